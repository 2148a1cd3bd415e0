from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from plstar.errors import PlstarInputError
from plstar.models import (
    ACTIVATIONS,
    NTKConv2d,
    NTKLinear,
    activation_module,
    cnn,
    describe_model,
    load_model_factory,
    mlp,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- layers ---------------------------------------------------------------------------------


def test_ntk_linear_forward_matches_formula() -> None:
    layer = NTKLinear(5, 3, generator=_gen(), dtype=torch.float64)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(3, dtype=torch.float64, generator=_gen(1)))
    x = torch.randn(4, 5, dtype=torch.float64, generator=_gen(2))
    expected = x @ layer.weight.T / math.sqrt(5) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-14, atol=1e-14)
    assert (layer.in_features, layer.out_features) == (5, 3)


def test_ntk_linear_bias_starts_at_zero_and_can_be_omitted() -> None:
    assert torch.equal(NTKLinear(4, 6).bias, torch.zeros(6))
    no_bias = NTKLinear(4, 6, bias=False)
    assert no_bias.bias is None and len(list(no_bias.parameters())) == 1


def test_ntk_weights_are_standard_normal() -> None:
    w = NTKLinear(400, 500, generator=_gen(), dtype=torch.float64).weight.detach().flatten()
    # 2e5 samples: standard errors of mean, variance and 4th moment are ~2e-3, 3e-3 and 1e-2.
    assert abs(w.mean().item()) < 0.01
    assert w.var().item() == pytest.approx(1.0, abs=0.02)
    assert (w**4).mean().item() == pytest.approx(3.0, abs=0.1)


def test_ntk_conv_matches_formula() -> None:
    conv = NTKConv2d(2, 3, 3, padding=1, generator=_gen(), dtype=torch.float64)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=_gen(1))
    expected = nn.functional.conv2d(x, conv.weight, padding=1) / math.sqrt(2 * 3 * 3)
    expected = expected + conv.bias[:, None, None]
    torch.testing.assert_close(conv(x), expected, rtol=1e-14, atol=1e-14)
    # One output pixel by hand: the centre pixel sums over all 2*3*3 inputs of its window.
    by_hand = (conv.weight[1] * x[0, :, 1:4, 1:4]).sum() / math.sqrt(18) + conv.bias[1]
    torch.testing.assert_close(conv(x)[0, 1, 2, 2], by_hand)


def test_erf_activation() -> None:
    act = activation_module("erf")
    x = torch.tensor([-2.0, 0.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        act(x), torch.tensor([math.erf(v) for v in x.tolist()], dtype=torch.float64)
    )


def test_every_listed_activation_builds_and_unknown_lists_choices() -> None:
    x = torch.linspace(-2, 2, 9)
    for name in ACTIVATIONS:
        assert activation_module(name)(x).shape == x.shape
    assert torch.equal(activation_module("identity")(x), x)
    with pytest.raises(
        PlstarInputError, match="tanh, relu, gelu, sigmoid, softplus, erf, identity"
    ):
        activation_module("swish")


# --- mlp / cnn ------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_mlp_depth_counts_linear_layers(depth: int) -> None:
    net = mlp(4, 16, depth, 2)
    linears = [m for m in net if isinstance(m, NTKLinear)]
    assert len(linears) == depth and len(net) == 2 * depth - 1
    assert (linears[0].in_features, linears[-1].out_features) == (4, 2)
    assert all(lin.in_features == 16 for lin in linears[1:])
    assert net(torch.randn(7, 4)).shape == (7, 2)


def test_mlp_standard_parameterization_uses_torch_linear_and_output_activation() -> None:
    net = mlp(3, 8, 2, activation="relu", parameterization="standard", output_activation="tanh")
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear, nn.Tanh]
    assert net(torch.randn(5, 3) * 100).abs().max().item() <= 1.0


def test_mlp_without_bias_has_only_weights() -> None:
    net = mlp(3, 8, 3, bias=False)
    assert all(name.endswith("weight") for name, _ in net.named_parameters())


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_same_generator_seed_gives_identical_weights(parameterization: str) -> None:
    torch.manual_seed(1)
    a = mlp(5, 32, 3, parameterization=parameterization, generator_seed=11)
    state_after = torch.get_rng_state()
    torch.manual_seed(2)
    b = mlp(5, 32, 3, parameterization=parameterization, generator_seed=11)
    c = mlp(5, 32, 3, parameterization=parameterization, generator_seed=12)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)
    # The seeded build must not consume the caller's global RNG stream.
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), state_after)


def test_mlp_dtype_is_applied_to_all_parameters() -> None:
    for parameterization in ("ntk", "standard"):
        net = mlp(3, 4, 2, parameterization=parameterization, dtype=torch.float64)
        assert {p.dtype for p in net.parameters()} == {torch.float64}


def test_ntk_mlp_preactivations_have_unit_variance_on_sphere_inputs() -> None:
    # Rows of norm sqrt(d) give first-layer pre-activations ~ N(0, 1), the point of NTK scaling.
    d = 64
    x = torch.randn(200, d, dtype=torch.float64, generator=_gen(3))
    x = x * (math.sqrt(d) / x.norm(dim=1, keepdim=True))
    pre = mlp(d, 2000, 2, generator_seed=0, dtype=torch.float64)[0](x)
    assert pre.var().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"depth": 0},
        {"out_features": -1},
        {"width": 2.5},
        {"activation": "swish"},
        {"output_activation": "nope"},
        {"parameterization": "mup"},
        {"dtype": torch.int64},
    ],
)
def test_mlp_bad_specs_are_refused(kwargs: dict) -> None:
    args = {"in_features": 3, "width": 4, "depth": 2} | kwargs
    with pytest.raises(PlstarInputError):
        mlp(**args)


def test_cnn_structure_and_output_shape() -> None:
    net = cnn(2, 6, 4, 3, out_features=5, generator_seed=0, dtype=torch.float64)
    convs = [m for m in net if isinstance(m, NTKConv2d)]
    assert len(convs) == 3 and convs[0].in_channels == 2
    assert all(c.kernel_size == (3, 3) and c.padding == 1 for c in convs)
    assert isinstance(net[-2], nn.Flatten) and net[-1].in_features == 4 * 6 * 6
    assert net(torch.randn(3, 2, 6, 6, dtype=torch.float64)).shape == (3, 5)


def test_cnn_standard_parameterization_uses_torch_layers() -> None:
    net = cnn(1, 4, 3, 1, parameterization="standard", activation="relu")
    assert [type(m) for m in net] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    with pytest.raises(PlstarInputError, match="image_size"):
        cnn(1, 0, 3, 1)


# --- user factories and descriptions --------------------------------------------------------


def test_load_model_factory_builds_the_returned_module(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(
        "import torch\n"
        "from dataclasses import dataclass\n"
        "@dataclass\nclass Cfg:\n    width: int = 3\n"
        "def build():\n    return torch.nn.Linear(2, Cfg().width)\n"
    )
    model = load_model_factory(f"{tmp_path / 'user.py'}:build")
    assert isinstance(model, nn.Linear) and model.out_features == 3


def test_load_model_factory_errors(tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(
        "import torch\nNUMBER = 3\ndef not_module():\n    return 7\ndef build(x):\n    return x\n"
    )
    (tmp_path / "broken.py").write_text("import torch\nraise RuntimeError('boom in user code')\n")
    cases = {
        str(user): "must look like 'path/to/file.py:factory_name'",
        f"{tmp_path / 'absent.py'}:build": "model file not found",
        f"{tmp_path / 'broken.py'}:build": "RuntimeError: boom in user code",
        f"{user}:missing": r"no attribute 'missing'; it defines \[.*'not_module'",
        f"{user}:NUMBER": "not a callable factory",
        f"{user}:not_module": "returned a int, expected a torch.nn.Module",
        f"{user}:build": "take no arguments",
    }
    for spec, message in cases.items():
        with pytest.raises(PlstarInputError, match=message):
            load_model_factory(spec)


def test_describe_model_names_layers_and_counts_trainable_parameters() -> None:
    net = mlp(3, 4, 2)
    net[2].bias.requires_grad_(False)
    text = describe_model(net)
    # m = (3*4 + 4) + (4*1) trainable; the frozen output bias is excluded.
    assert text == "Sequential(NTKLinear, Tanh, NTKLinear), m=20 trainable parameters"
    assert "\n" not in describe_model(cnn(1, 8, 16, 4))
