"""Structured (per-layer Gram) kernels against dense Jacobians, layer type by layer type."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_kernel
from torch import Tensor, nn

import plstar
from plstar import entry_check, recording, structured
from plstar.functional import make_functional
from plstar.models import cnn, mlp
from plstar.structured import split_parameters

DEFAULT_DTYPE = torch.float64


class Sequence(nn.Module):
    """A Linear applied at every position of a sequence, then LayerNorm, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(torch.tanh(self.mix(x))).mean(dim=1))


class ResidualLayerNorm(nn.Module):
    def __init__(self, d: int = 5, k: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(2)]
        )
        self.out = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class CustomScale(nn.Module):
    """A bare parameter and a PReLU: no rule, so they fall back to Jacobian rows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.act = nn.PReLU(4)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]))
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.lin(x))) * self.scale


class TiedEmbedding(nn.Module):
    """Input embedding tied to the output projection (weight shared by two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.proj = nn.Linear(4, 6, bias=False)
        self.proj.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(torch.tanh(self.embed(tokens).mean(dim=1)))


class WeightUsedOutsideForward(nn.Module):
    """Uses ``lin.weight`` directly as well as through ``lin``: invisible to forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)) @ self.lin.weight[:, :1]


def _models() -> dict[str, tuple[nn.Module, Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    bn = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    )
    with torch.no_grad():
        bn[1].running_mean.copy_(torch.randn(3))
        bn[1].running_var.copy_(torch.rand(3) + 0.5)
        bn[1].weight.copy_(torch.randn(3))
    return {
        "ntk-mlp": (
            mlp(4, 6, 3, 3, generator_seed=1, dtype=torch.float64),
            torch.randn(5, 4, generator=g),
        ),
        "ntk-cnn": (
            cnn(1, 5, 3, 2, 2, generator_seed=1, dtype=torch.float64),
            torch.randn(4, 1, 5, 5, generator=g),
        ),
        "strided-dilated-conv": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(3 * 4 * 4, 2),
            ),
            torch.randn(4, 2, 7, 7, generator=g),
        ),
        "conv1d-groupnorm": (
            nn.Sequential(
                nn.Conv1d(2, 4, 3, padding=1),
                nn.GroupNorm(2, 4),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(4 * 6, 1),
            ),
            torch.randn(5, 2, 6, generator=g),
        ),
        "conv-batchnorm-eval": (bn.eval(), torch.randn(4, 1, 6, 6, generator=g)),
        "sequence-layernorm": (Sequence(), torch.randn(5, 3, 3, generator=g)),
        "residual-layernorm": (ResidualLayerNorm(), torch.randn(5, 3, generator=g)),
        "fallback-parameters": (CustomScale(), torch.randn(5, 3, generator=g)),
        "tied-embedding": (TiedEmbedding(), torch.randint(0, 6, (5, 4), generator=g)),
    }


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_structured_kernel_equals_dense_jacobian_product(name: str) -> None:
    model, x = MODELS[name]
    model, x = model.double(), (x.double() if x.is_floating_point() else x)
    K = plstar.tangent_kernel(model, x, implementation="structured")
    expected = dense_kernel(model, x)
    assert float((K - expected).abs().max() / expected.abs().max()) < 1e-12


@pytest.mark.parametrize("name", sorted(MODELS))
def test_structured_cross_kernel_with_tiny_blocks(name: str) -> None:
    model, x = MODELS[name]
    model, x = model.double(), (x.double() if x.is_floating_point() else x)
    x1, x2 = x[:2], x[2:]
    K = plstar.tangent_kernel(model, x1, x2, implementation="structured", memory_budget=1)
    expected = dense_kernel(model, x1, x2)
    assert float((K - expected).abs().max() / expected.abs().max()) < 1e-12


@pytest.mark.parametrize("name", sorted(MODELS))
def test_structured_operator_products_match_dense_kernel(name: str) -> None:
    model, x = MODELS[name]
    model, x = model.double(), (x.double() if x.is_floating_point() else x)
    expected = dense_kernel(model, x)
    v = torch.randn(expected.shape[0], 3, generator=torch.Generator().manual_seed(0))
    # budgets: the features in one block, and so small that every sample is its own block
    for budget in (2**30, 2 * x.shape[0] * 2**20):
        op = plstar.kernel_operator(model, x, implementation="structured", memory_budget=budget)
        assert op.implementation == "structured"
        assert float((op @ v - expected @ v).abs().max() / (expected @ v).abs().max()) < 1e-12
    assert len(op.features) >= 1


def test_operator_auto_takes_products_when_features_do_not_fit() -> None:
    model, x = MODELS["ntk-mlp"]
    op = plstar.kernel_operator(model.double(), x.double(), memory_budget=1)
    assert op.implementation == "ntvp"
    with pytest.raises(plstar.PlstarInputError, match="memory budget"):
        plstar.kernel_operator(model.double(), x.double(), implementation="structured",
                               memory_budget=1)  # fmt: skip
    with pytest.raises(plstar.PlstarInputError, match="outside its module"):
        plstar.kernel_operator(WeightUsedOutsideForward().double(), torch.randn(4, 3),
                               implementation="structured")  # fmt: skip


def test_entry_check_is_remembered_per_model_and_signature(monkeypatch) -> None:
    model = mlp(3, 8, 2, 2, generator_seed=3, dtype=torch.float64)  # fresh: never checked
    x = torch.randn(4, 3, dtype=torch.float64)
    fmodel = make_functional(model, x)
    assert model not in entry_check._VERIFIED
    found = entry_check.verified_probe(fmodel, x, strict=True)
    check = entry_check.entry_check(fmodel, x, found)
    assert check.total < 1e-12 and set(check.units) == {"0", "2"}
    assert max(check.units.values()) < 1e-12
    assert entry_check._VERIFIED[model][0] == entry_check._signature(fmodel, x)

    def not_again(*args: object) -> None:
        raise AssertionError("the entry check ran again")

    monkeypatch.setattr(entry_check, "entry_check", not_again)
    monkeypatch.setattr(entry_check, "probe", not_again)  # its sizes are remembered too
    again = entry_check.verified_probe(fmodel, x, strict=True)
    assert again is not None and again.modules == found.modules
    assert again.bytes(torch.float32, 2) == found.bytes(torch.float32, 2)
    assert again.flops_per_pair(2) == found.flops_per_pair(2)
    model.float()  # another dtype: checked again
    fmodel32 = make_functional(model, x.float())
    assert entry_check._VERIFIED[model][0] != entry_check._signature(fmodel32, x.float())


def test_rules_cover_standard_layers_and_leave_the_rest_to_jacobian_rows() -> None:
    fmodel = make_functional(MODELS["fallback-parameters"][0].double(), torch.randn(2, 3))
    modules, fallback = split_parameters(fmodel)
    assert set(modules) == {"lin", "out"}
    assert set(fallback) == {"scale", "act.weight"}
    # shared across modules: served together, through their per-sample gradients
    tied = make_functional(MODELS["tied-embedding"][0], torch.randint(0, 6, (2, 4)))
    assert set(split_parameters(tied)[0]) == {"embed", "proj"}
    assert structured.tied_units(split_parameters(tied)[0]) == {"embed+proj": ("embed", "proj")}


def test_parameter_used_outside_forward_is_named_or_given_rows() -> None:
    torch.manual_seed(0)
    model, x = WeightUsedOutsideForward().double(), torch.randn(4, 3)
    with pytest.raises(
        plstar.PlstarInputError, match=r"module 'lin' \(Linear\).*outside its module"
    ):
        plstar.tangent_kernel(model, x, implementation="structured")
    # auto: that module alone takes Jacobian rows
    fmodel = make_functional(model, x)
    found = entry_check.verified_probe(fmodel, x, strict=False)
    assert found is not None and found.fallback == ["lin.weight", "lin.bias"]
    assert "disagree with plain gradients" in found.rows_reasons["lin"]
    K = plstar.tangent_kernel(model, x)
    assert torch.allclose(K, dense_kernel(model, x), rtol=1e-12, atol=1e-12)


def test_auto_picks_structured_where_its_grams_save_work() -> None:
    # dense layers of width 512: Σ(p + k²q) per sample pair against the Jacobian's k²·m
    model, x = mlp(8, 512, 3, 2, generator_seed=0, dtype=torch.float64), torch.randn(64, 8)
    fmodel = make_functional(model, x)
    plan = plstar.plan_kernel(
        fmodel, x, 64, implementation="auto", dtype=torch.float64, memory_budget=2**30
    )
    assert plan.implementation == "structured"
    assert plan.cache_columns


def test_float32_model_with_float64_gram_accumulation() -> None:
    model64 = mlp(8, 64, 3, 2, generator_seed=3, dtype=torch.float64)
    model32 = mlp(8, 64, 3, 2, dtype=torch.float32)
    model32.load_state_dict({name: t.float() for name, t in model64.state_dict().items()})
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    K32 = plstar.tangent_kernel(model32, x.float(), implementation="structured")
    K64 = plstar.tangent_kernel(model64, x, implementation="structured")
    assert K32.dtype == torch.float64
    assert float((K32 - K64).abs().max() / K64.abs().max()) < 1e-5


class TimeMajor(nn.Module):
    """Transposes to (T, n, d) before its Linear: the layer does not see the batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x.transpose(0, 1))).sum(dim=0)


def test_layer_that_does_not_see_batch_first_takes_jacobian_rows_alone() -> None:
    torch.manual_seed(0)
    model, x = TimeMajor().double(), torch.randn(4, 5, 3)
    fmodel = make_functional(model, x)
    found = structured.probe(fmodel, x)
    assert found.modules == {} and found.fallback == ["lin.weight", "lin.bias"]
    assert "batch as its first dimension" in found.rows_reasons["lin"]
    for implementation in ("structured", "auto"):
        K = plstar.tangent_kernel(model, x, implementation=implementation)
        assert torch.allclose(K, dense_kernel(model, x), rtol=1e-12, atol=1e-12)


def test_auto_takes_jacobian_when_grams_save_no_work() -> None:
    # 8×8 images, 3×3 convolutions: every conv layer takes the per-sample-gradient form, so the
    # structured contraction would do the Jacobian's flops with more overhead.
    model, x = cnn(1, 8, 8, 2, 1, generator_seed=0, dtype=torch.float64), torch.randn(6, 1, 8, 8)
    fmodel = make_functional(model, x)
    plan = plstar.plan_kernel(
        fmodel, x, 6, implementation="auto", dtype=torch.float64, memory_budget=2**30
    )
    assert plan.implementation == "jacobian"
    wide = mlp(8, 256, 3, 1, generator_seed=0, dtype=torch.float64)
    xm = torch.randn(6, 8)
    plan = plstar.plan_kernel(
        make_functional(wide, xm),
        xm,
        6,
        implementation="auto",
        dtype=torch.float64,
        memory_budget=2**30,
    )
    assert plan.implementation == "structured"
    assert torch.allclose(
        plstar.tangent_kernel(model, x), dense_kernel(model, x), rtol=1e-12, atol=1e-12
    )


def test_remembered_checks_do_not_keep_the_model_alive() -> None:
    import gc
    import weakref

    model = nn.Linear(3, 2).double()  # the root module is itself a rule module
    plstar.tangent_kernel(model, torch.randn(4, 3), implementation="structured")
    assert model in entry_check._VERIFIED
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_probe_in_groups_of_outputs_within_a_small_budget_gives_the_same_features() -> None:
    model, x = MODELS["conv-batchnorm-eval"]
    model, x = model.double(), x.double()
    fmodel = make_functional(model, x)
    whole = structured.probe(fmodel, x)
    grouped = structured.probe(fmodel, x, memory_budget=1)  # one output per pass
    assert whole.per_unit.keys() == grouped.per_unit.keys()
    for name, factors in whole.per_unit.items():
        for a, b in zip(factors, grouped.per_unit[name], strict=True):
            assert a[0] == b[0] and torch.allclose(a[1], b[1], rtol=1e-14, atol=1e-14)
            if a[2] is not None:
                assert torch.allclose(a[2], b[2], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["gram", "tokens"])
@pytest.mark.parametrize("same_block", [True, False], ids=["diagonal-block", "cross-block"])
def test_position_pair_contraction_equals_its_definition(kind: str, same_block: bool) -> None:
    """K[(i,a),(j,b)] = Σ_{t,s} W_ij[t,s] (D_(ia)t · D_(jb)s), W = input Grams or equal token
    ids, against the four-index einsum of the definition (float64)."""
    from plstar.factors import contract_factors, flops_per_pair, position_pair_flops

    g = torch.Generator().manual_seed(0)
    k, positions, p, q = 3, 6, 4, 5

    def factor(c: int) -> tuple[str, Tensor, Tensor]:
        if kind == "gram":
            first = torch.randn(c, positions, p, generator=g, dtype=torch.float64)
        else:
            first = torch.randint(0, 4, (c, positions), generator=g)
        return (kind, first, torch.randn(c * k, positions, q, generator=g, dtype=torch.float64))

    left = factor(4)
    right = left if same_block else factor(3)
    _, a1, d1 = left
    _, a2, d2 = right
    if kind == "gram":
        weights = torch.einsum("itp,jsp->ijts", a1, a2)
    else:
        weights = (a1[:, None, :, None] == a2[None, :, None, :]).double()
    c1, c2 = a1.shape[0], a2.shape[0]
    pairs = torch.einsum("ItQ,JsQ->IJts", d1, d2).view(c1, k, c2, k, positions, positions)
    expected = torch.einsum("iajbts,ijts->iajb", pairs, weights).reshape(c1 * k, c2 * k)
    K = contract_factors(left, right, k)
    assert float((K - expected).abs().max() / expected.abs().max()) < 1e-13
    width = p if kind == "gram" else 1
    assert flops_per_pair([left], k) == position_pair_flops(positions, width, k, q)


class InPlaceResidual(nn.Module):
    """In-place ReLU and ``+=`` after hooked layers: the recording must copy to stay right."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, k)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu_(self.inp(x))
        z = self.mid(h)
        z += h
        return self.out(torch.tanh(z))


@pytest.mark.parametrize("k", [1, 4, 7, 10])
@pytest.mark.parametrize("in_place", [False, True], ids=["plain", "in-place"])
@pytest.mark.parametrize("outputs_per_pass", [None, 3], ids=["all-outputs", "groups-of-3"])
def test_recorded_cotangents_equal_one_reverse_pass_per_output(
    k: int, in_place: bool, outputs_per_pass: int | None
) -> None:
    """Sweeps over fewer copies than outputs (k = 7: the last sweep seeds one of two copies)
    give, for every output a and sample i, the cotangent of one plain reverse pass of f_a."""
    torch.manual_seed(k)
    model = (InPlaceResidual(k) if in_place else ResidualLayerNorm(k=k)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    fmodel = make_functional(model, x)
    modules = structured.rule_modules(model)[0]
    got = recording.record(fmodel, x, modules, outputs_per_pass)
    outputs: dict[str, Tensor] = {}

    def keep(name: str, output: Tensor) -> Tensor:  # in-place operations change the clone
        outputs[name] = output
        return output.clone()

    hooks = [
        m.register_forward_hook(lambda m, a, o, name=name: keep(name, o))
        for name, m in modules.items()
    ]
    try:
        for a in range(k):
            out = model(x)
            names = list(outputs)
            grads = torch.autograd.grad(out[:, a].sum(), [outputs[n] for n in names])
            for call, cot in zip(got.calls, got.cotangents, strict=True):
                expected = grads[names.index(call.name)]
                assert torch.allclose(cot[a], expected, rtol=1e-13, atol=1e-14), (call.name, a)
    finally:
        for hook in hooks:
            hook.remove()


def test_replicas_stay_near_the_square_root_and_waste_few_reverse_copies() -> None:
    for k in range(1, 201):
        r = recording.replicas(k)
        sweeps = -(-k // r)
        assert 1 <= r <= min(k, 2 * k**0.5 + 1)
        assert sweeps <= 2 * k**0.5 + 1
        assert sweeps * r - k < r  # only the last sweep seeds fewer copies than it runs
        if k % max(1, round(k**0.5)) == 0:
            assert sweeps * r == k  # a divisor near √k: nothing wasted


class FreeParameters(nn.Module):
    """Parameters no module owns: a class token and a position embedding broadcast over the
    batch (per-sample gradients from the recording), a (1, d) shift used through its first row
    (its leaf's rows are not per-sample gradients) and a (1, d) matrix (its leaf changes F)."""

    def __init__(self, d: int = 4, k: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 6, d))
        self.shift = nn.Parameter(torch.randn(1, d))
        self.gate = nn.Parameter(torch.randn(1, d))
        self.out = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:  # x (c, 5, 3)
        h = self.inp(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = torch.tanh(h + self.shift[0])
        return self.out(h[:, 0] * (h[:, 1] @ self.gate.T))


def test_parameters_broadcast_over_the_batch_get_gradients_from_the_recording() -> None:
    torch.manual_seed(0)
    model = FreeParameters().double()
    x = torch.randn(5, 5, 3, dtype=torch.float64)
    found = structured.probe(make_functional(model, x), x)
    assert found.broadcast == ("cls_token", "pos_embed")
    assert found.fallback == ["shift", "gate"]
    assert list(found.rows_reasons) == [""]  # the model itself, for shift and gate
    for implementation in ("structured", "auto"):
        kernel = plstar.tangent_kernel(model, x, implementation=implementation)
        torch.testing.assert_close(kernel, dense_kernel(model, x), rtol=1e-10, atol=1e-12)
    cross = plstar.tangent_kernel(model, x[:2], x[2:], implementation="structured")
    torch.testing.assert_close(cross, dense_kernel(model, x)[:6, 6:], rtol=1e-10, atol=1e-12)
