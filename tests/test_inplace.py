"""In-place operations after a hooked layer: structured kernels stay exact (float64 oracle), only
the modules whose recorded tensors change are copied, and the entry check names a module."""

from __future__ import annotations

import torch
from conftest import dense_kernel
from torch import Tensor, nn

import plstar
from plstar import recording
from plstar.entry_check import entry_check, verified_probe
from plstar.functional import make_functional
from plstar.structured import probe

DEFAULT_DTYPE = torch.float64


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_exact(model: nn.Module, x: Tensor) -> None:
    """structured and auto kernels, and structured operator products, against the oracle."""
    expected = dense_kernel(model, x)
    for implementation in ("structured", "auto"):
        K = plstar.tangent_kernel(model, x, implementation=implementation)
        assert relative_error(K, expected) < 1e-10, implementation
    blocked = plstar.tangent_kernel(model, x, implementation="structured", memory_budget=1)
    assert relative_error(blocked, expected) < 1e-10
    op = plstar.kernel_operator(model, x, implementation="structured")
    v = torch.randn(expected.shape[0], 2, generator=torch.Generator().manual_seed(0))
    assert relative_error(op @ v, expected @ v) < 1e-10


def _eval_batchnorm(channels: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.eval()


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: ReLU(inplace=True) after each BatchNorm, ``out += identity``."""

    def __init__(self, channels: int, g: torch.Generator) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = _eval_batchnorm(channels, g)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = _eval_batchnorm(channels, g)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet_blocks() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), BasicBlock(3, g), BasicBlock(3, g),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4),
    ).eval()  # fmt: skip


def test_resnet_blocks_with_inplace_relu_and_residual_add_are_exact() -> None:
    model, x = resnet_blocks(), torch.randn(5, 2, 5, 5)
    assert_exact(model, x)
    # the tensors changed in place are the stem conv's and the BatchNorms' outputs: only those
    # modules are copied, the block convolutions record their inputs as they are
    copied = {name for name, m in model.named_modules() if m in recording._IN_PLACE}
    assert copied == {"0", "2.bn1", "2.bn2", "3.bn1", "3.bn2"}


class InplaceActivations(nn.Module):
    """timm-style in-place activations on layer outputs, inside and outside a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 4), nn.SiLU(inplace=True), nn.Linear(4, 4))
        self.act = nn.Hardswish(inplace=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mlp(x)
        return self.out(self.act(h).relu_())


class OutputScaledInPlace(nn.Module):
    """``x += …``/``mul_`` on a layer's output inside a residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        z = self.mix(self.norm(h))
        z.mul_(torch.sigmoid(z))  # SiLU in place on mix's output
        z += h
        return self.out(z.mean(dim=1))


def test_inplace_activations_and_residual_adds_on_layer_outputs_are_exact() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for model, x, expected_copies in [
        (InplaceActivations(), torch.randn(5, 3, generator=g), {"mlp.0", "mlp.2"}),
        (OutputScaledInPlace(), torch.randn(4, 6, 3, generator=g), {"mix"}),
    ]:
        assert_exact(model, x)
        assert {n for n, m in model.named_modules() if m in recording._IN_PLACE} == expected_copies


def test_models_without_inplace_operations_copy_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2))
    x = torch.randn(4, 2, 5, 5)
    assert_exact(model, x)
    assert not any(m in recording._IN_PLACE for m in model.modules())


def test_unseen_inplace_changes_are_caught_by_the_reference_check(monkeypatch) -> None:
    """With version tracking switched off, the recorded outputs are stale; the probe's check of
    each rule's output against the recorded one gives those modules Jacobian rows instead."""
    model, x = resnet_blocks(), torch.randn(4, 2, 5, 5)
    monkeypatch.setattr(recording.LayerCall, "changed", lambda self: False)
    monkeypatch.setattr(recording, "_IN_PLACE", type(recording._IN_PLACE)())
    fmodel = make_functional(model, x)
    found = probe(fmodel, x)
    # the modules whose outputs ReLU(inplace=True) or ``+=`` changed (where it changed a value)
    assert {"0", "2.bn1", "2.bn2"} <= set(found.rows_reasons) <= {
        "0", "2.bn1", "2.bn2", "3.bn1", "3.bn2"
    }  # fmt: skip
    assert all("in-place change" in why for why in found.rows_reasons.values())
    assert entry_check(fmodel, x, found).total < 1e-12
    assert verified_probe(fmodel, x, strict=True) is not None
