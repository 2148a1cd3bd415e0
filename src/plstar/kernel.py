"""The empirical tangent kernel K = DF DFᵀ as a dense matrix (the operator is in matrix_free.py).

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

:class:`plstar.matrix_free.KernelOperator` gives products K·V without forming K, for kernels too
large to hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from plstar import structured
from plstar.devices import model_device, result_device
from plstar.entry_check import remembered_probe, sized_probe, verified_probe
from plstar.errors import DataError, PlstarInputError
from plstar.factors import row_products
from plstar.functional import (
    FunctionalModel,
    OutputSelector,
    Params,
    ProgressCallback,
    check_data,
    chunks,
    differentiable_attention,
    jacobian_rows,
    make_functional,
)
from plstar.planning import (
    IMPLEMENTATIONS,
    Implementation,
    KernelPlan,
    default_memory_budget,
    plan_with_probe,
    sample_costs,
    structured_floor,
    wants_structured,
)
from plstar.validation import callback, choice, floating_dtype
from plstar.validation import memory_budget as check_budget


def _contract_rows(left: Params, right: Params) -> Tensor:
    # row_products: a diagonal block (left is right) computes its upper strips only
    return sum(row_products(left[name], right[name]) for name in left)  # type: ignore[return-value]


def prepare_inputs(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> tuple[FunctionalModel, Tensor, Tensor]:
    """(F, x, x2 or x) checked and cast to the model's dtype (integer inputs kept as they are);
    the model's forward is checked on the samples of x2 as on those of x; ``output`` as in
    :func:`plstar.make_functional`."""
    fmodel = make_functional(model, x, memory_budget=memory_budget, output=output)
    x = x.to(fmodel.dtype) if x.is_floating_point() else x
    if x2 is None:
        return fmodel, x, x
    x2 = check_data("x2", x2)
    if x2.shape[1:] != x.shape[1:]:
        raise DataError(
            f"x2 samples have shape {tuple(x2.shape[1:])}, x samples {tuple(x.shape[1:])}"
        )
    make_functional(model, x2, memory_budget=memory_budget, output=fmodel.select)
    return fmodel, x, x2.to(fmodel.dtype) if x2.is_floating_point() else x2


def mirror_upper_triangle_(matrix: Tensor, strip: int = 1024) -> Tensor:
    """Copy the upper triangle of a square matrix onto its lower one, in place, and return it.

    A kernel that is symmetric in exact arithmetic is then symmetric bit for bit
    (``torch.equal(K, K.T)``), whatever the BLAS did: a GEMM A·Aᵀ need not give bitwise symmetric
    results, and on some CPUs it does not. Works in row strips, so the temporaries are
    ``strip × strip`` plus a transposed read, never N × N.
    """
    size = matrix.shape[0]
    for start in range(0, size, strip):
        stop = min(size, start + strip)
        if start:
            matrix[start:stop, :start] = matrix[:start, start:stop].mT
        square = matrix[start:stop, start:stop]
        square.copy_(square.triu() + square.triu(1).mT)
    return matrix


def _result(x: Tensor, x2: Tensor, k: int, dtype: torch.dtype, plan: KernelPlan) -> Tensor:
    """The empty (n·k, n2·k) kernel, on the inputs' device unless it does not fit there beside the
    plan's working memory (then in host memory: :func:`plstar.devices.result_device`)."""
    device = result_device(x.device, plan.result_bytes, plan.planned_bytes)
    return torch.empty(x.shape[0] * k, x2.shape[0] * k, dtype=dtype, device=device)


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
    when symmetric, then mirrored); column features are kept when the plan says they fit, else
    recomputed."""
    out = _result(x, x2, k, dtype, plan)
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
            done += 1
            if progress is not None:
                progress("tangent kernel", done, pairs)
    return mirror_upper_triangle_(out) if symmetric else out


def forward_products(fmodel: FunctionalModel, x: Tensor, tangents: Params) -> Tensor:
    """DF(x) applied to a batch of parameter tangents: (b, …) -> (b, c·k). Forward mode, so
    attention runs on its differentiable backend (:func:`plstar.functional.differentiable_attention`)."""

    def push(tangent: Params) -> Tensor:
        return jvp(lambda p: fmodel(p, x), (fmodel.params,), (tangent,))[1].reshape(-1)

    with differentiable_attention():
        return vmap(push)(tangents)


def _ntvp_kernel(
    fmodel: FunctionalModel,
    x: Tensor,
    x2: Tensor,
    symmetric: bool,
    plan: KernelPlan,
    dtype: torch.dtype,
    progress: ProgressCallback | None,
) -> Tensor:
    """K[:, J] = DF(x)·J_Jᵀ column block by column block; when symmetric, only the blocks that
    meet the upper triangle, which is then mirrored."""
    k = fmodel.k
    out = _result(x, x2, k, dtype, plan)
    col_blocks = list(chunks(x2.shape[0], plan.col_block))
    row_blocks = list(chunks(x.shape[0], plan.row_block))
    pairs = [
        (cols, [rows for rows in row_blocks if not symmetric or rows.start < cols.stop])
        for cols in col_blocks
    ]
    total, done = sum(len(rows) for _, rows in pairs), 0
    for cols, wanted in pairs:
        tangents = {
            name: t.reshape(t.shape[0], *fmodel.params[name].shape)
            for name, t in jacobian_rows(fmodel, x2[cols], fmodel.dtype).items()
        }
        for rows in wanted:
            block = forward_products(fmodel, x[rows], tangents)  # (cols·k, rows·k)
            out[rows.start * k : rows.stop * k, cols.start * k : cols.stop * k] = block.T.to(dtype)
            done += 1
            if progress is not None:
                progress("tangent kernel", done, total)
    return mirror_upper_triangle_(out) if symmetric else out


def tangent_kernel(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    output: OutputSelector | None = None,
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
    The result is exactly symmetric when ``x2`` is None (its upper triangle mirrored).
    ``output`` picks F from what the model returns: None takes a Tensor as it is, the ``logits``
    of a dict or Hugging Face ``ModelOutput`` (else its first tensor), the first tensor of a
    tuple; a callable is applied to it, e.g. ``lambda out: out.logits[:, -1]``.
    Raises PlstarInputError for an unknown implementation, a dtype other than float32/float64 or a
    memory budget that is not a positive number of bytes; IllDefinedModelError when F is not a
    function of w alone (Dropout or BatchNorm in train mode, randomness, samples that interact);
    DataError for empty, non-finite or mis-shaped inputs.
    """
    return planned_tangent_kernel(
        model, x, x2, implementation=implementation, dtype=dtype, memory_budget=memory_budget,
        progress=progress, output=output,
    )[0]  # fmt: skip


def choose_plan(
    fmodel: FunctionalModel,
    x: Tensor,
    n2: int,
    *,
    implementation: Implementation,
    dtype: torch.dtype,
    memory_budget: int,
    symmetric: bool,
) -> tuple[KernelPlan, structured.Probe | None]:
    """The plan :func:`tangent_kernel` follows, and the probe when it is "structured".

    "auto" takes the cheapest implementation that fits the budget, each sized with its own byte
    counts (:func:`plan_kernel`); the structured kernel is sized by its probe and checked against
    plain gradients only when it is chosen (once per model and signature): a module whose
    entries disagree then takes Jacobian rows on its own and the choice is made again. A
    demanded "structured" is checked first and raises PlstarInputError naming the module and
    the likely cause. Shared with plstar.distributed, which makes the same choice on each
    shard.
    """
    costs = sample_costs(fmodel, x)

    def plan_for(probe: structured.Probe | None) -> KernelPlan:
        return plan_with_probe(
            fmodel, x, n2, implementation=implementation, dtype=dtype,
            memory_budget=memory_budget, symmetric=symmetric, probe=probe, costs=costs,
        )  # fmt: skip

    found, checked, fresh = None, True, True
    if implementation in ("structured", "auto"):  # a verified probe: no routing to redo
        found = remembered_probe(fmodel, x)
    if found is None and wants_structured(fmodel, implementation):
        if implementation == "structured":
            found = verified_probe(fmodel, x, strict=True, memory_budget=memory_budget)
        else:  # sized first, unless it cannot win; checked only if it is chosen
            other = plan_for(None)
            floor = structured_floor(fmodel, x, n2, symmetric, costs)
            if other.planned_bytes <= memory_budget and floor >= other.cost:
                return other, None
            (found, fresh), checked = sized_probe(fmodel, x, memory_budget), False

    plan = plan_for(found)
    if plan.implementation == "structured" and not checked:
        if not fresh:  # remembered for its sizes only; the check needs the features
            found = structured.probe(fmodel, x, memory_budget=memory_budget)
        verified = verified_probe(fmodel, x, strict=False, found=found, memory_budget=memory_budget)
        if verified is not found:  # modules went to Jacobian rows, or none agreed: again
            found, plan = verified, plan_for(verified)
    return plan, (found if plan.implementation == "structured" else None)


def planned_tangent_kernel(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    output: OutputSelector | None = None,
) -> tuple[Tensor, KernelPlan]:
    """:func:`tangent_kernel` and the plan that made it (the implementation "auto" chose)."""
    implementation = choice("implementation", implementation, IMPLEMENTATIONS)  # type: ignore[assignment]
    dtype = floating_dtype("dtype", dtype)
    budget = check_budget(memory_budget) or default_memory_budget(model_device(model))
    callback("progress", progress)
    fmodel, x, x2_ = prepare_inputs(model, x, x2, budget, output)
    symmetric = x2 is None
    plan, found = choose_plan(
        fmodel, x, x2_.shape[0], implementation=implementation, dtype=dtype,
        memory_budget=budget, symmetric=symmetric,
    )  # fmt: skip
    if plan.implementation == "ntvp":
        with torch.no_grad():
            kernel = _ntvp_kernel(fmodel, x, x2_, symmetric, plan, dtype, progress)
    elif found is not None:
        modules, fallback, broadcast = found.modules, found.fallback, found.broadcast
        kernel = _assemble(
            x, x2_, symmetric, plan, fmodel.k, dtype,
            lambda xs: structured.block_features(fmodel, xs, modules, fallback, dtype, broadcast),
            lambda a, b: structured.contract_blocks(a, b, fmodel.k), progress,
        )  # fmt: skip
    else:
        with torch.no_grad():
            kernel = _assemble(
                x, x2_, symmetric, plan, fmodel.k, dtype,
                lambda xs: jacobian_rows(fmodel, xs, dtype), _contract_rows, progress,
            )  # fmt: skip
    if not bool(torch.isfinite(kernel.sum())) and not bool(torch.isfinite(kernel).all()):
        raise PlstarInputError(
            f"the tangent kernel has NaN or Inf entries although x and F(x) are finite: DF "
            f"overflows in the model's dtype ({fmodel.dtype}); run the model in float64 or "
            "rescale its inputs or weights"
        )
    return kernel, plan
