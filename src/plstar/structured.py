"""Structured tangent kernels: per-layer Gram matrices instead of Jacobians.

After Novak, Sohl-Dickstein & Schoenholz, *Fast Finite Width Neural Tangent Kernel* (ICML 2022,
arXiv 2206.08720). For a dense layer z = W a (+ b) the contribution of W to K is a Hadamard
product of two Gram matrices, K_W[(i,a),(j,b)] = (a_i · a_j)(δ_ia · δ_jb), with a_i the layer
input and δ_ia = ∂f_a(x_i)/∂z_i the output cotangent: n²(d_in + k² d_out) flops instead of
n² k² d_in d_out, and the Jacobian is never formed. The layer rules are in
:mod:`plstar.layer_rules`; this module records what they need and decides, module by module,
where they apply.

Recording (:mod:`plstar.recording`): forward hooks on about √k copies of the samples and reverse
sweeps over the retained graph, safe against in-place operations after a hooked layer. A module
called on a tensor shared by all samples (first dimension 1, e.g. position embeddings indexed by
a (1, T) tensor) has its output expanded to the batch, so its cotangents are per sample.
Parameters no module owns but the forward broadcasts over the batch (a class token, a position
embedding) get their per-sample gradients from the same sweeps
(:mod:`plstar.broadcast_parameters`).

Per-layer fallback: a module whose rule cannot apply on this input — no per-sample layout, a
subclass whose output is not the one its rule assumes, never called by the forward (its
parameters are then used by another module), or, under "auto", kernel entries that disagree
with plain gradients — gets per-sample Jacobian rows for its parameters alone; the rest of the
model stays structured. :class:`Probe` records which parameters went to rows and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from plstar import factors as algebra
from plstar import layer_rules
from plstar.broadcast_parameters import broadcast_parameters, broadcast_rows
from plstar.costs import activation_bytes_per_sample
from plstar.errors import PlstarInputError
from plstar.factors import Factor
from plstar.functional import FunctionalModel, jacobian_matrix
from plstar.recording import Recording, SharedOutputError, record
from plstar.routing import drop_partial_ties, rule_modules, tied_units, unit_parameters

__all__ = [
    "BlockFeatures", "Footprint", "NotPerSampleError", "Probe", "add_pulled_features",
    "block_features", "contract_blocks", "probe", "pull_features", "push_features",
    "rule_modules", "split_parameters", "tied_units", "unit_factors",
]  # fmt: skip


class NotPerSampleError(PlstarInputError):
    """A hooked module's calls on a later sample block differ from those on the first samples
    (not batch-first, or not made): its use depends on the data."""


def _tied_rows(
    modules: dict[str, nn.Module], members: tuple[str, ...], uses: dict, k: int
) -> list[Factor]:
    """Per-sample gradients of modules that share parameters, summed per parameter: "rows"."""
    grads: dict[int, Tensor] = {}
    for name in members:
        module = modules[name]
        made = layer_rules.rule_for(module).gradients(module, uses[name], k)  # type: ignore[union-attr]
        for attribute, grad in made.items():
            key = id(getattr(module, attribute))
            grads[key] = grad if key not in grads else grads[key] + grad
    return [("rows", grad.reshape(grad.shape[0], -1), None) for grad in grads.values()]


def unit_factors(
    recording: Recording, modules: dict[str, nn.Module], k: int, dtype: torch.dtype
) -> dict[str, list[Factor]]:
    """Each called unit's factors (:func:`tied_units` name -> factors), cast to ``dtype`` (token
    ids kept)."""
    usable = [call for call in recording.calls if call.problem is None]
    uses: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for call, cot in zip(usable, recording.cotangents, strict=True):
        uses.setdefault(call.name, []).append((call.inputs, cot.transpose(0, 1).detach()))
    found = {}
    for unit, members in tied_units(modules).items():
        if not all(name in uses for name in members):
            continue
        if len(members) == 1:
            made = layer_rules.layer_factors(modules[unit], uses[unit], k)
        else:
            made = _tied_rows(modules, members, uses, k)
        found[unit] = [
            (kind, first if kind == "tokens" else first.to(dtype),
             None if second is None else second.to(dtype))
            for kind, first, second in made
        ]  # fmt: skip
    return found


@dataclass
class BlockFeatures:
    """Everything one block of samples contributes: per-layer factors and fallback Jacobian rows."""

    factors: list[Factor]
    rows: Tensor | None  # (c·k, m_fallback): Jacobian rows of the parameters without a rule


def fallback_rows(
    fmodel: FunctionalModel, x: Tensor, fallback: list[str], dtype: torch.dtype
) -> Tensor | None:
    """Jacobian rows (c·k, Σ numel) of the parameters in ``fallback`` (None when empty)."""
    if not fallback:
        return None
    return jacobian_matrix(fmodel, x, dtype, fallback)


def block_features(
    fmodel: FunctionalModel,
    x: Tensor,
    modules: dict[str, nn.Module],
    fallback: list[str],
    dtype: torch.dtype,
    broadcast: tuple[str, ...] = (),
) -> BlockFeatures:
    """Layer inputs and output cotangents of a block of samples, cast to ``dtype``.

    One forward pass with hooks over about √k copies of the block, then reverse sweeps giving
    δ_ia for every recorded call (:func:`plstar.recording.record`); a second forward pass
    only when an in-place operation changed a recorded tensor of a module not yet known for it.
    Parameters in ``broadcast`` get their per-sample gradients from the same reverse sweeps
    (:func:`plstar.recording.record`), those in ``fallback`` Jacobian rows by vmap(jacrev).
    Raises NotPerSampleError when a module of ``modules`` is not called batch-first, or not
    called at all, on this block (the probe of the first samples found it was).
    """
    recording = record(fmodel, x, modules, broadcast=broadcast)
    bad = next((call for call in recording.calls if call.problem is not None), None)
    if bad is not None:
        raise NotPerSampleError(
            f"module {bad.name!r} is called differently on later samples: {bad.problem}; use "
            "implementation='jacobian'"
        )
    per_unit = unit_factors(recording, modules, fmodel.k, dtype)
    missing = [name for name in tied_units(modules) if name not in per_unit]
    if missing:
        raise NotPerSampleError(
            f"module {missing[0]!r} is not called on samples where it was called before: its "
            "use depends on the data; use implementation='jacobian'"
        )
    made = [f for each in per_unit.values() for f in each] + broadcast_rows(recording, dtype)
    return BlockFeatures(algebra.merge_rows(made), fallback_rows(fmodel, x, fallback, dtype))


def contract_blocks(left: BlockFeatures, right: BlockFeatures, k: int) -> Tensor:
    """K block between two sample blocks: Σ over layers of their Gram contributions."""
    total: Tensor | None = None
    for first, second in zip(left.factors, right.factors, strict=True):
        part = algebra.contract_factors(first, second, k)
        total = part if total is None else total + part
    if left.rows is not None and right.rows is not None:
        part = algebra.row_products(left.rows, right.rows)
        total = part if total is None else total + part
    assert total is not None
    return total


def _factors(features: BlockFeatures) -> list[Factor]:
    rows = [] if features.rows is None else [("rows", features.rows, None)]
    return [*features.factors, *rows]


def pull_features(features: BlockFeatures, v: Tensor, k: int) -> list[Tensor]:
    """DFᵀv of one sample block, one parameter-space tensor per factor; v (c·k, b)."""
    return [algebra.pull_factor(f, v, k) for f in _factors(features)]


def add_pulled_features(
    total: list[Tensor] | None, part: list[Tensor], features: BlockFeatures
) -> list[Tensor]:
    """Sum of :func:`pull_features` over sample blocks."""
    if total is None:
        return part
    kinds = [f[0] for f in _factors(features)]
    return [algebra.add_pulled(t, p, kind) for t, p, kind in zip(total, part, kinds, strict=True)]


def push_features(features: BlockFeatures, pulled: list[Tensor], k: int) -> Tensor:
    """DF·g of one sample block for g from summed :func:`pull_features`: (c·k, b)."""
    parts = [algebra.push_factor(f, g, k) for f, g in zip(_factors(features), pulled, strict=True)]
    return torch.stack(parts).sum(dim=0)


def split_parameters(fmodel: FunctionalModel) -> tuple[dict[str, nn.Module], list[str]]:
    """(rule modules, names of trainable parameters left to Jacobian rows), before any probe."""
    modules = rule_modules(fmodel.module)[0]
    covered = {p for names in unit_parameters(fmodel, modules).values() for p in names}
    return modules, [name for name in fmodel.params if name not in covered]


@dataclass(frozen=True)
class Footprint:
    """The sizes a plan needs from a probe, kept when its tensors are dropped: per sample, the
    features' floating elements and other bytes (token ids); the most temporary elements per
    row sample of contracting a Gram or tokens factor; the contraction's multiply-adds per sample
    pair by factor kind; the width of the fallback Jacobian rows."""

    float_elements: float
    other_bytes: float
    contraction_elements: int
    flops: dict[str, int]
    fallback_width: int

    @classmethod
    def of(cls, features: BlockFeatures, samples: int, k: int, fallback: int = 0) -> Footprint:
        """Measured on ``features`` of ``samples`` samples, plus ``fallback`` parameters' rows
        when the features hold none."""
        if features.rows is not None:
            fallback = features.rows.shape[1]
        tensors = [t for f in features.factors for t in f[1:] if t is not None]
        floats = sum(t.numel() for t in tensors if t.is_floating_point()) / samples
        other = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())
        contraction = max(
            (algebra.position_pair_elements(f[1].shape[1], k, f[2].shape[2])
             for f in features.factors if f[2] is not None),
            default=0,
        )  # fmt: skip
        flops = {
            kind: algebra.flops_per_pair(features.factors, k, (kind,))
            for kind in ("gram", "tokens", "rows")
        }
        flops["rows"] += k * k * fallback
        return cls(floats + k * fallback, other / samples, contraction, flops, fallback)


@dataclass(frozen=True)
class Probe:
    """The structured features of the first two samples (float64), once every module the rules
    cannot serve went to Jacobian rows: they size the plan and serve the entry check, so both
    cost a few small forward and reverse passes.

    ``rows_reasons`` says, per module whose parameters take Jacobian rows, why; ``fallback``
    lists every parameter that takes them; ``broadcast`` those that no module owns but the
    forward broadcasts over the batch, whose per-sample gradients the recording gives;
    ``per_unit`` holds each unit's factors (:func:`tied_units`) and ``units`` its parameters;
    ``footprint`` the sizes, which outlive the tensors (:meth:`stripped`).
    """

    features: BlockFeatures
    samples: int
    modules: dict[str, nn.Module]
    fallback: list[str]
    rows_reasons: dict[str, str] = field(default_factory=dict)
    per_unit: dict[str, list[Factor]] = field(default_factory=dict)
    units: dict[str, list[str]] = field(default_factory=dict)
    footprint: Footprint | None = None
    broadcast: tuple[str, ...] = ()

    def bytes(self, dtype: torch.dtype, k: int) -> tuple[int, int]:
        """(bytes of one sample's features in ``dtype``, bytes of the contraction's temporaries
        per row sample)."""
        size = self.sizes(k)
        itemsize = dtype.itemsize
        per_row = size.contraction_elements * itemsize
        return int(size.float_elements * itemsize + size.other_bytes), per_row

    def flops_per_pair(self, k: int, kinds: tuple[str, ...] = ("gram", "tokens", "rows")) -> int:
        """Multiply-adds per sample pair of the contraction (for comparison with k²·m), of the
        factors of ``kinds`` ("rows" are one GEMM; "gram" and "tokens" sum over positions)."""
        return sum(self.sizes(k).flops[kind] for kind in kinds)

    def sizes(self, k: int) -> Footprint:
        """The footprint (computed from the features unless remembered)."""
        return self.footprint or Footprint.of(self.features, self.samples, k)

    def stripped(self, k: int) -> Probe:
        """This probe without its tensors and modules (its sizes kept), to be remembered between
        calls; :meth:`bound` puts the modules back."""
        return replace(
            self, features=BlockFeatures([], None), modules={}, per_unit={},
            footprint=self.sizes(k),
        )  # fmt: skip

    def bound(self, model: nn.Module, names: tuple[str, ...]) -> Probe:
        """This probe with the modules ``names`` of ``model`` (in the model's order)."""
        return replace(self, modules={n: m for n, m in model.named_modules() if n in names})


Routing = tuple[dict[str, nn.Module], dict[str, str]]
_PROBE_BUDGET = 2**30  # bytes of activations a probe holds at a time, unless told
"""(modules the rules serve, why each other module with parameters takes Jacobian rows)."""


def _problems(
    fmodel: FunctionalModel, pair: Tensor, modules: dict[str, nn.Module], outputs: int
) -> tuple[dict[str, str], dict[str, list[Factor]]]:
    """(module -> why its rule cannot serve it here, the others' factors in float64)."""
    try:
        recording = record(fmodel, pair, modules, outputs)
    except SharedOutputError as error:
        why = "its output, shared by all samples, cannot be expanded to the batch"
        return dict.fromkeys(error.names, why), {}
    problems = {call.name: call.problem for call in recording.calls if call.problem}
    called = {call.name for call in recording.calls}
    for name in modules.keys() - called:
        problems[name] = "the forward never calls it (its parameters are used by another module)"
    if any(call.shared for call in recording.calls):
        with torch.no_grad():
            plain = fmodel.pick(fmodel.module(pair)).reshape(recording.out.shape)
        if not layer_rules.output_close(plain, recording.out.detach()):
            why = "expanding its output, shared by all samples, to the batch changes F"
            problems.update({call.name: why for call in recording.calls if call.shared})
    with torch.no_grad():
        for call in recording.calls:
            if call.name in problems:
                continue
            try:
                expected = layer_rules.rule_for(call.module).reference(call.module, call.inputs)
            except Exception:  # any failure means the rule does not fit this call
                expected = None
            if not layer_rules.output_close(expected, call.output.detach()[: pair.shape[0]]):
                problems[call.name] = (
                    f"its output is not the one the rule for {type(call.module).__name__} "
                    "assumes (a subclass whose forward computes something else, or an in-place "
                    "change plstar did not see)"
                )
    made: dict[str, list[Factor]] = {}
    for members in tied_units(modules).values():
        if any(name in problems for name in members):
            continue
        try:
            part = {name: modules[name] for name in members}
            made |= unit_factors(recording, part, fmodel.k, torch.float64)
        except Exception as error:  # a rule that fails on this input cannot serve the module
            why = f"its rule failed on this input ({type(error).__name__}: {error})"
            problems.update(dict.fromkeys(members, why))
    return problems, made


def probe(
    fmodel: FunctionalModel,
    x: Tensor,
    routing: Routing | None = None,
    memory_budget: int = _PROBE_BUDGET,
) -> Probe:
    """Features of x[:2] in float64, after routing every module the rules cannot serve to
    Jacobian rows (starting from ``routing``, default every module with a supported rule).

    Cost: a hooked forward pass and reverse sweeps over two samples per round (the outputs in
    groups whose copies' activations fit ``memory_budget``); a second round only when a module
    had to leave the hooked set; one more recording (and two samples' Jacobian rows) for the
    parameters that no module owns (:func:`plstar.broadcast_parameters.broadcast_parameters`).
    The fallback parameters' Jacobian rows are sized (:class:`Footprint`), not computed.
    """
    modules, reasons = rule_modules(fmodel.module) if routing is None else routing
    modules, reasons = dict(modules), dict(reasons)
    pair = x[: min(2, x.shape[0])]
    # outputs per pass, so that the copies' activations stay within the budget (a pass holds
    # at most as many copies as it has outputs)
    per_copy = 2 * pair.shape[0] * activation_bytes_per_sample(fmodel, pair)
    outputs = max(1, memory_budget // per_copy)
    while True:
        problems, per_unit = _problems(fmodel, pair, modules, outputs)
        if not problems:
            break
        for name, why in problems.items():
            modules.pop(name, None)
            reasons[name] = why
        modules, reasons = drop_partial_ties(fmodel.module, modules, reasons)
    units = unit_parameters(fmodel, modules)
    covered = {p for names in units.values() for p in names}
    unowned = [name for name in fmodel.params if name not in covered]
    broadcast, rows = broadcast_parameters(fmodel, pair, unowned, outputs)
    fallback = [name for name in unowned if name not in broadcast]
    # a module whose own parameters all ride on the recording takes no rows after all
    served = {name.rpartition(".")[0] for name in broadcast}
    left = {name.rpartition(".")[0] for name in fallback}
    reasons = {m: why for m, why in reasons.items() if m not in served or m in left}
    made = [f for each in per_unit.values() for f in each] + rows
    features = BlockFeatures(algebra.merge_rows(made), None)  # fallback rows: sized, not computed
    width = sum(fmodel.params[name].numel() for name in fallback)
    size = Footprint.of(features, pair.shape[0], fmodel.k, width)
    return Probe(
        features, pair.shape[0], modules, fallback, reasons, per_unit, units, size, broadcast
    )
