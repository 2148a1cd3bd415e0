"""Shared float64 oracles and a zoo of small models covering the layer types plstar must handle."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn
from torch.func import functional_call

# The property tests draw the same examples on every run, so a CI run never fails on a case no
# earlier run saw; HYPOTHESIS_PROFILE=explore draws new ones (for looking for bugs, not for CI).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


def sigint_as_python_sets_it() -> None:
    """``preexec_fn`` for a child that must stop on SIGINT: a shell's background job (CI run with
    ``&``, nohup) starts with SIGINT ignored, a child inherits that, and Python then never raises
    KeyboardInterrupt; with the default disposition at exec, Python installs its own handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args: list[str]) -> int:
    """Run the ``plstar`` command in-process; return its exit code."""
    from plstar.cli import main

    try:
        main(args)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """Oracle: DF (n·k, m), sample-major rows, by reverse passes through the module's own
    Parameters (every use of a tied or shared one counts), never through functional_call."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = model(x).reshape(-1)
        try:
            seeds = torch.eye(out.numel(), dtype=out.dtype)
            grads = torch.autograd.grad(
                out, params, seeds, is_grads_batched=True, allow_unused=True
            )
        except RuntimeError:  # an op without a batching rule: one reverse pass per output
            rows = [
                torch.autograd.grad(o, params, retain_graph=True, allow_unused=True) for o in out
            ]
            grads = tuple(
                None if parts[0] is None else torch.stack(parts)  # type: ignore[misc]
                for parts in zip(*rows, strict=True)
            )
    return torch.cat(
        [
            torch.zeros(out.numel(), p.numel(), dtype=p.dtype) if g is None else g.flatten(1)
            for g, p in zip(grads, params, strict=True)
        ],
        dim=1,
    ).detach()


def dense_kernel(model: nn.Module, x: Tensor, x2: Tensor | None = None) -> Tensor:
    """Oracle: K = DF(x) DF(x2)ᵀ from dense Jacobians."""
    j1 = dense_jacobian(model, x)
    return j1 @ (j1 if x2 is None else dense_jacobian(model, x2)).T


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def as_function_of_flat(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """F(w) with w the flat parameter vector: lets torch.func.hessian build exact oracles.

    Each (module, attribute) holding a trainable Parameter gets its slice of w once: torch's
    tie_weights would swap a module used at two positions twice and restore it wrongly.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    index = {id(p): i for i, (_, p) in enumerate(named)}
    slots: dict[tuple[int, str], tuple[str, int]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attribute, p in module._parameters.items():
            if p is not None and id(p) in index:
                path = f"{prefix}.{attribute}" if prefix else attribute
                slots.setdefault((id(module), attribute), (path, index[id(p)]))

    def forward(w: Tensor) -> Tensor:
        pieces, start = [], 0
        for _, p in named:
            pieces.append(w[start : start + p.numel()].reshape(p.shape))
            start += p.numel()
        bound = {path: pieces[i] for path, i in slots.values()}
        out = functional_call(model, bound, (x,), tie_weights=False)
        return out.reshape(x.shape[0], -1)

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


class TiedHead(nn.Module):
    """Token embedding whose matrix is also the output head's weight (two modules, one Parameter),
    with a Linear between them that the structured rules still cover."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens).mean(dim=1))))


class Symmetric(nn.Module):
    """Parametrization W = (A + Aᵀ)/2 of a square weight."""

    def forward(self, a: Tensor) -> Tensor:
        return (a + a.mT) / 2


def _mlp(activation: type[nn.Module], k: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), activation(), nn.Linear(6, 5), activation(), nn.Linear(5, k)
    )


def _cnn(k: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.GELU(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, k),
    )  # fmt: skip


def _tied_module() -> nn.Module:
    """One Linear at two positions of a Sequential (paths 0 and 2, one module object)."""
    layer = nn.Linear(4, 4)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(4, 1))


def _shared_block() -> nn.Module:
    """A block (Linear + GELU) registered at two places of a bigger model."""
    block = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    return nn.Sequential(nn.Linear(4, 3), block, nn.Linear(3, 3), nn.Tanh(), block, nn.Linear(3, 2))


def _parametrized() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    nn.utils.parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


ZOO: dict[str, Callable[[torch.Generator], tuple[nn.Module, Tensor]]] = {
    "mlp-tanh-k1": lambda g: (_mlp(nn.Tanh, 1), torch.randn(7, 4, generator=g)),
    "mlp-relu-k3": lambda g: (_mlp(nn.ReLU, 3), torch.randn(6, 4, generator=g)),
    "mlp-gelu-k3": lambda g: (_mlp(nn.GELU, 3), torch.randn(5, 4, generator=g)),
    "cnn-k3": lambda g: (_cnn(3), torch.randn(4, 1, 5, 5, generator=g)),
    "embedding-k2": lambda g: (TokenModel(11, 4, 2), torch.randint(0, 11, (6, 3), generator=g)),
    "shared-weights-k2": lambda g: (SharedWeights(3, 2), torch.randn(6, 3, generator=g)),
    "tied-module-k1": lambda g: (_tied_module(), torch.randn(6, 4, generator=g)),
    "shared-block-k2": lambda g: (_shared_block(), torch.randn(5, 4, generator=g)),
    "tied-head-k5": lambda g: (TiedHead(5, 3), torch.randint(0, 5, (4, 3), generator=g)),
    "parametrized-k2": lambda g: (_parametrized(), torch.randn(5, 4, generator=g)),
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
