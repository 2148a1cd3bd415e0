"""Directions in parameter space for slices of the loss landscape (:mod:`plstar.landscape`).

Every direction is a flat vector d (m,) float64 in the order of :func:`plstar.certify.flat_parameters`
(trainable parameters, tied ones once), on the model's device. Four kinds:

* ``"random"`` — a Gaussian draw rescaled **per filter** (Li, Xu, Taylor, Studer & Goldstein,
  *Visualizing the Loss Landscape of Neural Nets*, arXiv 1712.09913): for every parameter with
  two or more dimensions, each output unit's slice (a row of a Linear weight, an output channel
  of a convolution) gets the norm of the same slice of the weight, so a step a·d changes every
  unit by the same fraction a of its own size, whatever the layer's scale. Parameters with one
  dimension or none — biases, the affine scales and shifts of BatchNorm/LayerNorm/GroupNorm,
  learned scalars — are handled by an explicit choice, ``biases``: ``"zero"`` (the default: they
  do not move, Li et al.'s ``ignore="biasbn"``) or ``"scaled"`` (the whole vector is one group,
  rescaled to its parameter's norm). A zero slice of the weight, or of the draw, gives a zero
  slice of the direction, never 0/0.
* ``"gradient"`` — −∇L(w)/‖∇L(w)‖, scaled to ‖w‖;
* ``"lambda-min"`` — the direction in which λ_min(K(w)) falls fastest
  (:func:`plstar.certify.lambda_min_descent`), scaled to ‖w‖;
* ``"segment"`` — w₂ − w toward a second point (trained weights, another minimum): a = 1 is w₂.

Random draws come from a host generator of their own for each seed (:func:`direction_generator`),
so the same seed gives the same directions on every device and never replays the stream that a
model built with that seed drew its weights from. Scaling the gradient and λ_min directions to ‖w‖ (1 when w = 0) puts every axis in the same unit
as the filter-normalized ones, whose norm is ‖w‖ restricted to the parameters they move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from plstar.certify import flat_parameters, lambda_min_descent, trainable_parameters
from plstar.curvature import loss_gradient
from plstar.devices import direction_generator, host_normal, model_device
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector
from plstar.validation import choice

BiasHandling = Literal["zero", "scaled"]
BIAS_HANDLINGS: tuple[str, ...] = get_args(BiasHandling)
DirectionKind = Literal["random", "gradient", "lambda-min", "segment"]
DIRECTION_KINDS: tuple[str, ...] = get_args(DirectionKind)

# Layers that store their output units along dimension 1: transposed convolutions (in, out, ...)
# and Hugging Face's GPT-2 Conv1D (in, out), matched by class name like plstar's layer rules.
_OUTPUT_AXIS_ONE = ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1D")
"""Second word of the directions' seed sequence (ASCII "land"): a stream of their own."""


@dataclass(frozen=True)
class Direction:
    """A direction d (m,) float64 on the model's device; ``kind`` one of DIRECTION_KINDS,
    ``label`` how it reads on an axis ("random 1", "gradient", ...), ``description`` how it was
    made."""

    kind: str
    label: str
    vector: Tensor
    description: str

    @property
    def norm(self) -> float:
        return float(self.vector.norm())


def filter_axes(model: nn.Module) -> list[int]:
    """For each trainable parameter (flattening order): the dimension that indexes its output
    units, 1 for transposed convolutions and HF Conv1D weights, else 0."""
    owner: dict[int, str] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), f"{type(module).__name__}.{name}")
    axes = []
    for p in trainable_parameters(model):
        kind, name = owner[id(p)].rsplit(".", 1)
        axes.append(1 if kind in _OUTPUT_AXIS_ONE and name == "weight" and p.ndim >= 2 else 0)
    return axes


def _rescaled(draw: Tensor, weight: Tensor) -> Tensor:
    """Rows of ``draw`` (g, s) rescaled to the norms of the rows of ``weight``; a zero row of
    either gives a zero row (no 0/0)."""
    draw_norms = draw.norm(dim=1, keepdim=True)
    weight_norms = weight.norm(dim=1, keepdim=True)
    usable = (draw_norms > 0) & (weight_norms > 0)
    factor = torch.where(usable, weight_norms / torch.where(usable, draw_norms, 1.0), 0.0)
    return draw * factor


def filter_normalize(
    model: nn.Module, direction: Tensor, *, biases: BiasHandling = "zero"
) -> Tensor:
    """``direction`` (m,) rescaled per filter to the model's current weights (module docstring).

    For a parameter with ≥ 2 dimensions, each slice along its output axis (:func:`filter_axes`)
    gets the norm of the weight's slice. 0-d and 1-d parameters: ``biases="zero"`` sets them to 0,
    ``"scaled"`` rescales each as one group to its parameter's norm. Returns a new (m,) float64
    tensor; ``direction`` is not changed. Cost: O(m).
    """
    biases = choice("biases", biases, BIAS_HANDLINGS)  # type: ignore[assignment]
    params = trainable_parameters(model)
    m = sum(p.numel() for p in params)
    if direction.shape != (m,):
        raise PlstarInputError(f"direction must have shape ({m},), got {tuple(direction.shape)}")
    parts, start = [], 0
    for p, axis in zip(params, filter_axes(model), strict=True):
        draw = direction[start : start + p.numel()].reshape(p.shape).double()
        weight = p.detach().double()
        start += p.numel()
        if p.ndim >= 2:  # one group per output unit
            rows = _rescaled(draw.movedim(axis, 0).reshape(draw.shape[axis], -1),
                             weight.movedim(axis, 0).reshape(weight.shape[axis], -1))  # fmt: skip
            moved = list(draw.movedim(axis, 0).shape)
            parts.append(rows.reshape(moved).movedim(0, axis).reshape(-1))
        elif biases == "scaled":  # the whole vector is one group
            parts.append(_rescaled(draw.reshape(1, -1), weight.reshape(1, -1)).reshape(-1))
        else:
            parts.append(torch.zeros_like(draw).reshape(-1))
    return torch.cat(parts)


def random_direction(
    model: nn.Module, generator: torch.Generator, *, biases: BiasHandling = "zero"
) -> Tensor:
    """A filter-normalized Gaussian direction (m,) float64 (:func:`filter_normalize`), drawn on the
    host from ``generator`` (the same numbers on every device) and moved to the model's device."""
    m = sum(p.numel() for p in trainable_parameters(model))
    return filter_normalize(model, host_normal((m,), generator, model_device(model)), biases=biases)


def segment_direction(
    model: nn.Module, target: Tensor | Mapping[str, Tensor] | nn.Module
) -> Tensor:
    """w₂ − w (m,) float64: from the model's parameters w to ``target``, a flat vector (m,), a
    state dict (the trainable parameters by name; buffers are ignored) or a module of the same
    architecture. Raises PlstarInputError naming a missing or mis-shaped parameter."""
    w = flat_parameters(model).double()
    if isinstance(target, nn.Module):
        target = dict(target.named_parameters())
    if isinstance(target, Tensor):
        if target.numel() != w.numel():
            raise PlstarInputError(
                f"the second point has {target.numel()} numbers, the model {w.numel()} parameters"
            )
        return target.detach().reshape(-1).to(w.device, torch.float64) - w
    names = {id(p): n for n, p in model.named_parameters()}
    parts = []
    for p in trainable_parameters(model):
        name = names[id(p)]
        value = target.get(name)
        if not isinstance(value, Tensor) or value.shape != p.shape:
            found = "missing" if value is None else f"of shape {tuple(getattr(value, 'shape', ()))}"
            raise PlstarInputError(
                f"the second point's parameter {name!r} is {found}; expected {tuple(p.shape)} "
                "(save it with torch.save(model.state_dict(), path))"
            )
        parts.append(value.detach().reshape(-1).to(w.device, torch.float64))
    return torch.cat(parts) - w


def _scaled_to_weights(unit: Tensor, w: Tensor) -> Tensor:
    return unit * (float(w.norm()) or 1.0)


def make_directions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    kinds: Sequence[str],
    *,
    seed: int = 0,
    target: Tensor | Mapping[str, Tensor] | nn.Module | None = None,
    biases: BiasHandling = "zero",
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> list[Direction]:
    """One or two directions at the model's current w, of ``kinds`` (DIRECTION_KINDS).

    Random directions come from one host generator, :func:`direction_generator` of ``seed`` (the
    second random direction of a plane is its next draw). ``target`` is the second point of
    ``"segment"``. Refuses (PlstarInputError) an unknown kind, more than two, the same
    deterministic kind twice (a plane needs two directions), "segment" without ``target`` or a
    ``target`` without "segment", a vanishing gradient, and a λ_min direction that does not exist
    (n·k > 20,000, or K constant: a linear model). Cost: a gradient for "gradient"; a dense eigh
    of K and ≈ 4 passes over the data for "lambda-min"; O(m) for the others.
    """
    kinds = [choice("direction", kind, DIRECTION_KINDS) for kind in kinds]
    if not 1 <= len(kinds) <= 2:
        raise PlstarInputError(f"give one direction (a line) or two (a plane), got {len(kinds)}")
    if len(kinds) == 2 and kinds[0] == kinds[1] != "random":
        raise PlstarInputError(f"{kinds[0]} twice spans a line, not a plane; choose another")
    if ("segment" in kinds) != (target is not None):
        raise PlstarInputError(
            "the segment direction needs the second point (--to FILE.pt), and a second point "
            "needs the segment direction"
        )
    w = flat_parameters(model).double()
    generator = direction_generator(seed)
    common = {"memory_budget": memory_budget, "output": output}
    found: list[Direction] = []
    for kind in kinds:
        if kind == "random":
            draw = sum(d.kind == "random" for d in found) + 1
            label, vector = f"random {draw}", random_direction(model, generator, biases=biases)
            text = (f"Gaussian (seed {seed}, draw {draw}), filter-normalized; 1-d parameters "
                    f"(biases, norm layers): {biases}")  # fmt: skip
        elif kind == "gradient":
            _, gradient = loss_gradient(model, x, y, **common)
            if not float(gradient.norm()) > 0:
                raise PlstarInputError("∇L(w) = 0: the gradient gives no direction here")
            label, text = "gradient", "−∇L(w)/‖∇L(w)‖ · ‖w‖"
            vector = _scaled_to_weights(-gradient / gradient.norm(), w)
        elif kind == "lambda-min":
            descent = lambda_min_descent(model, x, **common)
            if descent is None:
                raise PlstarInputError(
                    "no λ_min-descent direction here: n·k exceeds 20,000, or λ_min(K) does not "
                    "change with w (a linear model)"
                )
            label, text = "λ_min descent", "steepest descent of λ_min(K(w)), unit · ‖w‖"
            vector = _scaled_to_weights(descent.to(w.dtype), w)
        else:
            label, text = "segment", "w₂ − w (a = 1 is the second point)"
            vector = segment_direction(model, target)  # type: ignore[arg-type]
        if not math.isfinite(float(vector.norm())) or float(vector.norm()) == 0:
            raise PlstarInputError(f"the {label} direction is zero or not finite")
        found.append(Direction(kind, label, vector.to(w.device), text))
    return found
