"""Tangent kernels and their spectra across processes, on ``torch.distributed`` (NCCL or gloo).

Launch with ``torchrun`` and call :func:`init`; every function below is then called by every rank
(SPMD). Samples are sharded across the p ranks in order (rank r holds samples
``offsets[r]:offsets[r + 1]``, sizes differing by at most one). Each rank computes the features of
its shard — per-layer structured features, or Jacobian rows on the fallback path, by the very
routines of the single-process kernel — and the features travel around a ring (p − 1 exchanges),
so rank r assembles its row block K[shard_r, :] without any rank holding all features or all of K.

:class:`DistributedKernel` is the result: ``gather()`` brings K to one rank when it fits, and
``K @ v`` (v replicated, (N,) or (N, b)) costs one all-reduce of a zero-padded (N·b + 1)-vector.
Each entry of that sum has exactly one non-zero term, so the product is bitwise identical on every
rank and :func:`plstar.lanczos.lanczos` runs unchanged, in lockstep, on every rank. With
``store="features"`` there is no ring and no K: each rank keeps its shard's features and a product
contracts through parameter space (two all-reduces), for n whose row blocks do not fit.
docs/scaling.md gives the memory and communication model.

Failure: every phase runs under :func:`guarded`; an exception on one rank is announced by an
all-reduce of a status flag and re-raised on every rank as :class:`DistributedError` with the
failing rank's message. A rank that dies breaks its connections and the others fail fast; a rank
that hangs is caught by the process group's timeout (:func:`init`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from plstar import conditions, structured
from plstar import distributed_comm as comm
from plstar import distributed_features as features_
from plstar.conditions import Analysis
from plstar.devices import model_device
from plstar.distributed_comm import (
    DistributedError,
    broadcast_parameters,
    comm_device,
    guarded,
    init,
    shard_sizes,
)
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, ProgressCallback, chunks
from plstar.functional import make_functional as _make_functional
from plstar.kernel import mirror_upper_triangle_
from plstar.planning import IMPLEMENTATIONS, Implementation, default_memory_budget
from plstar.spectrum import Spectrum, Which
from plstar.spectrum import spectrum as _spectrum
from plstar.validation import callback, choice, floating_dtype
from plstar.validation import memory_budget as check_budget

__all__ = [
    "DistributedError",
    "DistributedKernel",
    "analyze",
    "broadcast_parameters",
    "guarded",
    "init",
    "shard_sizes",
    "spectrum",
    "tangent_kernel",
]

T = TypeVar("T")
DENSE_GATHER_LIMIT = 20_000
"""Largest N = n·k that :func:`spectrum` gathers to one rank for the dense solver (as analyze)."""


@dataclass
class DistributedKernel:
    """The tangent kernel K (N × N, N = n·k, sample-major) spread over the ranks.

    Stored as ``rows`` = K[offsets[rank]·k : offsets[rank + 1]·k, :] (store="rows"), or only as
    this rank's shard ``features`` (store="features"), from which products are contracted through
    parameter space. ``K @ v`` and :meth:`gather` are collectives: every rank calls them alike.
    """

    rows: Tensor | None
    counts: list[int]
    k: int
    implementation: str
    dtype: torch.dtype
    group: dist.ProcessGroup | None = None
    features: structured.BlockFeatures | None = None
    layout: features_.Layout | None = None
    block: int = 1
    token_rows: list[int] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    products: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        n = sum(self.counts) * self.k
        return (n, n)

    @property
    def row_range(self) -> slice:
        """The rows of K (and of K·v) that belong to this rank."""
        rank = dist.get_rank(self.group)
        start = sum(self.counts[:rank]) * self.k
        return slice(start, start + self.counts[rank] * self.k)

    def __matmul__(self, v: Tensor) -> Tensor:
        """K v for v (N,) or (N, b), the same on every rank; the result likewise, on v's device
        (a numpy v: on this rank's device).

        store="rows": one all-reduce of N·b + 1 numbers (this rank's rows of K v, zeros elsewhere,
        and a failure flag): every entry has one non-zero term, so the sum is exact. store=
        "features": first an all-reduce of the pulled DFᵀv (m·b numbers), then that one.
        """
        v = v if isinstance(v, Tensor) else torch.as_tensor(v, device=self.device)
        columns = v.reshape(self.shape[0], -1)
        mine, width = self.row_range, columns.shape[1]
        if self.rows is not None:
            rows = self.rows

            def local() -> Tensor:
                return rows @ columns.to(rows.device, self.dtype)
        else:
            features, layout, k, block = self.features, self.layout, self.k, self.block
            assert features is not None and layout is not None
            own = columns[mine].to(comm_device(self.group), self.dtype)
            pulled = comm.pull_all(features, layout, own, k, block, self.token_rows, self.group)

            def local() -> Tensor:
                return features_.push_blocks(features, layout, pulled, k, block, self.device)

        def fill(out: Tensor) -> None:
            out.view(-1, width)[mine] = local()

        product = comm.reduce_with_flag(columns.numel(), fill, self.dtype, self.group)
        self.products += width
        return product.view(columns.shape).to(v.device).reshape(v.shape)

    def gather(self, dst: int = 0, *, max_bytes: int | None = None) -> Tensor | None:
        """The whole K (N × N, on the CPU, exactly symmetric) on rank ``dst``; None elsewhere.

        Refuses, on every rank, when K is not stored or N²·itemsize exceeds ``max_bytes``
        (default: twice :func:`plstar.default_memory_budget`, i.e. half the RAM it sees).
        """
        if self.rows is None:  # the same on every rank: they all raise, with no collective
            raise PlstarInputError("K is not stored (store='features'); use store='rows'")
        limit = max_bytes if max_bytes is not None else 2 * default_memory_budget()
        matrix = comm.gather_rows(self.rows, self.counts, self.k, dst, limit, self.group)
        return None if matrix is None else mirror_upper_triangle_(matrix)


def tangent_kernel(
    model: nn.Module,
    x: Tensor,
    *,
    sharded: bool = False,
    store: Literal["rows", "features"] = "rows",
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    group: dist.ProcessGroup | None = None,
    output: OutputSelector | None = None,
) -> DistributedKernel:
    """K = DF DFᵀ of ``model`` on x across the ranks of ``group`` (a collective), n_r samples here.

    ``x`` is the whole data set on every rank (each takes its shard), or with ``sharded=True``
    this rank's shard only (global order = rank order). The model must be the same on every rank
    (checked; see :func:`broadcast_parameters`). store="rows": the features go round the ring and
    each rank keeps K[shard, :] (n_r·k · n·k numbers in ``dtype``); features of three shards must
    fit ``memory_budget``; traffic p − 1 messages of one shard's features per rank; flops up to 2×
    the single-process kernel's in all (each off-diagonal block is formed by both ranks that own
    its rows or its columns; diagonal blocks use the symmetry), over p ranks. store="features":
    no ring, each rank keeps its own features only, and products contract through parameter
    space (two all-reduces each). ``output`` picks F from what the model returns (see
    :func:`plstar.tangent_kernel`).
    Raises DistributedError on every rank when any rank fails.
    """
    store = choice("store", store, ("rows", "features"))  # type: ignore[assignment]
    implementation = choice("implementation", implementation, IMPLEMENTATIONS)  # type: ignore[assignment]
    dtype = floating_dtype("dtype", dtype)
    callback("progress", progress)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    budget = check_budget(memory_budget) or default_memory_budget(model_device(model))
    fmodel, local, counts = comm.shard_of(model, x, sharded, group, output)
    offsets = [sum(counts[:r]) for r in range(world + 1)]
    found: list = []

    def plan() -> tuple[str, int]:
        used, block, probe = features_.choose_implementation(
            fmodel, local, max(counts), implementation, dtype, budget
        )
        found.append(probe)
        return used, block

    choices = guarded("planning", plan, group, gather=True)
    used = "structured" if all(c[0] == "structured" for c in choices) else "jacobian"
    block = max(1, min(c[1] for c in choices))
    compute = features_.feature_function(fmodel, local, used, dtype, found[0])
    held, kept = (3 if store == "rows" and world > 1 else 1), []  # own, in hand, in flight

    def own_features() -> tuple[features_.Layout, list[int]]:
        blocks = list(chunks(local.shape[0], block))
        parts = [compute(local[blocks[0]])]
        layout = features_.layout_of(parts[0], blocks[0].stop)
        need = held * layout.bytes(max(counts))
        if need > budget:  # refused before the other blocks are computed
            raise PlstarInputError(
                f"{held} shard(s) of features need {need / 2**30:.2f} GiB per rank, over the "
                f"{budget / 2**30:.2f} GiB budget: use more ranks or a larger memory budget"
            )
        parts += [compute(local[rows]) for rows in blocks[1:]]
        kept.append(features_.concat(parts, layout))
        return layout, [int(f[1].max()) + 1 for f in kept[0].factors if f[0] == "tokens"]

    # only the layouts travel here (and the token tables' lengths), never the features
    agreed = guarded("tangent kernel features", own_features, group, gather=True)
    own, layout = kept[0], agreed[rank][0]
    if any(other[0] != layout for other in agreed):
        raise DistributedError(
            "the ranks' features have different layouts (a layer is used differently on "
            "different shards); use implementation='jacobian'", input_error=True
        )  # fmt: skip
    kernel = DistributedKernel(
        None, counts, fmodel.k, used, dtype, group, own, layout, block,
        [max(t) for t in zip(*[a[1] for a in agreed], strict=True)], fmodel.device,
    )  # fmt: skip
    if store == "features":
        return kernel
    k = fmodel.k
    rows = torch.empty(counts[rank] * k, offsets[-1] * k, dtype=dtype, device=fmodel.device)

    def visit(source: int, theirs: structured.BlockFeatures) -> None:
        # Each sub-block pair is contracted in one orientation, that of the global sample order,
        # so the ranks owning K[I, J] and K[J, I] compute the same product; in the diagonal block
        # the lower sub-blocks are those transposes, copied. gather() mirrors the whole K, so
        # what a user sees is symmetric bit for bit even if two processes' GEMMs differed.
        for mine in chunks(counts[rank], block):
            left = features_.take(own, layout, mine)
            for cols in chunks(counts[source], block):
                if source == rank and cols.start < mine.start:
                    continue
                right = features_.take(theirs, layout, cols)
                if offsets[rank] + mine.start <= offsets[source] + cols.start:
                    part = structured.contract_blocks(left, right, k)
                else:
                    part = structured.contract_blocks(right, left, k).T
                if source == rank and cols == mine:  # A·Aᵀ need not be bitwise symmetric
                    mirror_upper_triangle_(part)
                start = (offsets[source] + cols.start) * k
                rows[mine.start * k : mine.stop * k, start : start + part.shape[1]] = part
                if source == rank and cols.start > mine.start:
                    start = (offsets[rank] + mine.start) * k
                    rows[cols.start * k : cols.stop * k, start : start + part.shape[0]] = part.T
        if progress is not None:
            progress("tangent kernel", (rank - source) % world + 1, world)

    comm.ring(
        own, layout, counts, rank, comm_device(group), fmodel.device, visit,
        lambda phase, fn: guarded(phase, fn, group), group,
    )  # fmt: skip
    kernel.rows, kernel.features = rows, None  # the row block is all products need
    return kernel


def spectrum(
    kernel: DistributedKernel,
    which: Which = "both",
    *,
    method: Literal["auto", "dense", "lanczos"] = "auto",
    input_precision: float | None = None,
    tol: float = 1e-10,
    max_iter: int = 300,
    seed: int = 0,
    dst: int = 0,
) -> Spectrum:
    """Extreme eigenvalues of a distributed K, the same :class:`Spectrum` on every rank.

    "dense" (and "auto" up to N = 20,000): K is gathered to rank ``dst``, solved there by
    :func:`plstar.spectrum` exactly as in one process. "lanczos" (and "auto" beyond):
    :func:`plstar.spectrum` on the kernel's products, run in lockstep on every rank (one
    all-reduce per product). Either way rank ``dst``'s result is broadcast, so every rank returns
    the same numbers by construction, not by trusting two processes' floating point to agree.
    Arguments as :func:`plstar.spectrum`.
    """
    if not isinstance(kernel, DistributedKernel):
        raise PlstarInputError(f"kernel must be a DistributedKernel, got {type(kernel).__name__}")
    method = choice("method", method, ("auto", "dense", "lanczos"))  # type: ignore[assignment]
    group = kernel.group
    dense = method == "dense" or (
        method == "auto" and kernel.rows is not None and kernel.shape[0] <= DENSE_GATHER_LIMIT
    )
    if dense:
        matrix = kernel.gather(dst)
        found = guarded("kernel spectrum", lambda: None if matrix is None else _spectrum(
            matrix, which, input_precision=input_precision, seed=seed,
        ), group)  # fmt: skip
    else:
        found = guarded("kernel spectrum", lambda: _spectrum(
            kernel, which, input_precision=input_precision, tol=tol, max_iter=max_iter, seed=seed,
        ), group)  # fmt: skip
    box = [found]
    source = comm.global_rank(group, dst)
    guarded("kernel spectrum (broadcast)",
            lambda: dist.broadcast_object_list(box, source, group), group)  # fmt: skip
    return box[0]


def analyze(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    target_loss: float | None = None,
    hessian_outputs: int | None = 16,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    store: Literal["rows", "features"] = "rows",
    dst: int = 0,
    group: dist.ProcessGroup | None = None,
    hessian_time_share: float | None = 0.4,
    output: OutputSelector | None = None,
) -> Analysis | None:
    """:func:`plstar.analyze` with K and its spectrum computed across the ranks (a collective).

    Every rank passes the whole (x, y). K(w₀) (``store`` as :func:`tangent_kernel`), its spectrum
    (as :func:`spectrum`: dense on rank ``dst`` up to n·k = 20,000 when K is stored, else Lanczos
    on the distributed products) and the top eigenvector of K are distributed; then the other
    ranks return None while rank ``dst`` computes L(w₀), ρ(w₀), β and ‖H_F‖ on all n samples by
    the single-process code and returns the Analysis (``hessian_time_share`` and ``output`` as
    there).
    """
    started = time.perf_counter()
    found, top, used = _kernel_part(
        model, x, implementation=implementation, dtype=dtype, memory_budget=memory_budget,
        progress=progress, seed=seed, store=store, dst=dst, group=group, output=output,
    )  # fmt: skip
    if dist.get_rank(group) != dst:
        return None
    label = f"{used} on {dist.get_world_size(group)} ranks" + (
        ", products from features" if store == "features" else ""
    )
    solved = time.perf_counter()
    result = conditions.analyze(
        model, x, y, dtype=dtype, target_loss=target_loss, hessian_outputs=hessian_outputs,
        seed=seed, memory_budget=memory_budget, precomputed=(found, top, label),
        hessian_time_share=hessian_time_share, output=output,
    )  # fmt: skip
    result.seconds = {"kernel and spectrum": solved - started, **result.seconds}
    return result


def _kernel_part(
    model: nn.Module, x: Tensor, *, implementation: Implementation, dtype: torch.dtype,
    memory_budget: int | None, progress: ProgressCallback | None, seed: int,
    store: Literal["rows", "features"], dst: int, group: dist.ProcessGroup | None,
    output: OutputSelector | None,
) -> tuple[Spectrum, Tensor, str]:  # fmt: skip
    """(spectrum of K, its unit top eigenvector (N,), implementation), the same on every rank,
    with analyze's solver settings; the row blocks are freed on return."""
    kernel = tangent_kernel(
        model, x, implementation=implementation, dtype=dtype, memory_budget=memory_budget,
        progress=progress, store=store, group=group, output=output,
    )  # fmt: skip
    eps_model = float(torch.finfo(_make_functional(model, x[:1], output=output).dtype).eps)
    operator_path = kernel.rows is None or kernel.shape[0] > DENSE_GATHER_LIMIT
    found = spectrum(kernel, input_precision=eps_model, seed=seed, dst=dst,
                     **({"tol": 1e-8} if operator_path else {}))  # fmt: skip
    # The top eigenvector warm-starts β, as in conditions.analyze: Lanczos on the distributed
    # products, in lockstep on every rank.
    top = guarded("top eigenvector", lambda: conditions.top_eigenvector(
        kernel, assembled=not operator_path, seed=seed), group)  # fmt: skip
    return found, top, kernel.implementation
