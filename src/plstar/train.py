"""GD and SGD with the step sizes the theory certifies, checked against the theory as they run.

* GD (THEORY.md item 2): η = 1/β with β = λ_max(H_L(w₀)); β is re-measured every
  ``recheck_every`` steps and η lowered to 1/β if it grew; if the loss ever rises, the run says
  so and halves η. The envelope is L_t ≤ (1 − μ/β)^t L₀.
* SGD (item 6, derived for the summed loss in docs/theory.md): batches of b samples drawn without
  replacement, update w ← w − η·(n/b)·Σ_batch ∇ℓ_i, step η*(b) = bμ/(λ(nβ_s + μ(b − 1))) with
  λ = β(w₀) and β_s the per-sample smoothness (:func:`per_sample_smoothness`); E L_t ≤ (1 − μη*)^t L₀.
* PL*_ε (item 7): the first step with L < ε, and the bound ⌊(β/μ) log(L₀/ε)⌋ + 1.

The training step itself is a plain autograd pass over the module (not the functional core): it is
the loop being measured, and must cost what a user's own loop costs.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from plstar import theory
from plstar.certify import flat_parameters
from plstar.conditions import json_safe
from plstar.curvature import LossGradient, flat, loss_sharpness, per_sample_smoothness
from plstar.devices import HOST, host_permutation
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, ProgressCallback, make_functional
from plstar.monitor import Monitor, Reference, reference_point
from plstar.validation import callback, choice, describe, real_number, whole_number
from plstar.validation import memory_budget as check_budget
from plstar.validation import seed as check_seed

Method = Literal["gd", "sgd"]
SGD_FAILURE_PROBABILITY = 0.05
"""δ of the SGD radius reported by ``train``: the path stays in B(w₀, R) with probability ≥ 1 − δ."""


@dataclass
class TrainResult:
    """What a run did and what the theory predicted for it (summed loss L = ½‖F − y‖²).

    ``rate``: the per-step contraction of the envelope (GD: of L_t; SGD: of E L_t), from w₀;
    ``radius``: the ball the theory keeps the path in (SGD: with probability 1 − δ, δ = 0.05);
    ``first_below_eps``: first step with L < ε (None if never); ``pl_eps_bound``: ⌊κ log(L₀/ε)⌋ + 1
    for GD at η = 1/β (item 7), else the step at which the envelope reaches ε (for SGD, in mean);
    ``losses``: L(w_t) over the full data for t = 0..steps (omitted from :meth:`to_dict`);
    ``events``: loss rises, step-size changes, divergence, interruption, in words.
    """

    method: str
    lr_mode: str
    steps: int
    steps_requested: int
    interrupted: bool
    n: int
    m: int
    batch_size: int
    loss0: float
    final_loss: float
    mu: float
    beta: float
    per_sample_smoothness: float | None
    step_size: float
    final_step_size: float
    rate: float
    radius: float
    saturation_batch_size: float | None
    eps: float
    first_below_eps: int | None
    pl_eps_bound: float
    max_distance: float
    max_envelope_ratio: float
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)
    events: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, without the per-step losses (they are in the monitor's history)."""
        out = {key: value for key, value in asdict(self).items() if key != "losses"}
        return json_safe(out)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: still a KeyboardInterrupt, carrying the run so far as ``result``."""

    def __init__(self, result: TrainResult) -> None:
        super().__init__("training interrupted")
        self.result = result


def check_arguments(
    method: str, steps: int, lr: str | float, batch_size: int | None, n: int, eps: float | None,
    recheck_every: int | None,
) -> int:  # fmt: skip
    """Validate :func:`train`'s arguments for n samples; return the batch size b (n for GD).

    Raises PlstarInputError naming the argument; cheap, so callers may check before any setup.
    """
    choice("method", method, ("gd", "sgd"))
    whole_number("steps", steps, minimum=1)
    if not (isinstance(lr, str) and lr == "theory"):
        if isinstance(lr, str | bool) or not isinstance(lr, numbers.Real):
            raise PlstarInputError(f"lr must be 'theory' or a number > 0, got {describe(lr)}")
        real_number("lr", lr, minimum=0.0, strict=True)
    if eps is not None:
        real_number("eps", eps, minimum=0.0, strict=True)
    if recheck_every is not None:
        whole_number("recheck_every", recheck_every, minimum=1)
    if method == "gd":
        if batch_size is not None and not (_is_integer(batch_size) and int(batch_size) == n):
            raise PlstarInputError(
                f"batch_size applies to method='sgd'; GD uses all n = {n} samples"
            )
        return n
    b = min(n, 32) if batch_size is None else batch_size
    if not _is_integer(b) or not 1 <= int(b) <= n:
        raise PlstarInputError(
            f"batch_size must be an integer in 1..n = {n}, got {describe(batch_size)}"
        )
    return int(b)


def _is_integer(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _unflat(vector: Tensor, like: list[Tensor]) -> list[Tensor]:
    sizes = [p.numel() for p in like]
    return [v.reshape(p.shape).to(p.dtype) for v, p in zip(vector.split(sizes), like, strict=True)]


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    method: Method = "gd",
    steps: int = 200,
    lr: str | float = "theory",
    batch_size: int | None = None,
    monitor: Monitor | None = None,
    eps: float | None = None,
    recheck_every: int | None = None,
    hessian_outputs: int | None = 4,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    output: OutputSelector | None = None,
) -> TrainResult:
    """Train ``model`` in place on L = ½‖F − y‖² (summed) with the theory's step size, and compare.

    ``lr="theory"``: GD η = 1/β(w₀), SGD η*(b) (module docstring); a number: that step, never
    changed (the rate and radius are then those of the descent lemma for it, or SGD's ρ(η)).
    ``batch_size`` (SGD only, default min(n, 32)): samples per step, drawn without replacement.
    ``monitor``: a :class:`Monitor` created on the same model right before; its w₀ measurements
    are reused and it records every step. ``eps``: PL*_ε target (default 1e-6·L₀).
    ``recheck_every``: GD steps between re-measurements of β (default: the monitor's ``every``,
    else 100). Ctrl-C raises :class:`TrainingInterrupted` carrying the result so far; the model
    keeps the last parameters reached. Cost per step: GD one forward and reverse pass over all
    samples; SGD one over b samples plus a forward pass over all (L(w_t)), or a full gradient pass
    when a monitor records ρ. Setup: :func:`reference_point`, and for SGD
    :func:`per_sample_smoothness`. ``output`` picks F from what the model returns (see
    :func:`plstar.tangent_kernel`; a monitor must have been made with the same). Raises
    PlstarInputError for an unknown method, steps < 1, lr ≤ 0, batch_size outside 1..n (or given
    for GD), eps ≤ 0, or a monitor for other parameters or another output.
    """
    seed, memory_budget = check_seed(seed), check_budget(memory_budget)
    if hessian_outputs is not None:
        hessian_outputs = whole_number("hessian_outputs (None for all)", hessian_outputs, minimum=1)
    callback("progress", progress)
    if monitor is not None and not isinstance(monitor, Monitor):
        raise PlstarInputError(f"monitor must be a plstar.Monitor, got {type(monitor).__name__}")
    fmodel = make_functional(model, x, memory_budget=memory_budget, output=output)
    output = fmodel.select
    n, m = x.shape[0], fmodel.m
    b = check_arguments(method, steps, lr, batch_size, n, eps, recheck_every)
    objective = LossGradient(model, x, y, memory_budget=memory_budget, output=output)
    if monitor is not None:
        monitor.check_start(model, x, objective.y, output)
    if objective.loss() == 0.0:
        return _at_global_minimum(method, lr, steps, n, m, b, monitor)
    if monitor is not None:
        ref: Reference = monitor.reference
    else:
        ref = reference_point(model, x, objective.y, seed=seed, memory_budget=memory_budget,
                              progress=progress, output=output)  # fmt: skip
    mu, beta, loss0 = ref.mu, ref.beta, ref.loss0
    theory_lr = lr == "theory"
    if theory_lr and beta <= 0:
        raise PlstarInputError(
            f"β(w₀) = {beta:.3g} ≤ 0 (L is locally concave): 1/β is no step; pass lr"
        )
    beta_s: float | None = None
    saturation: float | None = None
    if method == "gd":
        eta = theory.gd_step_size(beta) if theory_lr else float(lr)
        rate, radius = (
            theory.gd_rate_for_step(eta, beta, mu),
            theory.gd_radius_for_step(eta, beta, mu, loss0),
        )
    else:
        beta_s = per_sample_smoothness(model, x, objective.y, hessian_outputs=hessian_outputs,
                                       seed=seed, memory_budget=memory_budget, output=output)  # fmt: skip
        if theory_lr and mu <= 0:
            raise PlstarInputError(
                "λ_min(K(w₀)) is zero within precision: no SGD step is certified; pass lr"
            )
        sgd = {"per_sample_smoothness": beta_s, "loss_smoothness": beta, "pl_constant": mu,
               "n_samples": n, "batch_size": b}  # fmt: skip
        eta = theory.sgd_step_size(**sgd) if theory_lr else float(lr)
        rate = theory.sgd_rate(**sgd, step_size=None if theory_lr else eta)
        radius = theory.sgd_radius(
            per_sample_smoothness=beta_s, pl_constant=mu, loss0=loss0, n_samples=n,
            failure_probability=SGD_FAILURE_PROBABILITY,
        ) if theory_lr else math.nan  # fmt: skip
        saturation = theory.sgd_saturation_batch_size(
            per_sample_smoothness=beta_s, pl_constant=mu, n_samples=n
        )
    if monitor is not None:
        monitor.rate, monitor.radius = rate, radius
    target = eps if eps is not None else 1e-6 * loss0
    result = TrainResult(
        method=method, lr_mode="theory" if theory_lr else "fixed", steps=0, steps_requested=steps,
        interrupted=False, n=n, m=m, batch_size=b, loss0=loss0, final_loss=loss0, mu=mu, beta=beta,
        per_sample_smoothness=beta_s, step_size=eta, final_step_size=eta, rate=rate, radius=radius,
        saturation_batch_size=saturation, eps=target,
        first_below_eps=0 if loss0 < target else None,
        pl_eps_bound=theory.pl_eps_first_passage_bound(beta, mu, loss0, target)
        if method == "gd" and theory_lr else theory.steps_to_loss(loss0, target, rate),
        max_distance=0.0, max_envelope_ratio=1.0, seconds=0.0, losses=[loss0],
    )  # fmt: skip
    started = time.perf_counter()
    try:
        _loop(
            result, objective, ref, monitor, theory_lr, recheck_every, seed, memory_budget, progress
        )
    except KeyboardInterrupt:
        result.interrupted = True
        result.events.append(f"interrupted (Ctrl-C) after step {result.steps}")
    result.seconds = time.perf_counter() - started
    result.final_loss = result.losses[-1]
    result.max_envelope_ratio = envelope_ratio(result.losses, rate)
    result.verdict = _verdict(result)
    if result.interrupted:
        raise TrainingInterrupted(result)
    return result


def _at_global_minimum(
    method: str, lr: str | float, steps: int, n: int, m: int, b: int, monitor: Monitor | None
) -> TrainResult:
    """The run that starts where L = 0: no step (∇L = 0), said so in the verdict."""
    mu = beta = math.nan
    if monitor is not None:
        mu, beta = monitor.reference.mu, monitor.reference.beta
    return TrainResult(
        method=method, lr_mode="theory" if lr == "theory" else "fixed", steps=0,
        steps_requested=steps, interrupted=False, n=n, m=m, batch_size=b, loss0=0.0,
        final_loss=0.0, mu=mu, beta=beta, per_sample_smoothness=None, step_size=0.0,
        final_step_size=0.0, rate=math.nan, radius=0.0, saturation_batch_size=None, eps=0.0,
        first_below_eps=0, pl_eps_bound=0.0, max_distance=0.0, max_envelope_ratio=math.nan,
        seconds=0.0, losses=[0.0],
        verdict=["L(w₀) = 0: the model interpolates y at w₀, a global minimum of L; ∇L(w₀) = 0, "
                 "so no step was taken and there is nothing to train."],
    )  # fmt: skip


def _loop(
    result: TrainResult, objective: LossGradient, ref: Reference, monitor: Monitor | None,
    theory_lr: bool, recheck_every: int | None, seed: int, memory_budget: int | None,
    progress: ProgressCallback | None,
) -> None:  # fmt: skip
    """The steps; updates ``result`` in place after each, so an interruption loses nothing."""
    gd, n, b = result.method == "gd", result.n, result.batch_size
    params, w0 = objective.params, flat_parameters(objective.model)
    generator = torch.Generator(device=HOST).manual_seed(seed)
    grads = _unflat(ref.gradient0, params) if gd else []
    recheck = recheck_every or (monitor.every if monitor is not None else 100)
    beta_now, warm = ref.beta, ref.beta_vector
    counts = {"L rose": 0, "β grew": 0}

    def note(kind: str, text: str) -> None:  # the first 5 of each kind; a long run stays readable
        counts[kind] += 1
        if counts[kind] <= 5:
            result.events.append(text)

    # Round-off in a sum of n squares: rises smaller than this are not rises.
    tolerance = 100 * float(torch.finfo(params[0].dtype).eps)
    eta = result.step_size
    for step in range(1, result.steps_requested + 1):
        if gd:
            direction = grads
        else:
            _, direction = objective(host_permutation(n, generator, w0.device)[:b])
            torch._foreach_mul_(direction, n / b)  # g = (n/b) Σ_batch ∇ℓ_i, unbiased for ∇L
        with torch.no_grad():  # one fused call: Ctrl-C cannot land between two parameters
            torch._foreach_add_(params, direction, alpha=-eta)
        record = None
        if gd:
            loss, grads = objective()
            if monitor is not None:
                record = monitor.step(loss=loss, gradient=flat(grads), step_size=eta)
        elif monitor is not None:
            record = monitor.step(step_size=eta)
            loss = record.loss
        else:
            loss = objective.loss()
        previous = result.losses[-1]
        result.losses.append(loss)
        result.steps = step
        distance = (
            record.distance
            if record is not None
            else float((flat_parameters(objective.model) - w0).double().norm())
        )
        result.max_distance = max(result.max_distance, distance)
        if progress is not None:
            progress("train", step, result.steps_requested)
        if not math.isfinite(loss):
            result.events.append(f"step {step}: L = {loss}: diverged, stopped")
            break
        if result.first_below_eps is None and loss < result.eps:
            result.first_below_eps = step
        if gd and loss > previous * (1 + tolerance):
            eta = eta / 2 if theory_lr else eta
            change = f"η halved to {eta:.4g}" if theory_lr else "η kept (fixed lr)"
            note("L rose", f"step {step}: L rose from {previous:.6g} to {loss:.6g}; {change}")
        if gd and theory_lr and step % recheck == 0:
            if record is not None and record.sharpness is not None:
                found = record.sharpness
            else:
                estimate = loss_sharpness(objective.model, objective.x, objective.y, v0=warm, tol=1e-4,
                                          max_iter=2, seed=seed, memory_budget=memory_budget,
                                          output=objective.output)  # fmt: skip
                found, warm = estimate.value, estimate.vector
            if found > beta_now * (1 + 1e-3) and 1 / found < eta:
                eta = 1 / found
                note(
                    "β grew",
                    f"step {step}: β re-measured {found:.5g} > {beta_now:.5g}; η = {eta:.4g}",
                )
            beta_now = max(beta_now, found)
        result.final_step_size = eta
    result.events += [f"{kind}: {c} times in all" for kind, c in counts.items() if c > 5]


def envelope_ratio(losses: list[float], rate: float) -> float:
    """max over t ≥ 1 of L_t / (rate^t·L₀): ≤ 1 means the run stayed under the envelope.

    In logs, since rate^t underflows; t = 0 is 1 by definition and is left out so that "≤ 1" is
    not trivially met. NaN without a rate in (0, 1), with L₀ ≤ 0 or with no step; inf when a loss
    is not finite.
    """
    if not 0 < rate < 1 or len(losses) < 2 or losses[0] <= 0:
        return math.nan
    log0, log_rate = math.log(losses[0]), math.log(rate)
    worst = max(
        (math.log(loss) - log0 - t * log_rate if loss > 0 else -math.inf)
        if math.isfinite(loss) else math.inf
        for t, loss in enumerate(losses[1:], start=1)
    )  # fmt: skip
    return math.exp(worst) if worst < math.inf else math.inf


def _verdict(r: TrainResult) -> list[str]:
    """The run against the theory, in words."""
    what = "GD" if r.method == "gd" else f"SGD (b = {r.batch_size})"
    how = "theory" if r.lr_mode == "theory" else "fixed"
    lines = [f"{what}, η = {r.step_size:.4g} ({how}), {r.steps} of {r.steps_requested} steps: "
             f"L from {r.loss0:.4g} to {r.final_loss:.4g}."]  # fmt: skip
    if r.rate >= 1.0:
        lines.append("No rate is guaranteed (μ = 0, or η too large for the measured β).")
    else:
        mean = "" if r.method == "gd" else "E "
        inside = "within it" if r.max_envelope_ratio <= 1 + 1e-9 else "ABOVE it at some step"
        lines.append(
            f"Envelope from w₀: {mean}L_t ≤ {r.rate:.8g}^t·L₀; max L_t/envelope = "
            f"{r.max_envelope_ratio:.3g} ({inside}"
            + ("; one run of SGD may exceed a bound on the mean)." if r.method == "sgd" else ").")
        )
    reached = (f"first reached at step {r.first_below_eps}" if r.first_below_eps is not None
               else f"not reached in {r.steps} steps")  # fmt: skip
    bound = ("bound ⌊κ log(L₀/ε)⌋ + 1 =" if r.method == "gd" and r.lr_mode == "theory"
             else f"the envelope{' (a mean)' if r.method == 'sgd' else ''} reaches ε at step")  # fmt: skip
    lines.append(f"PL*_ε: L < ε = {r.eps:.3g} {reached}; {bound} {r.pl_eps_bound:.4g}.")
    radius = "none derived for this step" if math.isnan(r.radius) else f"R = {r.radius:.4g}"
    lines.append(f"max ‖w_t − w₀‖ = {r.max_distance:.4g}; theory's radius: {radius}.")
    if r.method == "sgd" and r.saturation_batch_size is not None:
        lines.append(
            f"η*(b) scales linearly with b up to b* = 1 + nβ_s/μ = {r.saturation_batch_size:.4g}."
        )
    return lines
