"""plstar.landscape, plstar.directions and ``plstar landscape``: float64 oracles and the command.

Loss values, ρ, λ_min(K) and θ_min(H_L) at grid points against direct computations (the model
moved by hand, dense Jacobians and Hessians); filter normalization against a hand computation;
the segment's end; the model left as it was; a resume that recomputes nothing; the command's
files, JSON, refusals and Ctrl-C; and loss-landscapes' values on the same directions and grid.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import dense_kernel, run_cli
from test_model_unchanged import assert_unchanged, snapshot
from torch import Tensor, nn
from torch.func import functional_call, hessian

import plstar
from plstar.certify import assign_parameters, flat_parameters, lambda_min_descent
from plstar.curvature import loss_hessian_min
from plstar.directions import Direction, filter_normalize, make_directions, segment_direction
from plstar.errors import PlstarInputError
from plstar.landscape import LandscapeGrid, landscape
from plstar.models import mlp

DEFAULT_DTYPE = torch.float64
# the module itself: the package's attribute plstar.landscape is the function of that name
landscape_module = importlib.import_module("plstar.landscape")


def _problem(seed: int = 3) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = mlp(5, 12, 2, 2, generator_seed=seed, dtype=torch.float64)
    return model, torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g)


def _moved(model: nn.Module, w: Tensor) -> nn.Module:
    """A copy of ``model`` at parameters ``w`` (the oracle never touches the measured model)."""
    moved = copy.deepcopy(model)
    assign_parameters(moved, w)
    return moved


def _loss_and_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Oracle: L = ½‖F − y‖² and ∇L by one plain reverse pass through the module."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = 0.5 * ((model(x) - y) ** 2).sum()
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def _dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Oracle: the m×m loss Hessian by torch.func.hessian over the flat parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]

    def loss(w: Tensor) -> Tensor:
        parts, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = math.prod(shape)
            parts[name] = w[start : start + size].reshape(shape)
            start += size
        return 0.5 * ((functional_call(model, parts, (x,)) - y) ** 2).sum()

    return hessian(loss)(flat_parameters(model))


def _grid(fine: int = 5, coarse: int = 3, dims: int = 2) -> LandscapeGrid:
    return LandscapeGrid.regular([(-0.5, 0.5)] * dims, fine, coarse)


# ----------------------------------------------------------------------------- oracles
def test_loss_and_pl_ratio_on_the_grid_equal_a_direct_computation() -> None:
    model, x, y = _problem()
    directions = make_directions(model, x, y, ["random", "gradient"], seed=1)
    found = landscape(model, x, y, directions, _grid(), hessian_steps=0)
    w = flat_parameters(model)
    assert len(found.loss_points) == 25 and found.computed == {"loss": 25, "kernel": 9}
    for point in found.loss_points.values():
        a, b = point.coords
        moved = _moved(model, w + a * directions[0].vector + b * directions[1].vector)
        loss, gradient = _loss_and_gradient(moved, x, y)
        assert point.loss == pytest.approx(loss, rel=1e-13)
        assert point.gradient_norm == pytest.approx(float(gradient.norm()), rel=1e-11)
        assert point.pl_ratio == pytest.approx(plstar.pl_ratio(moved, x, y), rel=1e-11)


def test_kernel_points_against_dense_kernels_and_hessians() -> None:
    model, x, y = _problem()
    directions = make_directions(model, x, y, ["random", "lambda-min"], seed=2)
    m = sum(p.numel() for p in model.parameters())
    # m Lanczos steps span the whole space: θ_min is then λ_min(H_L) itself
    found = landscape(model, x, y, directions, _grid(3, 3), hessian_steps=m)
    w = flat_parameters(model)
    for point in found.kernel_points.values():
        a, b = point.coords
        moved = _moved(model, w + a * directions[0].vector + b * directions[1].vector)
        exact = torch.linalg.eigvalsh(dense_kernel(moved, x))
        assert point.lambda_min == pytest.approx(float(exact[0]), rel=1e-9, abs=1e-12)
        assert point.lambda_max == pytest.approx(float(exact[-1]), rel=1e-11)
        assert point.lambda_min - point.lambda_min_error <= point.pl_ratio <= point.lambda_max
        bottom = float(torch.linalg.eigvalsh(_dense_hessian(moved, x, y))[0])
        assert point.hessian_min == pytest.approx(bottom, rel=1e-8, abs=1e-9)
        assert point.negative_curvature == (bottom < 0)
    assert found.origin is found.kernel_points["1,1"]  # the coarse grid holds w
    lambda0 = float(torch.linalg.eigvalsh(dense_kernel(model, x))[0])
    held = 0
    for point in found.kernel_points.values():
        a, b = point.coords
        moved = _moved(model, w + a * directions[0].vector + b * directions[1].vector)
        held += float(torch.linalg.eigvalsh(dense_kernel(moved, x))[0]) >= lambda0 / 2
    assert found.kernel_held(0.5) == held and found.kernel_held(0.0) == 9
    assert found.bracket_violations() == 0
    broken = copy.copy(found)  # ρ above λ_max at one point: the check must count it
    point = found.kernel_points["0,0"]
    broken.kernel_points = {
        **found.kernel_points,
        "0,0": dataclasses.replace(point, pl_ratio=2 * point.lambda_max),
    }
    assert broken.bracket_violations() == 1


def test_few_lanczos_steps_bound_the_smallest_hessian_eigenvalue_from_above() -> None:
    model, x, y = _problem()
    bottom = float(torch.linalg.eigvalsh(_dense_hessian(model, x, y))[0])
    assert bottom < 0  # a tanh network away from a minimum: L is not convex here
    previous = math.inf
    for steps in (1, 2, 4, 8):
        found = loss_hessian_min(model, x, y, steps=steps)
        assert bottom - 1e-10 <= found.value <= previous + 1e-10  # Rayleigh quotients
        previous = found.value
    warm = loss_hessian_min(model, x, y, steps=2, v0=loss_hessian_min(model, x, y, steps=30).vector)
    assert warm.value == pytest.approx(bottom, rel=1e-6)


def test_filter_normalization_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.ConvTranspose2d(3, 4, 2), nn.Flatten(), nn.LazyLinear(3),
        nn.LayerNorm(3),
    ).double()  # fmt: skip
    model(torch.zeros(1, 2, 4, 4))  # materialize the lazy layer
    with torch.no_grad():
        model[0].weight[1] = 0.0  # a dead filter
        model[3].bias.zero_()  # a zero bias (NTK layers start so)
    params = list(model.parameters())
    draw = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(4))
    draw[:8] = 0.0  # the draw's first filter is zero too
    for biases in ("zero", "scaled"):
        found = filter_normalize(model, draw, biases=biases)
        assert torch.isfinite(found).all()
        start = 0
        for p, axis in zip(params, (0, 0, 1, 1, 0, 0, 0, 0), strict=True):
            d = found[start : start + p.numel()].reshape(p.shape)
            r = draw[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
            if p.ndim >= 2:  # each output unit: the weight's norm, the draw's direction
                for unit in range(p.shape[axis]):
                    du, ru, wu = (t.select(axis, unit) for t in (d, r, p.detach()))
                    if float(wu.norm()) == 0 or float(ru.norm()) == 0:
                        assert float(du.norm()) == 0
                    else:
                        assert float(du.norm()) == pytest.approx(float(wu.norm()), rel=1e-14)
                        torch.testing.assert_close(du, ru * (wu.norm() / ru.norm()))
            elif biases == "zero" or float(p.detach().norm()) == 0:
                assert float(d.norm()) == 0  # 1-d: not moved (or nothing to scale to)
            else:  # 1-d, scaled: one group, the parameter's norm, the draw's direction
                torch.testing.assert_close(d, r * (p.detach().norm() / r.norm()))
    assert float(filter_normalize(model, draw)[:8].norm()) == 0


def test_directions_are_seeded_and_scaled() -> None:
    model, x, y = _problem()
    first = make_directions(model, x, y, ["random", "random"], seed=5)
    again = make_directions(model, x, y, ["random", "random"], seed=5)
    other = make_directions(model, x, y, ["random", "random"], seed=6)
    assert torch.equal(first[0].vector, again[0].vector)
    assert torch.equal(first[1].vector, again[1].vector)
    assert not torch.equal(first[0].vector, first[1].vector)
    assert not torch.equal(first[0].vector, other[0].vector)
    # the model drew its weights from manual_seed(3): a direction with seed 3 has its own stream
    (mine,) = make_directions(model, x, y, ["random"], seed=3)
    first = model[0].weight.detach().reshape(-1)
    assert abs(float(mine.vector[: first.numel()] @ first)) < 0.6 * float(first.norm()) ** 2
    w = flat_parameters(model)
    gradient, descent = make_directions(model, x, y, ["gradient", "lambda-min"])
    _, exact = _loss_and_gradient(model, x, y)
    torch.testing.assert_close(gradient.vector, -exact / exact.norm() * w.norm())
    torch.testing.assert_close(descent.vector, lambda_min_descent(model, x) * w.norm())


def test_the_segment_reaches_the_second_point_at_one() -> None:
    model, x, y = _problem(seed=3)
    end, _, _ = _problem(seed=4)
    w2 = flat_parameters(end)
    for target in (end, end.state_dict(), w2):
        torch.testing.assert_close(segment_direction(model, target), w2 - flat_parameters(model))
    directions = make_directions(model, x, y, ["segment"], target=end)
    grid = LandscapeGrid.regular([(-0.5, 2.0)], 11, 6)
    found = landscape(model, x, y, directions, grid, hessian_steps=0)
    at_end = found.loss_points["6"]  # -0.5 + 6·0.25 = 1
    assert at_end.coords == (1.0,)
    assert at_end.loss == pytest.approx(_loss_and_gradient(end, x, y)[0], rel=1e-13)
    with pytest.raises(PlstarInputError, match=r"'0\.weight' is missing"):
        segment_direction(model, {"2.weight": w2[:2]})
    with pytest.raises(PlstarInputError, match="needs the second point"):
        make_directions(model, x, y, ["segment", "random"])


def test_bad_arguments_are_refused() -> None:
    model, x, y = _problem()
    for kinds, says in ((["gradient", "gradient"], "spans a line"), ([], "one direction"),
                        (["random"] * 3, "one direction"), (["sideways"], "direction")):  # fmt: skip
        with pytest.raises(PlstarInputError, match=says):
            make_directions(model, x, y, kinds)
    directions = make_directions(model, x, y, ["random"])
    with pytest.raises(PlstarInputError, match="grid of 2 axes"):
        landscape(model, x, y, directions, _grid())
    for spans, points, coarse in (([(1.0, 0.0)], 5, 3), ([(0.0, 1.0)], 1, 3),
                                  ([(0.0, 1.0)], 5, 1)):  # fmt: skip
        with pytest.raises(PlstarInputError):
            LandscapeGrid.regular(spans, points, coarse)


# ----------------------------------------------------------------------------- the model, resume
def test_the_model_is_left_as_it_was_even_when_interrupted() -> None:
    model, x, y = _problem()
    directions = make_directions(model, x, y, ["random", "lambda-min"])
    before = snapshot(model)
    landscape(model, x, y, directions, _grid(), hessian_steps=2)
    assert_unchanged(before, model)

    def stop(phase: str, done: float, total: float) -> None:
        if phase == landscape_module.KERNEL_PHASE and done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        landscape(model, x, y, directions, _grid(), hessian_steps=2, progress=stop)
    assert_unchanged(before, model)


def test_a_resumed_slice_recomputes_nothing_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _problem()
    directions = make_directions(model, x, y, ["random", "random"])
    whole = landscape(model, x, y, directions, _grid(7, 4), hessian_steps=3)
    kept: dict[str, dict[str, Any]] = {"loss": {}, "kernel": {}}

    def keep(kind: str, points: list[Any]) -> None:
        from dataclasses import asdict

        kept[kind].update({landscape_module.point_key(p.index): asdict(p) for p in points})
        if kind == "kernel" and len(kept["kernel"]) == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(landscape_module, "MAX_POINTS_PER_BATCH", 10)
    with pytest.raises(KeyboardInterrupt):
        landscape(model, x, y, directions, _grid(7, 4), hessian_steps=3,
                  hessian_start=whole.hessian_start, on_points=keep)  # fmt: skip
    assert len(kept["loss"]) == 49 and len(kept["kernel"]) == 6
    kept["loss"] = dict(list(kept["loss"].items())[:30])  # as if stopped in the fine grid too
    calls = {"loss points": 0, "kernels": 0}
    batch, spectrum = landscape_module._loss_batch, landscape_module.kernel_spectrum

    def counted_batch(fmodel: Any, x: Tensor, y: Tensor, points: Tensor, rows: int) -> Any:
        calls["loss points"] += points.shape[0]
        return batch(fmodel, x, y, points, rows)

    def counted_spectrum(*args: Any, **kwargs: Any) -> Any:
        calls["kernels"] += 1
        return spectrum(*args, **kwargs)

    monkeypatch.setattr(landscape_module, "_loss_batch", counted_batch)
    monkeypatch.setattr(landscape_module, "kernel_spectrum", counted_spectrum)
    resumed = landscape(model, x, y, directions, _grid(7, 4), hessian_steps=3,
                        hessian_start=whole.hessian_start, known=kept)  # fmt: skip
    assert calls == {"loss points": 49 - 30, "kernels": 17 - 6}  # the 4×4 grid misses w: +1
    assert resumed.computed == {"loss": 19, "kernel": 11}
    for name in ("loss", "pl_ratio"):  # other batches of points: rounding may differ
        np.testing.assert_allclose(resumed.values(name), whole.values(name), rtol=1e-13)
    for name in ("lambda_min", "hessian_min"):  # one point at a time, from the same start
        np.testing.assert_array_equal(resumed.values(name), whole.values(name))
    assert resumed.origin == whole.origin


# ----------------------------------------------------------------------------- loss-landscapes
def test_loss_values_equal_those_of_loss_landscapes() -> None:
    """The peer's linear_interpolation and planar_interpolation on plstar's directions, with
    plstar's summed loss as its metric. Its plane walks in place, adding a step before each
    evaluation on even rows and subtracting one on odd rows: even rows sit one step further
    along the second direction than odd rows; the comparison follows where it evaluated."""
    ll = pytest.importorskip("loss_landscapes")
    from loss_landscapes.metrics import Loss

    model, x, y = _problem()
    u, v = (d.vector for d in make_directions(model, x, y, ["random", "random"], seed=7))
    w = flat_parameters(model)
    metric = Loss(lambda f, t: 0.5 * ((f - t) ** 2).sum(), x, y)
    steps = 6
    ends = [_moved(model, w + u), _moved(model, w + v)]
    start = copy.deepcopy(model)  # the peer moves its model and turns off requires_grad
    line = ll.linear_interpolation(start, ends[0], metric, steps=steps)
    ours = landscape(model, x, y, make_directions(model, x, y, ["random"], seed=7)[:1],
                     LandscapeGrid.regular([(0.0, 1.0)], steps + 1, 0))  # fmt: skip
    np.testing.assert_allclose(line, ours.values("loss")[1:], rtol=1e-12)
    plane = ll.planar_interpolation(copy.deepcopy(model), *ends, metric, steps=steps)
    directions = make_directions(model, x, y, ["random", "random"], seed=7)
    grid = LandscapeGrid.regular([(0.0, 1.0), (0.0, 1.0)], steps + 1, 0)
    ours2 = landscape(model, x, y, directions, grid).values("loss")
    for i in range(steps):
        shift = 1 if i % 2 == 0 else 0
        np.testing.assert_allclose(plane[i], ours2[i, shift : shift + steps], rtol=1e-12)


# ----------------------------------------------------------------------------- the command
TINY = ["-n", "8", "--width", "8", "--depth", "2", "--grid", "3", "--kernel-grid", "2",
        "--hessian-steps", "2"]  # fmt: skip


def test_cli_writes_the_points_the_figure_and_the_store(tmp_path: Path, capsys) -> None:
    out = tmp_path / "slice"
    assert run_cli(["landscape", *TINY, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {
        "landscape.json",
        "landscape.png",
        "points.json",
        "directions.npz",
    }
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "landscape.json").read_text())
    found = data["landscape"]
    assert [d["label"] for d in found["directions"]] == ["random 1", "random 2"]
    assert len(found["loss_points"]) == 9 and len(found["kernel_points"]) == 4
    assert found["origin"]["index"] == [] and found["origin"]["coords"] == [0.0, 0.0]
    assert data["config"]["grid"] == 3 and data["config"]["spans"] == [[-1.0, 1.0]] * 2
    assert "λ₀ = λ_min(K(w₀))" in capsys.readouterr().out
    # the same run, resumed: nothing left to compute, the same numbers
    assert run_cli(["landscape", *TINY, "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "landscape.json").read_text())["landscape"]
    assert again["computed"] == {"loss": 0, "kernel": 0}
    assert again["loss_points"] == found["loss_points"]


def test_cli_line_along_the_segment_to_a_saved_point(tmp_path: Path) -> None:
    from plstar.data import load_digits

    dataset = load_digits(8, dtype=torch.float64)
    end = mlp(64, 8, 2, 1, generator_seed=9, dtype=torch.float64)
    torch.save(end.state_dict(), tmp_path / "end.pt")
    out = tmp_path / "line"
    assert run_cli(["landscape", *TINY[:6], "--grid", "11", "--kernel-grid", "6",
                    "--directions", "segment", "--to", str(tmp_path / "end.pt"),
                    "--out", str(out)]) == 0  # fmt: skip
    found = json.loads((out / "landscape.json").read_text())["landscape"]
    at_end = next(p for p in found["loss_points"] if p["coords"] == [1.0])
    assert at_end["loss"] == pytest.approx(_loss_and_gradient(end, dataset.x, dataset.y)[0],
                                           rel=1e-12)  # fmt: skip
    assert (out / "landscape.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--directions", "random,bogus"], "expected one or two of"),
        (["--directions", "segment"], "needs --to"),
        (["--to", "end.pt"], "needs --to"),
        (["--directions", "segment", "--to", "missing.pt"], "no such file"),
        (["--directions", "segment", "--to", "end.pt"], "not a file of tensors"),
        (["--span=1:0"], "LOW < HIGH"),
        (["--span", "1,1,1"], "at most one span per axis"),
        (["--directions", "gradient", "--span", "1,2"], "2 ranges for 1 direction"),
        (["--kernel-grid", "1"], "at least 2"),
        (["--grid", "1"], "integer ≥ 2"),
        (["--directions", "gradient,gradient"], "spans a line"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, extra: list[str], says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "end.pt").write_text("not torch")
    assert run_cli(["landscape", *TINY, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_cli_ctrl_c_keeps_the_points_and_resume_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from plstar.cli.landscape_store import LandscapeStore

    out = tmp_path / "slice"
    add = LandscapeStore.add

    def add_then_stop(self: LandscapeStore, kind: str, points: list[Any]) -> None:
        add(self, kind, points)
        if kind == "kernel":
            raise KeyboardInterrupt

    monkeypatch.setattr(LandscapeStore, "add", add_then_stop)
    assert run_cli(["landscape", *TINY, "--out", str(out)]) == 130
    assert "run again with --resume" in capsys.readouterr().err
    stored = json.loads((out / "points.json").read_text())
    assert len(stored["loss"]) == 9 and len(stored["kernel"]) == 1
    monkeypatch.undo()
    assert run_cli(["landscape", *TINY, "--out", str(out), "--resume", "--grid", "5"]) == 2
    assert "another configuration (different grid)" in capsys.readouterr().err
    assert run_cli(["landscape", *TINY, "--out", str(out), "--resume"]) == 0
    found = json.loads((out / "landscape.json").read_text())["landscape"]
    # the 2×2 coarse grid misses w, measured first and stored before the stop
    assert found["computed"] == {"loss": 0, "kernel": 4}
    assert len(found["kernel_points"]) == 4 and found["origin"]["coords"] == [0.0, 0.0]


def test_direction_objects_round_trip_through_the_store(tmp_path: Path) -> None:
    from plstar.cli.landscape_store import LandscapeStore

    model, x, y = _problem()
    directions = make_directions(model, x, y, ["random", "gradient"])
    store = LandscapeStore(tmp_path, {"a": 1})
    store.start(directions, torch.ones(3))
    back, start = LandscapeStore(tmp_path, {"a": 1}).resume(torch.device("cpu"))  # type: ignore[misc]
    assert [d.label for d in back] == [d.label for d in directions]
    assert all(isinstance(d, Direction) and torch.equal(d.vector, e.vector)
               for d, e in zip(back, directions, strict=True))  # fmt: skip
    assert start is not None and torch.equal(start, torch.ones(3))
