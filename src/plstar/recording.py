"""Recording what the structured rules need: every call of the hooked modules, and cotangents.

Forward hooks take every call's input and output over r ≈ √k stacked copies of the samples;
reverse sweeps over the retained graph, each seeding r outputs (output a on copy a), give every
output's cotangents δ[a, i] = ∂f_a(x_i)/∂z_i. What the hooks hold must not change before the
reverse sweeps: when an in-place operation after a hooked layer (``ReLU(inplace=True)``, ``out +=
identity``) bumps the version counter of a recorded tensor, the block is recorded again with
that module's input copied and its output handed on as a copy — the recorded output keeps its
place in the graph, the in-place operation changes the copy — and the module is remembered, so
later blocks copy from the start. A model without in-place operations copies nothing.

A module whose rule decomposes it (``nn.MultiheadAttention``: its parameters act inside its
forward, out of the hooks' reach) is recorded through the rule's inner map: the hook recomputes
its output through that map and hands the recomputed output on, so the map's output is in the
graph and gets cotangents.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from plstar.devices import HOST
from plstar.functional import FunctionalModel
from plstar.layer_rules import rule_for


class SharedOutputError(RuntimeError):
    """The forward failed once outputs shared by all samples were expanded to the batch."""

    def __init__(self, names: set[str]) -> None:
        super().__init__(f"expanding the shared outputs of {sorted(names)} broke the forward")
        self.names = names


# Modules after which an in-place operation changed a recorded tensor: their input is copied and
# their output handed on as a copy from the first call on (weakly held: the model may go).
_IN_PLACE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class LayerCall:
    """One call of a hooked module: its input (c, ...) and its output (kept in the graph).

    ``versions`` are the version counters of input and output at the call (None when copies
    were taken); ``shared`` marks a call on a tensor shared by all samples, expanded to the
    batch; ``problem`` says why the call cannot serve the module's rule.
    """

    name: str
    module: nn.Module
    inputs: Tensor
    output: Tensor
    versions: tuple[int, int] | None = None
    shared: bool = False
    problem: str | None = None

    def changed(self) -> bool:
        """Whether an in-place operation changed the input or output after the call."""
        return self.versions is not None and self.versions != (
            self.inputs._version,
            self.output._version,
        )


def _first_tensor(args: tuple, kwargs: dict) -> object:
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


@contextmanager
def record_calls(
    modules: dict[str, nn.Module], batch: int, copies: int = 1
) -> Iterator[list[LayerCall]]:
    """Forward hooks that record every call of the given modules (name -> module), in call
    order, on ``copies`` stacked copies of a batch of ``batch`` samples (inputs are kept for the
    first copy only)."""
    calls: list[LayerCall] = []
    names = {id(m): name for name, m in modules.items()}
    decomposing = {id(m) for m in modules.values() if getattr(rule_for(m), "decomposes", False)}
    rows = batch * copies

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        name, a, replaced = names[id(module)], _first_tensor(args, kwargs), None
        if id(module) in decomposing:  # record its inner map: (a, z), and hand on its output
            try:
                made = rule_for(module).decompose(module, args, kwargs, output)  # type: ignore[union-attr]
            except Exception as error:  # a call the rule cannot recompute: rows for this module
                made = f"its rule could not recompute the call ({type(error).__name__}: {error})"
            if isinstance(made, str):
                empty = torch.empty(0, device=HOST)  # a placeholder: no data, nowhere to follow
                calls.append(LayerCall(name, module, empty, empty, problem=made))
                return None
            a, output, replaced = made
        if not isinstance(a, Tensor) or not isinstance(output, Tensor):
            empty = torch.empty(0, device=HOST)
            calls.append(LayerCall(name, module, empty, empty, problem="it is not called on a "
                                   "tensor and returning one"))  # fmt: skip
            return None
        handed_on, shared = None, rows > 1 and a.shape[:1] == output.shape[:1] == (1,)
        if shared:  # the same input for every sample: per-sample cotangents need a batch
            a = a.expand(rows, *a.shape[1:])
            output = handed_on = output.expand(rows, *output.shape[1:])
        problem = None
        if a.shape[:1] != (rows,) or output.shape[:1] != (rows,):
            problem = (
                f"it does not see the batch as its first dimension (input {tuple(a.shape)}, "
                f"output {tuple(output.shape)}, batch {rows})"
            )
        if module in _IN_PLACE:
            kept = a[:batch].detach().clone()
            calls.append(LayerCall(name, module, kept, output, None, shared, problem))
            # later in-place operations change the copy (a decomposed output is never handed on)
            return replaced if replaced is not None else output.clone()
        versions = (a._version, output._version)
        calls.append(LayerCall(name, module, a[:batch].detach(), output, versions, shared, problem))
        return replaced if replaced is not None else handed_on

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Recording:
    """One forward pass with hooks: F of the block (c, k), the calls, the cotangents of the
    usable calls' outputs, each (k, c, ...) with [a, i] = ∂f_a(x_i)/∂z_i, and the per-sample
    gradients of the broadcast parameters, each (k, c, *shape[1:]) with [a, i] = ∂f_a(x_i)/∂p."""

    out: Tensor
    calls: list[LayerCall]
    cotangents: list[Tensor] = field(default_factory=list)
    parameter_grads: dict[str, Tensor] = field(default_factory=dict)


def record(
    fmodel: FunctionalModel,
    x: Tensor,
    modules: dict[str, nn.Module],
    outputs_per_pass: int | None = None,
    broadcast: tuple[str, ...] = (),
) -> Recording:
    """Forward pass over :func:`replicas` stacked copies of x with hooks on ``modules``, then
    reverse sweeps over the retained graph, each seeding output a on copy a: every cotangent of
    every output.

    Copies rather than a vmapped reverse pass (``is_grads_batched``): torch 2.13 loops over the
    seeds inside the batched backward of convolutions and normalisations (measured 3-9× slower
    on a ResNet-18 and an MLP-Mixer), while copies run every kernel on a larger batch; about √k
    copies and √k sweeps balance the repeated forward pass against each sweep's overhead.
    Memory: the activations of that many copies and the cotangents of ``outputs_per_pass``
    (default k) outputs, the outputs taken in groups of that many. Samples do not interact (the model checks
    refuse batch coupling), so each copy computes F. A call whose input or output an in-place
    operation changed marks its module for copies and the pass is run again (a model without
    in-place operations runs once).

    ``broadcast`` names parameters of shape (1, ...) that the forward broadcasts over the batch
    (a ViT's class token and position embedding): each is replaced by a leaf with one row per
    sample (equal values), whose gradient rows are then the per-sample gradients
    (:attr:`Recording.parameter_grads`); whether a parameter is used that way is the caller's to
    check (:func:`plstar.structured.probe` compares with Jacobian rows).
    """
    k = fmodel.k
    group = k if outputs_per_pass is None else max(1, min(k, outputs_per_pass))
    for _ in range(len(modules) + 1):
        passes = [_one_pass(fmodel, x, modules, start, min(k, start + group), broadcast)
                  for start in range(0, k, group)]  # fmt: skip
        if any(p is None for p in passes):
            continue  # an in-place change: its module is copied from now on
        first = passes[0]
        assert first is not None
        cotangents = [
            torch.cat([p.cotangents[i] for p in passes], dim=0)  # type: ignore[union-attr]
            if len(passes) > 1
            else cot
            for i, cot in enumerate(first.cotangents)
        ]
        grads = {
            name: torch.cat([p.parameter_grads[name] for p in passes])  # type: ignore[union-attr]
            for name in broadcast
        }
        return Recording(first.out, first.calls, cotangents, grads)
    raise AssertionError("copies of the recorded tensors did not stop in-place changes")


def replicas(outputs: int) -> int:
    """Copies of the samples the forward pass runs on when ``outputs`` outputs are recorded: near
    √outputs, each reverse sweep seeding that many outputs, and among those the count whose last
    sweep leaves the fewest copies unseeded (their reverse pass is wasted). One copy would run k
    reverse sweeps, each paying the graph's per-node overhead on a small batch; k copies would
    repeat the forward pass k times. Measured on the architecture benchmark (float32, 2 cores,
    best of 9): k → about √k copies took ResNet-18 0.41 → 0.31 s and the MLP-Mixer 0.116 → 0.099 s
    (k = 10), GPT-2 0.38 → 0.31 s (k = 100)."""
    root = math.sqrt(outputs)
    candidates = range(max(1, math.ceil(root / 2)), min(outputs, math.ceil(2 * root)) + 1)
    return min(candidates, key=lambda r: (-(-outputs // r) * r, abs(r - root)))


def _one_pass(
    fmodel: FunctionalModel,
    x: Tensor,
    modules: dict[str, nn.Module],
    start: int,
    stop: int,
    broadcast: tuple[str, ...],
) -> Recording | None:
    """Outputs start..stop: a forward pass on :func:`replicas` copies of x, then reverse sweeps
    over the retained graph, sweep s seeding output start + s·r + a on copy a; None when an
    in-place operation changed a recorded tensor (its module is then marked for copies)."""
    c, k = x.shape[0], fmodel.k
    copies = replicas(stop - start)
    stacked = x.repeat(copies, *[1] * (x.ndim - 1)) if copies > 1 else x
    with torch.enable_grad(), record_calls(modules, c, copies) as calls:
        leaves = {
            name: fmodel.params[name].expand(copies * c, *fmodel.params[name].shape[1:])
            .clone().requires_grad_()
            for name in broadcast
        }  # fmt: skip
        try:
            out = fmodel.pick(_forward(fmodel, stacked, leaves)).reshape(copies * c, k)
        except Exception as error:
            shared = {call.name for call in calls if call.shared}
            if not shared:
                raise
            raise SharedOutputError(shared) from error
        changed = {call.module for call in calls if call.changed()}
        if changed:
            _IN_PLACE.update(changed)
            return None
        usable = [call.output for call in calls if call.problem is None] + list(leaves.values())
        eye = torch.eye(k, dtype=out.dtype, device=out.device)
        firsts = range(start, stop, copies)
        sweeps: list[list[Tensor]] = []
        for first in firsts:
            seeded_outputs = min(stop, first + copies) - first
            # copies past the last output get a zero seed (and cotangents that are dropped)
            seeds = torch.zeros(copies, k, dtype=out.dtype, device=out.device)
            seeds[:seeded_outputs] = eye[first : first + seeded_outputs]
            # a scalar to differentiate: tensor grad_outputs make torch 2.13 import sympy (0.5 s)
            seeded = (out * seeds.repeat_interleave(c, dim=0)).sum()
            last = first == firsts[-1]
            grads = (
                torch.autograd.grad(seeded, usable, allow_unused=True, retain_graph=not last)
                if usable else ()
            )  # fmt: skip
            sweeps.append([
                (z.new_zeros(z.shape) if g is None else g).view(copies, c, *z.shape[1:])
                [:seeded_outputs]
                for z, g in zip(usable, grads, strict=True)
            ])  # fmt: skip
    cotangents = [
        torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*sweeps, strict=True)
    ]
    layers = len(cotangents) - len(leaves)
    grads = dict(zip(broadcast, cotangents[layers:], strict=True))
    return Recording(out[:c], calls, cotangents[:layers], grads)


def _forward(fmodel: FunctionalModel, x: Tensor, leaves: dict[str, Tensor]) -> object:
    """The module's raw output, with ``leaves`` in place of the parameters so named (and their
    aliases); every other parameter is the module's own, so the graph reaches them."""
    if not leaves:
        return fmodel.module(x)
    bound = {**leaves, **{alias: leaves[name] for alias, name in fmodel.aliases if name in leaves}}
    return functional_call(fmodel.module, bound, (x,), strict=False, tie_weights=False)
