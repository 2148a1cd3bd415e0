"""Kernel factors — one layer's contribution to K for a block of samples — and their algebra.

A factor takes one of three forms:
("gram", A (c, T, p), D (c·k, T, q)): K[(i,a),(j,b)] = Σ_{t,s} (A_it · A_js)(D_(ia)t · D_(jb)s) —
layer inputs (bias folded in as a constant input 1) and output cotangents at T positions,
contracted as Σ_t D_(ia)t · (Σ_s W_ij[t,s] D_(jb)s) with W_ij[t,s] = A_it · A_js, so that
the k² cotangent pairs meet once per position, not once per position pair:
T²p + k·T·q·(T + k) multiply-adds per sample pair (:func:`position_pair_flops`);
("rows", R (c·k, r), None): per-sample gradients, K = R Rᵀ;
("tokens", ids (c, T), D (c·k, T, q)): an embedding, K = Σ_{t,s} [ids_it = ids_js] D·D.
:func:`contract_factors` gives the kernel block between two factors; :func:`pull_factor` and
:func:`push_factor` the products DFᵀv and DF·g without forming K. Every tensor leads with c or
c·k, sample-major, so factors of sample blocks concatenate along the first dimension.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

Factor = tuple[str, Tensor, Tensor | None]
"""("gram", A (c, T, p), D (c·k, T, q)) or ("rows", R (c·k, r), None) or ("tokens", ids, D)."""


GRAM_SLOWDOWN = 2.0
"""How much slower a Gram-form contraction (einsums over position pairs) runs than a GEMM of the
same flops, measured here; the forms are compared, and implementations planned, with it."""


def position_pair_flops(positions: int, width: int, k: int, q: int) -> int:
    """Multiply-adds per sample pair of a "gram" or "tokens" factor: the position weights W_ij
    (T² · width; width 1 for token ids), then Σ_s W_ij[t,s] D_(jb)s (k·T²·q) and its product
    with D_(ia)t (k²·T·q). At one position: width + k²·q."""
    if positions == 1:
        return width + k * k * q
    return positions * positions * width + k * positions * q * (positions + k)


def position_pair_elements(positions: int, k: int, q: int) -> int:
    """Temporary elements per row sample while a "gram" or "tokens" factor is contracted:
    W_ij for one column sample (T²) and Σ_s W_ij[t,s] D_(jb)s (T·q·k)."""
    return 0 if positions == 1 else positions * positions + positions * q * k


def weight_inputs(inputs: Tensor, scale: float, bias: bool) -> Tensor:
    """scale·inputs, with a constant 1 appended when the bias rides along, written in one pass."""
    if scale == 1.0 and not bias:
        return inputs
    p = inputs.shape[-1]
    out = inputs.new_empty((*inputs.shape[:-1], p + int(bias)))
    torch.mul(inputs, scale, out=out[..., :p])
    if bias:  # the bias is the weight of a constant input 1: one Gram covers both
        out[..., p] = 1.0
    return out


def weight_factors(inputs: Tensor, delta: Tensor) -> list[Factor]:
    """Factors of a weight applied as z_t = W_g a_t (per group g) at T positions.

    inputs (c, T, p) or (c, T, g, p) grouped; delta (c·k, T, q) or (c·k, T, g, q). The Gram
    form costs g·(T²p + k·T·q·(T + k)) per sample pair (×GRAM_SLOWDOWN), the rows form
    (per-sample gradients Σ_t δ_t a_tᵀ materialised, one GEMM) k²·g·p·q; the cheaper is taken.
    The Gram form of a grouped weight is one factor per group (groups share no parameter, so
    they have no cross terms).
    """
    if inputs.ndim == 3:
        inputs, delta = inputs.unsqueeze(2), delta.unsqueeze(2)
    c, positions, groups, p = inputs.shape
    ck, q = delta.shape[0], delta.shape[3]
    k = ck // c
    gram_cost = GRAM_SLOWDOWN * groups * position_pair_flops(positions, p, k, q)
    rows_cost = groups * k * k * p * q
    if positions == 1 or gram_cost <= rows_cost:
        return [("gram", inputs[:, :, g], delta[:, :, g]) for g in range(groups)]
    # per sample and group Σ_t δ_t a_tᵀ as one batched product over (c, g): (c, g, k, q, p)
    cotangents = delta.view(c, k, positions, groups, q).permute(0, 3, 1, 4, 2)
    per_sample = torch.matmul(cotangents, inputs.permute(0, 2, 1, 3).unsqueeze(2))
    return [("rows", per_sample.transpose(1, 2).reshape(ck, groups * q * p), None)]


def row_products(a1: Tensor, a2: Tensor) -> Tensor:
    """a1 a2ᵀ. When a1 is a2 (a diagonal block) the product is symmetric: it is computed in row
    strips from the diagonal on, and the part below each strip's diagonal block copied from its
    transpose (4 strips: 62.5 % of the GEMM's flops)."""
    size = a1.shape[0]
    strips = min(4, size // 64)
    if a1 is not a2 or strips < 2:
        return a1 @ a2.T
    bounds = [size * i // strips for i in range(strips + 1)]
    out = a1.new_empty((size, size))
    for start, stop in itertools.pairwise(bounds):
        strip = a1[start:stop] @ a1[start:].T  # (strip, size − start)
        out[start:stop, start:] = strip
        out[stop:, start:stop] = strip[:, stop - start :].T
    return out


def contract_factors(left: Factor, right: Factor, k: int) -> Tensor:
    """The kernel block between two sample blocks' factors of one layer: (c1·k, c2·k)."""
    kind, a1, d1 = left
    _, a2, d2 = right
    if kind == "rows":
        return row_products(a1, a2)
    assert d1 is not None and d2 is not None
    c1, c2 = a1.shape[0], a2.shape[0]
    if kind == "gram" and a1.shape[1] == 1:
        grams = a1[:, 0] @ a2[:, 0].T
        cot = (d1[:, 0] @ d2[:, 0].T).view(c1, k, c2, k)
        return (cot * grams[:, None, :, None]).reshape(c1 * k, c2 * k)
    return _position_pairs(kind, a1, d1, a2, d2, k, symmetric=left is right)


def _position_pairs(
    kind: str, a1: Tensor, d1: Tensor, a2: Tensor, d2: Tensor, k: int, symmetric: bool
) -> Tensor:
    """Σ_{t,s} W_ij[t,s] (D_(ia)t · D_(jb)s) for W = input Grams ("gram") or equal token ids
    ("tokens"), one column sample j at a time: Y = W_·j D_j is one GEMM over all row samples and
    positions, then each row sample's k×k block one batched product. Memory: T² + T·q·k per
    row sample. On a diagonal block (``symmetric``) only row samples i ≤ j are computed and the
    rest mirrored."""
    c1, c2, t1, q = a1.shape[0], a2.shape[0], d1.shape[1], d1.shape[2]
    rows = d1.reshape(c1, k, t1 * q)
    # (c2, T2, q, k): each column sample's cotangents with the outputs last, ready for Y
    columns = d2.view(c2, k, d2.shape[1], q).permute(0, 2, 3, 1).contiguous()
    flat = a1.reshape(c1 * t1, -1) if kind == "gram" else a1.reshape(c1 * t1, 1)
    out = d1.new_empty((c1, k, c2, k))
    for j in range(c2):
        stop = j + 1 if symmetric else c1
        if kind == "gram":
            weights = flat[: stop * t1] @ a2[j].T  # (stop·T1, T2)
        else:
            weights = (flat[: stop * t1] == a2[j][None, :]).to(d1.dtype)
        mixed = (weights @ columns[j].view(columns.shape[1], -1)).view(stop, t1 * q, k)
        out[:stop, :, j] = torch.bmm(rows[:stop], mixed)
    if symmetric:  # blocks (i, j) with i > j from (j, i)
        blocks = out.permute(0, 2, 1, 3)
        lower = torch.ones(c1, c1, dtype=torch.bool, device=out.device).tril(-1)
        blocks[lower] = blocks.transpose(0, 1).transpose(2, 3)[lower]
    return out.view(c1 * k, c2 * k)


def pull_factor(factor: Factor, v: Tensor, k: int) -> Tensor:
    """The factor's Jacobian transposed times v: v (c·k, b) -> a parameter-space tensor.

    Shapes: "rows" (r, b); "gram" (b, q, p); "tokens" (ids + 1, q, b) indexed by token id.
    Summed over sample blocks, then :func:`push_factor` gives K·v. Cost ≈ c·k·T·p·q·b ("gram").
    """
    kind, first, second = factor
    if kind == "rows":
        return first.T @ v
    assert second is not None
    ck, b = v.shape
    c, T, q = ck // k, second.shape[1], second.shape[2]
    if kind == "tokens":
        ids = first.repeat_interleave(k, dim=0).reshape(-1)  # (c·k·T,)
        weighted = (second[..., None] * v[:, None, None, :]).reshape(-1, q, b)
        table = torch.zeros((int(ids.max()) + 1, q, b), dtype=second.dtype, device=second.device)
        return table.index_add_(0, ids, weighted)
    weighted = torch.einsum("iab,iatq->ibtq", v.view(c, k, b), second.view(c, k, T, q))
    return torch.einsum("ibtq,itp->bqp", weighted, first)


def push_factor(factor: Factor, pulled: Tensor, k: int) -> Tensor:
    """The factor's Jacobian times a parameter-space tensor from :func:`pull_factor`: (c·k, b)."""
    kind, first, second = factor
    if kind == "rows":
        return first @ pulled
    assert second is not None
    c, T, q = first.shape[0], second.shape[1], second.shape[2]
    if kind == "tokens":
        rows = pulled[first.repeat_interleave(k, dim=0)]  # (c·k, T, q, b)
        return torch.einsum("Itq,Itqb->Ib", second, rows)
    mixed = torch.einsum("bqp,itp->ibtq", pulled, first)
    return torch.einsum("iatq,ibtq->iab", second.view(c, k, T, q), mixed).reshape(c * k, -1)


def add_pulled(total: Tensor | None, part: Tensor, kind: str) -> Tensor:
    """Sum of :func:`pull_factor` results over sample blocks (token tables may differ in length)."""
    if total is None:
        return part
    if kind == "tokens" and total.shape[0] != part.shape[0]:
        longer, shorter = (total, part) if total.shape[0] > part.shape[0] else (part, total)
        longer = longer.clone()
        longer[: shorter.shape[0]] += shorter
        return longer
    return total + part


_WIDE = 2048
"""Rows factors at least this wide are contracted as they are (a copy into a merged matrix would
cost more than their GEMM gains); narrower ones are merged into one."""


def merge_rows(factors: list[Factor]) -> list[Factor]:
    """The narrow "rows" factors (biases, normalisations) merged into one, so they cost a single
    GEMM; wide ones kept apart (their GEMMs are efficient as they are)."""
    narrow = [f[1] for f in factors if f[0] == "rows" and f[1].shape[1] < _WIDE]
    others = [f for f in factors if f[0] != "rows" or f[1].shape[1] >= _WIDE]
    if len(narrow) > 1:
        return [*others, ("rows", torch.cat(narrow, dim=1), None)]
    return [*others, *[("rows", r, None) for r in narrow]]


def flops_per_pair(
    factors: list[Factor], k: int, kinds: tuple[str, ...] = ("gram", "tokens", "rows")
) -> int:
    """Multiply-adds per sample pair of contracting these factors (those of ``kinds``)."""
    total = 0
    for kind, first, second in factors:
        if kind not in kinds:
            continue
        if kind == "rows":
            total += k * k * first.shape[1]
        else:
            assert second is not None
            width = 1 if kind == "tokens" else first.shape[2]
            total += position_pair_flops(first.shape[1], width, k, second.shape[2])
    return total


Use = tuple[Tensor, Tensor]
"""One call of a module: (input (c, ...), output cotangent (c, k, *output shape))."""


class LayerRule:
    """How the calls of one layer type contribute to the tangent kernel (subclass to write one).

    A rule sees every call of a module in one forward pass over c samples, as (input, cotangent)
    pairs: the input the module was called with (c, ...), and the cotangent of its output,
    δ (c, k, *output shape) with δ[i, a] = ∂f_a(x_i)/∂output_i. It returns :data:`Factor` s
    covering exactly the module's trainable parameters (``p.requires_grad``); for per-sample
    gradients g (c·k, r) of those parameters, ``[("rows", g, None)]`` is always correct.

    * :meth:`unsupported` — why the rule cannot apply to this module's options, or None.
    * :meth:`reference` — the output the factors assume, computed from the input alone. plstar
      compares it with the module's real output on the first two samples, so a subclass whose
      forward computes something else goes to Jacobian rows instead of getting wrong factors.
    * :meth:`factors` — the factors of all calls together (a module called twice has cross
      terms between its calls: concatenate calls along positions).
    * :meth:`gradients` (optional) — per-sample gradients in each parameter's own layout,
      (c·k, *parameter shape); needed only when the module shares a parameter with another
      module (a tied embedding and output head), whose gradients are then added.
    * :meth:`decompose` (with ``decomposes = True``) — for a layer whose parameters act inside
      its forward (``nn.MultiheadAttention``): the uses are then its (a, z) pairs.
    """

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this rule cannot serve ``module`` (an option it does not handle), or None."""
        return None

    def reference(self, module: nn.Module, inputs: Tensor) -> Any:
        """The module's output as the rule assumes it, from its input (c, ...)."""
        raise NotImplementedError

    def factors(self, module: nn.Module, uses: list[Use], k: int) -> list[Factor]:
        """The kernel factors of all of the module's calls in one forward pass."""
        raise NotImplementedError

    def gradients(self, module: nn.Module, uses: list[Use], k: int) -> dict[str, Tensor]:
        """Per-sample gradients of the trainable parameters, by attribute name:
        (c·k, *parameter shape), row i·k + a = ∂f_a(x_i)/∂parameter."""
        raise NotImplementedError

    decomposes = False
    """Whether the layer's parameters act inside its forward, out of the hooks' reach, so that
    recording calls :meth:`decompose` instead of reading the module's input and output."""

    def decompose(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> tuple[Tensor, Tensor, Any] | str:
        """The module's output recomputed from its arguments through a map z = g(a) that the
        factors describe: (a, z, the output to hand on in place of ``output``), or why not."""
        raise NotImplementedError
