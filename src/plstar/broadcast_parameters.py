"""Parameters no layer rule serves but the forward broadcasts over the batch (a ViT's class token
and position embedding, shape (1, ...)): their per-sample gradients from the recording's reverse
sweeps, not from a second, vmapped Jacobian pass.

The recording replaces each by a leaf with one row per sample (equal values); a leaf's gradient
rows are the per-sample gradients when the forward only broadcasts the parameter. The probe
checks that on two samples against Jacobian rows (a parameter used through its first row, or in
a product whose shape the leaf changes, keeps its Jacobian rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from plstar import layer_rules
from plstar.factors import Factor
from plstar.functional import FunctionalModel, jacobian_matrix
from plstar.recording import Recording, record


def broadcast_rows(recording: Recording, dtype: torch.dtype) -> list[Factor]:
    """The broadcast parameters' per-sample gradients as "rows" factors (c·k, numel)."""
    return [
        ("rows", grad.transpose(0, 1).reshape(grad.shape[0] * grad.shape[1], -1).to(dtype), None)
        for grad in recording.parameter_grads.values()
    ]


def broadcast_parameters(
    fmodel: FunctionalModel, pair: Tensor, names: list[str], outputs_per_pass: int | None = None
) -> tuple[tuple[str, ...], list[Factor]]:
    """Which of the parameters ``names`` (no rule serves them) the recording can give per-sample
    gradients for, and those gradients' rows on ``pair`` (float64): a parameter of shape
    (1, ...) whose per-sample leaf leaves F unchanged and whose gradient rows equal its Jacobian
    rows (√eps of the model's dtype, relative). Cost: one recording on two samples (one per
    candidate when their leaves together change F) and the candidates' Jacobian rows;
    ``outputs_per_pass`` as in :func:`plstar.recording.record`."""
    candidates = tuple(n for n in names if fmodel.params[n].ndim > 1
                       and fmodel.params[n].shape[0] == 1 < pair.shape[0])  # fmt: skip
    served = _served(fmodel, pair, candidates, outputs_per_pass) if candidates else {}
    if served is None:
        served = {}
        for name in candidates:
            served |= _served(fmodel, pair, (name,), outputs_per_pass) or {}
    kept = tuple(n for n in candidates if n in served)
    return kept, [served[n] for n in kept]


def _served(
    fmodel: FunctionalModel, pair: Tensor, candidates: tuple[str, ...], outputs: int | None
) -> dict[str, Factor] | None:
    """The candidates whose recorded gradient rows equal their Jacobian rows, with those rows;
    None when per-sample leaves for all of them together change F or break the forward."""
    try:
        recording = record(fmodel, pair, {}, outputs, broadcast=candidates)
    except Exception:  # a forward that cannot take per-sample leaves
        return None
    with torch.no_grad():
        plain = fmodel.pick(fmodel.module(pair)).reshape(recording.out.shape)
    if not layer_rules.output_close(plain, recording.out.detach()):
        return None
    served = {}
    for name, factor in zip(candidates, broadcast_rows(recording, fmodel.dtype), strict=True):
        if layer_rules.output_close(factor[1], jacobian_matrix(fmodel, pair, fmodel.dtype, [name])):
            served[name] = ("rows", factor[1].to(torch.float64), None)
    return served
