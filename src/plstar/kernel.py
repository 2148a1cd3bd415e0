"""The empirical tangent kernel K = DF DFᵀ, dense or as a matrix-free operator.

Layout (THEORY.md): sample-major, row ``i*k + a`` is output ``a`` of sample ``i``; K(x, x2) has shape
(n·k, n2·k). Three implementations of the dense kernel, agreeing to float64 round-off:

* ``"structured"`` — per-layer Gram matrices of layer inputs and output cotangents
  (:mod:`plstar.structured`); the Jacobian is never formed.

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

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from plstar import structured
from plstar.errors import DataError, PlstarInputError
from plstar.functional import (
    FunctionalModel,
    Params,
    ProgressCallback,
    check_finite,
    chunks,
    jacobian_rows,
    make_functional,
)
from plstar.planning import (
    Implementation,
    KernelPlan,
    activation_bytes_per_sample,
    default_memory_budget,
    plan_kernel,
)


def _contract_rows(left: Params, right: Params) -> Tensor:
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


def _assemble(
    x: Tensor,
    x2: Tensor,
    symmetric: bool,
    plan: KernelPlan,
    k: int,
    dtype: torch.dtype,
    features: Callable[[Tensor], Any],
    contract: Callable[[Any, Any], Tensor],
    progress: ProgressCallback | None,
) -> Tensor:
    """K block by block: features of each sample block, contracted pairwise (upper blocks only
    when symmetric); column features are kept when the plan says they fit, else recomputed."""
    out = torch.empty(x.shape[0] * k, x2.shape[0] * k, dtype=dtype)
    row_blocks = list(chunks(x.shape[0], plan.row_block))
    col_blocks = list(chunks(x2.shape[0], plan.row_block if symmetric else plan.col_block))
    kept: dict[int, Any] = {}
    pairs = (
        len(row_blocks) * (len(row_blocks) + 1) // 2
        if symmetric
        else len(row_blocks) * len(col_blocks)
    )
    done = 0
    for rows in row_blocks:
        left = kept.pop(rows.start) if symmetric and rows.start in kept else features(x[rows])
        for cols in col_blocks:
            if symmetric and cols.start < rows.start:
                continue  # mirrored from an earlier block
            if symmetric and cols == rows:
                right = left
            elif cols.start in kept:
                right = kept[cols.start]
            else:
                right = features(x2[cols])
                if plan.cache_columns:
                    kept[cols.start] = right
            block = contract(left, right)
            out[rows.start * k : rows.stop * k, cols.start * k : cols.stop * k] = block
            if symmetric and cols != rows:
                out[cols.start * k : cols.stop * k, rows.start * k : rows.stop * k] = block.T
            done += 1
            if progress is not None:
                progress("tangent kernel", done, pairs)
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
    Cost: "structured" ≈ n·n2·Σ_layers(d_in + k²·d_out) flops for dense layers (convolutions and
    layers used at several positions: the cheaper of the patch-Gram and per-sample-gradient forms)
    plus k reverse passes per sample; "jacobian" ≈ 2·n·n2·k²·m flops; "ntvp" ≈ n2·k forward-mode
    passes over n samples. "auto" takes "structured" when a layer rule applies. Memory: the result plus at most ``memory_budget`` bytes
    (default :func:`default_memory_budget`) of planned working memory (see :func:`plan_kernel`).
    Raises IllDefinedModelError when F is not a function of w alone (Dropout or BatchNorm in train
    mode) and DataError for empty, non-finite or mis-shaped inputs.
    """
    return planned_tangent_kernel(
        model, x, x2, implementation=implementation, dtype=dtype, memory_budget=memory_budget,
        progress=progress,
    )[0]  # fmt: skip


def _passes_entry_check(
    fmodel: FunctionalModel, x: Tensor, found: structured.Probe | None, implementation: str
) -> bool:
    """Whether the structured rules reproduce plain gradients here; raises if they were demanded."""
    error = structured.entry_check(fmodel, x, found)
    if found is not None and error <= 1e3 * float(torch.finfo(fmodel.dtype).eps):
        return True
    if implementation == "structured":
        raise PlstarInputError(
            "the structured rules disagree with plain gradients on this model (relative error "
            f"{error:.1e}): a parameter is used outside its module's forward or samples interact; "
            "use implementation='jacobian'"
        )
    return False


def planned_tangent_kernel(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[Tensor, KernelPlan]:
    """:func:`tangent_kernel` and the plan that made it (the implementation "auto" chose)."""
    fmodel, x, x2_ = _prepare(model, x, x2)
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    found = (
        structured.probe(fmodel, x)
        if implementation == "structured"
        or (implementation == "auto" and structured.split_parameters(fmodel)[0])
        else None
    )
    plan = plan_kernel(
        fmodel, x, x2_.shape[0], implementation=implementation, dtype=dtype,
        memory_budget=budget, symmetric=x2 is None, probe=found,
    )  # fmt: skip
    symmetric = x2 is None
    if plan.implementation == "ntvp":
        with torch.no_grad():
            return _ntvp_kernel(fmodel, x, x2_, plan, dtype, progress), plan
    if plan.implementation == "structured" and _passes_entry_check(
        fmodel, x, found, implementation
    ):
        assert found is not None
        modules, fallback = found.modules, found.fallback
        kernel = _assemble(
            x, x2_, symmetric, plan, fmodel.k, dtype,
            lambda xs: structured.block_features(fmodel, xs, modules, fallback, dtype),
            lambda a, b: structured.contract_blocks(a, b, fmodel.k), progress,
        )  # fmt: skip
        return kernel, plan
    if plan.implementation == "structured":  # auto, and the entry check failed
        plan = plan_kernel(
            fmodel, x, x2_.shape[0], implementation="jacobian", dtype=dtype,
            memory_budget=budget, symmetric=symmetric,
        )  # fmt: skip
    with torch.no_grad():
        kernel = _assemble(
            x, x2_, symmetric, plan, fmodel.k, dtype,
            lambda xs: jacobian_rows(fmodel, xs, dtype), _contract_rows, progress,
        )  # fmt: skip
    return kernel, plan


OperatorImplementation = Literal["auto", "structured", "ntvp"]


class KernelOperator:
    """Matrix-free tangent kernel: ``op @ V`` = K V without forming K.

    Shapes: V (n·k,) or (n·k, b) -> same shape, in ``dtype``. Two implementations:

    * ``"structured"`` — the per-layer features of all n samples (:mod:`plstar.structured`) are
      computed once and kept; a product is then two contractions per layer through its parameter
      space (DFᵀV, then DF·(DFᵀV)), with no forward or reverse pass: ≈ 4·n·k·b·Σ_layers T·p·q
      flops. Memory: the features, n·Σ_layers T·(p + k·q) numbers in ``dtype``.
    * ``"ntvp"`` — each product is one reverse pass (Jᵀ V) and one forward-mode pass (J · JᵀV) over
      the data, in sample blocks; memory ≈ b·m plus one block's activations.

    ``"auto"`` (default) takes "structured" when a layer rule applies, the features fit in half the
    memory budget and the entry check against plain gradients passes, else "ntvp".
    ``to_scipy()`` wraps the operator as a scipy LinearOperator.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        implementation: OperatorImplementation = "auto",
        dtype: torch.dtype = torch.float64,
        memory_budget: int | None = None,
    ) -> None:
        if implementation not in ("auto", "structured", "ntvp"):
            raise PlstarInputError(
                f"unknown operator implementation {implementation!r}: auto, structured or ntvp"
            )
        self.fmodel, self.x, _ = _prepare(model, x, None)
        n, k = self.x.shape[0], self.fmodel.k
        self.shape = (n * k, n * k)
        self.dtype = dtype
        budget = memory_budget if memory_budget is not None else default_memory_budget()
        per_sample = 4 * activation_bytes_per_sample(self.fmodel, self.x)
        self.block = int(max(1, min(n, budget // per_sample)))
        self.products = 0
        self.features = self._structured_features(implementation, budget)
        self.implementation = "ntvp" if self.features is None else "structured"

    def _structured_features(
        self, implementation: str, budget: int
    ) -> list[tuple[slice, structured.BlockFeatures]] | None:
        if implementation == "ntvp":
            return None
        fm, x, n = self.fmodel, self.x, self.x.shape[0]
        if implementation == "auto" and not structured.split_parameters(fm)[0]:
            return None
        found = structured.probe(fm, x)
        needed = 0 if found is None else n * found.bytes(self.dtype, fm.k)[0]
        if needed > budget // 2:
            if implementation == "structured":
                raise PlstarInputError(
                    f"the structured features of {n} samples need {needed / 2**30:.2f} GiB, more "
                    f"than half the memory budget ({budget / 2**30:.2f} GiB); raise the budget or "
                    "use implementation='ntvp'"
                )
            return None
        if not _passes_entry_check(fm, x, found, implementation):
            return None
        assert found is not None
        block = max(
            1, min(n, (budget // 2 - needed) // max(1, 4 * found.bytes(self.dtype, fm.k)[0]))
        )
        return [
            (
                rows,
                structured.block_features(fm, x[rows], found.modules, found.fallback, self.dtype),
            )
            for rows in chunks(n, block)
        ]

    def _structured_product(self, columns: Tensor) -> Tensor:
        """K·V for V (n·k, b) from the kept features."""
        assert self.features is not None
        k, pulled = self.fmodel.k, None
        for rows, features in self.features:
            part = structured.pull_features(features, columns[rows.start * k : rows.stop * k], k)
            pulled = structured.add_pulled_features(pulled, part, features)
        assert pulled is not None
        return torch.cat([structured.push_features(f, pulled, k) for _, f in self.features])

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
        self.products += columns.shape[0]
        if self.features is not None:
            product = self._structured_product(columns.T.to(self.dtype))
            return product.reshape(-1) if single else product
        with torch.no_grad():
            pulled = self._transpose_product(columns.reshape(-1, n, k))
            result = torch.cat(
                [
                    _forward_products(self.fmodel, self.x[rows], pulled).to(self.dtype)
                    for rows in chunks(n, self.block)
                ],
                dim=1,
            )
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
    implementation: OperatorImplementation = "auto",
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
) -> KernelOperator:
    """Matrix-free tangent kernel of ``model`` on x: ``op @ v``, ``op.shape``, ``op.to_scipy()``.

    Shapes: op.shape == (n·k, n·k). Cost per product: see :class:`KernelOperator` ("structured":
    two contractions per layer with kept features; "ntvp": a reverse and a forward-mode pass).
    """
    return KernelOperator(
        model, x, implementation=implementation, dtype=dtype, memory_budget=memory_budget
    )
