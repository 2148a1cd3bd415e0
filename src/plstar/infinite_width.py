"""The analytic infinite-width NNGP and NTK of plstar's NTK-parameterized MLP (``models.mlp``).

Architecture (``mlp(d, m, depth, k, activation=φ, parameterization="ntk", bias=True)``): depth
``L`` linear layers, φ between them, no output activation. Layer l computes
h^l = W^l a^{l−1}/√(fan_in) + b^l with a⁰ = x (fan_in = d), a^l = φ(h^l), every W^l entry N(0, 1)
and every b^l zero at initialisation but trainable. The network output is h^L ∈ ℝ^k.

Recursion (Jacot, Gabriel & Hongler 2018; Lee et al. 2019), as every hidden width m → ∞:

* NNGP (covariance of h^l at initialisation). Σ¹(x, x') = xᵀx'/d. For l ≥ 2, with (u, v) centred
  Gaussian of covariance [[Σ^{l−1}(x,x), Σ^{l−1}(x,x')], [·, Σ^{l−1}(x',x')]]:
  Σ^l(x, x') = E[φ(u)φ(v)], and Σ̇^l(x, x') = E[φ'(u)φ'(v)].
  The biases are zero at initialisation, so they add nothing to Σ.
* NTK (Σ_w ⟨∂h^l(x)/∂w, ∂h^l(x')/∂w⟩ per output unit). Θ¹ = xᵀx'/d + 1 (the 1 is ∂h¹/∂b¹ = 1);
  Θ^l = Σ^l + 1 + Σ̇^l · Θ^{l−1} for l ≥ 2: W^l contributes a^{l−1}·a'^{l−1}/m → Σ^l, the trainable
  b^l contributes 1, and the earlier layers reach h^l through W^l φ'(h^{l−1}) / √m, which averages
  to Σ̇^l times their kernel Θ^{l−1}.
* k outputs are independent and identically distributed, so the kernel is Θ^L ⊗ I_k: entry
  (i·k + a, j·k + b) is Θ^L(x_i, x_j)·[a = b], plstar's sample-major layout.

Closed forms of the Gaussian expectations (a = Σ(x,x), b = Σ(x',x'), c = Σ(x,x')):

* ReLU (arc-cosine kernel, Cho & Saul 2009): cos θ = c/√(ab);
  E[φ(u)φ(v)] = √(ab)·(sin θ + (π − θ) cos θ)/(2π), E[φ'(u)φ'(v)] = (π − θ)/(2π).
  For a zero-variance input (x = 0) both are 0: u ≡ 0, and torch's relu'(0) = 0.
* erf (Williams 1997): E[φ(u)φ(v)] = (2/π) arcsin(2c/√((1 + 2a)(1 + 2b))),
  E[φ'(u)φ'(v)] = (4/π)/√((1 + 2a)(1 + 2b) − 4c²)  (φ' = 2e^{−z²}/√π, E e^{−u²−v²} = det(I + 2C)^{−½}).
* identity: Σ^l = Σ^{l−1}, Σ̇^l = 1 (a deep linear network; a hand-checkable case).

Cost: one Gram matrix (n·n2·d flops) and O(depth·n·n2) elementwise operations; memory a few
n×n2 float tensors plus the (n·k)×(n2·k) result. Pure tensor math, no randomness.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from plstar.errors import DataError, PlstarInputError
from plstar.validation import floating_dtype, whole_number

KernelActivation = Literal["relu", "erf", "identity"]
KERNEL_ACTIVATIONS: tuple[str, ...] = get_args(KernelActivation)


def _check(
    x: Tensor, x2: Tensor | None, depth: int, activation: str, outputs: int, dtype: torch.dtype
) -> None:
    floating_dtype("dtype", dtype)
    if not isinstance(activation, str):
        raise PlstarInputError(f"activation must be a name, got {type(activation).__name__}")
    whole_number("depth", depth, minimum=1)
    whole_number("outputs", outputs, minimum=1)
    if activation not in KERNEL_ACTIVATIONS:
        raise PlstarInputError(
            f"no closed-form kernel for activation {activation!r}; choose one of "
            f"{', '.join(KERNEL_ACTIVATIONS)}"
        )
    for name, t in (("x", x), ("x2", x2)):
        if t is None:
            continue
        if (
            not isinstance(t, Tensor)
            or t.layout != torch.strided
            or t.is_meta
            or t.is_complex()
            or t.ndim != 2
            or t.shape[0] == 0
            or t.shape[1] == 0
        ):
            kind = f"{t.dtype} {t.layout} {tuple(t.shape)}" if isinstance(t, Tensor) else ""
            raise DataError(
                f"{name} must be a dense real (n, d) tensor with n, d ≥ 1, got "
                f"{kind or type(t).__name__}"
            )
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{name} has NaN or Inf entries")
    if x2 is not None and x2.shape[1] != x.shape[1]:
        raise DataError(f"x2 has {x2.shape[1]} features, x has {x.shape[1]}")


def _expectations(
    activation: str, a: Tensor, b: Tensor, c: Tensor, same: bool
) -> tuple[Tensor, Tensor]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) for (u, v) of variances a (n, 1), b (1, n2), covariance c."""
    if activation == "identity":
        return c, torch.ones_like(c)
    if activation == "erf":
        outer = (1 + 2 * a) * (1 + 2 * b)
        ratio = (2 * c / outer.sqrt()).clamp(-1.0, 1.0)
        det = (outer - 4 * c * c).clamp_min(0.0)
        if same:  # exact diagonal: det = 1 + 4a there, without cancellation
            det.diagonal().copy_(1 + 4 * a.reshape(-1))
        return (2 / math.pi) * torch.asin(ratio), (4 / math.pi) / det.sqrt()
    scale = (a * b).sqrt()
    cosine = torch.where(scale > 0, c / scale.clamp_min(torch.finfo(c.dtype).tiny), 0.0)
    cosine = cosine.clamp(-1.0, 1.0)
    if same:  # θ = 0 exactly on the diagonal: arccos is not Lipschitz at 1
        cosine.diagonal().copy_((scale.diagonal() > 0).to(c.dtype))
    theta = torch.arccos(cosine)
    value = scale * (torch.sin(theta) + (math.pi - theta) * cosine) / (2 * math.pi)
    derivative = torch.where(scale > 0, (math.pi - theta) / (2 * math.pi), 0.0)
    return value, derivative


def _recursion(
    x: Tensor, x2: Tensor | None, depth: int, activation: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(Σ^L, Θ^L), each (n, n2), for one output unit of the depth-L network."""
    same = x2 is None
    x = x.to(dtype)
    y = x if x2 is None else x2.to(dtype)
    d = x.shape[1]
    sigma = x @ y.T / d
    if same:  # elementwise steps below keep exact symmetry only if the Gram has it
        sigma = (sigma + sigma.T) / 2
    var_x = (x * x).sum(1, keepdim=True) / d  # (n, 1): Σ(x, x)
    var_y = ((y * y).sum(1) / d).reshape(1, -1)  # (1, n2): Σ(x', x')
    if same:
        sigma.diagonal().copy_(var_x.reshape(-1))
    theta = sigma + 1.0
    for _ in range(depth - 1):
        sigma, derivative = _expectations(activation, var_x, var_y, sigma, same)
        theta = sigma + 1.0 + derivative * theta
        # Σ^l(x, x) from the same closed form, elementwise (for ReLU cos θ = a/√(a·a) = 1 exactly)
        var_x = _expectations(activation, var_x, var_x, var_x, False)[0]
        var_y = _expectations(activation, var_y, var_y, var_y, False)[0]
    return sigma, theta


def _expand(kernel: Tensor, outputs: int) -> Tensor:
    """K ⊗ I_k in the sample-major layout: (n, n2) -> (n·k, n2·k)."""
    if outputs == 1:
        return kernel
    return torch.kron(kernel, torch.eye(outputs, dtype=kernel.dtype, device=kernel.device))


def infinite_width_ntk(
    x: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    activation: str,
    outputs: int = 1,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The analytic NTK Θ^L ⊗ I_k of ``mlp(d, m, depth, outputs, activation=..., "ntk")`` as m → ∞.

    The limit of :func:`plstar.tangent_kernel` of that network at initialisation (module docstring:
    recursion, closed forms, trainable zero-initialised biases). Shapes: x (n, d), x2 (n2, d) ->
    (n·k, n2·k) in ``dtype``, sample-major (row ``i*k + a`` is output a of sample i); ``x2=None``
    means x2 = x, and the result is then exactly symmetric. ``activation``: "relu", "erf" or
    "identity". Cost: n·n2·d + O(depth·n·n2) flops.
    Raises PlstarInputError for an activation without a closed form, depth or outputs < 1;
    DataError for empty, non-finite or mis-shaped inputs.
    """
    _check(x, x2, depth, activation, outputs, dtype)
    return _expand(_recursion(x, x2, depth, activation, dtype)[1], outputs)


def infinite_width_nngp(
    x: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    activation: str,
    outputs: int = 1,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The covariance Σ^L ⊗ I_k of the outputs of the same network at initialisation, m → ∞.

    Cov(f_a(x), f_b(x')) over random initialisations = Σ^L(x, x')·[a = b]. Shapes, layout, cost
    and failures as :func:`infinite_width_ntk`.
    """
    _check(x, x2, depth, activation, outputs, dtype)
    return _expand(_recursion(x, x2, depth, activation, dtype)[0], outputs)
