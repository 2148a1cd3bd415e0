"""Model builders: NTK-parameterized layers, MLP/CNN builders, and user model factories.

NTK parameterization (THEORY.md, "Parameterizations"): every weight entry is N(0, 1) and the layer
divides its pre-activation by sqrt(fan_in), so the tangent kernel has a width-independent limit.
"standard" uses PyTorch's default layers and initialisation, which changes the width scaling laws.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.functional import conv2d, linear

from plstar.devices import HOST
from plstar.errors import PlstarInputError

Activation = Literal["tanh", "relu", "gelu", "sigmoid", "softplus", "erf", "identity"]
Parameterization = Literal["ntk", "standard"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


class Erf(nn.Module):
    """Elementwise error function; its NTK has a closed form, which makes it a useful test case."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


_ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "erf": Erf,
    "identity": nn.Identity,
}


def activation_module(name: str) -> nn.Module:
    """A fresh elementwise activation module for ``name`` (one of ``ACTIVATIONS``).

    Raises PlstarInputError for an unknown name, listing the choices.
    """
    if name not in _ACTIVATION_MODULES:
        raise PlstarInputError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}."
        )
    return _ACTIVATION_MODULES[name]()


class _NTKLayer(nn.Module):
    """Shared parameters of the NTK layers: a N(0, 1) weight, a zero bias, and 1/sqrt(fan_in)."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        generator: torch.Generator | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # drawn on the host: a seed gives the same weights whatever device the model moves to
        drawn = torch.randn(weight_shape, generator=generator, dtype=dtype, device=HOST)
        self.weight = nn.Parameter(drawn)
        zeros = torch.zeros(weight_shape[0], dtype=dtype, device=HOST)
        self.register_parameter("bias", nn.Parameter(zeros) if bias else None)
        # fan_in = everything a single output unit sums over: all dimensions but the first.
        self.scale = 1.0 / math.sqrt(math.prod(weight_shape[1:]))


class NTKLinear(_NTKLayer):
    """Linear layer in NTK parameterization: ``x @ weight.T / sqrt(in_features) + bias``.

    Shapes: weight (out_features, in_features) with N(0, 1) entries; bias (out_features,) zeros;
    input (..., in_features) -> output (..., out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__((out_features, in_features), bias, generator, dtype)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2 and self.bias is not None:  # one fused GEMM: bias + scale·x Wᵀ
            return torch.addmm(self.bias, x, self.weight.T, alpha=self.scale)
        out = linear(x, self.weight) * self.scale
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class NTKConv2d(_NTKLayer):
    """2-D convolution in NTK parameterization.

    Shapes: weight (out_channels, in_channels, kh, kw) with N(0, 1) entries; bias (out_channels,)
    zeros; input (n, in_channels, H, W) -> output (n, out_channels, H', W').
    Forward: ``conv2d(x, weight, stride, padding) / sqrt(in_channels * kh * kw) + bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__((out_channels, in_channels, kh, kw), bias, generator, dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        out = conv2d(x, self.weight, None, self.stride, self.padding) * self.scale
        return out if self.bias is None else out + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlstarInputError(f"{name} must be a positive integer, got {value!r}.")


def _check_options(parameterization: str, dtype: torch.dtype, *activations: str | None) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise PlstarInputError(
            f"unknown parameterization {parameterization!r}; choose one of "
            f"{', '.join(PARAMETERIZATIONS)}."
        )
    if not dtype.is_floating_point:
        raise PlstarInputError(f"dtype must be a floating type such as torch.float64, got {dtype}.")
    for name in activations:
        if name is not None:
            activation_module(name)


@contextlib.contextmanager
def _seeded(parameterization: str, seed: int | None) -> Iterator[torch.Generator | None]:
    """Yield the generator NTK layers draw from; seed the global RNG locally for "standard".

    PyTorch's default layers only draw from the global RNG, so for them the seed is applied inside
    fork_rng, leaving the caller's RNG state untouched either way.
    """
    if seed is None:
        yield None
    elif parameterization == "ntk":
        yield torch.Generator(device=HOST).manual_seed(seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield None


def _linear(
    in_features: int,
    out_features: int,
    parameterization: str,
    bias: bool,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> nn.Module:
    if parameterization == "ntk":
        return NTKLinear(in_features, out_features, bias, generator=generator, dtype=dtype)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int = 1,
    *,
    activation: str = "tanh",
    parameterization: str = "ntk",
    bias: bool = True,
    output_activation: str | None = None,
    generator_seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Fully connected network with ``depth`` linear layers and ``activation`` between them.

    Shapes: input (n, in_features) -> output (n, out_features). Depth 3 is
    in->width, act, width->width, act, width->out; depth 1 is a single linear map.
    ``output_activation`` (if given) follows the last layer. The same ``generator_seed`` gives
    identical weights regardless of the global RNG state, which it does not change.
    Raises PlstarInputError for non-positive sizes or unknown activation/parameterization.
    """
    _check_sizes(in_features=in_features, width=width, depth=depth, out_features=out_features)
    _check_options(parameterization, dtype, activation, output_activation)
    sizes = [in_features] + [width] * (depth - 1) + [out_features]
    layers: list[nn.Module] = []
    with _seeded(parameterization, generator_seed) as generator:
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            if i > 0:
                layers.append(activation_module(activation))
            layers.append(_linear(fan_in, fan_out, parameterization, bias, generator, dtype))
    if output_activation is not None:
        layers.append(activation_module(output_activation))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int,
    image_size: int,
    channels: int,
    depth: int,
    out_features: int = 1,
    *,
    activation: str = "tanh",
    parameterization: str = "ntk",
    generator_seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Convolutional network: ``depth`` 3x3 convolutions (padding 1), each followed by
    ``activation``, then Flatten and a linear readout.

    Shapes: input (n, in_channels, image_size, image_size) -> output (n, out_features); the readout
    maps channels * image_size**2 features to out_features.
    Raises PlstarInputError for non-positive sizes or unknown activation/parameterization.
    """
    _check_sizes(
        in_channels=in_channels,
        image_size=image_size,
        channels=channels,
        depth=depth,
        out_features=out_features,
    )
    _check_options(parameterization, dtype, activation)
    layers: list[nn.Module] = []
    with _seeded(parameterization, generator_seed) as generator:
        for i in range(depth):
            fan_in = in_channels if i == 0 else channels
            if parameterization == "ntk":
                conv: nn.Module = NTKConv2d(
                    fan_in, channels, 3, padding=1, generator=generator, dtype=dtype
                )
            else:
                conv = nn.Conv2d(fan_in, channels, 3, padding=1, dtype=dtype)
            layers += [conv, activation_module(activation)]
        layers.append(nn.Flatten())
        readout_in = channels * image_size**2
        layers.append(_linear(readout_in, out_features, parameterization, True, generator, dtype))
    return nn.Sequential(*layers)


def load_model_factory(
    spec: str, *, seed: int | None = None, arguments: tuple[Any, ...] = ()
) -> nn.Module:
    """Build a user model from ``"path/to/file.py:factory"``: import the file, call
    ``factory(*arguments)`` (``plstar certify --widths`` passes the width).

    With ``seed``, the import and the call run under torch's, numpy's and Python's random
    generators seeded with it, and every generator's state is restored afterwards: an unseeded
    factory then gives the same weights on every run, and the caller's random streams are untouched.
    Raises PlstarInputError when the spec has no ':', the file is missing or fails to import (the
    original error is included), the attribute is missing or not callable, the call fails, or the
    result is not an ``nn.Module``.
    """
    # rpartition: a Windows drive letter ("C:\\...") may contain ':' before the factory name.
    file_part, sep, attr = spec.rpartition(":")
    if not sep or not file_part or not attr:
        raise PlstarInputError(
            f"model spec {spec!r} must look like 'path/to/file.py:factory_name'."
        )
    path = Path(file_part)
    if not path.is_file():
        raise PlstarInputError(f"model file not found: {path} (from spec {spec!r}).")
    with _seeded_everywhere(seed):
        return _import_and_call(path, attr, arguments)


@contextlib.contextmanager
def _seeded_everywhere(seed: int | None) -> Iterator[None]:
    """Seed torch (CPU and CUDA), numpy's global and Python's generators; restore them after."""
    if seed is None:
        yield
        return
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    # Named devices: fork_rng warns on several GPUs otherwise (a stray line on the CLI's stderr).
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def import_user_file(path: Path, kind: str, label: str = "") -> ModuleType:
    """Run the Python file ``path`` as a module of its own (``kind`` names it: "model",
    "output"); its failure, sys.exit() included, is a one-line PlstarInputError starting with
    ``label``. Ctrl-C is not caught."""
    module_name = f"plstar_user_{kind}_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise PlstarInputError(
            f"{label}cannot import {path}: it must be a Python source file (.py)."
        )
    module = importlib.util.module_from_spec(module_spec)
    # Registered before execution so that dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # sys.exit() in the file is its error; Ctrl-C is not
        del sys.modules[module_name]
        raise PlstarInputError(
            f"{label}importing {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_and_call(path: Path, attr: str, arguments: tuple[Any, ...] = ()) -> nn.Module:
    module = import_user_file(path, "model")
    factory = getattr(module, attr, None)
    if factory is None:
        public = sorted(name for name in vars(module) if not name.startswith("_"))
        raise PlstarInputError(f"{path} has no attribute {attr!r}; it defines {public}.")
    if not callable(factory):
        raise PlstarInputError(
            f"{path}:{attr} is a {type(factory).__name__}, not a callable factory; define "
            f"'def {attr}() -> nn.Module'."
        )
    shown = ", ".join(repr(a) for a in arguments)
    try:
        model = factory(*arguments)
    except (Exception, SystemExit) as exc:
        takes = f"{len(arguments)} argument(s) ({shown})" if arguments else "no arguments"
        raise PlstarInputError(
            f"calling {path}:{attr}({shown}) failed: {type(exc).__name__}: {exc}; the factory "
            f"must take {takes}."
        ) from exc
    if not isinstance(model, nn.Module):
        raise PlstarInputError(
            f"{path}:{attr}({shown}) returned a {type(model).__name__}, expected a torch.nn.Module."
        )
    return model


def describe_model(model: nn.Module) -> str:
    """One line naming the model's leaf layers in order and its trainable parameter count m."""
    leaves = [type(module).__name__ for module in model.modules() if not any(module.children())]
    m = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = "" if leaves == [type(model).__name__] else f"({', '.join(leaves)})"
    return f"{type(model).__name__}{layers}, m={m:,} trainable parameters"
