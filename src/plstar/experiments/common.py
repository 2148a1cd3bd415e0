"""Helpers shared by the experiments: problems (digits, Gaussian), networks, monitored GD, fits, axes.

Every experiment here runs in float64 on a seeded subset of the embedded digits, with inputs centred
and scaled to norm √d (THEORY.md, "Input scaling matters"), and NTK-parameterized tanh networks
(``plstar.models.mlp``). Other experiments may import this module; it holds no state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

import plstar
from plstar.data import Dataset, load_digits
from plstar.devices import HOST
from plstar.errors import PlstarInputError
from plstar.experiments.base import Check, Run, check_true
from plstar.functional import ProgressCallback
from plstar.models import describe_model, mlp

_Placeable = TypeVar("_Placeable", Tensor, nn.Module)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DTYPE = torch.float64
VARIANTS: tuple[str, ...] = ("linear", "nonlinear-output", "bottleneck")
"""Network families: NTK MLP with a linear output layer; the same with ``activation`` applied to
the output; and a width-1 bottleneck between two wide MLPs (f = g₂(tanh(g₁(x))))."""


DEVICE = HOST
"""Where the experiments of this process compute (``plstar reproduce --device``; set by
:func:`use_device`): their problems and networks are made on the host, then moved there."""


@contextlib.contextmanager
def use_device(device: torch.device) -> Iterator[None]:
    """Experiments run on ``device`` inside the block (this process only)."""
    global DEVICE
    previous, DEVICE = DEVICE, device
    try:
        yield
    finally:
        DEVICE = previous


def placed(value: _Placeable) -> _Placeable:
    """A tensor or module made on the host, moved to :data:`DEVICE`."""
    return value.to(DEVICE)  # type: ignore[return-value]


def digits_problem(n: int, seed: int, outputs: int = 1) -> Dataset:
    """n digits drawn with ``seed``, centred and scaled to norm √64 ("sphere"), float64, on
    :data:`DEVICE`.

    Shapes: x (n, 64); y (n, 1) ±1 parity for ``outputs=1``, (n, 10) centred one-hot for 10.
    """
    data = load_digits(n, outputs=outputs, seed=seed, scaling="sphere", dtype=DTYPE)
    return dataclasses.replace(data, x=placed(data.x), y=placed(data.y))


def network(
    variant: str, d: int, width: int, depth: int, k: int, seed: int, activation: str = "tanh"
) -> nn.Module:
    """An NTK-parameterized float64 network of the family ``variant`` (see ``VARIANTS``).

    "linear": ``mlp(d, width, depth, k)``; "nonlinear-output": the same followed by
    ``activation``; "bottleneck": ``mlp(d, width, depth, 1)`` → ``activation`` →
    ``mlp(1, width, depth, k)``, so every path goes through one scalar unit.
    Raises PlstarInputError for an unknown variant.
    """
    if variant not in VARIANTS:
        raise PlstarInputError(f"unknown network variant {variant!r}; choose one of {VARIANTS}")
    common = {"activation": activation, "generator_seed": seed, "dtype": DTYPE}
    if variant == "bottleneck":
        # Different seeds for the two halves, so that they do not share weights entry by entry.
        first = mlp(d, width, depth, 1, output_activation=activation, **common)
        second = mlp(1, width, depth, k, **{**common, "generator_seed": seed + 1_000_003})
        return placed(nn.Sequential(first, second))
    output = activation if variant == "nonlinear-output" else None
    return placed(mlp(d, width, depth, k, output_activation=output, **common))


def width_configurations(plan: dict[str, Any], seeds: int) -> list[dict[str, Any]]:
    """One GD configuration per (width, seed) of ``plan`` (widths, n, steps, every), depth 2."""
    return [
        {"width": width, "depth": 2, "n": plan["n"], "steps": plan["steps"],
         "every": plan["every"], "seed": seed}
        for width in plan["widths"] for seed in seeds_of(seeds)
    ]  # fmt: skip


def seeds_of(seeds: int) -> list[int]:
    """The seeds 0..seeds−1 an experiment runs (``configurations(quick, seeds)``)."""
    return list(range(seeds))


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than two distinct x or y ≤ 0)."""
    xs, ys = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if len(xs) < 2 or len(set(xs.tolist())) < 2 or not (np.all(xs > 0) and np.all(ys > 0)):
        return math.nan
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def late_rate(losses: Sequence[float]) -> float:
    """Per-step contraction over the last half: (L_T / L_{T/2})^{1/(T − T/2)} (NaN if L hit 0)."""
    half, last = len(losses) // 2, len(losses) - 1
    if last <= half or losses[half] <= 0 or losses[last] <= 0:
        return math.nan
    return math.exp((math.log(losses[last]) - math.log(losses[half])) / (last - half))


def thin(values: Sequence[float], points: int = 300) -> tuple[list[int], list[float]]:
    """(indices, values) of about ``points`` entries, evenly spaced and always keeping the last."""
    if len(values) <= points:
        return list(range(len(values))), [float(v) for v in values]
    index = sorted({*np.linspace(0, len(values) - 1, points).round().astype(int).tolist()})
    return index, [float(values[i]) for i in index]


def monitored_gd(
    config: dict[str, Any], progress: ProgressCallback | None = None
) -> tuple[plstar.TrainResult, plstar.Monitor, str]:
    """GD with the theory step η = 1/β from w₀ under a :class:`plstar.Monitor` on all samples.

    ``config``: n, width, depth, steps, every, seed (and optionally outputs, activation).
    Returns (train result, monitor, model description). Cost: ``steps`` full-batch gradient passes,
    plus every ``every`` steps the n·k × n·k kernel, its spectrum and two loss HVPs.
    """
    data = digits_problem(config["n"], config["seed"], config.get("outputs", 1))
    model = network(
        "linear", data.d, config["width"], config["depth"], data.k, config["seed"],
        config.get("activation", "tanh"),
    )  # fmt: skip
    monitor = plstar.Monitor(
        model, data.x, data.y, every=config["every"], kernel_samples=data.n, seed=config["seed"],
        progress=progress,
    )  # fmt: skip
    result = plstar.train(
        model, data.x, data.y, steps=config["steps"], monitor=monitor, seed=config["seed"],
        progress=progress,
    )  # fmt: skip
    return result, monitor, describe_model(model)


def gaussian_problem(n: int, d: int, k: int, seed: int) -> tuple[Tensor, Tensor, int]:
    """(x (n, d), y (n, k), model seed): x ~ N(0, I_d), y ~ N(0, I_k), float64, from ``seed``.

    The model seed is drawn from the same generator, so data and weights never share a stream.
    """
    generator = torch.Generator(device=HOST).manual_seed(seed)
    model_seed = int(torch.randint(2**62, (1,), generator=generator, device=HOST))
    x = torch.randn(n, d, generator=generator, dtype=torch.float64, device=HOST)
    y = torch.randn(n, k, generator=generator, dtype=torch.float64, device=HOST)
    return placed(x), placed(y), model_seed


def tanh_net(d: int, width: int, k: int, seed: int, depth: int = 2) -> nn.Module:
    """NTK-parameterized tanh MLP without biases, float64: m = (d + k)·width for depth 2; depth 1
    is the linear model x ↦ Wx/√d with m = d·k."""
    return placed(mlp(d, width, depth, k, bias=False, generator_seed=seed, dtype=torch.float64))


def parameter_count(model: nn.Module) -> int:
    """m: trainable parameters only."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finite(value: float) -> float | None:
    """``value``, or None where it is infinite (no bound), so that the data stay strict JSON."""
    return value if math.isfinite(value) else None


def first_below(losses: Sequence[float], level: float) -> int | None:
    """First t with losses[t] < level, or None."""
    return next((t for t, loss in enumerate(losses) if loss < level), None)


def all_hold(
    name: str, total: int, failures: list[str], detail: str, expected: str,
    control: bool = False,
) -> Check:  # fmt: skip
    """A check that a property holds for all ``total`` cases: measured "passed/total; detail",
    naming the ``failures``; fails when there is no case at all (``control``: see Check)."""
    measured = f"{total - len(failures)}/{total}" + (f"; {detail}" if detail else "")
    measured += f"; not: {', '.join(failures)}" if failures else ""
    return check_true(name, total > 0 and not failures, measured, expected, control)


def by_key(runs: Sequence[Run], key: str) -> dict[Any, list[Run]]:
    """Runs grouped by ``config[key]``, groups in ascending key order."""
    groups: dict[Any, list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.config[key]):
        groups.setdefault(run.config[key], []).append(run)
    return groups


def figure(
    columns: int = 1, *, rows: int = 1, width: float = 5.5, height: float = 4.2,
    title: str | None = None,
) -> tuple[Figure, list[Axes]]:  # fmt: skip
    """A constrained-layout Figure on an Agg canvas (never pyplot) and its axes, row-major."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    if title:
        fig.suptitle(title)
    return fig, axes


def width_colors(widths: Sequence[int]) -> dict[int, Any]:
    """One colour per width, from light (narrow) to dark (wide)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    span = max(1, len(widths) - 1)
    return {w: cmap(0.9 - 0.8 * i / span) for i, w in enumerate(sorted(widths))}


def reference_slope(
    ax: Axes, xs: Sequence[float], anchor: float, slope: float, label: str, style: str = ":"
) -> None:
    """A grey line of the given log-log slope through (min xs, anchor), for comparison."""
    lo, hi = min(xs), max(xs)
    ax.loglog([lo, hi], [anchor, anchor * (hi / lo) ** slope], style, color="grey", label=label)


def width_axis(ax: Axes, label: str = "width m") -> None:
    """Log base-2 x axis with ticks at the powers of two (widths are powers of two here)."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
