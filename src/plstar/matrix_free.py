"""The matrix-free tangent kernel: products K·V without forming K (:class:`KernelOperator`).

Two implementations: "structured" keeps every sample's per-layer features and multiplies through
each layer's parameter space; "ntvp" runs a reverse and a forward-mode pass per product.
docs/performance.md gives their costs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import vjp, vmap

from plstar import structured
from plstar.devices import model_device
from plstar.entry_check import verified_probe
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, Params, chunks, differentiable_attention
from plstar.kernel import forward_products, prepare_inputs
from plstar.planning import activation_bytes_per_sample, default_memory_budget
from plstar.validation import choice, floating_dtype
from plstar.validation import memory_budget as check_budget

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
    memory budget and the entry check against plain gradients passes, else "ntvp". ``output``
    picks F from what the model returns (see :func:`plstar.tangent_kernel`).
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
        output: OutputSelector | None = None,
    ) -> None:
        choice("implementation", implementation, ("auto", "structured", "ntvp"))
        self.dtype = floating_dtype("dtype", dtype)
        budget = check_budget(memory_budget) or default_memory_budget(model_device(model))
        self.fmodel, self.x, _ = prepare_inputs(model, x, None, budget, output)
        n, k = self.x.shape[0], self.fmodel.k
        self.shape = (n * k, n * k)
        per_sample = 4 * activation_bytes_per_sample(self.fmodel, self.x)
        self.block = int(max(1, min(n, budget // per_sample)))
        self.products = 0
        self.features = self._structured_features(implementation, budget)
        self.implementation = "ntvp" if self.features is None else "structured"

    @property
    def device(self) -> torch.device:
        """Where products are computed and returned: the model's device."""
        return self.fmodel.device

    def _structured_features(
        self, implementation: str, budget: int
    ) -> list[tuple[slice, structured.BlockFeatures]] | None:
        if implementation == "ntvp":
            return None
        fm, x, n = self.fmodel, self.x, self.x.shape[0]
        if implementation == "auto" and not structured.split_parameters(fm)[0]:
            return None
        found = verified_probe(fm, x, strict=implementation == "structured", memory_budget=budget)
        if found is None:  # "auto", and the structured kernel disagrees with plain gradients
            return None
        needed = n * found.bytes(self.dtype, fm.k)[0]
        if needed > budget // 2:
            if implementation == "structured":
                raise PlstarInputError(
                    f"the structured features of {n} samples need {needed / 2**30:.2f} GiB, more "
                    f"than half the memory budget ({budget / 2**30:.2f} GiB); raise the budget or "
                    "use implementation='ntvp'"
                )
            return None
        block = max(
            1, min(n, (budget // 2 - needed) // max(1, 4 * found.bytes(self.dtype, fm.k)[0]))
        )
        return [
            (
                rows,
                structured.block_features(
                    fm, x[rows], found.modules, found.fallback, self.dtype, found.broadcast
                ),
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
        """Jᵀ V for V (b, n, k): parameter-shaped tensors with a leading b. The pullback is vmapped,
        which fused attention's backward cannot be (a slow per-column loop): math backend."""
        fm, total = self.fmodel, None
        for rows in chunks(self.x.shape[0], self.block):
            with differentiable_attention():
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
        v = torch.as_tensor(v, device=self.device)
        columns = v.reshape(self.shape[0], -1).T
        n, k = self.x.shape[0], self.fmodel.k
        with torch.no_grad():
            pulled = self._transpose_product(columns.reshape(-1, n, k))
        flat = self.fmodel.flatten(pulled, batch=columns.shape[0]).to(torch.float64)
        return flat[0] if v.ndim == 1 else flat.T

    def __matmul__(self, v: Tensor) -> Tensor:
        v = torch.as_tensor(v, device=self.device)
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
                    forward_products(self.fmodel, self.x[rows], pulled).to(self.dtype)
                    for rows in chunks(n, self.block)
                ],
                dim=1,
            )
        return result.T.reshape(-1) if single else result.T

    def to_scipy(self) -> LinearOperator:
        """This operator as a float64 scipy ``LinearOperator`` (for eigsh, cg, …)."""

        def matmat(v: np.ndarray) -> np.ndarray:
            product = self @ torch.from_numpy(np.asarray(v, dtype=np.float64)).to(self.device)
            return product.double().cpu().numpy()

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
    output: OutputSelector | None = None,
) -> KernelOperator:
    """Matrix-free tangent kernel of ``model`` on x: ``op @ v``, ``op.shape``, ``op.to_scipy()``.

    Shapes: op.shape == (n·k, n·k). Cost per product: see :class:`KernelOperator` ("structured":
    two contractions per layer with kept features; "ntvp": a reverse and a forward-mode pass).
    ``output`` picks F from what the model returns (see :func:`plstar.tangent_kernel`).
    """
    return KernelOperator(
        model, x, implementation=implementation, dtype=dtype, memory_budget=memory_budget,
        output=output,
    )  # fmt: skip
