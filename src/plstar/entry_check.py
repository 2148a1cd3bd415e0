"""The entry check of the structured kernel: its entries against plain gradients, per module.

Hooks cannot see a parameter used outside its module's forward, and the layer rules assume that
samples do not interact. Before a structured kernel is used, three of its entries on the probe's
two samples are compared with ∇f_a(x_i)·∇f_b(x_j) — for the whole kernel and for each hooked
module's share — so a disagreement names its module. Under "auto" that module gets Jacobian
rows; when "structured" was demanded the message names it and the likely cause.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plstar import factors as algebra
from plstar import layer_rules
from plstar.errors import PlstarInputError
from plstar.factors import Factor
from plstar.functional import FunctionalModel
from plstar.structured import Probe, probe, tied_units


@dataclass(frozen=True)
class EntryCheck:
    """Largest relative errors of three structured kernel entries against ∇f_a(x_i)·∇f_b(x_j):
    of the whole kernel, and of each unit's share of it (:func:`plstar.structured.tied_units`
    name -> error: a module, or modules that share a parameter)."""

    total: float
    units: dict[str, float]


def entry_check(fmodel: FunctionalModel, x: Tensor, found: Probe) -> EntryCheck:
    """Three kernel entries of the probe, whole and module by module, against plain gradients.

    Hooks cannot see a parameter used outside its module's forward, and the layer rules assume
    that samples do not interact; this catches both, and names the module, at the cost of one
    forward and two reverse passes over the probe's two samples.
    """
    k, pair = fmodel.k, x[: found.samples]
    picks = [(0, 0), (pair.shape[0] - 1, k - 1)]
    params = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
    with torch.enable_grad():  # one reverse pass per pick: vmapped ones loop inside convolutions
        out = fmodel(params, pair)
        parts = [
            torch.autograd.grad(out[i, a], list(params.values()), retain_graph=True,
                                allow_unused=True)
            for i, a in picks
        ]  # fmt: skip
    grads = {
        name: torch.stack([
            torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g[j] is None
            else g[j].reshape(-1).double()
            for g in parts
        ])
        for j, (name, p) in enumerate(params.items())
    }  # fmt: skip

    rows = [i * k + a for i, a in picks]

    def entries(factors: list[Factor]) -> Tensor:
        """The factors' kernel restricted to the picks' rows: (2, 2)."""
        return sum(algebra.contract_factors(_restrict(f, rows, k), _restrict(f, rows, k), 1)
                   for f in factors)  # type: ignore[return-value]  # fmt: skip

    def error(kernel: Tensor, names: list[str], floor: float) -> float:
        exact = sum(grads[n] @ grads[n].T for n in names)  # (2, 2): the picks' products
        worst = 0.0
        for u, v in [(0, 0), (1, 1), (0, 1)]:
            scale = math.sqrt(float(exact[u, u]) * float(exact[v, v]))
            miss = abs(float(kernel[u, v]) - float(exact[u, v]))
            worst = max(worst, miss / max(scale, floor, 1e-300))
        return worst

    # the covered parameters together (fallback rows are Jacobian rows: exact by construction;
    # broadcast parameters' rows come from the recording, so they are checked with the rest)
    covered = [name for names in found.units.values() for name in names] + [*found.broadcast]
    total = error(entries(found.features.factors), covered, 0.0) if covered else 0.0
    floor = 1e-12 * math.sqrt(float(sum(g[0] @ g[0] for g in grads.values())))
    units = {
        name: 0.0 if not made else error(entries(made), found.units[name], floor)
        for name, made in found.per_unit.items()
    }
    return EntryCheck(total, units)


def _restrict(factor: Factor, rows: list[int], k: int) -> Factor:
    """A factor cut down to some of its rows (i·k + a), each as a sample with one output."""
    kind, first, second = factor
    if kind == "rows":
        return kind, first[rows], None
    assert second is not None
    return kind, first[[r // k for r in rows]], second[rows]


# Models whose routing passed the entry check, with the signature it was checked for: the check
# is structural (which parameters the hooks see), so repeated calls skip it.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _signature(fmodel: FunctionalModel, x: Tensor) -> tuple:
    # Not the output selector: which modules go to rows is structural (a module that does not
    # reach F has zero entries in both the rule's kernel and the plain gradients').
    shapes = tuple((name, tuple(p.shape), p.dtype) for name, p in fmodel.params.items())
    return shapes, tuple(x.shape[1:]), x.dtype, fmodel.k, layer_rules.generation()


# Probes made under "auto" to size the structured plan, without their tensors: a repeated call
# that chooses another implementation does not probe again.
_SIZED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def sized_probe(fmodel: FunctionalModel, x: Tensor, memory_budget: int) -> tuple[Probe, bool]:
    """(a probe that sizes the structured plan, whether it holds its tensors). Remembered per
    model and signature without its tensors: the entry check needs a fresh one."""
    cached = _SIZED.get(fmodel.module)
    if cached is not None and cached[0] == _signature(fmodel, x):
        return cached[1].bound(fmodel.module, cached[2]), False
    found = probe(fmodel, x, memory_budget=memory_budget)
    _SIZED[fmodel.module] = (_signature(fmodel, x), found.stripped(fmodel.k), tuple(found.modules))
    return found, True


def remembered_probe(fmodel: FunctionalModel, x: Tensor) -> Probe | None:
    """The probe that passed the entry check for this model, parameter shapes, sample shape,
    dtype and k, if any (without its tensors, :meth:`Probe.stripped`): no pass at all."""
    cached = _VERIFIED.get(fmodel.module)
    if cached is None or cached[0] != _signature(fmodel, x):
        return None
    return cached[1].bound(fmodel.module, cached[2])


def verified_probe(
    fmodel: FunctionalModel,
    x: Tensor,
    *,
    strict: bool,
    found: Probe | None = None,
    memory_budget: int = 2**30,
) -> Probe | None:
    """The probe whose structured kernel agrees with plain gradients, or None.

    A module whose entries disagree gets Jacobian rows (and the probe is made again); with
    ``strict`` ("structured" was demanded) it raises PlstarInputError naming the module and the
    likely cause instead. None (strict: PlstarInputError) when the whole kernel still disagrees.
    ``found``: the probe already made on x, checked rather than made again; returned as it is
    when it passes. ``memory_budget`` bounds the probe's activations. A model that passed for the same parameter shapes, sample shape, dtype and k
    is not probed or checked again (:func:`remembered_probe`).
    """
    tolerance = 1e3 * float(torch.finfo(fmodel.dtype).eps)
    remembered = remembered_probe(fmodel, x)
    if remembered is not None:
        return remembered
    found = probe(fmodel, x, memory_budget=memory_budget) if found is None else found
    check = entry_check(fmodel, x, found)
    members = tied_units(found.modules)
    bad = {name: e for name, e in check.units.items() if e > tolerance}
    if bad and strict:
        unit, worst = max(bad.items(), key=lambda item: item[1])
        kinds = ", ".join(type(found.modules[name]).__name__ for name in members[unit])
        which = " and ".join(repr(name) for name in members[unit])
        raise PlstarInputError(
            f"the structured rule of module {which} ({kinds}) disagrees with plain gradients "
            f"(relative error {worst:.1e}): its parameters are likely used outside its module's "
            "forward (read by other code, or tied by hand); use implementation='auto' (Jacobian "
            "rows for that module) or 'jacobian'"
        )
    if bad:
        why = "its kernel entries disagree with plain gradients (relative error {:.1e})"
        dropped = {name: why.format(e) for unit, e in bad.items() for name in members[unit]}
        modules = {n: m for n, m in found.modules.items() if n not in dropped}
        found = probe(fmodel, x, (modules, {**found.rows_reasons, **dropped}), memory_budget)
        check = entry_check(fmodel, x, found)
    if max(check.total, *check.units.values(), 0.0) > tolerance:
        if strict:
            raise PlstarInputError(
                f"the structured kernel disagrees with plain gradients (relative error "
                f"{check.total:.1e}) though each module's rule agrees: samples interact or a "
                "parameter is used outside its module's forward; use implementation='jacobian'"
            )
        return None
    # names, not modules: a value that held the model itself would keep its weak key alive
    signature = _signature(fmodel, x)
    _VERIFIED[fmodel.module] = (signature, found.stripped(fmodel.k), tuple(found.modules))
    return found
