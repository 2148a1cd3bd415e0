"""The machinery under :mod:`plstar.distributed`: joining, failing together, moving features.

* :func:`init` joins the group (NCCL or gloo) with a timeout on every collective;
* :func:`guarded` runs one phase on every rank and turns a failure on any rank into a
  :class:`DistributedError` on every rank, so no rank is left waiting in the next collective;
  :func:`reduce_with_flag` does the same inside the one all-reduce of a kernel product;
* :func:`ring` shows every shard's features to every rank in p steps, p − 1 exchanges;
  :func:`pull_all` sums DF_rᵀ v_r over the ranks for products from features alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from plstar.devices import result_device
from plstar.distributed_features import (
    Layout,
    empty_buffers,
    own_device,
    pack,
    pull_blocks,
    pulled_shapes,
    unpack,
)
from plstar.errors import PlstarInputError
from plstar.functional import FunctionalModel, OutputSelector, make_functional
from plstar.structured import BlockFeatures

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A phase failed on some rank; raised on every rank with the failing ranks' messages.

    ``input_error`` is true when the cause was bad input (a :class:`PlstarInputError`).
    """

    def __init__(self, message: str, *, input_error: bool = False, secondary: bool = False):
        super().__init__(message)
        self.input_error = input_error
        self.secondary = secondary  # raised because another rank failed


def init(
    backend: Literal["auto", "gloo", "nccl"] = "auto",
    *,
    timeout: float = 1800.0,
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
) -> torch.device:
    """Join the process group and return the device this rank computes on.

    ``"auto"`` takes NCCL when CUDA is available (device ``cuda:local_rank``), else gloo on the CPU.
    ``init_method="env://"`` reads torchrun's MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE (torch does);
    tests pass ``file://`` or ``tcp://`` with ``rank`` and ``world_size``. ``timeout`` (seconds)
    bounds every collective: a rank that hangs fails the others after that long, so it must exceed
    the longest phase one rank runs alone (the dense spectrum on rank 0 when gathered).
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank or 0)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, timeout=timedelta(seconds=timeout),
        rank=-1 if rank is None else rank, world_size=-1 if world_size is None else world_size,
    )  # fmt: skip
    return device


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where tensors must live for collectives: the current CUDA device on NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def guarded(
    phase: str, fn: Callable[[], T], group: dist.ProcessGroup | None = None, *,
    gather: bool = False,
) -> T | list[T]:  # fmt: skip
    """Run ``fn`` on every rank; if it raised on any rank, raise DistributedError on every rank.

    Returns fn's value, or with ``gather=True`` every rank's value (a list by rank). Cost: one
    all-reduce of a flag, plus one all-gather (of the values, or of the messages after a failure).
    When a collective itself fails (a peer died, or the timeout passed), the error says so.
    """
    error: BaseException | None = None
    value = None
    try:
        value = fn()
    except Exception as caught:
        error = caught
    flag = torch.tensor([0 if error is None else 1], device=comm_device(group))
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        failed = int(flag.item()) > 0
        items: list = [None] * dist.get_world_size(group)
        if failed or gather:
            mine = (None if error is None else _describe(error)) if failed else value
            dist.all_gather_object(items, mine, group=group)
    except Exception as lost:
        rank = dist.get_rank(group)
        raise DistributedError(
            f"rank {rank} lost contact with the other ranks during {phase}: another rank probably "
            f"died, hung past the timeout, or failed ({error or lost})"
        ) from (error or lost)
    if not failed:
        return items if gather else value  # type: ignore[return-value]
    primary = [(r, rep) for r, rep in enumerate(items) if rep is not None and not rep[2]]
    shown = primary or [(r, rep) for r, rep in enumerate(items) if rep is not None]
    by_text: dict[str, list[int]] = {}
    for r, (text, _, _) in shown:  # the same failure on many ranks is told once
        by_text.setdefault(text, []).append(r)
    message = "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} failed during {phase}: {text}"
        for text, rs in by_text.items()
    )
    raise DistributedError(
        message, input_error=any(rep[1] for _, rep in shown), secondary=error is None
    ) from error


def _describe(error: BaseException) -> tuple[str, bool, bool]:
    """(message, is input error, is only an echo of another rank's failure)."""
    if isinstance(error, DistributedError):
        return str(error), error.input_error, error.secondary
    text = str(error) if isinstance(error, PlstarInputError) else f"{type(error).__name__}: {error}"
    return text, isinstance(error, PlstarInputError), False


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """The default group's rank of ``group``'s rank ``rank`` (point-to-point calls want it)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def shard_sizes(n: int, world: int) -> list[int]:
    """Samples per rank for n samples on ``world`` ranks: the first n mod p ranks get one more."""
    if n < world:
        raise PlstarInputError(f"{n} samples cannot be shared by {world} ranks: use n ≥ ranks")
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def broadcast_parameters(
    model: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Copy rank ``src``'s parameters and buffers into ``model`` on every rank (as DDP does)."""
    device = comm_device(group)

    def copy() -> None:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                moved = t.detach().to(device)
                dist.broadcast(moved, global_rank(group, src), group=group)
                t.copy_(moved)

    guarded("broadcast of the parameters", copy, group)


def ring(
    own: BlockFeatures,
    layout: Layout,
    counts: list[int],
    rank: int,
    wire: torch.device,
    device: torch.device,
    visit: Callable[[int, BlockFeatures], None],
    step_guard: Callable[[str, Callable[[], None]], None],
    group: dist.ProcessGroup | None = None,
) -> None:
    """Show every shard's features to ``visit(source_rank, features)`` on this rank, in p steps.

    Features travel as buffers on ``wire`` (the collectives' device) and are visited on ``device``.
    Step t visits shard (rank − t) mod p and, meanwhile, passes the shard in hand to rank + 1 while
    receiving the next from rank − 1 (``batch_isend_irecv``; p − 1 exchanges in all), so the
    transfer overlaps the visit. Memory: three feature sets (own, in hand, in flight). Each step
    runs under ``step_guard`` so that a failure on any rank ends the step on every rank.
    """
    world = len(counts)
    following = global_rank(group, (rank + 1) % world)
    preceding = global_rank(group, (rank - 1) % world)
    state = {"hand": own, "packed": pack(own, wire) if world > 1 else {}}

    def step(t: int) -> None:
        source = (rank - t) % world
        works, incoming = [], {}
        if t < world - 1:
            incoming = empty_buffers(layout, counts[(source - 1) % world], wire)
            ops = [dist.P2POp(dist.isend, b, following, group) for b in state["packed"].values()]
            ops += [dist.P2POp(dist.irecv, b, preceding, group) for b in incoming.values()]
            works = dist.batch_isend_irecv(ops)
        try:
            visit(source, state["hand"])
        finally:  # complete the exchange even if the visit failed, so peers are not left waiting
            for work in works:
                work.wait()
        if incoming:
            state["packed"] = incoming
            state["hand"] = unpack(incoming, layout, counts[(source - 1) % world], device)

    for t in range(world):
        step_guard(f"tangent kernel, ring step {t + 1}/{world}", lambda t=t: step(t))


def fingerprint(fmodel: FunctionalModel, x: Tensor | None) -> list[float]:
    """Sums that differ when two ranks hold different parameters (or data): cheap, not a hash."""
    out = []
    for t in [*fmodel.params.values(), *([] if x is None else [x])]:
        v = t.detach().double().reshape(-1)
        weights = torch.linspace(1.0, 2.0, v.numel(), dtype=torch.float64, device=v.device)
        out += [float(v.abs().sum()), float((v * weights).sum())]
    return out


def agree_shards(summaries: list, sharded: bool, world: int) -> list[int]:
    """Shard sizes from each rank's (samples, sample shape, k, m, fingerprint), after checking that
    every rank holds the same model (and the same data when it is replicated). Every rank sees the
    same summaries, so every rank raises the same error, with no further collective."""
    first = summaries[0]
    for r, (_, shape, k, m, prints) in enumerate(summaries):
        if (shape, k, m) != first[1:4]:
            raise DistributedError(
                f"rank {r} has samples of shape {shape}, k = {k}, m = {m}; rank 0 has "
                f"{first[1]}, k = {first[2]}, m = {first[3]}", input_error=True,
            )  # fmt: skip
        same = len(prints) == len(first[4]) and all(
            math.isclose(a, b, rel_tol=1e-12) for a, b in zip(prints, first[4], strict=True)
        )
        if not same:
            what = "parameters" if sharded else "parameters or data"
            raise DistributedError(
                f"rank {r} holds different {what} from rank 0: call "
                "plstar.distributed.broadcast_parameters(model) and give every rank the same x",
                input_error=True,
            )
    if sharded:
        if any(s[0] == 0 for s in summaries):
            raise DistributedError("a rank holds an empty shard", input_error=True)
        return [s[0] for s in summaries]
    try:
        return shard_sizes(first[0], world)
    except PlstarInputError as error:
        raise DistributedError(str(error), input_error=True) from None


def reduce_with_flag(
    size: int, fill: Callable[[Tensor], None], dtype: torch.dtype, group: dist.ProcessGroup | None
) -> Tensor:
    """The sum over ranks of what ``fill`` writes into a zeroed (size,) buffer: one all-reduce.

    One more element carries a failure flag: a rank whose ``fill`` raises still enters the
    collective, then raises, and the others raise DistributedError, so nobody is left waiting.
    """
    buffer = torch.zeros(size + 1, dtype=dtype, device=comm_device(group))
    error = None
    try:
        fill(buffer[:-1])
    except Exception as caught:
        error = caught
        buffer[-1] = 1.0
    dist.all_reduce(buffer, group=group)
    if error is not None:
        raise error
    if float(buffer[-1]) > 0:
        raise DistributedError("another rank failed during a kernel product", secondary=True)
    return buffer[:-1]


def pull_all(
    own: BlockFeatures, layout: Layout, own_columns: Tensor, k: int, block: int,
    token_rows: list[int], group: dist.ProcessGroup | None,
) -> list[Tensor]:  # fmt: skip
    """Σ over the ranks of DF_rᵀ V_r, one parameter-shaped tensor per factor: one all-reduce.

    ``own_columns`` (n_r·k, b) are this rank's rows of V. Token tables are padded to
    ``token_rows``, the longest any rank has, so that every rank reduces the same shapes.
    """
    shapes = pulled_shapes(layout, own_columns.shape[1], token_rows)
    sizes = [math.prod(s) for s in shapes]

    def fill(out: Tensor) -> None:
        local = pull_blocks(own, layout, own_columns.to(own_device(own)), k, block)
        for piece, shape, part in zip(out.split(sizes), shapes, local, strict=True):
            piece.view(shape)[: part.shape[0]] = part  # a shorter token table: zero rows after

    flat = reduce_with_flag(sum(sizes), fill, own_columns.dtype, group)
    return [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes, strict=True)]


def gather_rows(
    rows: Tensor, counts: list[int], k: int, dst: int, limit: int,
    group: dist.ProcessGroup | None,
) -> Tensor | None:  # fmt: skip
    """Every rank's row block stacked on rank ``dst`` (on its rows' device when K fits there, else
    in host memory: :func:`plstar.devices.result_device`), None elsewhere; refused on every rank
    when the N × N result would exceed ``limit`` bytes on ``dst``."""
    rank, device, size = dist.get_rank(group), comm_device(group), sum(counts) * k

    def check() -> None:
        need = size * size * rows.element_size()
        if rank == dst and need > limit:
            raise PlstarInputError(
                f"K ({size}×{size}, {need / 2**30:.1f} GiB) does not fit the "
                f"{limit / 2**30:.1f} GiB allowed on rank {dst}; use its products instead"
            )

    def move() -> Tensor | None:
        if rank != dst:
            dist.send(rows.to(device).contiguous(), global_rank(group, dst), group=group)
            return None
        where = result_device(rows.device, size * size * rows.element_size(), 0)
        out = torch.empty(size, size, dtype=rows.dtype, device=where)
        start = 0
        for source, count in enumerate(counts):
            stop = start + count * k
            if source == rank:
                out[start:stop] = rows
            elif device == where:
                dist.recv(out[start:stop], global_rank(group, source), group)
            else:  # received where the collectives run (NCCL: the GPU), then copied
                buffer = torch.empty(stop - start, size, dtype=rows.dtype, device=device)
                dist.recv(buffer, global_rank(group, source), group)
                out[start:stop] = buffer
            start = stop
        return out

    guarded("gather (size check)", check, group)
    return guarded("gather", move, group)  # type: ignore[return-value]


def shard_of(
    model: nn.Module,
    x: Tensor,
    sharded: bool,
    group: dist.ProcessGroup | None,
    output: OutputSelector | None = None,
) -> tuple[FunctionalModel, Tensor, list[int]]:
    """(F(w; ·), this rank's samples, samples per rank) once every rank agrees on the model;
    ``output`` as in :func:`plstar.make_functional`."""
    world, state = dist.get_world_size(group), {}

    def prepare() -> tuple:
        fmodel = make_functional(model, x, output=output)
        state["fmodel"] = fmodel
        state["x"] = x.to(fmodel.dtype) if x.is_floating_point() else x
        return (x.shape[0], tuple(x.shape[1:]), fmodel.k, fmodel.m,
                fingerprint(fmodel, None if sharded else state["x"]))  # fmt: skip

    summaries = guarded("set-up", prepare, group, gather=True)
    counts = agree_shards(summaries, sharded, world)  # type: ignore[arg-type]
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    local = state["x"] if sharded else state["x"][start : start + counts[rank]]
    return state["fmodel"], local, counts
