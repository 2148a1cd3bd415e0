"""The table of structured layer rules: which layers get per-layer Gram factors, and how.

``RULES`` maps a layer type — or, for a library plstar does not import, its qualified class name
(``"package.module.Class"``) or bare class name (``"Conv1D"``) — to a
:class:`~plstar.factors.LayerRule`.
A module finds its rule by ``isinstance`` in MRO order, so subclasses (timm's ``LayerNorm``, a
``Linear`` subclass) use their base's rule; since a subclass may compute something else, every
rule states the output it assumes (``reference``), which plstar checks against the module's real
output on the first two samples before trusting the rule (see :mod:`plstar.structured`).

Built in: ``nn.Linear``, Hugging Face's ``Conv1D`` (a Linear with the weight stored transposed),
``nn.Conv1d/2d`` (any padding and groups, :mod:`plstar.conv_rules`), ``nn.Embedding``, the affine
parameters of LayerNorm / RMSNorm / GroupNorm / eval-mode BatchNorm, and plstar's NTK layers.
:func:`register_rule` adds users' own layers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plstar.conv_rules import ConvRule
from plstar.errors import PlstarInputError
from plstar.factors import (
    GRAM_SLOWDOWN,
    Factor,
    LayerRule,
    Use,
    position_pair_flops,
    weight_factors,
    weight_inputs,
)
from plstar.models import NTKConv2d, NTKLinear

__all__ = ["RULES", "LayerRule", "layer_factors", "register_rule", "rule_for", "unsupported"]


def _trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def output_close(expected: object, actual: Tensor) -> bool:
    """Whether a rule's output matches the module's (√eps of its dtype, relative)."""
    if not isinstance(expected, Tensor) or expected.shape != actual.shape:
        return False
    scale = float(actual.abs().max()) if actual.numel() else 0.0
    tolerance = float(torch.finfo(actual.dtype).eps) ** 0.5 * max(scale, 1e-30)
    return bool(((expected - actual).abs() <= tolerance).all())


def _join(parts: list[Tensor]) -> Tensor:
    """Calls concatenated along positions; a single call's tensor is used as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class LinearRule(LayerRule):
    """z = W a + b at every position of the input's trailing dimension.

    ``transposed``: the weight is stored (in, out), as in Hugging Face's ``Conv1D``;
    ``scaled``: z = scale·W a + b, plstar's NTK layer. The factor is the same either way: the
    Gram form does not depend on how W is laid out. ``weight`` and ``bias`` name the attributes.
    """

    def __init__(
        self,
        *,
        transposed: bool = False,
        scaled: bool = False,
        weight: str = "weight",
        bias: str = "bias",
    ) -> None:
        self.transposed, self.scaled = transposed, scaled
        self.weight, self.bias = weight, bias

    def _weight(self, module: nn.Module) -> Tensor:
        return getattr(module, self.weight)

    def _bias(self, module: nn.Module) -> Tensor | None:
        return getattr(module, self.bias, None)

    def unsupported(self, module: nn.Module) -> str | None:
        return None if self._weight(module).ndim == 2 else "its weight is not a matrix"

    def reference(self, module: nn.Module, inputs: Tensor) -> Tensor:
        weight, bias = self._weight(module), self._bias(module)
        weight = weight.T if self.transposed else weight
        if not self.scaled:
            return F.linear(inputs, weight, bias)
        out = F.linear(inputs, weight) * module.scale
        return out if bias is None else out + bias

    def _positions(self, module: nn.Module, uses: list[Use], k: int) -> tuple[Tensor, Tensor]:
        """Inputs (c, T, d_in) and cotangents (c·k, T, d_out) of all calls, at T positions."""
        c = uses[0][0].shape[0]
        d_out, d_in = self._weight(module).shape[:: -1 if self.transposed else 1]
        inputs = _join([a.reshape(c, -1, d_in) for a, _ in uses])
        return inputs, _join([cot.reshape(c * k, -1, d_out) for _, cot in uses])

    def factors(self, module: nn.Module, uses: list[Use], k: int) -> list[Factor]:
        inputs, delta = self._positions(module, uses, k)
        trainable = _trainable(module)
        has_bias = self.bias in trainable and self._bias(module) is not None
        if self.weight in trainable:
            scale = module.scale if self.scaled else 1.0
            return weight_factors(weight_inputs(inputs, scale, has_bias), delta)
        return [("rows", delta.sum(dim=1), None)] if has_bias else []

    def gradients(self, module: nn.Module, uses: list[Use], k: int) -> dict[str, Tensor]:
        inputs, delta = self._positions(module, uses, k)
        c, (d_in, d_out) = inputs.shape[0], (inputs.shape[2], delta.shape[2])
        grads, trainable = {}, _trainable(module)
        if self.weight in trainable:
            scale = module.scale if self.scaled else 1.0
            grad = torch.einsum("cktq,ctp->ckqp", delta.view(c, k, *delta.shape[1:]), inputs)
            grad = (grad * scale).reshape(c * k, d_out, d_in)
            grads[self.weight] = grad.transpose(1, 2) if self.transposed else grad
        if self.bias in trainable and self._bias(module) is not None:
            grads[self.bias] = delta.sum(dim=1)
        return grads


class SelfAttentionRule(LinearRule):
    """``nn.MultiheadAttention`` on self-attention: its packed in-projection z = W_in a + b_in
    (q, k, v = z split in three) is a linear layer; ``out_proj`` is called as a module, so the
    Linear rule serves it. Recording replaces the module's output by the same computation
    through z: ``F.multi_head_attention_forward`` on the projected q, k, v with identity
    projections (every mask and option handled by torch itself), then ``out_proj``; a call
    whose recomputed output differs from the module's own is refused (Jacobian rows)."""

    decomposes = True

    def __init__(self) -> None:
        super().__init__(weight="in_proj_weight", bias="in_proj_bias")

    def unsupported(self, module: nn.Module) -> str | None:
        if not getattr(module, "_qkv_same_embed_dim", False):
            return "separate q/k/v projection weights (kdim or vdim differ from embed_dim)"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv or add_zero_attn append keys inside its forward"
        return super().unsupported(module)

    def decompose(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> tuple[Tensor, Tensor, Any] | str:
        bound = _ATTENTION_ARGUMENTS.bind(module, *args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        query = given.pop("query")
        if query is not given.pop("key") or query is not given.pop("value"):
            return "it is not self-attention (query, key and value are not one tensor)"
        if query.ndim != 3 or not isinstance(output, tuple):
            return "its input is not batched"
        a = query if module.batch_first else query.transpose(0, 1)  # (c, T, E)
        z = F.linear(a, module.in_proj_weight, module.in_proj_bias)
        q, k, v = (part.transpose(0, 1) for part in z.chunk(3, dim=-1))
        eye = torch.eye(module.embed_dim, dtype=z.dtype, device=z.device)
        given.pop("self")
        attended, weights = F.multi_head_attention_forward(
            q, k, v, module.embed_dim, module.num_heads, None, None, None, None, False,
            module.dropout, eye, None, training=module.training, use_separate_proj_weight=True,
            q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye, **given,
        )  # fmt: skip
        out = module.out_proj(attended.transpose(0, 1))
        out = out if module.batch_first else out.transpose(0, 1)
        if not output_close(out.detach(), output[0].detach()):
            return "recomputed through its in-projection, its output differs from its own"
        return a, z, (out, weights)


_ATTENTION_ARGUMENTS = inspect.signature(nn.MultiheadAttention.forward)


class EmbeddingRule(LayerRule):
    """Rows of a table picked by integer ids: a "tokens" factor (K sums over equal ids)."""

    def unsupported(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalises the table inside the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq rescales its gradients"
        return None

    def reference(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return F.embedding(inputs, module.weight)

    def factors(self, module: nn.Module, uses: list[Use], k: int) -> list[Factor]:
        """The "tokens" form, T² + k·T·d·(T + k) per sample pair (×GRAM_SLOWDOWN), or — when
        the table is small (position embeddings) — its per-sample gradients, k²·V·d per pair:
        the cheaper."""
        tokens, delta = self._tokens(module, uses, k)
        positions, (rows, dim) = tokens.shape[1], module.weight.shape
        if k * k * rows * dim < GRAM_SLOWDOWN * position_pair_flops(positions, 1, k, dim):
            grad = self.gradients(module, uses, k)["weight"]
            return [("rows", grad.reshape(grad.shape[0], -1), None)]
        return [("tokens", tokens, delta)]

    def _tokens(self, module: nn.Module, uses: list[Use], k: int) -> tuple[Tensor, Tensor]:
        """ids (c, T) of all calls and their cotangents (c·k, T, d), padding rows zeroed."""
        c, dim = uses[0][0].shape[0], module.weight.shape[1]
        tokens = torch.cat([a.reshape(c, -1) for a, _ in uses], dim=1)
        delta = torch.cat([cot.reshape(c * k, -1, dim) for _, cot in uses], dim=1)
        if module.padding_idx is not None:  # the padding row receives no gradient
            keep = (tokens != module.padding_idx).repeat_interleave(k, dim=0)
            delta = delta * keep[..., None]
        return tokens, delta

    def gradients(self, module: nn.Module, uses: list[Use], k: int) -> dict[str, Tensor]:
        tokens, delta = self._tokens(module, uses, k)
        ck, _, dim = delta.shape
        ids = tokens.repeat_interleave(k, dim=0)[..., None].expand(-1, -1, dim)
        grad = delta.new_zeros((ck, module.weight.shape[0], dim))
        return {"weight": grad.scatter_add_(1, ids, delta)}


class NormRule(LayerRule):
    """The affine parameters of a normalisation layer, y = w ⊙ x̂ + b: per-sample gradients
    Σ δ ⊙ x̂ and Σ δ over the positions that share a parameter ("rows" factors; they are small).
    ``kind`` is "layer", "rms", "group" or "batch" (eval mode, running statistics)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def unsupported(self, module: nn.Module) -> str | None:
        if self.kind == "batch" and (module.training or module.running_mean is None):
            return "it normalises with batch statistics (train mode or no running statistics)"
        return None

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        """x̂: the input normalised, before the affine parameters."""
        if self.kind == "layer":
            return F.layer_norm(a, module.normalized_shape, eps=module.eps)
        if self.kind == "rms":
            return F.rms_norm(a, module.normalized_shape, eps=module.eps)
        if self.kind == "group":
            return F.group_norm(a, module.num_groups, eps=module.eps)
        return F.batch_norm(
            a, module.running_mean, module.running_var, training=False, eps=module.eps
        )

    def reference(self, module: nn.Module, inputs: Tensor) -> Tensor:
        out = self.normalized(module, inputs)
        weight, bias = module.weight, getattr(module, "bias", None)
        if self.kind in ("group", "batch"):  # one parameter per channel, dimension 1
            shape = (-1, *[1] * (inputs.ndim - 2))
            weight = None if weight is None else weight.view(shape)
            bias = None if bias is None else bias.view(shape)
        out = out if weight is None else out * weight
        return out if bias is None else out + bias

    def factors(self, module: nn.Module, uses: list[Use], k: int) -> list[Factor]:
        c, trainable = uses[0][0].shape[0], _trainable(module)
        grad_w: Tensor | None = None
        grad_b: Tensor | None = None
        for a, cot in uses:  # cot (c, k, *output shape), x̂ (c, *output shape)
            if self.kind in ("layer", "rms"):  # parameters shared over the leading dimensions
                dims = tuple(range(2, cot.ndim - len(module.normalized_shape)))
            else:  # one parameter per channel (dimension 2 here), shared over the rest
                dims = tuple(range(3, cot.ndim))
            w = _sum_over(cot * self.normalized(module, a).unsqueeze(1), dims)
            b = _sum_over(cot, dims)
            grad_w = w if grad_w is None else grad_w + w
            grad_b = b if grad_b is None else grad_b + b
        factors: list[Factor] = []
        if "weight" in trainable and grad_w is not None:
            factors.append(("rows", grad_w.reshape(c * k, -1), None))
        if "bias" in trainable and grad_b is not None:
            factors.append(("rows", grad_b.reshape(c * k, -1), None))
        return factors


def _sum_over(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # ``sum(dim=())`` would reduce every dimension
    return t.sum(dim=dims) if dims else t


RULES: dict[type[nn.Module] | str, LayerRule] = {
    nn.Linear: LinearRule(),
    NTKLinear: LinearRule(scaled=True),
    # Hugging Face's GPT-2 layer (transformers.pytorch_utils.Conv1D) and copies of it, matched by
    # class name so plstar need not import transformers; the reference check confirms the layout
    "Conv1D": LinearRule(transposed=True),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    NTKConv2d: ConvRule(scaled=True),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: NormRule("layer"),
    nn.RMSNorm: NormRule("rms"),
    nn.GroupNorm: NormRule("group"),
    nn.modules.batchnorm._BatchNorm: NormRule("batch"),
    nn.MultiheadAttention: SelfAttentionRule(),
}
"""Layer type (or qualified class name) -> rule; read through :func:`rule_for`."""
_GENERATION = 0


def register_rule(module_type: type[nn.Module] | str, rule: LayerRule) -> None:
    """Give a layer type — your own, or one plstar has no rule for — a structured rule.

    ``module_type`` is a subclass of ``nn.Module`` or a qualified class name
    (``"package.module.ClassName"``, for a library you would rather not import first); it applies
    to subclasses too, and replaces any rule the type had. ``rule`` is a
    :class:`~plstar.factors.LayerRule`: reuse a built-in one for a layer that computes the same
    thing (``register_rule(MyLinear, RULES[nn.Linear])``) or subclass it.
    plstar checks a rule before using it (its ``reference`` against the module's output, its
    kernel entries against plain gradients) and gives any module that fails Jacobian rows.

    Raises PlstarInputError when ``module_type`` is not a module class or a dotted name, or
    ``rule`` is not a LayerRule.

    >>> import torch
    >>> from torch import nn
    >>> import plstar
    >>> from plstar.layer_rules import RULES
    >>> class Affine(nn.Module):  # computes F.linear, but is no nn.Linear
    ...     def __init__(self, d_in, d_out):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(d_out, d_in))
    ...         self.bias = nn.Parameter(torch.zeros(d_out))
    ...     def forward(self, a):
    ...         return nn.functional.linear(a, self.weight, self.bias)
    >>> plstar.register_rule(Affine, RULES[nn.Linear])
    >>> model = nn.Sequential(Affine(3, 4), nn.Tanh(), Affine(4, 2)).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(plstar.tangent_kernel(model, x, implementation="structured"),
    ...                     plstar.tangent_kernel(model, x, implementation="jacobian")))
    True
    """
    is_type = isinstance(module_type, type) and issubclass(module_type, nn.Module)
    if not is_type and not (isinstance(module_type, str) and "." in module_type):
        raise PlstarInputError(
            f"module_type must be an nn.Module subclass or a 'package.module.Class' name, got "
            f"{module_type!r}"
        )
    if not isinstance(rule, LayerRule):
        raise PlstarInputError(
            f"rule must be a plstar.LayerRule, got {type(rule).__name__}; subclass LayerRule "
            "or reuse one from plstar.layer_rules.RULES"
        )
    RULES[module_type] = rule
    global _GENERATION
    _GENERATION += 1


def generation() -> int:
    """How many times :func:`register_rule` changed the table (cached routings are per value)."""
    return _GENERATION


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of the nearest class in ``type(module).__mro__`` that has one (by type, then
    qualified name, then bare class name), else None."""
    for kind in type(module).__mro__:
        rule = (
            RULES.get(kind)
            or RULES.get(f"{kind.__module__}.{kind.__qualname__}")
            or RULES.get(kind.__qualname__)
        )
        if rule is not None:
            return rule
    return None


def gives_gradients(rule: LayerRule | None) -> bool:
    """Whether ``rule`` implements per-sample gradients (needed for shared parameters)."""
    return rule is not None and type(rule).gradients is not LayerRule.gradients


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot have structured factors (no rule, or options its rule lacks)."""
    rule = rule_for(module)
    if rule is None:
        return f"no rule for {type(module).__name__}"
    try:
        return rule.unsupported(module)
    except AttributeError as missing:  # a subclass without the attributes its base's rule reads
        return f"{type(module).__name__} lacks what its rule reads ({missing})"


def layer_factors(module: nn.Module, uses: list[Use], k: int) -> list[Factor]:
    """The kernel factors of one module over all its calls in a forward pass.

    ``uses`` holds (input, cotangent) per call, the cotangent (c, k, *output shape) =
    ∂f_a(x_i)/∂z_i. Calls are concatenated along positions, so a module applied twice gets its
    cross terms.
    """
    rule = rule_for(module)
    assert rule is not None
    return rule.factors(module, uses, k)
