"""The rule table: new rules against the dense float64 oracle, subclasses matched by behaviour,
per-layer fallback to Jacobian rows, and rules users register for their own layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_kernel
from torch import Tensor, nn

import plstar
from plstar import layer_rules, structured
from plstar.entry_check import verified_probe
from plstar.factors import LayerRule
from plstar.functional import make_functional
from plstar.kernel import planned_tangent_kernel

DEFAULT_DTYPE = torch.float64


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def routing(model: nn.Module, x: Tensor) -> structured.Probe:
    """The checked probe of ``model`` on x (which modules the rules serve, which take rows)."""
    found = verified_probe(make_functional(model, x), x, strict=False)
    assert found is not None
    return found


def assert_structured_matches_oracle(model: nn.Module, x: Tensor) -> None:
    expected = dense_kernel(model, x)
    for implementation in ("structured", "auto"):
        K = plstar.tangent_kernel(model, x, implementation=implementation)
        assert relative_error(K, expected) < 1e-10, implementation
    op = plstar.kernel_operator(model, x, implementation="structured")
    v = torch.randn(expected.shape[0], 2, generator=torch.Generator().manual_seed(0))
    assert relative_error(op @ v, expected @ v) < 1e-10


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 layer, copied: a Linear whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Seq(nn.Module):
    """Token embeddings plus positions indexed by a broadcast (1, T) tensor (GPT-2, BERT)."""

    def __init__(self, vocab: int = 7, d: int = 4, context: int = 8, k: int = 3) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.mix = Conv1D(2 * d, d)
        self.out = nn.Linear(2 * d, k)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        h = self.wte(tokens) + self.wpe(positions)
        return self.out(torch.tanh(self.mix(h))[:, -1])


def test_hf_conv1d_and_broadcast_positions_are_structured() -> None:
    torch.manual_seed(0)
    model, x = Seq(), torch.randint(0, 7, (5, 6))
    found = routing(model, x)
    assert set(found.modules) == {"wte", "wpe", "mix", "out"} and found.fallback == []
    assert_structured_matches_oracle(model, x)


def test_convolution_paddings_strides_dilations_and_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 4, padding="same"),  # even kernel: the extra element on the right
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2, padding_mode="reflect"),
        nn.GELU(),
        nn.Conv1d(4, 4, 3, groups=4, padding="valid", stride=2),  # depthwise
        nn.Tanh(),
        nn.Conv1d(4, 2, 2, padding=1, padding_mode="circular", bias=False),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(5, 2, 11)
    model(x)  # materialise the lazy layer
    found = routing(model, x)
    assert len(found.modules) == 5 and found.fallback == []
    assert_structured_matches_oracle(model, x)


def test_grouped_conv2d_takes_gram_or_rows_form_and_both_agree() -> None:
    torch.manual_seed(0)
    # 3×3 input, 3×3 kernel: one position, where the Gram form (one factor per group) is cheaper;
    # then a depthwise 3×3 over 6×6, where per-sample gradients are.
    few = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 2))
    many = nn.Sequential(
        nn.Conv2d(3, 3, 3, groups=3, padding="same", padding_mode="replicate"),
        nn.Tanh(),
        nn.Conv2d(3, 6, (2, 3), stride=(2, 1), groups=3),
        nn.Flatten(),
        nn.Linear(6 * 3 * 4, 2),
    )
    for model, x, kinds in [
        (few, torch.randn(4, 4, 3, 3), ["gram", "gram"]),
        (many, torch.randn(4, 3, 6, 6), ["rows"]),
    ]:
        found = routing(model, x)
        assert [f[0] for f in found.per_unit["0"]] == kinds
        assert_structured_matches_oracle(model, x)


class SameLinear(nn.Linear):
    """A subclass that computes what nn.Linear computes (its own forward, the same output)."""

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class DoubledLinear(nn.Linear):
    """A subclass whose forward computes something else: its rule must not be trusted."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * F.linear(x, self.weight, self.bias)


class LayerNormTimm(nn.LayerNorm):
    """timm's LayerNorm: a subclass with its own forward, the same function."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: normalises channels of (N, C, H, W), not the last dimension."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_subclasses_are_matched_by_behaviour_not_type() -> None:
    torch.manual_seed(0)
    layers = [SameLinear(3, 4), LayerNormTimm(4), nn.Tanh(), DoubledLinear(4, 4), nn.GELU()]
    model = _randomized(nn.Sequential(*layers, nn.RMSNorm(4), nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    found = routing(model, x)
    assert set(found.modules) == {"0", "1", "5", "6"}
    assert found.fallback == ["3.weight", "3.bias"]
    assert "not the one the rule for DoubledLinear assumes" in found.rows_reasons["3"]
    assert_structured_matches_oracle(model, x)
    image = _randomized(nn.Sequential(nn.Conv2d(2, 3, 3), LayerNorm2d(3), nn.Tanh(),
                                      nn.Flatten(), nn.Linear(3 * 3 * 3, 2)))  # fmt: skip
    xi = torch.randn(4, 2, 5, 5)
    found = routing(image, xi)
    assert set(found.modules) == {"0", "4"} and found.fallback == ["1.weight", "1.bias"]
    assert_structured_matches_oracle(image, xi)


class AttentionPool(nn.Module):
    """Self-attention through nn.MultiheadAttention, called with ``options``, pooled."""

    def __init__(self, attention: nn.MultiheadAttention | None = None, **options: object) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = attention or nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)
        self.options = options

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        seq = h if self.attn.batch_first else h.transpose(0, 1)
        options = dict(self.options)
        if options.pop("causal", False):
            options["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(
                x.shape[1], dtype=x.dtype
            )
            options["is_causal"] = True
        if options.pop("padding", False):  # the last position of every sample is padding
            options["key_padding_mask"] = torch.arange(x.shape[1]).expand(x.shape[0], -1) == (
                x.shape[1] - 1
            )
        if options.pop("self_only", False):  # a subclass taking the sequence once
            attended, weights = self.attn(seq, **options)
        elif options.pop("cross", False):  # keys and values from another tensor
            attended, weights = self.attn(seq, torch.tanh(seq), torch.tanh(seq), **options)
        else:
            attended, weights = self.attn(seq, seq, seq, **options)
        attended = attended if self.attn.batch_first else attended.transpose(0, 1)
        h = self.norm(h + attended)
        pooled = h.mean(dim=1)
        if weights is not None:  # the averaged attention weights feed F too
            pooled = pooled + (weights.flatten(1) ** 2).mean(dim=1, keepdim=True)
        return self.head(pooled)


ATTENTION_PARAMETERS = {
    "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"
}  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"need_weights": False},
        {},  # need_weights=True: the averaged weights are returned and used
        {"need_weights": False, "causal": True},
        {"average_attn_weights": False, "padding": True},
        {"need_weights": False, "sequence_first": True},
    ],
    ids=["plain", "weights", "causal-mask", "padding-mask", "sequence-first"],
)
def test_multihead_self_attention_is_structured(options: dict) -> None:
    """Its packed in-projection and out_proj get factors (no Jacobian rows) under every mask
    and option, and the kernel equals the dense oracle."""
    torch.manual_seed(0)
    options = dict(options)
    batch_first = not options.pop("sequence_first", False)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    model, x = _randomized(AttentionPool(attention, **options)), torch.randn(4, 5, 3)
    found = routing(model, x)
    assert {"attn", "attn.out_proj"} <= set(found.modules)
    assert not ATTENTION_PARAMETERS & set(found.fallback)
    assert_structured_matches_oracle(model, x)


def test_transformer_encoder_layers_are_structured_throughout() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    model = _randomized(nn.Sequential(nn.Linear(3, 8), layer, nn.Flatten(), nn.Linear(40, 2)))
    x = torch.randn(4, 5, 3)
    found = routing(model, x.double())
    assert found.fallback == [] and "1.self_attn" in found.modules
    assert_structured_matches_oracle(model, x)


class SelfOnlyAttention(nn.MultiheadAttention):
    """A subclass called with one argument: its calls do not fit nn.MultiheadAttention's."""

    def forward(self, x: Tensor, **options: object) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        return super().forward(x, x, x, **options)


class ScaledAttention(nn.MultiheadAttention):
    """A subclass whose forward computes something else than its base's."""

    def forward(self, *args: object, **kwargs: object) -> tuple[Tensor, Tensor | None]:
        out, weights = super().forward(*args, **kwargs)
        return 2.0 * out, weights


@pytest.mark.parametrize(
    ("attention", "options", "why"),
    [
        (lambda: nn.MultiheadAttention(8, 2, batch_first=True), {"cross": True},
         "not self-attention"),
        (lambda: nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True), {},
         "add_bias_kv"),
        (lambda: nn.MultiheadAttention(8, 2, batch_first=True, kdim=8, vdim=6), {"cross": True},
         "separate q/k/v"),
        (lambda: ScaledAttention(8, 2, batch_first=True), {}, "differs from its own"),
        (lambda: SelfOnlyAttention(8, 2, batch_first=True), {"self_only": True},
         "could not recompute the call"),
    ],
    ids=["cross-attention", "bias-kv", "kdim-vdim", "subclass", "other-signature"],
)  # fmt: skip
def test_multihead_attention_the_rule_cannot_serve_takes_rows(attention, options, why) -> None:
    torch.manual_seed(0)
    model, x = _randomized(AttentionPool(attention(), **options)), torch.randn(4, 5, 3)
    if why == "separate q/k/v":  # keys of width 8 and values of width 6

        def forward(x: Tensor) -> Tensor:
            h = model.embed(x)
            return model.head(model.attn(h, h, h[..., :6])[0].mean(dim=1))

        model.forward = forward  # type: ignore[method-assign]
    found = routing(model, x)
    assert why in found.rows_reasons["attn"]
    assert {"embed", "head"} <= set(found.modules)
    assert_structured_matches_oracle(model, x)


class SharedUse(nn.Module):
    """A module called on a tensor shared by all samples, whose output is then used in a way
    that is not a broadcast over the batch: expanding it to the batch would change F."""

    def __init__(self, reduce: bool) -> None:
        super().__init__()
        self.reduce = reduce
        self.pos = nn.Embedding(6, 3)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        p = self.pos(torch.arange(x.shape[1]).unsqueeze(0))  # (1, T, 3)
        p = p.sum(dim=0) if self.reduce else p.view(x.shape[1], 3)  # (T, 3)
        return self.lin(torch.tanh(x + p)).sum(dim=1)


@pytest.mark.parametrize("reduce", [True, False], ids=["changes-F", "breaks-forward"])
def test_shared_output_that_cannot_be_expanded_takes_rows(reduce: bool) -> None:
    torch.manual_seed(0)
    model, x = SharedUse(reduce), torch.randn(4, 5, 3)
    found = routing(model, x)
    assert set(found.modules) == {"lin"} and found.fallback == ["pos.weight"]
    assert "shared by all samples" in found.rows_reasons["pos"]
    assert_structured_matches_oracle(model, x)


class Scale(nn.Module):
    """A user's layer: z = a ⊙ w with w (d,) shared over positions."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, a: Tensor) -> Tensor:
        return a * self.weight


class ScaleRule(LayerRule):
    def reference(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return inputs * module.weight

    def factors(self, module: nn.Module, uses: list, k: int) -> list:
        c, d = uses[0][0].shape[0], module.weight.shape[0]
        grads = sum(
            (cot * a.unsqueeze(1)).reshape(c, k, -1, d).sum(dim=2) for a, cot in uses
        )  # per-sample gradient Σ_t δ_t ⊙ a_t, (c, k, d)
        return [("rows", grads.reshape(c * k, d), None)]


class Affine(nn.Module):
    """A user's layer that computes F.linear (but is no nn.Linear)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, a: Tensor) -> Tensor:
        return F.linear(a, self.weight, self.bias)


def test_register_rule_for_users_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_rules, "RULES", dict(layer_rules.RULES))
    torch.manual_seed(0)
    model = nn.Sequential(Affine(3, 4), nn.Tanh(), Scale(4), nn.GELU(), Affine(4, 2))
    x = torch.randn(5, 6, 3)
    assert routing(model, x).modules == {}  # no rule yet: every parameter takes rows
    plstar.register_rule(Affine, layer_rules.RULES[nn.Linear])
    plstar.register_rule(f"{Scale.__module__}.{Scale.__qualname__}", ScaleRule())
    found = routing(model, x)
    assert set(found.modules) == {"0", "2", "4"} and found.fallback == []
    assert_structured_matches_oracle(model, x)


def test_register_rule_refuses_what_is_not_a_layer_type_or_rule() -> None:
    with pytest.raises(plstar.PlstarInputError, match="module_type"):
        plstar.register_rule(42, LayerRule())  # type: ignore[arg-type]
    with pytest.raises(plstar.PlstarInputError, match=r"rule must be a plstar\.LayerRule"):
        plstar.register_rule(Affine, F.linear)  # type: ignore[arg-type]


def test_layers_without_a_rule_take_rows_named_in_the_plan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2 * 2, 4), nn.GELU(),
        nn.Linear(4, 2),
    )  # fmt: skip
    x = torch.randn(4, 1, 3, 3, 3)
    modules, fallback = structured.split_parameters(make_functional(model, x))
    assert set(modules) == {"3", "5"} and fallback == ["0.weight", "0.bias"]
    K, plan = planned_tangent_kernel(model, x, implementation="structured")
    assert plan.rows_parameters == ("0.weight", "0.bias")
    assert dict(plan.rows_reasons) == {"0": "no rule for Conv3d"}
    assert relative_error(K, dense_kernel(model, x)) < 1e-10
