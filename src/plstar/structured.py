"""Structured tangent kernels: per-layer Gram matrices instead of Jacobians (Novak et al. 2022).

For a dense layer z = W a (+ b) the contribution of W to K is a Hadamard product of two Gram
matrices, K_W[(i,a),(j,b)] = (a_i · a_j) (δ_ia · δ_jb), with a_i the layer input and δ_ia = ∂f_a(x_i)/∂z_i
the output cotangent: n²(d_in + k² d_out) flops instead of n² k² d_in d_out, and the Jacobian is never
formed. A layer used at T positions (a sequence, a convolution's patches, a module applied twice)
sums over position pairs; per layer, :func:`layer_factors` picks the cheaper of that "Gram" form and
the "rows" form (per-sample gradients δᵀa materialised) from their flop counts.

Rules exist for ``nn.Linear``, ``nn.Conv1d/2d`` (groups = 1, zero padding), ``nn.Embedding``, the
affine parameters of LayerNorm / GroupNorm / eval-mode BatchNorm, plstar's NTK layers, and biases.
Every other trainable parameter is handled by per-sample Jacobian rows for that parameter only.
A module whose parameters are also used outside its forward (weight tying across modules) is routed
to the Jacobian rows too; a check of three kernel entries against plain gradients guards the rest.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plstar import layer_rules as rules
from plstar.functional import FunctionalModel, jacobian_rows
from plstar.layer_rules import Factor, contract_factors, has_rule, layer_factors


class NotPerSampleError(RuntimeError):
    """A hooked layer's input is not laid out batch-first, so per-sample Grams would mix samples."""


@dataclass
class LayerCall:
    """One application of a rule-handled module: its input and its output (kept in the graph)."""

    module: nn.Module
    inputs: Tensor
    output: Tensor


def rule_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose trainable parameters the structured rules cover (name -> module).

    A module is excluded when one of its parameters is also owned by another module (tied weights
    across modules), since per-module Grams would then miss the cross terms.
    """
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    chosen = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and has_rule(module) and all(len(owners[id(p)]) == 1 for p in own):
            chosen[name] = module
    return chosen


@contextmanager
def record_calls(modules: dict[str, nn.Module]) -> Iterator[list[LayerCall]]:
    """Forward hooks that record every call of the given modules, in call order."""
    calls: list[LayerCall] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        calls.append(LayerCall(module, args[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class BlockFeatures:
    """Everything one block of samples contributes: per-layer factors and fallback Jacobian rows."""

    factors: list[Factor]
    rows: Tensor | None  # (c·k, m_fallback): Jacobian rows of the parameters without a rule


def block_features(
    fmodel: FunctionalModel,
    x: Tensor,
    modules: dict[str, nn.Module],
    fallback: list[str],
    dtype: torch.dtype,
) -> BlockFeatures:
    """Layer inputs and output cotangents of a block of samples, cast to ``dtype``.

    One forward pass with hooks, then one batched reverse pass per output (``is_grads_batched``),
    giving δ_ia for every recorded call at once. Fallback parameters get Jacobian rows by vmap(jacrev).
    """
    c, k = x.shape[0], fmodel.k
    with torch.enable_grad(), record_calls(modules) as calls:
        out = fmodel.pick(fmodel.module(x)).reshape(c, k)
        outputs = [call.output for call in calls]
        cotangents = _output_cotangents(out, outputs) if outputs else []
    if any(call.inputs.shape[0] != c or call.output.shape[0] != c for call in calls):
        raise NotPerSampleError(
            "a rule-handled layer does not see the batch as its first dimension"
        )
    uses: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in modules.values()}
    for call, cot in zip(calls, cotangents, strict=True):
        cot = (
            torch.zeros((k, *call.output.shape), dtype=out.dtype, device=out.device)
            if cot is None
            else cot
        )
        uses[id(call.module)].append((call.inputs, cot.transpose(0, 1).detach()))
    factors: list[Factor] = []
    for module in modules.values():
        if not uses[id(module)]:
            continue  # not called on this input: its parameters do not move F
        for kind, first, second in layer_factors(module, uses[id(module)], k):
            first = first if kind == "tokens" else first.to(dtype)
            factors.append((kind, first, None if second is None else second.to(dtype)))
    rows = None
    if fallback:
        rows = torch.cat(list(jacobian_rows(fmodel, x, dtype, fallback).values()), dim=1)
    return BlockFeatures(_merge_rows(factors), rows)


def _output_cotangents(out: Tensor, outputs: list[Tensor]) -> list[Tensor | None]:
    """∂(Σ_i f_a(x_i))/∂z for every recorded output z and every a: each (k, *z.shape)."""
    c, k = out.shape
    if k == 1:  # one plain reverse pass; the batched engine's vmap only adds overhead here
        grads = torch.autograd.grad(out, outputs, torch.ones_like(out), allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    seeds = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, c, k)
    try:
        return list(
            torch.autograd.grad(
                out,
                outputs,
                grad_outputs=seeds,
                is_grads_batched=True,
                allow_unused=True,
                retain_graph=True,
            )
        )
    except RuntimeError:  # an op without a batching rule: one reverse pass per output
        per_output = [
            torch.autograd.grad(out[:, a].sum(), outputs, retain_graph=True, allow_unused=True)
            for a in range(k)
        ]
        return [
            None if parts[0] is None else torch.stack(parts)  # type: ignore[misc]
            for parts in zip(*per_output, strict=True)
        ]


def _merge_rows(factors: list[Factor]) -> list[Factor]:
    """All "rows" factors into one, so they cost a single GEMM."""
    rows = [f[1] for f in factors if f[0] == "rows"]
    others = [f for f in factors if f[0] != "rows"]
    return [*others, ("rows", torch.cat(rows, dim=1), None)] if rows else others


def contract_blocks(left: BlockFeatures, right: BlockFeatures, k: int) -> Tensor:
    """K block between two sample blocks: Σ over layers of their Gram contributions."""
    total: Tensor | None = None
    for first, second in zip(left.factors, right.factors, strict=True):
        part = contract_factors(first, second, k)
        total = part if total is None else total + part
    if left.rows is not None and right.rows is not None:
        part = left.rows @ right.rows.T
        total = part if total is None else total + part
    assert total is not None
    return total


def _factors(features: BlockFeatures) -> list[Factor]:
    rows = [] if features.rows is None else [("rows", features.rows, None)]
    return [*features.factors, *rows]


def pull_features(features: BlockFeatures, v: Tensor, k: int) -> list[Tensor]:
    """DFᵀv of one sample block, one parameter-space tensor per factor; v (c·k, b)."""
    return [rules.pull_factor(f, v, k) for f in _factors(features)]


def add_pulled_features(
    total: list[Tensor] | None, part: list[Tensor], features: BlockFeatures
) -> list[Tensor]:
    """Sum of :func:`pull_features` over sample blocks."""
    if total is None:
        return part
    kinds = [f[0] for f in _factors(features)]
    return [rules.add_pulled(t, p, kind) for t, p, kind in zip(total, part, kinds, strict=True)]


def push_features(features: BlockFeatures, pulled: list[Tensor], k: int) -> Tensor:
    """DF·g of one sample block for g from summed :func:`pull_features`: (c·k, b)."""
    parts = [rules.push_factor(f, g, k) for f, g in zip(_factors(features), pulled, strict=True)]
    return torch.stack(parts).sum(dim=0)


def split_parameters(fmodel: FunctionalModel) -> tuple[dict[str, nn.Module], list[str]]:
    """(rule modules, names of trainable parameters left to Jacobian rows)."""
    modules = rule_modules(fmodel.module)
    covered = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in modules.items()
        for name, p in module.named_parameters(recurse=False)
        if p.requires_grad
    }
    return modules, [name for name in fmodel.params if name not in covered]


@dataclass(frozen=True)
class Probe:
    """The structured features of the first two samples (float64): they size the plan and serve
    the entry check, so both cost one small forward and reverse pass."""

    features: BlockFeatures
    samples: int
    modules: dict[str, nn.Module]
    fallback: list[str]

    def bytes(self, dtype: torch.dtype, k: int) -> tuple[int, int]:
        """(bytes of one sample's features in ``dtype``, bytes of one sample pair's temporaries)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        tensors = [t for f in self.features.factors for t in f[1:] if t is not None]
        tensors += [] if self.features.rows is None else [self.features.rows]
        per_sample = sum(
            t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in tensors
        )
        per_pair = max(
            (
                2 * k * k * f[1].shape[1] ** 2 * itemsize
                for f in self.features.factors
                if f[0] != "rows"
            ),
            default=0,
        )
        return per_sample // self.samples, per_pair

    def flops_per_pair(self, k: int) -> int:
        """Multiply-adds per sample pair of the contraction (for comparison with k²·m)."""
        total = 0
        for kind, first, second in self.features.factors:
            if kind == "rows":
                total += k * k * first.shape[1]
            else:
                positions = first.shape[1]
                width = 1 if kind == "tokens" else first.shape[2]
                total += positions * positions * (width + k * k * second.shape[2])
        rows = self.features.rows
        return total + (0 if rows is None else k * k * rows.shape[1])


def probe(fmodel: FunctionalModel, x: Tensor) -> Probe | None:
    """Features of x[:2] in float64, or None when a rule-handled layer does not see the batch first."""
    modules, fallback = split_parameters(fmodel)
    pair = x[: min(2, x.shape[0])]
    try:
        features = block_features(fmodel, pair, modules, fallback, torch.float64)
    except NotPerSampleError:
        return None
    return Probe(features, pair.shape[0], modules, fallback)


# Modules whose structured kernel matched plain gradients, with the signature it was checked for:
# the check is structural (which parameters the hooks see), so repeated calls skip it.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _signature(fmodel: FunctionalModel, x: Tensor) -> tuple:
    shapes = tuple((name, tuple(p.shape), p.dtype) for name, p in fmodel.params.items())
    return shapes, tuple(x.shape[1:]), x.dtype, fmodel.k


def entry_check(fmodel: FunctionalModel, x: Tensor, found: Probe | None) -> float:
    """Largest relative error of three structured kernel entries against ∇f_a(x_i)·∇f_b(x_j).

    Hooks cannot see a parameter used outside its module's forward, and the layer rules assume
    that samples do not interact; this catches both, at the cost of one forward and one batched
    reverse pass over the probe's two samples. A module that passed once for the same parameter
    shapes, sample shape, dtype and k is not checked again (returns 0). Infinite when the probe
    failed.
    """
    if found is None:
        return math.inf
    signature = _signature(fmodel, x)
    if _VERIFIED.get(fmodel.module) == signature:
        return 0.0
    k, features, pair = fmodel.k, found.features, x[: found.samples]
    kernel = contract_blocks(features, features, k)
    picks = [(0, 0), (pair.shape[0] - 1, k - 1)]
    params = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
    seeds = torch.zeros((len(picks), pair.shape[0], k), dtype=fmodel.dtype, device=fmodel.device)
    for row, (i, a) in enumerate(picks):
        seeds[row, i, a] = 1.0
    with torch.enable_grad():
        out = fmodel(params, pair)
        parts = torch.autograd.grad(
            out, list(params.values()), seeds, is_grads_batched=True, allow_unused=True
        )
    grads = torch.cat(
        [
            (
                torch.zeros((len(picks), p.numel()), dtype=p.dtype, device=p.device)
                if g is None
                else g.flatten(1)
            )
            for g, p in zip(parts, params.values(), strict=True)
        ],
        dim=1,
    ).double()
    worst = 0.0
    for u, v in [(0, 0), (1, 1), (0, 1)]:
        (i, a), (j, b) = picks[u], picks[v]
        exact = float(grads[u] @ grads[v])
        scale = math.sqrt(float(grads[u] @ grads[u]) * float(grads[v] @ grads[v]))
        error = abs(float(kernel[i * k + a, j * k + b]) - exact)
        worst = max(worst, error / max(scale, 1e-300))
    if worst <= 1e3 * float(torch.finfo(fmodel.dtype).eps):
        _VERIFIED[fmodel.module] = signature
    return worst
