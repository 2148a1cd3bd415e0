"""Per-layer rules of the structured kernel: a layer's calls -> kernel factors, and their algebra.

A factor is one layer's contribution to K for a block of samples, in one of three forms:
("gram", A (c, T, p), D (c·k, T, q)): K[(i,a),(j,b)] = Σ_{t,s} (A_it · A_js)(D_(ia)t · D_(jb)s) —
layer inputs (bias folded in as a constant input 1) and output cotangents at T positions;
("rows", R (c·k, r), None): per-sample gradients, K = R Rᵀ;
("tokens", ids (c, T), D (c·k, T, q)): an embedding, K = Σ_{t,s} [ids_it = ids_js] D·D.
:func:`contract_factors` gives the kernel block between two factors, :func:`apply_factor` the
product K·v of one factor's kernel without forming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plstar.models import NTKConv2d, NTKLinear

Factor = tuple[str, Tensor, Tensor | None]
"""("gram", A (c, T, p), D (c·k, T, q)) or ("rows", R (c·k, r), None) or ("tokens", ids, D)."""


def _conv_is_plain(module: nn.Module) -> bool:
    return (
        module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    )


def has_rule(module: nn.Module) -> bool:
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


def _positions(t: Tensor, c: int, width: int) -> Tensor:
    """(c, ..., width) channel-last -> (c, T, width)."""
    return t.reshape(c, -1, width)


def _channels_last(t: Tensor) -> Tensor:
    """(c, C, *spatial) -> (c, T, C)."""
    return t.flatten(2).transpose(1, 2)


def _join(parts: list[Tensor]) -> Tensor:
    """Concatenation along positions; a single call's tensor is used as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _weight_inputs(inputs: Tensor, scale: float, bias: bool) -> Tensor:
    """scale·inputs, with a constant 1 appended when the bias rides along, written in one pass."""
    if scale == 1.0 and not bias:
        return inputs
    p = inputs.shape[-1]
    out = inputs.new_empty((*inputs.shape[:-1], p + int(bias)))
    torch.mul(inputs, scale, out=out[..., :p])
    if bias:  # the bias is the weight of a constant input 1: one Gram covers both
        out[..., p] = 1.0
    return out


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
        inputs = _join([_positions(a, c, d_in) for a, _ in uses])
        delta = _join([cot.reshape(c * k, -1, d_out) for _, cot in uses])
        scale = module.scale if isinstance(module, NTKLinear) else 1.0
    elif isinstance(module, nn.Conv1d | nn.Conv2d | NTKConv2d):
        inputs = _join([_patches(module, a) for a, _ in uses])
        delta = _join([_channels_last(cot.reshape(c * k, *cot.shape[2:])) for _, cot in uses])
        scale = module.scale if isinstance(module, NTKConv2d) else 1.0
    else:
        return _affine_factors(module, uses, k, trainable)
    has_bias = "bias" in trainable and module.bias is not None
    if "weight" in trainable:
        factors.append(_weight_factor(_weight_inputs(inputs, scale, has_bias), delta))
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


def contract_factors(left: Factor, right: Factor, k: int) -> Tensor:
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


def pull_factor(factor: Factor, v: Tensor, k: int) -> Tensor:
    """The factor's Jacobian transposed times v: v (c·k, b) -> a parameter-space tensor.

    Shapes: "rows" (r, b); "gram" (b, q, p); "tokens" (ids + 1, q, b) indexed by token id.
    Summed over sample blocks, then :func:`push_factor` gives K·v. Cost ≈ c·k·T·p·q·b ("gram").
    """
    kind, first, second = factor
    if kind == "rows":
        return first.T @ v
    assert second is not None
    ck, b = v.shape
    c, T, q = ck // k, second.shape[1], second.shape[2]
    if kind == "tokens":
        ids = first.repeat_interleave(k, dim=0).reshape(-1)  # (c·k·T,)
        weighted = (second[..., None] * v[:, None, None, :]).reshape(-1, q, b)
        table = torch.zeros((int(ids.max()) + 1, q, b), dtype=second.dtype, device=second.device)
        return table.index_add_(0, ids, weighted)
    weighted = torch.einsum("iab,iatq->ibtq", v.view(c, k, b), second.view(c, k, T, q))
    return torch.einsum("ibtq,itp->bqp", weighted, first)


def push_factor(factor: Factor, pulled: Tensor, k: int) -> Tensor:
    """The factor's Jacobian times a parameter-space tensor from :func:`pull_factor`: (c·k, b)."""
    kind, first, second = factor
    if kind == "rows":
        return first @ pulled
    assert second is not None
    c, T, q = first.shape[0], second.shape[1], second.shape[2]
    if kind == "tokens":
        rows = pulled[first.repeat_interleave(k, dim=0)]  # (c·k, T, q, b)
        return torch.einsum("Itq,Itqb->Ib", second, rows)
    mixed = torch.einsum("bqp,itp->ibtq", pulled, first)
    return torch.einsum("iatq,ibtq->iab", second.view(c, k, T, q), mixed).reshape(c * k, -1)


def add_pulled(total: Tensor | None, part: Tensor, kind: str) -> Tensor:
    """Sum of :func:`pull_factor` results over sample blocks (token tables may differ in length)."""
    if total is None:
        return part
    if kind == "tokens" and total.shape[0] != part.shape[0]:
        longer, shorter = (total, part) if total.shape[0] > part.shape[0] else (part, total)
        longer = longer.clone()
        longer[: shorter.shape[0]] += shorter
        return longer
    return total + part
