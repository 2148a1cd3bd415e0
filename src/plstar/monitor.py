"""Watch the PL* picture along any training path: a :class:`Monitor` for user loops and ``train``.

At every step a record holds L(w_t), the PL ratio ρ(w_t) = ‖∇L‖²/(2L), the distance ‖w_t − w₀‖ and
the envelope rate^t·L₀ predicted at w₀ (rate = 1 − μ/β for GD, THEORY.md item 2). Every ``every``
steps it adds the extremes of the tangent kernel on a fixed subsample, the relative drift
‖K_t − K₀‖_F/‖K₀‖_F on that subsample, and the sharpness λ_max(H_L(w_t)) by a few Lanczos steps
warm-started from the previous top vector. Subsample caveat: by Cauchy interlacing, λ_min of a
principal submatrix is ≥ λ_min of the full K, so the recorded λ_min is an upper bound on the full one
unless the subsample is the whole data set; μ for the envelope is always from the full K(w₀).

A caller that records only every few of its own steps (a trainer callback) passes the trainer's
step index, ``step(at_step=t)``: the envelope is then rate^t·L₀ at that t, and the kernel is
measured whenever t crosses a multiple of ``every``. ``tensorboard=`` writes every record as
TensorBoard scalars (:mod:`plstar.tensorboard_log`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from plstar import theory
from plstar.certify import flat_parameters, kernel_spectrum, lambda_min_within_precision
from plstar.conditions import json_safe
from plstar.curvature import loss_gradient, loss_sharpness
from plstar.devices import HOST, host_permutation
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, ProgressCallback, check_targets, make_functional
from plstar.kernel import tangent_kernel
from plstar.spectrum import Spectrum, spectrum
from plstar.tensorboard_log import TensorBoardLog
from plstar.validation import callback, real_number, whole_number
from plstar.validation import memory_budget as check_budget
from plstar.validation import seed as check_seed

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


@dataclass(frozen=True)
class Reference:
    """What the theory needs at w₀: L₀, ∇L₀ (m,) float64, μ = λ_min(K(w₀)) over the full data
    (0 when zero within precision), β = λ_max(H_L(w₀)) with its Lanczos error and Ritz vector."""

    loss0: float
    gradient0: Tensor = field(repr=False)
    mu: float
    beta: float
    beta_error: float
    beta_vector: Tensor | None = field(default=None, repr=False)
    kernel: Spectrum | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the scalars and the kernel spectrum (no vectors)."""
        return json_safe({
            "loss0": self.loss0, "mu": self.mu, "beta": self.beta, "beta_error": self.beta_error,
            "kernel": None if self.kernel is None else self.kernel.to_dict(),
        })  # fmt: skip


def reference_point(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    mu: float | None = None,
    beta: float | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    output: OutputSelector | None = None,
) -> Reference:
    """L₀, ∇L₀, μ and β at the current parameters (μ, β measured unless given).

    Cost: one gradient; the full kernel and its spectrum (see :func:`plstar.certify.kernel_spectrum`)
    unless ``mu`` is given; a Lanczos run on loss HVPs warm-started from ∇L₀ (which lies in the span
    of the Gauss–Newton directions DFᵀr) unless ``beta`` is given.
    """
    common = {"memory_budget": memory_budget, "output": output}
    loss0, gradient0 = loss_gradient(model, x, y, **common)
    kernel = None
    if mu is None:
        kernel = kernel_spectrum(model, x, seed=seed, **common)
        mu = theory.pl_constant(lambda_min_within_precision(kernel))
        if progress is not None:
            progress("kernel at w₀", 1, 1)
    vector = gradient0 if float(gradient0.norm()) > 0 else None
    beta_error = 0.0
    if beta is None:
        found = loss_sharpness(model, x, y, v0=vector, seed=seed, **common)
        beta, beta_error, vector = found.value, found.error_bound, found.vector
        if progress is not None:
            progress("sharpness at w₀", 1, 1)
    return Reference(loss0, gradient0, float(mu), float(beta), beta_error, vector, kernel)


LOGGED_FIELDS = (
    "loss", "pl_ratio", "distance", "envelope", "lambda_min", "lambda_max", "drift", "sharpness",
)  # fmt: skip
"""The Record fields that loggers receive (TensorBoard, trainer callbacks) as ``plstar/<field>``."""


@dataclass
class Record:
    """One monitored step. Shapes are scalars; None where not measured at this step.

    ``lambda_min``/``lambda_max``: extremes of K(w_t) on the fixed subsample (λ_min 0 when zero
    within precision); ``drift``:
    ‖K_t − K₀‖_F/‖K₀‖_F there; ``sharpness``: λ_max(H_L(w_t)) (a Ritz value: never above the truth,
    ``sharpness_error`` bounds its distance to an eigenvalue); ``seconds``: wall time since w₀.
    """

    step: int
    loss: float
    pl_ratio: float
    distance: float
    envelope: float
    seconds: float
    step_size: float | None = None
    lambda_min: float | None = None
    lambda_max: float | None = None
    drift: float | None = None
    sharpness: float | None = None
    sharpness_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers as strings)."""
        return json_safe(asdict(self))

    def scalars(self, prefix: str = "plstar/") -> dict[str, float]:
        """``{prefix + field: value}`` for the :data:`LOGGED_FIELDS` measured at this step (the
        kernel and sharpness fields only every ``every`` steps); what loggers receive."""
        values = {name: getattr(self, name) for name in LOGGED_FIELDS}
        return {prefix + name: float(value) for name, value in values.items() if value is not None}


class Monitor:
    """Records the PL* picture along a training path; usable in any loop.

    ``monitor = Monitor(model, x, y)`` before training (this fixes w₀ and measures L₀, μ, β and
    the subsample kernel K₀), then ``monitor.step()`` after each ``optimizer.step()``. Inside
    :func:`plstar.train` the loss and gradient of the step are passed in, so the per-step part
    costs nothing but a parameter-vector norm.
    Cost per ``step()`` without a gradient passed: one forward and reverse pass over (x, y). Every
    ``every`` steps: the kernel of ``kernel_samples`` samples, its eigenvalues, and at most
    ``sharpness_iterations`` loss HVPs. ``mu``/``beta`` (the envelope's constants) are measured at
    w₀ over the full data unless given; ``rate`` defaults to GD's 1 − μ/β and ``radius`` to the GD
    theorem's R — both are public attributes (``train`` sets SGD's). ``on_record`` is called with
    each new record (the CLI appends it to metrics.jsonl). ``output`` picks F from what the model
    returns (see :func:`plstar.tangent_kernel`). ``tensorboard``: a folder or a ``SummaryWriter``
    that receives every record's scalars as ``plstar/<field>`` at global step ``record.step``;
    :meth:`close` adds the four-panel figure and flushes (needs ``pip install
    "plstar[tensorboard]"``, imported only then).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        every: int = 100,
        kernel_samples: int = 256,
        sharpness: bool = True,
        sharpness_iterations: int = 2,
        mu: float | None = None,
        beta: float | None = None,
        seed: int = 0,
        memory_budget: int | None = None,
        on_record: Callable[[Record], None] | None = None,
        progress: ProgressCallback | None = None,
        output: OutputSelector | None = None,
        tensorboard: str | Path | SummaryWriter | None = None,
    ) -> None:
        for name, value in (("every", every), ("kernel_samples", kernel_samples),
                            ("sharpness_iterations", sharpness_iterations)):  # fmt: skip
            whole_number(name, value, minimum=1)
        mu = None if mu is None else real_number("mu", mu, minimum=0.0)
        beta = None if beta is None else real_number("beta", beta, minimum=0.0)
        seed, memory_budget = check_seed(seed), check_budget(memory_budget)
        callback("on_record", on_record)
        callback("progress", progress)
        # Checked (the package, the folder) before any measurement; the writer opens at step 0.
        self.tensorboard = None if tensorboard is None else TensorBoardLog(tensorboard)
        started = time.perf_counter()
        fmodel = make_functional(model, x, memory_budget=memory_budget, output=output)
        self.model, self.x, self.y = model, x, check_targets(fmodel, x, y)
        self.output = fmodel.select
        self.n, self.k, self.m = x.shape[0], fmodel.k, fmodel.m
        self.every, self.sharpness = every, sharpness
        self.sharpness_iterations, self.seed = sharpness_iterations, seed
        self.memory_budget, self.on_record = memory_budget, on_record
        self.w0 = flat_parameters(model)
        # A fixed subsample, so that K_t is compared with K₀ entry by entry along the path.
        if self.n <= kernel_samples:
            self.subsample = torch.arange(self.n, device=x.device)
        else:
            generator = torch.Generator(device=HOST).manual_seed(seed)
            chosen = host_permutation(self.n, generator, x.device)[:kernel_samples]
            self.subsample = chosen.sort()[0]
        # one tensor for every record, so the model's data check is remembered for it
        self._kernel_x = x[self.subsample]
        self._kernel0 = tangent_kernel(
            model, self._kernel_x, memory_budget=memory_budget, output=self.output
        )
        self._kernel0_norm = float(torch.linalg.matrix_norm(self._kernel0))
        whole = len(self.subsample) == self.n
        if mu is None and whole:  # the subsample is the data: K₀ already gives μ
            full = spectrum(self._kernel0, input_precision=float(torch.finfo(fmodel.dtype).eps))
            mu = theory.pl_constant(lambda_min_within_precision(full))
        measured = time.perf_counter()
        self.reference = reference_point(
            model, x, self.y, mu=mu, beta=beta, seed=seed, memory_budget=memory_budget,
            progress=progress, output=self.output,
        )  # fmt: skip
        # What training needs anyway (train reuses it); not counted as the monitor's overhead.
        self.reference_seconds = time.perf_counter() - measured
        self.mu, self.beta = self.reference.mu, self.reference.beta
        self.rate = theory.gd_rate(self.beta, self.mu)
        self.radius = theory.gd_radius(self.beta, self.mu, self.reference.loss0)
        self._warm = self.reference.beta_vector
        self.history: list[Record] = []
        self.overhead_seconds = 0.0
        self._started = started
        self._record(0, self.reference.loss0, self.reference.gradient0, None)
        self.overhead_seconds = time.perf_counter() - started - self.reference_seconds

    @property
    def steps(self) -> int:
        """Index of the last recorded step (0 right after construction)."""
        return self.history[-1].step

    def check_start(
        self, model: nn.Module, x: Tensor, y: Tensor, output: OutputSelector | None = None
    ) -> None:
        """Refuse (PlstarInputError) to watch a run of another model, other data (x, and y as
        (n, k)) or another output selection, or one that does not start at this monitor's w₀:
        its envelope, μ and β would belong to another problem."""
        if model is not self.model:
            raise PlstarInputError("the monitor watches another model: create it on this one")
        if output is not self.output:
            raise PlstarInputError(
                "the monitor was created with another output= than the one trained on; create "
                "it with the same output"
            )
        for name, mine, theirs in (("x", self.x, x), ("y", self.y, y)):
            same = mine is theirs or (
                mine.shape == theirs.shape
                and mine.dtype == theirs.dtype
                and bool(torch.equal(mine, theirs))
            )
            if not same:
                raise PlstarInputError(
                    f"the monitor was created with another {name} than the one trained on; "
                    f"create it with the same (x, y)"
                )
        if self.steps != 0 or not torch.equal(flat_parameters(model), self.w0):
            raise PlstarInputError(
                "the monitor must start at the current parameters: create it right before training"
            )

    def step(
        self,
        *,
        loss: float | None = None,
        gradient: Tensor | None = None,
        step_size: float | None = None,
        at_step: int | None = None,
    ) -> Record:
        """Record the state at the model's current parameters as step ``at_step``.

        ``at_step``: the index of the training step this record belongs to, counted from w₀
        (default: the previous record's step + 1). A trainer callback that records every N of its
        steps passes its own step, so that the envelope rate^t·L₀ is taken at the right t and the
        kernel is measured whenever t crosses a multiple of ``every``. ``loss`` and ``gradient``
        ((m,), in the order of the model's trainable parameters) may be passed when already
        computed at these parameters; otherwise one gradient pass is made. Raises
        PlstarInputError for an ``at_step`` that is not an integer above the previous record's.
        """
        if at_step is None:
            at_step = self.steps + 1
        elif whole_number("at_step", at_step, minimum=0) <= self.steps:
            raise PlstarInputError(
                f"at_step must increase: {at_step} follows the record of step {self.steps}; pass "
                "the index of a later training step"
            )
        started = time.perf_counter()
        if loss is None or gradient is None:
            loss, gradient = loss_gradient(
                self.model, self.x, self.y, memory_budget=self.memory_budget, output=self.output
            )
        record = self._record(int(at_step), float(loss), gradient, step_size)
        self.overhead_seconds += time.perf_counter() - started
        return record

    def _record(self, step: int, loss: float, gradient: Tensor, step_size: float | None) -> Record:
        g = gradient.double()
        rho = float(g @ g) / (2.0 * loss) if loss > 0 else math.nan
        distance = float((flat_parameters(self.model) - self.w0).double().norm())
        record = Record(
            step=step, loss=loss, pl_ratio=rho, distance=distance,
            envelope=self.reference.loss0 * self.rate**step,
            seconds=time.perf_counter() - self._started, step_size=step_size,
        )  # fmt: skip
        # A multiple of `every` lies in (previous step, step]: with consecutive steps, step % every == 0.
        previous = self.history[-1].step if self.history else -1
        if step // self.every > previous // self.every:
            self._measure_kernel(record)
        self.history.append(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.on_record is not None:
            self.on_record(record)
        return record

    def _measure_kernel(self, record: Record) -> None:
        kernel = tangent_kernel(
            self.model, self._kernel_x, memory_budget=self.memory_budget, output=self.output
        )
        eps = float(torch.finfo(self.w0.dtype).eps)
        found = spectrum(kernel, input_precision=eps)
        record.lambda_min, record.lambda_max = lambda_min_within_precision(found), found.lambda_max
        drift = float(torch.linalg.matrix_norm(kernel - self._kernel0))
        record.drift = drift / self._kernel0_norm if self._kernel0_norm > 0 else math.nan
        if self.sharpness and record.step == 0:  # β(w₀) was just measured for the envelope
            record.sharpness = self.reference.beta
            record.sharpness_error = self.reference.beta_error
        elif self.sharpness:
            estimate = loss_sharpness(
                self.model, self.x, self.y, v0=self._warm, tol=1e-4,
                max_iter=self.sharpness_iterations, seed=self.seed, memory_budget=self.memory_budget,
                output=self.output,
            )  # fmt: skip
            record.sharpness, record.sharpness_error = estimate.value, estimate.error_bound
            self._warm = estimate.vector

    def to_dict(self) -> dict[str, Any]:
        """Reference values at w₀, settings and the history, JSON-ready."""
        return json_safe({
            "reference": self.reference.to_dict() | {"rate": self.rate, "radius": self.radius},
            "settings": {"every": self.every, "kernel_samples": len(self.subsample), "n": self.n,
                         "k": self.k, "m": self.m, "sharpness": self.sharpness},
            "overhead_seconds": self.overhead_seconds,
            "reference_seconds": self.reference_seconds,
            "history": [r.to_dict() for r in self.history],
        })  # fmt: skip

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically to ``path``."""
        from plstar.report import write_json

        return write_json(path, self.to_dict())

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save the four-panel training figure (see :func:`plstar.plots.plot_training`) as PNG."""
        from plstar.plots import plot_training

        return plot_training(self.history, path, **self._figure_options(title))

    def close(self, *, title: str | None = None) -> None:
        """End the TensorBoard log, if any: add the four-panel figure as an image at the last
        step, flush, close a writer the monitor opened. Idempotent; the records stay usable, and a
        later ``step()`` writes on (into a new event file in the same folder).
        ``with Monitor(...) as monitor:`` calls it at the end of the block."""
        if self.tensorboard is not None:
            self.tensorboard.close(self.history, self._figure_options(title))

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _figure_options(self, title: str | None) -> dict[str, Any]:
        return {"mu": self.mu, "radius": self.radius, "title": title,
                "subsample": len(self.subsample), "n": self.n}  # fmt: skip
