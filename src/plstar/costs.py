"""What one sample costs a model: the bytes autograd saves for its backward pass and the flops
of its forward pass, measured on one sample so that plans fit any module."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from plstar.functional import FunctionalModel


@dataclass(frozen=True)
class SampleCosts:
    """What one sample costs the model: autograd's saved bytes and forward-pass flops."""

    activation_bytes: int
    forward_flops: float


# The products a forward pass spends its flops in, by torch function name: 2·(output elements)·
# (length of the contracted dimension), read from the argument at this index (its last
# dimension; for convolutions the product of the weight's dimensions past the first).
_PRODUCTS = {
    "linear": 1, "matmul": 0, "__matmul__": 0, "mm": 0, "bmm": 0, "mv": 0, "addmm": 1,
    "baddbmm": 1, "addmv": 1, "conv1d": 1, "conv2d": 1, "conv3d": 1,
}  # fmt: skip


class _FlopCount(TorchFunctionMode):
    """Flops of the matrix products, convolutions and attention a forward pass calls (torch's
    FlopCounterMode would import torch._dynamo, seconds on a first call)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        try:
            if name in _PRODUCTS and isinstance(out, Tensor):
                operand = args[_PRODUCTS[name]]
                inner = operand[0].numel() if name.startswith("conv") else operand.shape[-1]
                self.flops += 2.0 * out.numel() * inner
            elif name == "scaled_dot_product_attention":
                q, k = args[0], args[1]
                self.flops += 4.0 * q.numel() * k.shape[-2]
        except (AttributeError, IndexError, TypeError):  # an overload this count does not know
            pass
        return out


# Costs measured per model, with the shapes they were measured for: a repeated call (a monitor,
# a kernel per training step) does not run the counting forward pass again (weakly held).
_MEASURED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, SampleCosts]] = (
    weakref.WeakKeyDictionary()
)


def _shapes(fmodel: FunctionalModel, x: Tensor) -> tuple:
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in fmodel.params.items())
    return params, tuple(x.shape[1:]), x.dtype, x.device


def sample_costs(fmodel: FunctionalModel, x: Tensor) -> SampleCosts:
    """Bytes autograd saves for one sample's backward pass, parameters (and views of them)
    excluded (they are saved too, but once per batch, not per sample), and the flops of its
    forward pass in matrix products, convolutions and attention (at least 2·m). One forward
    pass over x[:1], unless this model was measured for the same parameter shapes, sample
    shape, dtype and device (then none)."""
    remembered = _MEASURED.get(fmodel.module)
    if remembered is not None and remembered[0] == _shapes(fmodel, x):
        return remembered[1]
    measured = _measure(fmodel, x)
    _MEASURED[fmodel.module] = (_shapes(fmodel, x), measured)
    return measured


def _measure(fmodel: FunctionalModel, x: Tensor) -> SampleCosts:
    saved = 0
    params = {k: v.detach().requires_grad_(True) for k, v in fmodel.params.items()}
    shared = {p.untyped_storage().data_ptr() for p in [*params.values(), *fmodel.buffers.values()]}

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in shared:
            saved += t.numel() * t.element_size()
        return t

    counter = _FlopCount()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with counter:
            fmodel(params, x[:1]).sum()
    return SampleCosts(max(saved, 1), max(counter.flops, 2.0 * fmodel.m))


def activation_bytes_per_sample(fmodel: FunctionalModel, x: Tensor) -> int:
    """Bytes autograd saves for one sample's backward pass (see :func:`sample_costs`)."""
    return sample_costs(fmodel, x).activation_bytes
