"""Memory plans: which kernel implementation, and how many samples per block, fit a budget.

Sizes are measured on one sample (autograd's saved tensors, the structured features) rather than
guessed from layer types, so the plan fits any module. docs/performance.md gives the formulas.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from plstar import structured
from plstar.errors import PlstarInputError
from plstar.functional import FunctionalModel
from plstar.validation import choice, floating_dtype, whole_number

Implementation = Literal["auto", "structured", "jacobian", "ntvp"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "structured", "jacobian", "ntvp")
_MAX_DEFAULT_BUDGET = 2 * 1024**3


def default_memory_budget() -> int:
    """Working memory plstar plans for: a quarter of physical RAM, at most 2 GiB (bytes).

    Physical rather than "free" RAM: free pages exclude the page cache, which the OS gives back on
    demand, and would make plans (and timings) depend on what ran before.
    """
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 1024**3
    return int(min(0.25 * physical, _MAX_DEFAULT_BUDGET))


@dataclass(frozen=True)
class KernelPlan:
    """How a kernel will be assembled: the implementation, samples per block, the working memory
    planned, and whether every column block's features are kept (else recomputed per row block)."""

    implementation: str
    row_block: int
    col_block: int
    planned_bytes: int
    budget_bytes: int
    result_bytes: int
    cache_columns: bool = False


def activation_bytes_per_sample(fmodel: FunctionalModel, x: Tensor) -> int:
    """Bytes autograd saves for one sample's backward pass, parameters (and views of them) excluded:
    they are saved too, but once per batch, not per sample."""
    saved = 0
    params = {k: v.detach().requires_grad_(True) for k, v in fmodel.params.items()}
    shared = {p.untyped_storage().data_ptr() for p in [*params.values(), *fmodel.buffers.values()]}

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in shared:
            saved += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fmodel(params, x[:1]).sum()
    return max(saved, 1)


def _largest_block(fixed: int, per_sample: int, per_pair: int, budget: int) -> int:
    """Largest c with fixed + c·per_sample + c²·per_pair ≤ budget (0 if even c = 1 does not fit)."""
    room = budget - fixed
    if room < per_sample + per_pair:
        return 0
    if per_pair <= 0:
        return room // per_sample
    return int((-per_sample + math.sqrt(per_sample**2 + 4 * per_pair * room)) / (2 * per_pair))


def plan_kernel(
    fmodel: FunctionalModel,
    x: Tensor,
    n2: int,
    *,
    implementation: Implementation,
    dtype: torch.dtype,
    memory_budget: int,
    symmetric: bool = False,
    probe: structured.Probe | None = None,
) -> KernelPlan:
    """Choose the implementation and block sizes so working memory stays within ``memory_budget``.

    The budget covers working memory; the result itself (n·k · n2·k · itemsize) is counted apart.
    "auto" takes "structured" when a layer rule covers some parameters and its Grams at least halve
    the contraction's flops (or the Jacobian rows do not fit), else "jacobian" when a block of one
    sample per side fits, else
    "ntvp", whose blocks hold only one set of Jacobian rows. Features of every block are kept when
    they fit beside blocks of at least 64 samples; otherwise two blocks are held at a time and
    column blocks are recomputed. ``symmetric`` (x2 is x) lets one set of features serve rows and
    columns. Sizes are measured on the first samples (``probe``: a :func:`structured.probe` already
    made, reused), so the plan fits any module.
    """
    implementation = choice("implementation", implementation, IMPLEMENTATIONS)  # type: ignore[assignment]
    dtype = floating_dtype("dtype", dtype)
    memory_budget = whole_number("memory_budget", memory_budget, minimum=1)
    n2 = whole_number("n2", n2, minimum=1)
    n, k, m = x.shape[0], fmodel.k, fmodel.m
    itemsize = torch.empty((), dtype=dtype).element_size()
    model_itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
    activations = activation_bytes_per_sample(fmodel, x)
    jacobian_per_sample = k * m * (itemsize + model_itemsize) + k * activations
    result_bytes = n * k * n2 * k * itemsize
    sizes, found = None, None
    if implementation == "structured" or (
        implementation == "auto" and structured.split_parameters(fmodel)[0]
    ):
        found = probe if probe is not None else structured.probe(fmodel, x)
        sizes = None if found is None else found.bytes(dtype, k)
        if sizes is None and implementation == "structured":
            raise PlstarInputError(
                "a layer with a structured rule does not see the batch as its first dimension; "
                "use implementation='jacobian'"
            )
    if implementation == "auto":
        # Structured only where its Grams save work: when every layer takes the per-sample-gradient
        # form (small convolutions) it does the Jacobian's flops with more overhead.
        saves = found is not None and found.flops_per_pair(k) < 0.5 * k * k * m
        fits = 2 * jacobian_per_sample <= memory_budget
        if sizes is not None and (saves or not fits):
            implementation = "structured"
        elif 2 * jacobian_per_sample <= memory_budget:
            implementation = "jacobian"
        else:
            implementation = "ntvp"
    if implementation in ("structured", "jacobian"):
        if sizes is not None:  # kept features; the activations only while a block is computed
            stored, transient, per_pair = sizes[0], k * activations, sizes[1]
        else:
            stored, transient, per_pair = (
                k * m * itemsize,
                k * (m * model_itemsize + activations),
                0,
            )
        per_pair += 3 * k * k * itemsize  # the block product and its temporaries
        samples = n if symmetric else n + n2
        # Keep every block's features when they fit with room for blocks of ≥ 64 samples; else
        # hold two blocks at a time and recompute column blocks.
        cached = _largest_block(samples * stored, transient, per_pair, memory_budget)
        cache = cached >= min(64, n, n2)
        if cache:
            block = cached
        else:
            block = max(1, _largest_block(0, 2 * stored + transient, per_pair, memory_budget))
        row, col = min(n, block), min(n2, block)
        held = samples * stored if cache else (row + col) * stored
        planned = held + max(row, col) * transient + row * col * per_pair
        return KernelPlan(
            implementation, row, col, int(planned), memory_budget, result_bytes, cache
        )
    if implementation == "ntvp":
        col = max(1, min(n2, memory_budget // (2 * jacobian_per_sample)))
        # vmap over col·k tangents of a forward pass over ``row`` samples
        per_row = col * k * (activations + k * itemsize) * 2
        row = max(1, min(n, (memory_budget - col * jacobian_per_sample) // max(per_row, 1)))
        planned = col * jacobian_per_sample + row * per_row
        return KernelPlan(
            implementation, int(row), int(col), int(planned), memory_budget, result_bytes
        )
    raise AssertionError(f"unplanned implementation {implementation!r}")
