"""Shared float64 oracles and a zoo of small models covering the layer types plstar must handle."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


@pytest.fixture(autouse=True)
def float64_by_default(request: pytest.FixtureRequest):
    """Oracle tests run in float64 throughout; modules opt in with ``DEFAULT_DTYPE = torch.float64``."""
    wanted = getattr(request.module, "DEFAULT_DTYPE", None)
    if wanted is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(wanted)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_cli(args: list[str]) -> int:
    """Run the ``plstar`` command in-process; return its exit code."""
    from plstar.cli import main

    try:
        main(args)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """Oracle: DF (n·k, m) from one jacrev of the whole batch, sample-major rows."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jac = jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(params)
    return torch.cat([jac[name].reshape(jac[name].shape[0], -1) for name in params], dim=1)


def dense_kernel(model: nn.Module, x: Tensor, x2: Tensor | None = None) -> Tensor:
    """Oracle: K = DF(x) DF(x2)ᵀ from dense Jacobians."""
    j1 = dense_jacobian(model, x)
    return j1 @ (j1 if x2 is None else dense_jacobian(model, x2)).T


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def as_function_of_flat(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """F(w) with w the flat parameter vector: lets torch.func.hessian build exact oracles."""
    named = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]

    def forward(w: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in named:
            params[name] = w[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, params, (x,)).reshape(x.shape[0], -1)

    return forward


class SharedWeights(nn.Module):
    """One hidden layer applied twice: its parameters enter F through two paths."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.out = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class TokenModel(nn.Module):
    """Embedding of integer tokens, mean-pooled, then a linear read-out."""

    def __init__(self, vocab: int, dim: int, k: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, k)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(tokens).mean(dim=1)))


def _mlp(activation: type[nn.Module], k: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), activation(), nn.Linear(6, 5), activation(), nn.Linear(5, k)
    )


def _cnn(k: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.GELU(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, k),
    )  # fmt: skip


ZOO: dict[str, Callable[[torch.Generator], tuple[nn.Module, Tensor]]] = {
    "mlp-tanh-k1": lambda g: (_mlp(nn.Tanh, 1), torch.randn(7, 4, generator=g)),
    "mlp-relu-k3": lambda g: (_mlp(nn.ReLU, 3), torch.randn(6, 4, generator=g)),
    "mlp-gelu-k3": lambda g: (_mlp(nn.GELU, 3), torch.randn(5, 4, generator=g)),
    "cnn-k3": lambda g: (_cnn(3), torch.randn(4, 1, 5, 5, generator=g)),
    "embedding-k2": lambda g: (TokenModel(11, 4, 2), torch.randint(0, 11, (6, 3), generator=g)),
    "shared-weights-k2": lambda g: (SharedWeights(3, 2), torch.randn(6, 3, generator=g)),
}


@pytest.fixture(params=sorted(ZOO))
def zoo_case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Tensor]:
    """(name, float64 model in eval mode, inputs) for every zoo entry, deterministic."""
    torch.manual_seed(0)
    model, x = ZOO[request.param](torch.Generator().manual_seed(1))
    return request.param, model.double().eval(), x


def assert_nonblank_pngs(figures: dict) -> None:
    """Every figure renders to a PNG (signature) with some variation in its pixels (not blank)."""
    import io

    from matplotlib.image import imread

    from plstar.plots import png_bytes

    for name, figure in figures.items():
        content = png_bytes(figure)
        assert content.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert imread(io.BytesIO(content)).var() > 0, name


@functools.cache
def quick_result(number: int) -> Any:
    """The quick configuration of experiment ``number``, run once per test session."""
    from plstar.experiments.runner import evaluate

    return evaluate(number, quick=True)
