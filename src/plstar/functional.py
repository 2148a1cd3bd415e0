"""From ``nn.Module`` to a pure function F(w; x) of the trainable parameters.

Every core routine goes through :func:`make_functional`, so the refusals of ill-defined input
live in one place: a model whose output is not a function of ``w`` alone (Dropout, train-mode
BatchNorm), no trainable parameters, non-finite numbers, and data whose shapes do not match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from plstar.errors import DataError, IllDefinedModelError, PlstarInputError

Params = dict[str, Tensor]
ProgressCallback = Callable[[str, float, float], None]
"""``progress(phase, done, total)``: called by every long loop; the CLI turns it into a bar."""


@dataclass(frozen=True)
class FunctionalModel:
    """A module seen as F(w; x) ∈ ℝ^{n×k}, with w the trainable parameters only.

    ``params`` are detached copies' views of the module's trainable parameters (tied parameters
    appear once); ``buffers`` are held fixed. ``k`` is the flattened output size per sample.
    """

    module: nn.Module
    params: Params
    buffers: dict[str, Tensor]
    k: int

    @property
    def m(self) -> int:
        """Number of trainable parameters (tied ones counted once)."""
        return sum(p.numel() for p in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype the model computes in (that of its first parameter)."""
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """F(w; x) for a batch: x (c, ...) -> (c, k)."""
        out = functional_call(self.module, (params, self.buffers), (x,))
        return out.reshape(out.shape[0], -1)

    def single(self, params: Params, xi: Tensor) -> Tensor:
        """f(w; x_i) for one sample (no batch dimension): xi (...) -> (k,)."""
        return self(params, xi.unsqueeze(0)).reshape(-1)

    def flatten(self, tree: Params, batch: int | None = None) -> Tensor:
        """Concatenate a parameter-shaped dict into (m,), or (batch, m) when entries lead with batch."""
        lead = () if batch is None else (batch,)
        return torch.cat([tree[name].reshape(*lead, -1) for name in self.params], dim=-1)

    def unflatten(self, vector: Tensor) -> Params:
        """Inverse of :meth:`flatten`, cast to the model's dtype: (m,) or (b, m) -> dict."""
        lead = vector.shape[:-1]
        tree, start = {}, 0
        for name, p in self.params.items():
            stop = start + p.numel()
            tree[name] = vector[..., start:stop].reshape(*lead, *p.shape).to(p.dtype)
            start = stop
        return tree


def jacobian_rows(
    fmodel: FunctionalModel, x: Tensor, dtype: torch.dtype, names: list[str] | None = None
) -> Params:
    """Per-sample Jacobian rows: dict name -> (c·k, numel of that parameter), in ``dtype``.

    Row ``i*k + a`` is ∇f_a(w; x_i) restricted to that parameter; ``names`` restricts the
    parameters (default all). Cost: k reverse passes per sample, vectorised over samples by vmap;
    a module whose backward has no batching rule (PReLU in torch 2.13) is done sample by sample.
    """
    chosen = list(fmodel.params) if names is None else names
    fixed = {n: p for n, p in fmodel.params.items() if n not in chosen}
    free = {n: fmodel.params[n] for n in chosen}

    def single(params: Params, xi: Tensor) -> Tensor:
        return fmodel.single({**fixed, **params}, xi)

    c = x.shape[0]
    # torch 2.13: PReLU's batched backward raises for most block sizes but returns wrong rows,
    # silently, when the block size equals k (the inner vmap's size); one extra sample avoids that.
    padded = torch.cat([x, x[:1]]) if c == fmodel.k > 1 else x
    try:
        rows = {n: r[:c] for n, r in vmap(jacrev(single), in_dims=(None, 0))(free, padded).items()}
    except RuntimeError:
        per_sample = [jacrev(single)(free, xi) for xi in x]
        rows = {n: torch.stack([r[n] for r in per_sample]) for n in chosen}
    return {n: rows[n].reshape(c * fmodel.k, -1).to(dtype) for n in chosen}


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of length ``size`` (the last may be shorter)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def check_finite(name: str, tensor: Tensor) -> None:
    """Refuse NaN or Inf in a floating tensor, naming it."""
    if tensor.is_floating_point() or tensor.is_complex():
        # A finite sum proves every entry finite (NaN and ±Inf propagate) in one read without a
        # mask the size of the tensor; only an overflow or a real NaN/Inf takes the full count.
        if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
            return
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise DataError(
                f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or Inf); "
                "clean or impute the data before measuring."
            )


def _refuse_ill_defined(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        where = f"{name} ({type(sub).__name__})" if name else type(sub).__name__
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise IllDefinedModelError(
                f"{where} is in train mode, so F is random, not a function of the parameters; "
                "call model.eval() before measuring."
            )
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            if sub.training:
                raise IllDefinedModelError(
                    f"{where} is in train mode, so each output depends on the whole batch; "
                    "call model.eval() to use its running statistics."
                )
            if sub.running_mean is None:
                raise IllDefinedModelError(
                    f"{where} has no running statistics (track_running_stats=False), so it "
                    "normalises with batch statistics even in eval mode; F is not per-sample."
                )


def make_functional(model: nn.Module, x: Tensor) -> FunctionalModel:
    """Check ``model`` and ``x`` and return the pure form F(w; x).

    Probes the model on the first sample to learn k. Raises :class:`IllDefinedModelError` for
    Dropout/BatchNorm in train mode or no trainable parameters, :class:`DataError` for empty or
    non-finite x, and :class:`PlstarInputError` when the model cannot run on x.
    """
    if not isinstance(model, nn.Module):
        raise PlstarInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise DataError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError("x is empty: at least one sample is needed")
    check_finite("x", x)
    _refuse_ill_defined(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise IllDefinedModelError(
            "the model has no trainable parameters (requires_grad=True); there is no tangent kernel"
        )
    for name, p in params.items():
        if not p.is_floating_point():
            raise IllDefinedModelError(f"parameter {name} is not floating point ({p.dtype})")
        check_finite(f"parameter {name}", p)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    first = next(iter(params.values()))
    sample = x[:1].to(first.dtype) if x.is_floating_point() else x[:1]
    try:
        with torch.no_grad():
            probe = functional_call(model, (params, buffers), (sample,))
    except Exception as error:  # a user's model can raise anything; say where it came from
        raise PlstarInputError(
            f"the model could not run on x of shape {tuple(x.shape)}: {error}"
        ) from error
    if not isinstance(probe, Tensor) or probe.ndim == 0 or probe.shape[0] != 1:
        raise PlstarInputError(
            "the model must map a batch x (n, ...) to outputs (n, ...) with the batch first; "
            f"it returned {getattr(probe, 'shape', type(probe).__name__)} for one sample"
        )
    return FunctionalModel(model, params, buffers, int(probe[0].numel()))


def check_targets(fmodel: FunctionalModel, x: Tensor, y: Tensor) -> Tensor:
    """Validate targets against the model's outputs and return them as (n, k) in the model dtype."""
    if not isinstance(y, Tensor):
        raise DataError(f"y must be a torch.Tensor, got {type(y).__name__}")
    check_finite("y", y)
    n = x.shape[0]
    if y.ndim == 0 or y.shape[0] != n:
        raise DataError(f"x has {n} samples but y has shape {tuple(y.shape)}")
    y2 = y.reshape(n, -1)
    if y2.shape[1] != fmodel.k:
        raise DataError(
            f"the model gives k={fmodel.k} output(s) per sample but y has {y2.shape[1]} per sample "
            f"(y shape {tuple(y.shape)})"
        )
    return y2.to(fmodel.dtype)
