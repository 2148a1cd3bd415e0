"""plstar.infinite_width against independent float64 oracles: hand-derived closed forms, numerical
quadrature of the Gaussian expectations, and Monte-Carlo averages of plstar.tangent_kernel (and of
the network outputs) over many random initialisations of plstar.models.mlp."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from plstar.errors import DataError, PlstarInputError
from plstar.infinite_width import infinite_width_nngp, infinite_width_ntk
from plstar.kernel import tangent_kernel
from plstar.models import mlp

DEFAULT_DTYPE = torch.float64
ACTIVATIONS = ("relu", "erf", "identity")


def _inputs(n: int = 5, d: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_depth_one_kernel_is_scaled_gram_plus_one_for_the_bias(activation: str) -> None:
    x, x2 = _inputs(), _inputs(3, seed=1)
    gram = x @ x2.T / x.shape[1] + 1.0
    found = infinite_width_ntk(x, x2, depth=1, activation=activation, outputs=3)
    expected = torch.kron(gram, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(found, expected, rtol=1e-14, atol=1e-14)
    # A depth-1 network is linear in its parameters: its kernel is the same at every width.
    net = mlp(7, 4, 1, 3, activation=activation, generator_seed=0, dtype=torch.float64)
    torch.testing.assert_close(tangent_kernel(net, x, x2), expected, rtol=1e-13, atol=1e-13)
    # Zero-initialised biases add nothing to the output covariance.
    nngp = infinite_width_nngp(x, x2, depth=1, activation=activation)
    torch.testing.assert_close(nngp, x @ x2.T / x.shape[1], rtol=1e-14, atol=1e-14)


def test_depth_two_relu_kernel_matches_hand_computed_values() -> None:
    """Rows of norm √d (Σ¹ = 1 on the diagonal): θ = 0 on the diagonal, θ = π/2 for orthogonal rows.

    Σ²(x,x) = 1/2, Σ̇² = 1/2 ⇒ Θ² = 1/2 + 1 + (1 + 1)/2 = 5/2; orthogonal: Σ² = 1/(2π), Σ̇² = 1/4,
    Θ² = 1/(2π) + 1 + (0 + 1)/4.
    """
    d = 4
    x = torch.eye(d, dtype=torch.float64)[:2] * math.sqrt(d)
    found = infinite_width_ntk(x, depth=2, activation="relu")
    assert found[0, 0].item() == pytest.approx(2.5, rel=1e-15)
    assert found[0, 1].item() == pytest.approx(1 / (2 * math.pi) + 1.25, rel=1e-15)


def test_depth_two_erf_and_identity_kernels_match_hand_computed_values() -> None:
    """erf, ‖x‖² = d: Σ² = (2/π) asin(2/3), Σ̇² = (4/π)/√5, Θ² = Σ² + 1 + 2Σ̇²;
    identity: Θ² = 2·xᵀx'/d + 2 (two linear layers, two biases)."""
    d = 4
    x = torch.eye(d, dtype=torch.float64)[:2] * math.sqrt(d)
    erf = infinite_width_ntk(x, depth=2, activation="erf")
    sigma, derivative = 2 / math.pi * math.asin(2 / 3), 4 / (math.pi * math.sqrt(5))
    assert erf[0, 0].item() == pytest.approx(sigma + 1 + 2 * derivative, rel=1e-14)
    # orthogonal rows: c = 0, so Σ² = 0 and Σ̇² = (4/π)/3
    assert erf[0, 1].item() == pytest.approx(1 + 4 / (3 * math.pi), rel=1e-14)
    z = _inputs()
    identity = infinite_width_ntk(z, depth=2, activation="identity")
    torch.testing.assert_close(identity, 2 * z @ z.T / z.shape[1] + 2, rtol=1e-14, atol=1e-14)


def _gaussian_expectation(f, g, a: float, b: float, c: float) -> float:
    """E[f(u) g(v)] for (u, v) ~ N(0, [[a, c], [c, b]]) by adaptive 2-D quadrature (scipy).

    u = l11·z1, v = l21·z1 + l22·z2 with z standard normal; the integration domain is split along
    the lines u = 0 and v = 0, where ReLU and its step derivative have their kinks.
    """
    l11, l21 = math.sqrt(a), c / math.sqrt(a)
    l22 = math.sqrt(max(b - l21**2, 0.0))
    reach = 12.0

    def integrand(z2: float, z1: float) -> float:
        density = math.exp(-(z1 * z1 + z2 * z2) / 2) / (2 * math.pi)
        return f(l11 * z1) * g(l21 * z1 + l22 * z2) * density

    def kink(z1: float) -> float:  # z2 where v = 0 (none when v depends on z1 alone)
        return min(reach, max(-reach, -l21 * z1 / l22)) if l22 > 1e-12 else 0.0

    total = 0.0
    for lo, hi in ((-reach, 0.0), (0.0, reach)):
        for inner in ((lambda z1: -reach, kink), (kink, lambda z1: reach)):
            total += integrate.dblquad(integrand, lo, hi, *inner, epsabs=1e-12, epsrel=1e-11)[0]
    return total


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_depth_two_kernel_matches_numerical_quadrature(activation: str) -> None:
    """Θ² = Σ² + 1 + Σ̇²·(xᵀx'/d + 1), with Σ² and Σ̇² integrated numerically for random pairs."""
    phi, dphi = {
        "relu": (lambda z: max(z, 0.0), lambda z: float(z > 0)),
        "erf": (special.erf, lambda z: 2 / math.sqrt(math.pi) * math.exp(-z * z)),
    }[activation]
    x = _inputs(3, 5, seed=4)
    found = infinite_width_ntk(x, depth=2, activation=activation)
    found_nngp = infinite_width_nngp(x, depth=2, activation=activation)
    gram = (x @ x.T / x.shape[1]).numpy()
    for i, j in ((0, 1), (1, 2), (2, 2)):
        a, b, c = gram[i, i], gram[j, j], gram[i, j]
        sigma = _gaussian_expectation(phi, phi, a, b, c)
        derivative = _gaussian_expectation(dphi, dphi, a, b, c)
        assert found_nngp[i, j].item() == pytest.approx(sigma, rel=1e-7, abs=1e-9)
        assert found[i, j].item() == pytest.approx(sigma + 1 + derivative * (c + 1), rel=1e-7)


def _z_scores(samples: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |mean − expected| / standard error, max standard error / max |expected|)."""
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    return float(((mean - expected).abs() / error).max()), float(error.max() / expected.abs().max())


@pytest.mark.parametrize(
    ("activation", "depth"), [("relu", 2), ("erf", 2), ("relu", 3), ("erf", 3)]
)
def test_empirical_kernel_averaged_over_initialisations_converges_to_it(
    activation: str, depth: int
) -> None:
    """Mean of plstar.tangent_kernel over 24 networks of width 512, two outputs (so the zero
    cross-output blocks of Θ ⊗ I₂ are tested too). At depth 2 the kernel is an exact average of
    i.i.d. per-unit terms, so its mean is Θ² at any width; at depth 3 the O(1/m) bias is far below
    the standard error. Each of the 55 distinct entries must lie within 5 standard errors, and
    the standard errors must be small (≤ 3 % of the kernel's scale) for the test to have power."""
    x = _inputs(5, 6, seed=2)
    expected = infinite_width_ntk(x, depth=depth, activation=activation, outputs=2)
    samples = torch.stack([
        tangent_kernel(mlp(6, 512, depth, 2, activation=activation, generator_seed=s,
                           dtype=torch.float64), x)
        for s in range(24)
    ])  # fmt: skip
    z, relative_error = _z_scores(samples, expected)
    assert relative_error < 0.03
    assert z < 5.0, f"an entry lies {z:.2f} standard errors from the analytic NTK"


@pytest.mark.parametrize(("activation", "depth"), [("relu", 2), ("erf", 3)])
def test_output_covariance_over_initialisations_converges_to_nngp(
    activation: str, depth: int
) -> None:
    """E f_a(x) f_a(x') over 200 networks of width 256 with 8 outputs = Σ^L(x, x') (one sample per
    network: the average over its outputs, which share the hidden layer)."""
    x = _inputs(4, 6, seed=3)
    expected = infinite_width_nngp(x, depth=depth, activation=activation)
    products = []
    with torch.no_grad():
        for seed in range(200):
            net = mlp(6, 256, depth, 8, activation=activation, generator_seed=seed,
                      dtype=torch.float64)  # fmt: skip
            out = net(x)  # (n, 8)
            products.append(out @ out.T / out.shape[1])
    z, relative_error = _z_scores(torch.stack(products), expected)
    assert relative_error < 0.05
    assert z < 5.0, f"an entry lies {z:.2f} standard errors from the analytic NNGP"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_is_symmetric_psd_and_cross_kernels_are_its_blocks(activation: str) -> None:
    x = _inputs(9, 4, seed=5)
    x[3] = 0.0  # a zero input (zero-variance pre-activations) must not break the closed forms
    x[5] = x[4]  # and two identical rows (θ = 0 off the diagonal)
    for depth in (1, 2, 4):
        for kernel in (
            infinite_width_ntk(x, depth=depth, activation=activation, outputs=2),
            infinite_width_nngp(x, depth=depth, activation=activation, outputs=2),
        ):
            assert torch.isfinite(kernel).all()
            assert torch.equal(kernel, kernel.T)
            values = np.linalg.eigvalsh(kernel.numpy())
            assert values.min() >= -1e-13 * values.max()
        full = infinite_width_ntk(x, depth=depth, activation=activation, outputs=2)
        cross = infinite_width_ntk(x[:4], x[4:], depth=depth, activation=activation, outputs=2)
        torch.testing.assert_close(cross, full[:8, 8:], rtol=1e-12, atol=1e-12)


def test_zero_input_relu_kernel_follows_torch_convention_at_every_width() -> None:
    """x = 0 makes every hidden pre-activation 0 and torch's relu'(0) = 0: only the last bias
    moves the output, Θ(0, ·) = 1 at depth 2 — the same for the finite network."""
    x = torch.zeros(1, 3, dtype=torch.float64)
    x2 = _inputs(2, 3, seed=6)
    found = infinite_width_ntk(x, x2, depth=2, activation="relu")
    torch.testing.assert_close(found, torch.ones(1, 2, dtype=torch.float64))
    net = mlp(3, 16, 2, 1, activation="relu", generator_seed=0, dtype=torch.float64)
    torch.testing.assert_close(tangent_kernel(net, x, x2), found)


def test_float32_request_returns_float32() -> None:
    kernel = infinite_width_ntk(_inputs(), depth=3, activation="erf", dtype=torch.float32)
    assert kernel.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"depth": 2, "activation": "tanh"}, PlstarInputError),
        ({"depth": 0, "activation": "relu"}, PlstarInputError),
        ({"depth": 2, "activation": "relu", "outputs": 0}, PlstarInputError),
        ({"depth": True, "activation": "relu"}, PlstarInputError),
    ],
)
def test_invalid_options_are_refused(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        infinite_width_ntk(_inputs(), **kwargs)


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(DataError):
        infinite_width_ntk(torch.ones(4, dtype=torch.float64), depth=2, activation="relu")
    with pytest.raises(DataError):
        infinite_width_ntk(_inputs(3, 4), _inputs(3, 5), depth=2, activation="relu")
    bad = _inputs()
    bad[0, 0] = math.nan
    with pytest.raises(DataError):
        infinite_width_nngp(bad, depth=2, activation="erf")
