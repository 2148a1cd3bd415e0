"""Lanczos on the per-output Hessians H_{F_j} of :func:`plstar.model_hessian_norm`.

H_{F_j}, j = i*k + a, is the Hessian of output a of sample i alone, so a batch of outputs runs as
independent Lanczos problems side by side: one vmap over (sample, direction, tangent) per product.
Each output's tangent is its own m-vector, so a product of B outputs costs ≈ B single products
(memory-bound); a converged output's rows are skipped.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from plstar.devices import HOST
from plstar.errors import PlstarInputError
from plstar.functional import FunctionalModel, Params, differentiable_attention
from plstar.lanczos import lanczos
from plstar.validation import whole_number


def select_outputs(total: int, outputs: int | list[int] | Tensor | None, seed: int) -> np.ndarray:
    """The output indices ``outputs`` stands for (None: all; a count: that many at random with
    ``seed``, sorted; explicit indices checked to lie in [0, total))."""
    if outputs is None:
        return np.arange(total)
    if isinstance(outputs, int | np.integer | bool):
        count = whole_number("outputs (a count; None for all)", outputs, minimum=1)
        if count >= total:
            return np.arange(total)
        return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    try:
        given = torch.as_tensor(outputs, device=HOST)  # indices: chosen on the host
    except (TypeError, ValueError, RuntimeError):
        given = None
    if (
        given is None
        or given.is_floating_point()
        or given.is_complex()
        or given.dtype == torch.bool
    ):
        raise PlstarInputError(
            f"outputs must be None, a count, or integer output indices; got {type(outputs).__name__}"
        )
    chosen = np.asarray(given, dtype=np.int64).reshape(-1)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= total:
        raise PlstarInputError(
            f"output indices must lie in [0, {total}), got {chosen.tolist()[:8]}"
        )
    return chosen


class OutputLanczos:
    """Batched Lanczos on H_{F_j} for lists of outputs j, in batches that fit a memory budget."""

    def __init__(self, fmodel: FunctionalModel, x: Tensor, max_iter: int, tol: float, seed: int):
        self.fmodel, self.x, self.max_iter, self.tol, self.seed = fmodel, x, max_iter, tol, seed

        def output_hvp(params: Params, xi: Tensor, direction: Tensor, tangent: Params) -> Params:
            gradient = grad(lambda p: (fmodel.single(p, xi) * direction).sum())
            return jvp(gradient, (params,), (tangent,))[1]

        self.batched_hvp = vmap(output_hvp, in_dims=(None, 0, 0, 0))
        self.unit = torch.eye(fmodel.k, dtype=fmodel.dtype, device=fmodel.device)

    def __call__(
        self, chosen: np.ndarray, budget: int, end: float | None
    ) -> tuple[Tensor, Tensor, int, int]:
        """(|extreme Ritz value|, its residual) for the first outputs of ``chosen``, the products
        run and how many outputs were examined: up to ``max_iter`` Lanczos steps each. With
        ``end`` (a perf_counter time) Lanczos stops before a step that would end after it, and no
        batch starts whose first product, as long as the last batch's, would: fewer outputs
        examined well rather than all of them for a step or two (one step is a random vector's
        Rayleigh quotient)."""
        fm, steps = self.fmodel, self.max_iter
        batch = int(max(1, min(len(chosen), budget // ((2 * steps + 6) * fm.m * 8))))
        norms, errors, products, done, per_product = [], [], 0, 0, 0.0
        for first in range(0, len(chosen), batch):
            started = time.perf_counter()
            if end is not None and first > 0 and started + per_product > end:
                break
            indices = chosen[first : first + batch]
            result = lanczos(
                self._matvec(indices), fm.m, len(indices), max_iter=steps, tol=self.tol,
                seed=self.seed, deadline=end, device=fm.device,
            )  # fmt: skip
            per_product = (time.perf_counter() - started) / result.iterations
            top_is_max = result.theta_max.abs() >= result.theta_min.abs()
            norms.append(torch.where(top_is_max, result.theta_max, result.theta_min).abs())
            errors.append(torch.where(top_is_max, result.residual_max, result.residual_min))
            products, done = products + result.iterations, done + len(indices)
        return torch.cat(norms), torch.cat(errors), products, done

    def _matvec(self, indices: np.ndarray) -> Any:
        fm, k = self.fmodel, self.fmodel.k
        samples = self.x[torch.as_tensor(indices // k, device=self.x.device)]
        directions = self.unit[torch.as_tensor(indices % k, device=fm.device)]

        def matvec(vectors: Tensor) -> Tensor:
            # Lanczos passes zero rows for the outputs it has finished: skip their products.
            live = (vectors != 0).any(dim=1).nonzero().reshape(-1)
            result = torch.zeros_like(vectors)
            if len(live):
                tangents = fm.unflatten(vectors[live].to(fm.device))
                with differentiable_attention():
                    out = self.batched_hvp(fm.params, samples[live], directions[live], tangents)
                result[live] = fm.flatten(out, batch=len(live)).double().to(result.device)
            return result

        return matvec
