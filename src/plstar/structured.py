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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plstar.functional import FunctionalModel, jacobian_rows
from plstar.models import NTKConv2d, NTKLinear

Factor = tuple[str, Tensor, Tensor | None]
"""("gram", A (c, T, p), D (c·k, T, q)) or ("rows", R (c·k, r), None) or ("tokens", ids, D)."""


class NotPerSampleError(RuntimeError):
    """A hooked layer's input is not laid out batch-first, so per-sample Grams would mix samples."""


@dataclass
class LayerCall:
    """One application of a rule-handled module: its input and its output (kept in the graph)."""

    module: nn.Module
    inputs: Tensor
    output: Tensor


def _conv_is_plain(module: nn.Module) -> bool:
    return (
        module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    )


def _has_rule(module: nn.Module) -> bool:
    kind = type(module)
    if kind in (nn.Linear, NTKLinear, NTKConv2d):
        return True
    if kind in (nn.Conv1d, nn.Conv2d):
        return _conv_is_plain(module)
    if kind is nn.Embedding:
        return module.max_norm is None and not module.scale_grad_by_freq
    if kind in (nn.LayerNorm, nn.GroupNorm):
        return module.weight is not None
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return module.affine and not module.training and module.running_mean is not None
    return False


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
        if own and _has_rule(module) and all(len(owners[id(p)]) == 1 for p in own):
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


def _positions(t: Tensor, c: int, width: int) -> Tensor:
    """(c, ..., width) channel-last -> (c, T, width)."""
    return t.reshape(c, -1, width)


def _channels_last(t: Tensor) -> Tensor:
    """(c, C, *spatial) -> (c, T, C)."""
    return t.flatten(2).transpose(1, 2)


def layer_factors(module: nn.Module, uses: list[tuple[Tensor, Tensor]], k: int) -> list[Factor]:
    """The kernel factors of one module over all its calls in a forward pass.

    ``uses`` holds (input, cotangent) per call, the cotangent (c, k, *output shape) = ∂f_a(x_i)/∂z_i.
    Calls are concatenated along positions, so a module applied twice gets its cross terms.
    """
    c = uses[0][0].shape[0]
    trainable = {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    factors: list[Factor] = []
    if isinstance(module, nn.Embedding):
        tokens = torch.cat([a.reshape(c, -1) for a, _ in uses], dim=1)
        delta = torch.cat([cot.reshape(c * k, -1, module.embedding_dim) for _, cot in uses], dim=1)
        if module.padding_idx is not None:  # the padding row receives no gradient
            keep = (tokens != module.padding_idx).repeat_interleave(k, dim=0)
            delta = delta * keep[..., None]
        return [("tokens", tokens, delta)]
    if isinstance(module, nn.Linear | NTKLinear):
        d_in, d_out = module.in_features, module.out_features
        inputs = torch.cat([_positions(a, c, d_in) for a, _ in uses], dim=1)
        delta = torch.cat([cot.reshape(c * k, -1, d_out) for _, cot in uses], dim=1)
        scale = module.scale if isinstance(module, NTKLinear) else 1.0
    elif isinstance(module, nn.Conv1d | nn.Conv2d | NTKConv2d):
        inputs = torch.cat([_patches(module, a) for a, _ in uses], dim=1)
        delta = torch.cat(
            [_channels_last(cot.reshape(c * k, *cot.shape[2:])) for _, cot in uses], dim=1
        )
        scale = module.scale if isinstance(module, NTKConv2d) else 1.0
    else:
        return _affine_factors(module, uses, k, trainable)
    has_bias = "bias" in trainable and module.bias is not None
    if "weight" in trainable:
        inputs = inputs * scale
        if has_bias:  # the bias is the weight of a constant input 1: one Gram covers both
            inputs = torch.cat([inputs, torch.ones_like(inputs[..., :1])], dim=-1)
        factors.append(_weight_factor(inputs, delta))
    elif has_bias:
        factors.append(("rows", delta.sum(dim=1), None))
    return factors


def _affine_factors(
    module: nn.Module, uses: list[tuple[Tensor, Tensor]], k: int, trainable: set[str]
) -> list[Factor]:
    """Per-sample gradients of a normalisation layer's affine parameters, summed over calls."""
    c = uses[0][0].shape[0]
    grad_w: Tensor | None = None
    grad_b: Tensor | None = None
    for a, cot in uses:
        delta = cot.reshape(c * k, *cot.shape[2:])
        dims = _affine_reduction_dims(module, delta.ndim)
        w = _sum_over(delta * _normalized_input(module, a).repeat_interleave(k, dim=0), dims)
        b = _sum_over(delta, dims)
        grad_w = w if grad_w is None else grad_w + w
        grad_b = b if grad_b is None else grad_b + b
    factors: list[Factor] = []
    if "weight" in trainable and grad_w is not None:
        factors.append(("rows", grad_w.reshape(c * k, -1), None))
    if "bias" in trainable and module.bias is not None and grad_b is not None:
        factors.append(("rows", grad_b.reshape(c * k, -1), None))
    return factors


def _sum_over(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # ``sum(dim=())`` would reduce every dimension
    return t.sum(dim=dims) if dims else t


def _weight_factor(inputs: Tensor, delta: Tensor) -> Factor:
    """Gram form when it is cheaper than materialising per-sample weight gradients."""
    c, positions, p = inputs.shape
    ck, _, q = delta.shape
    k = ck // c
    gram_cost = positions * positions * (p + k * k * q)
    rows_cost = k * k * p * q
    if positions == 1 or gram_cost <= rows_cost:
        return ("gram", inputs, delta)
    per_sample = torch.einsum("ctq,ctp->cqp", delta, inputs.repeat_interleave(k, dim=0))
    return ("rows", per_sample.reshape(ck, q * p), None)


def _patches(module: nn.Module, a: Tensor) -> Tensor:
    """Unfolded input patches (c, T, C_in·∏kernel), in the order of the flattened weight."""
    if a.ndim == 3:  # Conv1d as a 2-D convolution of height 1
        a = a.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation = _pair(module.kernel_size), _pair(getattr(module, "dilation", 1))
        padding, stride = _pair(module.padding), _pair(module.stride)
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _normalized_input(module: nn.Module, a: Tensor) -> Tensor:
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, eps=module.eps)
    return F.batch_norm(a, module.running_mean, module.running_var, training=False, eps=module.eps)


def _affine_reduction_dims(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """Dims summed to get per-sample affine gradients from (c·k, ...) tensors."""
    if isinstance(module, nn.LayerNorm):
        return tuple(range(1, ndim - len(module.normalized_shape)))
    return tuple(range(2, ndim))


def _contract(left: Factor, right: Factor, k: int) -> Tensor:
    kind, a1, d1 = left
    _, a2, d2 = right
    if kind == "rows":
        return a1 @ a2.T
    c1, c2 = a1.shape[0], a2.shape[0]
    if kind == "tokens":
        same = (a1[:, None, :, None] == a2[None, :, None, :]).to(d1.dtype)  # (c1, c2, T1, T2)
        cot = torch.einsum("ItQ,JsQ->IJts", d1, d2).view(c1, k, c2, k, *same.shape[2:])
        return (cot * same[:, None, :, None]).sum(dim=(-2, -1)).reshape(c1 * k, c2 * k)
    if a1.shape[1] == 1:
        grams = a1[:, 0] @ a2[:, 0].T
        cot = (d1[:, 0] @ d2[:, 0].T).view(c1, k, c2, k)
        return (cot * grams[:, None, :, None]).reshape(c1 * k, c2 * k)
    grams = torch.einsum("itp,jsp->ijts", a1, a2)
    cot = torch.einsum("ItQ,JsQ->IJts", d1, d2).view(c1, k, c2, k, *grams.shape[2:])
    return (cot * grams[:, None, :, None]).sum(dim=(-2, -1)).reshape(c1 * k, c2 * k)


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
        out = fmodel.module(x).reshape(c, k)
        outputs = [call.output for call in calls]
        cotangents = _output_cotangents(out, outputs) if outputs else []
    if any(call.inputs.shape[0] != c or call.output.shape[0] != c for call in calls):
        raise NotPerSampleError(
            "a rule-handled layer does not see the batch as its first dimension"
        )
    uses: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in modules.values()}
    for call, cot in zip(calls, cotangents, strict=True):
        cot = torch.zeros((k, *call.output.shape), dtype=out.dtype) if cot is None else cot
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
    seeds = torch.eye(k, dtype=out.dtype)[:, None, :].expand(k, c, k)
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
        part = _contract(first, second, k)
        total = part if total is None else total + part
    if left.rows is not None and right.rows is not None:
        part = left.rows @ right.rows.T
        total = part if total is None else total + part
    assert total is not None
    return total


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


def entry_check(fmodel: FunctionalModel, x: Tensor, found: Probe | None) -> float:
    """Largest relative error of three structured kernel entries against ∇f_a(x_i)·∇f_b(x_j).

    Hooks cannot see a parameter used outside its module's forward; this catches it, at the cost
    of two gradients and a two-sample structured kernel (``found``, from :func:`probe`). Infinite
    when the probe failed.
    """
    if found is None:
        return math.inf
    k, features, pair = fmodel.k, found.features, x[: found.samples]
    kernel = contract_blocks(features, features, k)
    picks = [(0, 0), (pair.shape[0] - 1, k - 1)]
    grads = []
    for i, a in picks:
        params = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
        with torch.enable_grad():
            value = fmodel(params, pair[i : i + 1])[0, a]
            parts = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        grads.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                    for g, p in zip(parts, params.values(), strict=True)
                ]
            )
        )
    worst = 0.0
    for u, v in [(0, 0), (1, 1), (0, 1)]:
        (i, a), (j, b) = picks[u], picks[v]
        exact = float(grads[u] @ grads[v])
        scale = math.sqrt(float(grads[u] @ grads[u]) * float(grads[v] @ grads[v]))
        error = abs(float(kernel[i * k + a, j * k + b]) - exact)
        worst = max(worst, error / max(scale, 1e-300))
    return worst
