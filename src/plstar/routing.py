"""Which modules the structured rules serve, and in which units.

A module with trainable parameters is served by its rule (:mod:`plstar.layer_rules`) unless the
rule does not support its options; modules that share a parameter (a tied embedding and output
head) form one unit, served through their rules' per-sample gradients summed per parameter, or
not at all. Everything else takes per-sample Jacobian rows (:mod:`plstar.structured`).
"""

from __future__ import annotations

from torch import nn

from plstar import layer_rules
from plstar.functional import FunctionalModel


def tied_units(modules: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """What the kernel is assembled from: each module alone, or the modules that share a
    parameter together (named "a+b"), in the order of ``modules``."""
    parent = {name: name for name in modules}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first: dict[int, str] = {}
    for name, module in modules.items():
        for p in module.parameters(recurse=False):
            if id(p) in first:
                parent[root(name)] = root(first[id(p)])
            else:
                first[id(p)] = name
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(root(name), []).append(name)
    return {"+".join(members): tuple(members) for members in groups.values()}


def rule_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(modules whose trainable parameters a rule covers, why the others' do not), by name.

    Modules that share a parameter (weights tied across modules, e.g. an embedding and the
    output head) are covered together, through their rules' per-sample gradients, or not at all.
    """
    chosen, reasons = {}, {}
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        why = layer_rules.unsupported(module)
        if why is None:
            chosen[name] = module
        else:
            reasons[name] = why
    return drop_partial_ties(model, chosen, reasons)


def drop_partial_ties(
    model: nn.Module, chosen: dict[str, nn.Module], reasons: dict[str, str]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``chosen`` without the modules that share a parameter with a module outside it, or whose
    rule gives no per-sample gradients for a shared parameter (their reasons added)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    chosen, reasons = dict(chosen), dict(reasons)
    changed = True
    while changed:
        changed = False
        for name, module in list(chosen.items()):
            for p in module.parameters(recurse=False):
                others = [o for o in owners[id(p)] if o != name]
                rule = layer_rules.rule_for(module)
                why = None
                if others and not layer_rules.gives_gradients(rule):
                    why = f"a parameter is shared with module {others[0]!r}, and the rule for "
                    why += f"{type(module).__name__} gives no per-sample gradients"
                elif any(o not in chosen for o in others):
                    outside = next(o for o in others if o not in chosen)
                    why = f"a parameter is shared with module {outside!r}, which takes rows"
                if why is not None:
                    reasons[name], changed = why, True
                    del chosen[name]
                    break
    return chosen, reasons


def unit_parameters(fmodel: FunctionalModel, modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """The trainable parameters (by their names in ``fmodel.params``) of each unit."""
    names = {id(p): name for name, p in fmodel.module.named_parameters() if p.requires_grad}
    units = {}
    for unit, members in tied_units(modules).items():
        found: list[str] = []
        for member in members:
            for p in modules[member].parameters(recurse=False):
                if id(p) in names and names[id(p)] not in found:
                    found.append(names[id(p)])
        units[unit] = found
    return units
