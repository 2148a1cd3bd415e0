"""Memory plans: which kernel implementation, and how many samples per block, fit a budget.

Sizes are measured on one sample (autograd's saved tensors, the structured features) rather than
guessed from layer types, so the plan fits any module. docs/performance.md gives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from plstar import structured
from plstar.costs import SampleCosts, sample_costs
from plstar.costs import activation_bytes_per_sample as activation_bytes_per_sample
from plstar.devices import device_budget, physical_memory
from plstar.entry_check import verified_probe
from plstar.factors import GRAM_SLOWDOWN
from plstar.functional import FunctionalModel
from plstar.recording import replicas
from plstar.validation import choice, floating_dtype, whole_number

Implementation = Literal["auto", "structured", "jacobian", "ntvp"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "structured", "jacobian", "ntvp")
_MAX_DEFAULT_BUDGET = 2 * 1024**3


def default_memory_budget(device: torch.device | str | None = None) -> int:
    """Working memory plstar plans for (bytes): on a GPU half its free memory
    (:func:`plstar.devices.device_budget`); on the host a quarter of physical RAM, at most 2 GiB.

    Physical rather than "free" RAM: free pages exclude the page cache, which the OS gives back on
    demand, and would make plans (and timings) depend on what ran before.
    """
    on_device = None if device is None else device_budget(torch.device(device))
    if on_device is not None:
        return on_device
    return int(min(0.25 * physical_memory(), _MAX_DEFAULT_BUDGET))


@dataclass(frozen=True)
class KernelPlan:
    """How a kernel will be assembled: the implementation, samples per block, the working memory
    planned, and whether every column block's features are kept (else recomputed per row block).

    ``cost`` is the estimated work in flops that ranked the implementations under "auto"
    (forward-pass flops are counted on one sample; see :func:`plan_kernel`). For "structured",
    ``rows_parameters`` lists the parameters that take per-sample Jacobian rows and
    ``rows_reasons`` says, per module, why its rule did not serve it.
    """

    implementation: str
    row_block: int
    col_block: int
    planned_bytes: int
    budget_bytes: int
    result_bytes: int
    cache_columns: bool = False
    cost: float = 0.0
    rows_parameters: tuple[str, ...] = ()
    rows_reasons: tuple[tuple[str, str], ...] = ()


def _largest_block(fixed: int, per_sample: int, per_pair: int, budget: int) -> int:
    """Largest c with fixed + c·per_sample + c²·per_pair ≤ budget (0 if even c = 1 does not fit)."""
    room = budget - fixed
    if room < per_sample + per_pair:
        return 0
    if per_pair <= 0:
        return room // per_sample
    return int((-per_sample + math.sqrt(per_sample**2 + 4 * per_pair * room)) / (2 * per_pair))


# Relative speed of the work each implementation does, against a large GEMM (1): the structured
# Grams are einsums over position pairs (GRAM_SLOWDOWN), forward-mode products and vmapped
# reverse passes run at about a third.
_PASS_SLOWDOWN = 3.0


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
    Each implementation is sized with its own byte counts — "structured" with its features
    (measured on the first two samples, :func:`plstar.structured.probe`), "jacobian" with its
    rows (k·m per sample), "ntvp" with one block of Jacobian rows and vmapped forward-mode
    passes — and costed in flops: per sample, a forward pass (F, counted on one sample) and k
    reverse passes (2F each) for the features, then "structured" Σ_layers min(T²p + kTq(T + k), k²pq)
    and "jacobian" k²·m multiply-adds per sample pair, "ntvp" k forward-mode passes (3F) per
    sample pair. "auto" takes the cheapest implementation whose plan fits the budget, or the one
    needing the least memory when none fits. "structured" is a candidate once its entry check
    passed (``probe``: a checked probe already made, reused; else one is made here). A demanded
    implementation is planned with blocks of one sample when even those exceed the budget.
    Features of every block are kept when they fit beside blocks of at least 64 samples;
    otherwise two blocks are held at a time and column blocks are recomputed. ``symmetric``
    (x2 is x) lets one set of features serve rows and columns and halves the contraction.
    """
    implementation = choice("implementation", implementation, IMPLEMENTATIONS)  # type: ignore[assignment]
    dtype = floating_dtype("dtype", dtype)
    memory_budget = whole_number("memory_budget", memory_budget, minimum=1)
    n2 = whole_number("n2", n2, minimum=1)
    if probe is None and wants_structured(fmodel, implementation):
        strict = implementation == "structured"
        probe = verified_probe(fmodel, x, strict=strict, memory_budget=memory_budget)
    return plan_with_probe(
        fmodel, x, n2, implementation=implementation, dtype=dtype,
        memory_budget=memory_budget, symmetric=symmetric, probe=probe,
    )  # fmt: skip


def wants_structured(fmodel: FunctionalModel, implementation: str) -> bool:
    """Whether ``implementation`` considers the structured kernel on this model at all."""
    return implementation == "structured" or (
        implementation == "auto" and bool(structured.split_parameters(fmodel)[0])
    )


def plan_with_probe(
    fmodel: FunctionalModel,
    x: Tensor,
    n2: int,
    *,
    implementation: str,
    dtype: torch.dtype,
    memory_budget: int,
    symmetric: bool,
    probe: structured.Probe | None,
    costs: SampleCosts | None = None,
) -> KernelPlan:
    """:func:`plan_kernel` once the structured probe is settled (None: not a candidate);
    ``costs``: :func:`sample_costs` already measured."""
    costs = sample_costs(fmodel, x) if costs is None else costs
    sizes = _Sizes.of(fmodel, x.shape[0], n2, dtype, costs, symmetric)
    candidates = {
        "structured": None if probe is None else lambda: _blocked(sizes, memory_budget, probe),
        "jacobian": lambda: _blocked(sizes, memory_budget, None),
        "ntvp": lambda: _ntvp(sizes, memory_budget),
    }
    if implementation != "auto":
        make = candidates[implementation]
        assert make is not None, "a demanded structured kernel needs its probe"
        return make()
    plans = [make() for make in candidates.values() if make is not None]
    fitting = [plan for plan in plans if plan.planned_bytes <= memory_budget]
    if fitting:
        return min(fitting, key=lambda plan: plan.cost)
    return min(plans, key=lambda plan: (plan.planned_bytes, plan.cost))


def structured_floor(
    fmodel: FunctionalModel, x: Tensor, n2: int, symmetric: bool, costs: SampleCosts
) -> float:
    """A lower bound on the cost of a "structured" plan, known before its probe: recording the
    features of every sample once. When another plan costs less, the probe can be skipped."""
    sizes = _Sizes.of(fmodel, x.shape[0], n2, torch.float64, costs, symmetric)
    return (sizes.n if symmetric else sizes.n + sizes.n2) * sizes.recording_flops


@dataclass(frozen=True)
class _Sizes:
    """The measured quantities every plan is computed from."""

    n: int
    n2: int
    k: int
    m: int
    dtype: torch.dtype
    itemsize: int
    model_itemsize: int
    costs: SampleCosts
    symmetric: bool
    result_bytes: int

    @classmethod
    def of(
        cls, fmodel: FunctionalModel, n: int, n2: int, dtype: torch.dtype, costs: SampleCosts,
        symmetric: bool,
    ) -> _Sizes:  # fmt: skip
        itemsize = dtype.itemsize
        model_itemsize = fmodel.dtype.itemsize
        k = fmodel.k
        return cls(n, n2, k, fmodel.m, dtype, itemsize, model_itemsize, costs, symmetric,
                   n * k * n2 * k * itemsize)  # fmt: skip

    @property
    def pairs(self) -> float:
        """Sample pairs contracted: n·n2, about half of them when x2 is x."""
        return self.n * (self.n + 1) / 2 if self.symmetric else float(self.n * self.n2)

    @property
    def features_flops(self) -> float:
        """One sample's Jacobian rows: a forward pass and k (vmapped) reverse passes."""
        return self.costs.forward_flops * (1 + 2 * self.k) * _PASS_SLOWDOWN

    @property
    def recording_flops(self) -> float:
        """One sample's structured features: a forward pass over √k copies and reverse sweeps
        over k (:func:`plstar.recording.replicas`)."""
        return self.costs.forward_flops * (replicas(self.k) + 2 * self.k) * _PASS_SLOWDOWN

    @property
    def jacobian_bytes(self) -> int:
        """One sample's Jacobian rows (in ``dtype`` and the model's) and k passes' activations."""
        k, m = self.k, self.m
        return k * m * (self.itemsize + self.model_itemsize) + k * self.costs.activation_bytes


def _blocked(sizes: _Sizes, budget: int, probe: structured.Probe | None) -> KernelPlan:
    """A "structured" (with ``probe``) or "jacobian" plan: features per sample block, kept when
    they fit, contracted block pair by block pair."""
    s, k = sizes, sizes.k
    activations = s.costs.activation_bytes
    if probe is not None:  # kept features; the activations only while a block is computed
        stored, contraction = probe.bytes(s.dtype, k)
        fallback = bool(probe.fallback)
        rows_m = probe.sizes(k).fallback_width
        transient = k * activations * (2 if fallback else 1) + k * rows_m * s.model_itemsize
        transient = max(transient, contraction)  # features are made, then contracted
        grams = probe.flops_per_pair(k, ("gram", "tokens"))
        pair_flops = 2 * (probe.flops_per_pair(k, ("rows",)) + GRAM_SLOWDOWN * grams)
        name = "structured"
    else:
        stored = k * s.m * s.itemsize
        transient = k * (s.m * s.model_itemsize + activations)
        pair_flops = 2 * k * k * s.m
        name = "jacobian"
    per_pair = 3 * k * k * s.itemsize  # the block product and its temporaries
    samples = s.n if s.symmetric else s.n + s.n2
    # Keep every block's features when they fit with room for blocks of ≥ 64 samples; else hold
    # two blocks at a time and recompute column blocks.
    cached = _largest_block(samples * stored, transient, per_pair, budget)
    cache = cached >= min(64, s.n, s.n2)
    block = cached if cache else max(1, _largest_block(0, 2 * stored + transient, per_pair, budget))
    row, col = min(s.n, block), min(s.n2, block)
    held = samples * stored if cache else (row + col) * stored
    planned = held + max(row, col) * transient + row * col * per_pair
    computed = samples if cache or s.symmetric else s.n + s.n2 * math.ceil(s.n / row)
    if probe is None:
        feature_flops = computed * s.features_flops
    else:  # the fallback parameters' Jacobian rows cost a vmapped pass of their own
        feature_flops = computed * (s.recording_flops + (s.features_flops if fallback else 0))
    cost = feature_flops + s.pairs * pair_flops
    rows, reasons = ((), ()) if probe is None else (
        tuple(probe.fallback), tuple(sorted(probe.rows_reasons.items()))
    )  # fmt: skip
    return KernelPlan(
        name, row, col, int(planned), budget, s.result_bytes, cache, cost, rows, reasons
    )


def _ntvp(sizes: _Sizes, budget: int) -> KernelPlan:
    """An "ntvp" plan: Jacobian rows of a column block, pushed through forward-mode passes."""
    s, k = sizes, sizes.k
    col = max(1, min(s.n2, budget // (2 * s.jacobian_bytes)))
    # vmap over col·k tangents of a forward pass over ``row`` samples
    per_row = col * k * (s.costs.activation_bytes + k * s.itemsize) * 2
    row = max(1, min(s.n, (budget - col * s.jacobian_bytes) // max(per_row, 1)))
    planned = col * s.jacobian_bytes + row * per_row
    passes = s.pairs * k * 3 * s.costs.forward_flops * _PASS_SLOWDOWN
    cost = s.n2 * s.features_flops + passes
    return KernelPlan("ntvp", int(row), int(col), int(planned), budget, s.result_bytes,
                      cost=cost)  # fmt: skip
