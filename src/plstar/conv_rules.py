"""The structured rule of 1-D and 2-D convolutions: any padding, padding mode, stride, dilation
and number of groups (depthwise included), and plstar's NTK convolution.

A convolution is a weight applied at every output position t to that position's input patch:
z_t = W_g a_t per group g. Its factors are the patches and the output cotangents at all
positions (:func:`plstar.factors.weight_factors`); padding is applied explicitly first, exactly
as the module pads (``padding='same'`` pads the extra element on the right, as PyTorch does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plstar.factors import Factor, LayerRule, Use, weight_factors, weight_inputs


def _tuple(value: int | tuple[int, ...], size: int) -> tuple[int, ...]:
    return (value,) * size if isinstance(value, int) else tuple(value)


def _pads(module: nn.Module, spatial: int) -> list[int]:
    """F.pad's amounts (last dimension first, left then right) the module's forward applies."""
    kernel = _tuple(module.kernel_size, spatial)
    dilation = _tuple(getattr(module, "dilation", 1), spatial)
    padding = module.padding
    if padding == "valid":
        return [0] * (2 * spatial)
    pads: list[int] = []
    for d in reversed(range(spatial)):
        if padding == "same":
            total = dilation[d] * (kernel[d] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [_tuple(padding, spatial)[d]] * 2
    return pads


def _padded(module: nn.Module, a: Tensor) -> Tensor:
    pads = _pads(module, a.ndim - 2)
    if not any(pads):
        return a
    mode = getattr(module, "padding_mode", "zeros")
    return F.pad(a, pads, mode="constant" if mode == "zeros" else mode)


def _patches(module: nn.Module, a: Tensor) -> Tensor:
    """Unfolded, padded input patches (c, T, groups, C_in/groups·∏kernel), per group in the order
    of that group's flattened weight."""
    a = _padded(module, a)
    spatial = a.ndim - 2
    kernel = _tuple(module.kernel_size, spatial)
    dilation = _tuple(getattr(module, "dilation", 1), spatial)
    stride = _tuple(module.stride, spatial)
    if spatial == 1:  # a 1-D convolution is a 2-D one of height 1
        a, kernel, dilation, stride = a.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(a, kernel, dilation=dilation, stride=stride)  # (c, C_in·∏kernel, T)
    c, groups = cols.shape[0], getattr(module, "groups", 1)
    return cols.view(c, groups, -1, cols.shape[-1]).permute(0, 3, 1, 2)


class ConvRule(LayerRule):
    """nn.Conv1d / nn.Conv2d (and subclasses that compute the same), or ``scaled`` for plstar's
    NTK convolution (output = scale·conv(x, W) + b). Memory of the patches: c·T·C_in·∏kernel."""

    def __init__(self, scaled: bool = False) -> None:
        self.scaled = scaled

    def unsupported(self, module: nn.Module) -> str | None:
        if module.weight.ndim not in (3, 4):
            return f"{module.weight.ndim - 2}-D convolutions have no rule"
        return None

    def reference(self, module: nn.Module, inputs: Tensor) -> Tensor:
        conv = F.conv1d if inputs.ndim == 3 else F.conv2d
        bias = None if self.scaled else module.bias
        spatial = inputs.ndim - 2
        out = conv(
            _padded(module, inputs), module.weight, bias, _tuple(module.stride, spatial), 0,
            _tuple(getattr(module, "dilation", 1), spatial), getattr(module, "groups", 1),
        )  # fmt: skip
        if not self.scaled:
            return out
        out = out * module.scale
        return out if module.bias is None else out + module.bias.view(-1, *[1] * spatial)

    def factors(self, module: nn.Module, uses: list[Use], k: int) -> list[Factor]:
        c, groups = uses[0][0].shape[0], getattr(module, "groups", 1)
        trainable = {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}
        patches = [_patches(module, a) for a, _ in uses]
        inputs = patches[0] if len(patches) == 1 else torch.cat(patches, dim=1)
        deltas = [
            cot.reshape(c * k, cot.shape[2], -1).transpose(1, 2).unflatten(2, (groups, -1))
            for _, cot in uses
        ]  # (c·k, T, groups, C_out/groups) per call
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
        has_bias = "bias" in trainable and module.bias is not None
        if "weight" in trainable:
            scale = module.scale if self.scaled else 1.0
            return weight_factors(weight_inputs(inputs, scale, has_bias), delta)
        if has_bias:
            return [("rows", delta.sum(dim=1).reshape(c * k, -1), None)]
        return []
