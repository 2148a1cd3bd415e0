"""Feature sets of sample shards for :mod:`plstar.distributed`: what a rank computes, how it
travels, and how products contract through it.

A shard's features are a :class:`structured.BlockFeatures`, from the single-process kernel's own
routines: per-layer structured factors (plus fallback Jacobian rows), or on the "jacobian" path
Jacobian rows only. Every tensor in it leads with c (samples) or c·k (sample-major rows) and has the
same trailing shape on every rank, so a :class:`Layout` agreed once lets a rank rebuild a peer's
features from one flat buffer per dtype and the peer's sample count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from plstar import structured
from plstar.errors import PlstarInputError
from plstar.functional import FunctionalModel, chunks, jacobian_rows
from plstar.kernel import choose_plan
from plstar.planning import Implementation
from plstar.structured import BlockFeatures


@dataclass(frozen=True)
class Layout:
    """How a feature set is laid out: the factor kinds and, per tensor, (lead, trailing, dtype).

    ``lead`` is 1 for tensors with one row per sample and k for tensors with k rows per sample.
    Equal layouts on all ranks are what makes the exchange well defined (checked once).
    """

    kinds: tuple[str, ...]
    tensors: tuple[tuple[int, tuple[int, ...], str], ...]
    has_rows: bool

    def elements(self, samples: int) -> dict[str, int]:
        """Number of elements per dtype of a feature set of ``samples`` samples."""
        out: dict[str, int] = {}
        for lead, trailing, dtype in self.tensors:
            size = lead * samples
            for d in trailing:
                size *= d
            out[dtype] = out.get(dtype, 0) + size
        return out

    def bytes(self, samples: int) -> int:
        """Bytes of a feature set of ``samples`` samples (what one ring step sends)."""
        return sum(n * getattr(torch, d).itemsize for d, n in self.elements(samples).items())


def _tensors(features: BlockFeatures) -> list[Tensor]:
    out: list[Tensor] = []
    for _, first, second in features.factors:
        out += [first] if second is None else [first, second]
    return out + ([] if features.rows is None else [features.rows])


def layout_of(features: BlockFeatures, samples: int) -> Layout:
    """The layout of a feature set computed on ``samples`` ≥ 1 samples."""
    tensors = tuple(
        (t.shape[0] // samples, tuple(t.shape[1:]), str(t.dtype).replace("torch.", ""))
        for t in _tensors(features)
    )
    kinds = tuple(f[0] for f in features.factors)
    return Layout(kinds, tensors, features.rows is not None)


def _rebuild(layout: Layout, tensors: list[Tensor]) -> BlockFeatures:
    factors, it = [], iter(tensors)
    for kind in layout.kinds:
        first = next(it)
        factors.append((kind, first, None if kind == "rows" else next(it)))
    return BlockFeatures(factors, next(it) if layout.has_rows else None)


def concat(parts: list[BlockFeatures], layout: Layout) -> BlockFeatures:
    """Features of consecutive sample blocks joined into those of their union (sample-major)."""
    if len(parts) == 1:
        return parts[0]
    columns = zip(*[_tensors(p) for p in parts], strict=True)
    return _rebuild(layout, [torch.cat(list(c), dim=0) for c in columns])


def take(features: BlockFeatures, layout: Layout, rows: slice) -> BlockFeatures:
    """The features of samples ``rows`` of a feature set (views, no copy)."""
    pieces = [
        t[rows.start * lead : rows.stop * lead]
        for t, (lead, _, _) in zip(_tensors(features), layout.tensors, strict=True)
    ]
    return _rebuild(layout, pieces)


def pack(features: BlockFeatures, device: torch.device) -> dict[str, Tensor]:
    """One contiguous buffer per dtype on ``device``, sorted by dtype name (the same everywhere)."""
    groups: dict[str, list[Tensor]] = {}
    for t in _tensors(features):
        groups.setdefault(str(t.dtype).replace("torch.", ""), []).append(t.reshape(-1))
    return {d: torch.cat(groups[d]).to(device) for d in sorted(groups)}


def unpack(
    buffers: dict[str, Tensor], layout: Layout, samples: int, device: torch.device
) -> BlockFeatures:
    """Inverse of :func:`pack` for a feature set of ``samples`` samples, moved to ``device``."""
    offsets = dict.fromkeys(buffers, 0)
    tensors = []
    for lead, trailing, dtype in layout.tensors:
        shape = (lead * samples, *trailing)
        size = 1
        for d in shape:
            size *= d
        start = offsets[dtype]
        tensors.append(buffers[dtype][start : start + size].view(shape).to(device))
        offsets[dtype] = start + size
    return _rebuild(layout, tensors)


def empty_buffers(layout: Layout, samples: int, device: torch.device) -> dict[str, Tensor]:
    """Receive buffers for a feature set of ``samples`` samples."""
    return {
        d: torch.empty(n, dtype=getattr(torch, d), device=device)
        for d, n in sorted(layout.elements(samples).items())
    }


def choose_implementation(
    fmodel: FunctionalModel, x: Tensor, n2: int, implementation: Implementation,
    dtype: torch.dtype, budget: int,
) -> tuple[str, int, structured.Probe | None]:  # fmt: skip
    """(implementation, samples per block, probe) on this rank's shard, as tangent_kernel chooses:
    "structured" once the entry check passed, else (for "auto") the Jacobian rows, re-planned.

    "ntvp" forms no features to exchange: where the plan picks it (the Jacobian rows of a block
    do not fit), the rows are used one sample at a time.
    """
    if implementation == "ntvp":
        raise PlstarInputError("the distributed kernel exchanges features: use 'structured', "
                               "'jacobian' or 'auto', not 'ntvp'")  # fmt: skip
    plan, found = choose_plan(
        fmodel, x, n2, implementation=implementation, dtype=dtype, memory_budget=budget,
        symmetric=False,
    )  # fmt: skip
    if found is not None:
        return "structured", plan.row_block, found
    return "jacobian", plan.row_block if plan.implementation == "jacobian" else 1, None


def feature_function(
    fmodel: FunctionalModel, x: Tensor, implementation: str, dtype: torch.dtype,
    found: structured.Probe | None,
) -> Callable[[Tensor], structured.BlockFeatures]:  # fmt: skip
    """Samples (c, ...) -> their features: structured, or Jacobian rows only ("jacobian")."""
    if implementation == "structured":
        modules, fallback = (
            (found.modules, found.fallback) if found else structured.split_parameters(fmodel)
        )
        broadcast = found.broadcast if found else ()
        return lambda xs: structured.block_features(fmodel, xs, modules, fallback, dtype, broadcast)

    def rows(xs: Tensor) -> structured.BlockFeatures:
        with torch.no_grad():
            parts = jacobian_rows(fmodel, xs, dtype)
        return structured.BlockFeatures([], torch.cat(list(parts.values()), dim=1))

    return rows


def pulled_shapes(layout: Layout, columns: int, token_rows: list[int]) -> list[tuple[int, ...]]:
    """Shapes of :func:`structured.pull_features` for ``columns`` columns, token tables padded to
    the ``token_rows`` agreed by all ranks (each rank's table ends at its largest token id)."""
    shapes, tensors, tokens = [], iter(layout.tensors), iter(token_rows)
    for kind in [*layout.kinds, *(["rows"] if layout.has_rows else [])]:
        first = next(tensors)
        if kind == "rows":
            shapes.append((first[1][0], columns))
            continue
        q = next(tensors)[1][-1]
        shapes.append(
            (next(tokens), q, columns) if kind == "tokens" else (columns, q, first[1][-1])
        )
    return shapes


def own_device(features: BlockFeatures) -> torch.device:
    """The device the features live on."""
    return _tensors(features)[0].device


def pull_blocks(
    own: BlockFeatures, layout: Layout, columns: Tensor, k: int, block: int
) -> list[Tensor]:
    """DFᵀV over this rank's samples, in blocks of ``block`` samples; columns (n_r·k, b)."""
    total = None
    for rows in chunks(columns.shape[0] // k, block):
        part = take(own, layout, rows)
        pulled = structured.pull_features(part, columns[rows.start * k : rows.stop * k], k)
        total = structured.add_pulled_features(total, pulled, part)
    assert total is not None
    return total


def push_blocks(
    own: BlockFeatures, layout: Layout, pulled: list[Tensor], k: int, block: int,
    device: torch.device,
) -> Tensor:  # fmt: skip
    """DF·g over this rank's samples, g = :func:`pull_blocks` summed over ranks: (n_r·k, b)."""
    pulled = [t.to(device) for t in pulled]
    samples = _tensors(own)[0].shape[0] // layout.tensors[0][0]
    return torch.cat(
        [
            structured.push_features(take(own, layout, rows), pulled, k)
            for rows in chunks(samples, block)
        ]
    )
