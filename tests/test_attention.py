"""Models that call ``F.scaled_dot_product_attention``: every forward-mode and second-order pass.

PyTorch's fused CPU attention has no forward-mode AD, no double backward and no vmap batching
rule; plstar runs those passes on the math backend. Oracles: dense Jacobians by reverse passes
(the fused kernels) and dense Hessians by jacfwd(grad) on the math backend, float64, checked
symmetric. Not torch.func.hessian (jacfwd of jacrev): in torch 2.13 it is wrong for layer_norm
(0.36 off in a Hessian-vector product of size 4, non-symmetric; pytorch/pytorch#196700 reports
layer_norm's nested forward-mode derivative wrong), while jvp of grad matches finite differences.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from architectures import ARCHITECTURES, Selected, build
from conftest import as_function_of_flat, dense_kernel, flat_params
from torch import Tensor
from torch.func import grad, jacfwd
from torch.nn.attention import SDPBackend, sdpa_kernel

import plstar
from plstar.certify import assign_parameters, lambda_min_descent

DEFAULT_DTYPE = torch.float64

# Small enough for dense m × m Hessians (m ≈ 300–600); GPT-2 variants are causal.
SIZES = {
    "gpt2-like": dict(n=2, t=4, vocab=8, d=4, layers=1),
    "bert-like": dict(n=2, t=4, vocab=6, d=4),
    "hf-gpt2": dict(n=2, t=4, vocab=8, d=4, layers=1),
    "hf-bert": dict(n=2, t=4, vocab=6, d=4, intermediate=8),
}


def attention_model(name: str):
    """(F as a module for the oracles, the model itself, x, output) of a zoo entry."""
    if not ARCHITECTURES[name].available():
        pytest.skip(f"{name} needs {ARCHITECTURES[name].requires}")
    model, x, output = build(name, torch.float64, **SIZES[name])
    return Selected(model, output), model, x, output


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


def dense_hessian(function, w: Tensor) -> Tensor:
    """Oracle: the m × m Hessian of a scalar function, forward over reverse, math backend."""
    with sdpa_kernel(SDPBackend.MATH):
        found = jacfwd(grad(function))(w)
    assert relative(found, found.T) <= 1e-12  # a Hessian is symmetric: the oracle is sound
    return found


@pytest.mark.parametrize("name", sorted(SIZES))
def test_forward_mode_kernel_and_operator_equal_the_fused_reverse_mode_oracle(name: str) -> None:
    f, model, x, output = attention_model(name)
    oracle = dense_kernel(f, x)  # reverse passes through the fused kernels
    ntvp = plstar.tangent_kernel(model, x, implementation="ntvp", output=output)
    assert relative(ntvp, oracle) <= 1e-10
    operator = plstar.kernel_operator(model, x, implementation="ntvp", output=output)
    v = torch.randn(oracle.shape[0], 3, generator=torch.Generator().manual_seed(0))
    assert relative(operator @ v, oracle @ v) <= 1e-10


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sharpness_and_model_hessian_norm_equal_dense_hessians(name: str) -> None:
    f, model, x, output = attention_model(name)
    forward, w = as_function_of_flat(f, x), flat_params(f)
    y = torch.randn(forward(w).shape, generator=torch.Generator().manual_seed(1))
    picks = [0, forward(w).numel() - 1]
    loss_hessian = dense_hessian(lambda u: 0.5 * ((forward(u) - y) ** 2).sum(), w)
    output_norms = [
        torch.linalg.matrix_norm(dense_hessian(lambda u, j=j: forward(u).reshape(-1)[j], w), ord=2)
        for j in picks
    ]
    beta = plstar.loss_sharpness(model, x, y, tol=1e-10, max_iter=300, output=output)
    assert beta.value == pytest.approx(float(torch.linalg.eigvalsh(loss_hessian)[-1]), rel=1e-8)
    norm = plstar.model_hessian_norm(
        model, x, outputs=picks, tol=1e-10, max_iter=300, output=output
    )
    assert norm.value == pytest.approx(float(max(output_norms)), rel=1e-8)
    assert norm.converged and beta.converged


def test_lambda_min_descent_direction_lowers_lambda_min_fastest() -> None:
    """certify's informed direction: λ_min(K) falls along it, faster than along random ones."""
    f, model, x, output = attention_model("gpt2-like")
    direction = lambda_min_descent(model, x, output=output)
    assert direction is not None
    w0, h = flat_params(f), 1e-5

    def slope(d: torch.Tensor) -> float:
        ends = []
        for sign in (1, -1):
            assign_parameters(f, w0 + sign * h * d)
            ends.append(float(torch.linalg.eigvalsh(dense_kernel(f, x))[0]))
        assign_parameters(f, w0)
        return (ends[0] - ends[1]) / (2 * h)

    generator = torch.Generator().manual_seed(2)
    randoms = [torch.randn(w0.numel(), generator=generator) for _ in range(3)]
    steepest = slope(direction)
    assert steepest < 0
    assert all(steepest <= slope(d / d.norm()) + 1e-6 for d in randoms)


def test_analyze_and_the_monitor_run_end_to_end_on_fused_attention() -> None:
    _, model, x, output = attention_model("bert-like")
    y = torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(3))
    analysis = plstar.analyze(model, x, y, output=output, hessian_outputs=2)
    assert analysis.complete and analysis.beta.value > 0 and analysis.hessian_norm.value > 0
    monitor = plstar.Monitor(model, x, y, every=1, sharpness_iterations=3)
    plstar.train(model, x, y, steps=2, monitor=monitor)
    assert all(r.sharpness is not None and r.sharpness > 0 for r in monitor.history)


def test_the_jacobian_implementation_batches_attention_without_a_slow_fallback() -> None:
    """vmap over the fused kernels' backward loops sample by sample, with a warning each call;
    on the math backend it is batched (and about 2× faster, measured on a small GPT-2)."""
    f, model, x, output = attention_model("gpt2-like")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = plstar.tangent_kernel(model, x, implementation="jacobian", output=output)
    assert not [w for w in caught if "performance drop" in str(w.message)]
    assert relative(kernel, dense_kernel(f, x)) <= 1e-10


@pytest.mark.parametrize("enabled", [True, False])
def test_multihead_attention_fast_path_is_off_inside_and_restored_after(enabled: bool) -> None:
    """nn.MultiheadAttention's fused eval path has no forward-mode AD: ntvp switches it off for its
    passes (the kernel equals the oracle) and leaves the user's setting as it found it."""
    model, x, _ = build("multihead", torch.float64)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        kernel = plstar.tangent_kernel(model, x, implementation="ntvp")
        assert torch.backends.mha.get_fastpath_enabled() is enabled
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    assert relative(kernel, dense_kernel(model, x)) <= 1e-10
