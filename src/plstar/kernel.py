"""The empirical tangent kernel K = DF DFᵀ, dense or as a matrix-free operator.

Layout (THEORY.md): sample-major, row ``i*k + a`` is output ``a`` of sample ``i``; K(x, x2) has shape
(n·k, n2·k). Two implementations of the dense kernel, agreeing to float64 round-off:

* ``"jacobian"`` — per-sample Jacobian rows by ``vmap(jacrev)`` in blocks of samples, cast once to
  the accumulation dtype, contracted block by block (K_IJ = Σ_p J_I[p] J_J[p]ᵀ). Cost ≈ 2·n·n2·k²·m
  flops; working memory ≈ 2 blocks · c·k·m · 8 bytes, never the whole Jacobian when it exceeds the
  budget (blocks of x2 are recomputed per row block instead).
* ``"ntvp"`` — Jacobian rows of a block of x2, pushed through forward-mode products over x:
  K[:, J] = DF(x) · J_Jᵀ. Cost ≈ n2·k forward-mode passes over n samples; memory ≈ c·k·m.

:class:`KernelOperator` gives products K·V without forming K (one reverse and one forward pass over
the data per product), for kernels too large to hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from plstar.errors import DataError, PlstarInputError
from plstar.functional import (
    FunctionalModel,
    Params,
    ProgressCallback,
    check_finite,
    chunks,
    make_functional,
)

Implementation = Literal["auto", "jacobian", "ntvp"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "jacobian", "ntvp")
_MAX_DEFAULT_BUDGET = 2 * 1024**3


def default_memory_budget() -> int:
    """Working memory plstar plans for: a quarter of the RAM available now, at most 2 GiB (bytes)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 * 1024**3
    return int(min(0.25 * available, _MAX_DEFAULT_BUDGET))


@dataclass(frozen=True)
class KernelPlan:
    """How a kernel will be assembled: implementation, samples per block and the memory it plans."""

    implementation: str
    row_block: int
    col_block: int
    planned_bytes: int
    budget_bytes: int
    result_bytes: int


def _activation_bytes_per_sample(fmodel: FunctionalModel, x: Tensor) -> int:
    """Bytes autograd saves for one sample's backward pass (measured, so it fits any module)."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    params = {k: v.detach().requires_grad_(True) for k, v in fmodel.params.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fmodel(params, x[:1]).sum()
    return max(saved, 1)


def plan_kernel(
    fmodel: FunctionalModel,
    x: Tensor,
    n2: int,
    *,
    implementation: Implementation,
    dtype: torch.dtype,
    memory_budget: int,
) -> KernelPlan:
    """Choose the implementation and block sizes so working memory stays within ``memory_budget``.

    The budget covers working memory; the result itself (n·k · n2·k · itemsize) is counted apart.
    "auto" takes "jacobian" (GEMM-bound, fastest here) whenever a block of at least one sample per
    side fits, else "ntvp", whose blocks cost only one set of Jacobian rows.
    """
    n, k, m = x.shape[0], fmodel.k, fmodel.m
    itemsize = torch.empty((), dtype=dtype).element_size()
    model_itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
    activations = _activation_bytes_per_sample(fmodel, x)
    # One sample's Jacobian rows while they are made (model dtype, plus vmap's k-fold activations)
    # and once cast to the accumulation dtype.
    per_sample = k * m * (itemsize + model_itemsize) + k * activations
    result_bytes = n * k * n2 * k * itemsize
    if implementation == "auto":
        implementation = "jacobian" if 2 * per_sample <= memory_budget else "ntvp"
    if implementation == "jacobian":
        block = max(1, memory_budget // (2 * per_sample))
        row, col = min(n, block), min(n2, block)
        planned = (row + col) * per_sample
    elif implementation == "ntvp":
        col = max(1, min(n2, memory_budget // (2 * per_sample)))
        # vmap over col·k tangents of a forward pass over ``row`` samples
        per_row = col * k * (activations + k * itemsize) * 2
        row = max(1, min(n, (memory_budget - col * per_sample) // max(per_row, 1)))
        planned = col * per_sample + row * per_row
    else:
        raise PlstarInputError(
            f"unknown implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    return KernelPlan(implementation, int(row), int(col), int(planned), memory_budget, result_bytes)


def jacobian_rows(fmodel: FunctionalModel, x: Tensor, dtype: torch.dtype) -> Params:
    """Per-sample Jacobian rows: dict name -> (c·k, numel of that parameter), in ``dtype``.

    Row ``i*k + a`` is ∇_w f_a(w; x_i) restricted to that parameter. Cost: k reverse passes per
    sample, vectorised over samples by vmap.
    """
    rows = vmap(jacrev(fmodel.single), in_dims=(None, 0))(fmodel.params, x)
    c = x.shape[0]
    return {name: t.reshape(c * fmodel.k, -1).to(dtype) for name, t in rows.items()}


def _contract(left: Params, right: Params) -> Tensor:
    return sum(left[name] @ right[name].T for name in left)  # type: ignore[return-value]


def _prepare(
    model: nn.Module, x: Tensor, x2: Tensor | None
) -> tuple[FunctionalModel, Tensor, Tensor]:
    fmodel = make_functional(model, x)
    x = x.to(fmodel.dtype) if x.is_floating_point() else x
    if x2 is None:
        return fmodel, x, x
    if not isinstance(x2, Tensor) or x2.ndim == 0 or x2.shape[0] == 0:
        raise DataError("x2 is empty: at least one sample is needed")
    if x2.shape[1:] != x.shape[1:]:
        raise DataError(
            f"x2 samples have shape {tuple(x2.shape[1:])}, x samples {tuple(x.shape[1:])}"
        )
    check_finite("x2", x2)
    return fmodel, x, x2.to(fmodel.dtype) if x2.is_floating_point() else x2


def _jacobian_kernel(fmodel, x, x2, symmetric, plan, dtype, progress) -> Tensor:
    k = fmodel.k
    out = torch.empty(x.shape[0] * k, x2.shape[0] * k, dtype=dtype)
    row_blocks = list(chunks(x.shape[0], plan.row_block))
    col_blocks = list(chunks(x2.shape[0], plan.col_block))
    total = len(row_blocks) * len(col_blocks)
    done = 0
    for rows in row_blocks:
        left = jacobian_rows(fmodel, x[rows], dtype)
        for cols in col_blocks:
            done += 1
            if symmetric and cols.start < rows.start:
                continue  # mirrored below
            right = left if (symmetric and cols == rows) else jacobian_rows(fmodel, x2[cols], dtype)
            block = _contract(left, right)
            out[rows.start * k : rows.stop * k, cols.start * k : cols.stop * k] = block
            if symmetric and cols != rows:
                out[cols.start * k : cols.stop * k, rows.start * k : rows.stop * k] = block.T
            if progress is not None:
                progress("tangent kernel", done, total)
    return out


def _forward_products(fmodel: FunctionalModel, x: Tensor, tangents: Params) -> Tensor:
    """DF(x) applied to a batch of parameter tangents: (b, …) -> (b, c·k)."""

    def push(tangent: Params) -> Tensor:
        return jvp(lambda p: fmodel(p, x), (fmodel.params,), (tangent,))[1].reshape(-1)

    return vmap(push)(tangents)


def _ntvp_kernel(fmodel, x, x2, plan, dtype, progress) -> Tensor:
    k = fmodel.k
    out = torch.empty(x.shape[0] * k, x2.shape[0] * k, dtype=dtype)
    col_blocks = list(chunks(x2.shape[0], plan.col_block))
    row_blocks = list(chunks(x.shape[0], plan.row_block))
    total, done = len(col_blocks) * len(row_blocks), 0
    for cols in col_blocks:
        tangents = {
            name: t.reshape(t.shape[0], *fmodel.params[name].shape)
            for name, t in jacobian_rows(fmodel, x2[cols], fmodel.dtype).items()
        }
        for rows in row_blocks:
            block = _forward_products(fmodel, x[rows], tangents)  # (cols·k, rows·k)
            out[rows.start * k : rows.stop * k, cols.start * k : cols.stop * k] = block.T.to(dtype)
            done += 1
            if progress is not None:
                progress("tangent kernel", done, total)
    return out


def tangent_kernel(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
) -> Tensor:
    """Empirical tangent kernel K = DF(x) DF(x2)ᵀ of ``model`` at its current parameters.

    Shapes: x (n, ...), x2 (n2, ...) -> K (n·k, n2·k); row ``i*k + a`` is output a of sample i.
    ``x2=None`` means x2 = x (then K is symmetric and only its upper blocks are computed). The model
    runs in its own dtype; products are accumulated in ``dtype`` (float64 by default).
    Cost: "jacobian" ≈ 2·n·n2·k²·m flops + (n + n2·blocks)·k reverse passes; "ntvp" ≈ n2·k
    forward-mode passes over n samples. Memory: the result plus at most ``memory_budget`` bytes
    (default :func:`default_memory_budget`) of planned working memory (see :func:`plan_kernel`).
    Raises IllDefinedModelError when F is not a function of w alone (Dropout or BatchNorm in train
    mode) and DataError for empty, non-finite or mis-shaped inputs.
    """
    fmodel, x, x2_ = _prepare(model, x, x2)
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    plan = plan_kernel(
        fmodel, x, x2_.shape[0], implementation=implementation, dtype=dtype, memory_budget=budget
    )
    with torch.no_grad():
        if plan.implementation == "jacobian":
            return _jacobian_kernel(fmodel, x, x2_, x2 is None, plan, dtype, progress)
        return _ntvp_kernel(fmodel, x, x2_, plan, dtype, progress)


class KernelOperator:
    """Matrix-free tangent kernel: ``op @ V`` = K V without forming K.

    Shapes: V (n·k,) or (n·k, b) -> same shape, in ``dtype``. Each product costs one reverse pass
    (Jᵀ V) and one forward-mode pass (J · JᵀV) over the data, in sample blocks of ``block`` samples;
    memory ≈ b·m plus one block's activations. ``to_scipy()`` wraps it as a scipy LinearOperator.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        dtype: torch.dtype = torch.float64,
        memory_budget: int | None = None,
    ) -> None:
        self.fmodel, self.x, _ = _prepare(model, x, None)
        n, k = self.x.shape[0], self.fmodel.k
        self.shape = (n * k, n * k)
        self.dtype = dtype
        budget = memory_budget if memory_budget is not None else default_memory_budget()
        per_sample = 4 * _activation_bytes_per_sample(self.fmodel, self.x)
        self.block = int(max(1, min(n, budget // per_sample)))
        self.products = 0

    def _transpose_product(self, v: Tensor) -> Params:
        """Jᵀ V for V (b, n, k): parameter-shaped tensors with a leading b."""
        fm, total = self.fmodel, None
        for rows in chunks(self.x.shape[0], self.block):
            _, pullback = vjp(lambda p, rows=rows: fm(p, self.x[rows]), fm.params)
            part = vmap(pullback)(v[:, rows].to(fm.dtype))[0]
            total = part if total is None else {name: total[name] + part[name] for name in part}
        assert total is not None
        return total

    def transpose_product(self, v: Tensor) -> Tensor:
        """DFᵀ v for v (n·k,) or (n·k, b): a flat parameter vector (m,) or (m, b), float64.

        With v the top eigenvector of K this is the top eigenvector of the Gauss–Newton matrix
        DFᵀDF, the warm start for the loss sharpness.
        """
        v = torch.as_tensor(v)
        columns = v.reshape(self.shape[0], -1).T
        n, k = self.x.shape[0], self.fmodel.k
        with torch.no_grad():
            pulled = self._transpose_product(columns.reshape(-1, n, k))
        flat = self.fmodel.flatten(pulled, batch=columns.shape[0]).to(torch.float64)
        return flat[0] if v.ndim == 1 else flat.T

    def __matmul__(self, v: Tensor) -> Tensor:
        v = torch.as_tensor(v)
        single = v.ndim == 1
        columns = v.reshape(self.shape[0], -1).T  # (b, n·k)
        n, k = self.x.shape[0], self.fmodel.k
        with torch.no_grad():
            pulled = self._transpose_product(columns.reshape(-1, n, k))
            result = torch.cat(
                [
                    _forward_products(self.fmodel, self.x[rows], pulled).to(self.dtype)
                    for rows in chunks(n, self.block)
                ],
                dim=1,
            )
        self.products += columns.shape[0]
        return result.T.reshape(-1) if single else result.T

    def to_scipy(self) -> LinearOperator:
        """This operator as a float64 scipy ``LinearOperator`` (for eigsh, cg, …)."""

        def matmat(v: np.ndarray) -> np.ndarray:
            return (self @ torch.from_numpy(np.asarray(v, dtype=np.float64))).double().numpy()

        return LinearOperator(
            self.shape,
            matvec=lambda v: matmat(v.reshape(-1, 1)).reshape(-1),
            matmat=matmat,
            dtype=np.float64,
        )


def kernel_operator(
    model: nn.Module,
    x: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
) -> KernelOperator:
    """Matrix-free tangent kernel of ``model`` on x: ``op @ v``, ``op.shape``, ``op.to_scipy()``.

    Shapes: op.shape == (n·k, n·k). Cost per product: one reverse and one forward-mode pass over x.
    """
    return KernelOperator(model, x, dtype=dtype, memory_budget=memory_budget)
