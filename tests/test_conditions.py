"""The PL ratio and ``analyze``: identities of THEORY.md and the linear model's closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ZOO, dense_kernel
from torch import nn

import plstar

DEFAULT_DTYPE = torch.float64


@pytest.mark.parametrize("seed", range(4))
def test_pl_ratio_lies_between_extreme_kernel_eigenvalues(zoo_case, seed: int) -> None:
    _, model, x = zoo_case
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        f = model(x).reshape(x.shape[0], -1)
    y = f + torch.randn(f.shape, generator=torch.Generator().manual_seed(seed + 10))
    rho = plstar.pl_ratio(model, x, y)
    K = dense_kernel(model, x)
    eig = torch.linalg.eigvalsh(K)
    r = (f - y).reshape(-1)
    assert float(eig[0]) - 1e-10 <= rho <= float(eig[-1]) * (1 + 1e-10)
    assert rho == pytest.approx(float(r @ K @ r) / float(r @ r), rel=1e-10)


def linear_problem(n: int = 6, d: int = 10) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(d, 1).double()
    return model, torch.randn(n, d), torch.randn(n, 1)


def test_analyze_linear_model_gives_closed_form_mu_beta_and_gd_rate() -> None:
    model, x, y = linear_problem()
    gram = x @ x.T + torch.ones(6, 6)
    eig = torch.linalg.eigvalsh(gram)
    a = plstar.analyze(model, x, y, hessian_outputs=None)
    assert a.overparameterized and a.pl_star_at_w0
    assert a.mu == pytest.approx(float(eig[0]), rel=1e-10)
    assert a.beta.value == pytest.approx(float(eig[-1]), rel=1e-8)
    assert a.hessian_norm.value == 0.0
    assert a.gd_rate == pytest.approx(1 - float(eig[0] / eig[-1]), rel=1e-8)
    # GD with η = 1/β on the linear model: L_t ≤ (1 − μ/β)^t L₀ and ‖w_t − w₀‖ ≤ R.
    w0 = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=a.gd_step)
    for t in range(1, 40):
        optimizer.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_t = float(0.5 * ((model(x) - y) ** 2).sum())
            distance = math.sqrt(
                sum(
                    float(((p - q) ** 2).sum()) for p, q in zip(model.parameters(), w0, strict=True)
                )
            )
        assert loss_t <= a.gd_rate**t * a.loss0 * (1 + 1e-9)
        assert distance <= a.radius


def test_analyze_underparameterized_model_says_pl_star_cannot_hold() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x, y = torch.randn(30, 2), torch.randn(30, 1)
    a = plstar.analyze(model, x, y)
    assert not a.overparameterized
    assert a.mu == 0.0 and math.isinf(a.kappa) and math.isinf(a.radius)
    assert a.kernel.is_singular
    assert "cannot hold" in a.verdict[0]


def test_analysis_serialises_to_json_with_every_figure() -> None:
    model, x = ZOO["mlp-tanh-k1"](torch.Generator().manual_seed(0))
    model = model.double()
    y = torch.randn(x.shape[0], 1)
    data = json.loads(json.dumps(plstar.analyze(model, x, y).to_dict()))
    for key in ("n", "k", "m", "loss0", "kernel", "beta", "pl_ratio", "hessian_norm", "mu",
                "kappa", "radius", "gd_step", "gd_rate", "steps_to_target", "verdict"):  # fmt: skip
        assert key in data
    assert data["kernel"]["lambda_min"] <= data["pl_ratio"] <= data["kernel"]["lambda_max"]


def test_analyze_matrix_free_path_agrees_with_dense(monkeypatch) -> None:
    model, x = ZOO["mlp-tanh-k1"](torch.Generator().manual_seed(0))
    model = model.double()
    y = torch.randn(x.shape[0], 1)
    dense = plstar.analyze(model, x, y)
    monkeypatch.setattr("plstar.conditions.DENSE_SPECTRUM_LIMIT", 1)
    free = plstar.analyze(model, x, y)
    assert free.implementation == "structured operator"
    assert free.kernel.lambda_max == pytest.approx(dense.kernel.lambda_max, rel=1e-9)
    assert free.kernel.lambda_min == pytest.approx(dense.kernel.lambda_min, rel=1e-6)


class Cube(torch.autograd.Function):
    """x³ whose backward cannot be differentiated again and which has no forward mode: the
    kernel (reverse passes) can be measured, β and ‖H_F‖ (forward over reverse) cannot."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class FirstOrderOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(Cube.apply(torch.tanh(self.a(x))))


def test_a_failing_second_order_stage_keeps_every_figure_measured_before_it() -> None:
    torch.manual_seed(0)
    model, x, y = FirstOrderOnly().double(), torch.randn(6, 3), torch.randn(6, 1)
    a = plstar.analyze(model, x, y)
    assert not a.complete and sorted(a.failed) == ["model hessian", "sharpness"]
    assert all("jvp" in error and "\n" not in error for error in a.failed.values())
    assert a.beta is None and a.hessian_norm is None
    assert all(math.isnan(v) for v in (a.kappa, a.radius, a.gd_step, a.gd_rate))
    eig = torch.linalg.eigvalsh(dense_kernel(model, x))
    assert a.mu == pytest.approx(float(eig[0]), rel=1e-9) and a.pl_star_at_w0
    assert sum("could not be measured" in line for line in a.verdict) == 2
    data = json.loads(json.dumps(a.to_dict()))
    assert data["beta"] is None and data["complete"] is False and data["kappa"] == "nan"


def test_model_hessian_norm_is_cut_to_its_time_share_and_says_it_did_not_converge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x = ZOO["mlp-tanh-k1"](torch.Generator().manual_seed(0))
    model, y = model.double(), torch.randn(x.shape[0], 1)
    unbounded = plstar.analyze(model, x, y, hessian_time_share=None)
    assert unbounded.hessian_norm.converged
    monkeypatch.setattr("plstar.conditions.HESSIAN_MIN_SECONDS", 1e-9)
    cut = plstar.analyze(model, x, y, hessian_time_share=1e-9)
    # One batch of outputs, stopped after its first product: Rayleigh quotients, lower bounds.
    assert cut.hessian_norm.products == 1 and not cut.hessian_norm.converged
    assert cut.hessian_norm.value <= unbounded.hessian_norm.value * (1 + 1e-12)
    assert any("‖H_F‖ stopped before converging" in line for line in cut.verdict)
    assert cut.to_dict()["hessian_norm"]["converged"] is False
    assert cut.kernel.lambda_min == pytest.approx(unbounded.kernel.lambda_min, rel=1e-12)
