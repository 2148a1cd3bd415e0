"""plstar.train against closed forms: linear least squares, the descent lemma, SGD's derived rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from plstar import theory
from plstar.errors import PlstarInputError
from plstar.models import mlp
from plstar.monitor import Monitor
from plstar.theory import gd_radius_for_step, gd_rate_for_step, pl_eps_first_passage_bound
from plstar.train import TrainingInterrupted, train

DEFAULT_DTYPE = torch.float64


def linear_problem(n: int, d: int, seed: int) -> tuple[nn.Linear, Tensor, Tensor]:
    """F(w) = X w (no bias), n < d: K = X Xᵀ, H_L = XᵀX, interpolating."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g))
    return model, torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g)


def test_gd_follows_rate_exactly_in_slowest_direction() -> None:
    model, x, y = linear_problem(6, 20, seed=0)
    gram = (x @ x.T).numpy()
    values, vectors = np.linalg.eigh(gram)
    mu, beta, slowest = values[0], values[-1], torch.from_numpy(vectors[:, 0])
    r0 = (model(x) - y).detach().reshape(-1)
    steps = 40
    result = train(model, x, y, steps=steps, eps=1e-3 * 0.5 * float(r0 @ r0))
    eta = result.step_size
    assert eta * beta == pytest.approx(1.0, rel=1e-6)  # η = 1/β with β = λ_max(XᵀX)
    assert result.mu == pytest.approx(mu, rel=1e-10)
    assert result.rate == pytest.approx(1 - mu * eta, rel=1e-12)
    rT = (model(x) - y).detach().reshape(-1)
    # For F = Xw, r_{t+1} = (I − ηK) r_t: the slowest eigencomponent contracts by exactly 1 − ημ.
    assert float(slowest @ rT) / float(slowest @ r0) == pytest.approx(
        (1 - eta * mu) ** steps, rel=1e-9
    )
    assert result.max_envelope_ratio <= 1.0 + 1e-12
    assert not result.events  # no rises, β constant


def test_pl_eps_first_passage_is_reported_and_within_bound() -> None:
    model, x, y = linear_problem(5, 12, seed=1)
    loss0 = 0.5 * float(((model(x) - y) ** 2).sum().detach())
    eps = 1e-2 * loss0
    result = train(model, x, y, steps=400, eps=eps)
    first = next(t for t, loss in enumerate(result.losses) if loss < eps)
    assert result.first_below_eps == first
    kappa = result.beta / result.mu
    assert result.pl_eps_bound == math.floor(kappa * math.log(loss0 / eps)) + 1  # strict "<"
    assert first <= result.pl_eps_bound
    # The "≤ ε" ceiling of THEORY item 7, and one more when κ log(L₀/ε) is an integer.
    assert pl_eps_first_passage_bound(2.0, 1.0, math.e, 1.0) == 3.0  # κ log = 2 exactly
    assert pl_eps_first_passage_bound(2.0, 1.0, 1.5, 1.0) == theory.pl_eps_steps_bound(
        2.0, 1.0, 1.5, 1.0
    )


def test_losses_stay_under_envelope_of_the_paths_own_mu_and_beta_on_wide_tanh_network() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(5)
    y = torch.sign(torch.randn(8, 1, generator=g))
    model = mlp(5, 256, 2, 1, generator_seed=3, dtype=torch.float64)
    monitor = Monitor(model, x, y, every=1, sharpness_iterations=30)
    result = train(model, x, y, steps=60, monitor=monitor)
    history = monitor.history
    assert len(history) == 61 and all(r.lambda_min is not None for r in history)
    mu = min(r.lambda_min for r in history)  # the full kernel: 8 samples ≤ kernel_samples
    beta = max(r.sharpness + r.sharpness_error for r in history)
    loss0 = history[0].loss
    for r in history:
        assert r.loss <= (1 - mu / beta) ** r.step * loss0 * (1 + 1e-12)
    radius = 2 * math.sqrt(2 * beta * loss0) / mu
    assert max(r.distance for r in history) <= radius
    assert result.max_distance == pytest.approx(max(r.distance for r in history))


def test_sgd_mean_loss_decays_at_least_at_derived_rate() -> None:
    n, b, steps = 5, 2, 40
    model, x, y = linear_problem(n, 80, seed=2)
    w0 = model.weight.detach().clone()
    gram = (x @ x.T).numpy()
    mu, lam = np.linalg.eigvalsh(gram)[[0, -1]]
    beta_s = float((x**2).sum(dim=1).max())  # per-sample smoothness ‖x_i‖² (H_F = 0)
    runs = []
    for seed in range(48):
        with torch.no_grad():
            model.weight.copy_(w0)
        result = train(model, x, y, method="sgd", batch_size=b, steps=steps, seed=seed)
        runs.append(result.losses)
    assert result.per_sample_smoothness == pytest.approx(beta_s, rel=1e-10)
    expected = b * mu / (lam * (n * beta_s + mu * (b - 1)))  # η*(b), docs/theory.md item 6
    assert result.step_size == pytest.approx(expected, rel=1e-6)
    mean = np.mean(np.asarray(runs), axis=0)
    bound = result.losses[0] * result.rate ** np.arange(steps + 1)
    assert bound[-1] < 0.1 * bound[0]  # the horizon covers a real decrease
    assert np.all(mean <= bound * (1 + 1e-12))


class ExpModel(nn.Module):
    """f(w; x) = eᵂ·x: H_L = eʷ(2eʷ − y) grows along the path from w₀ = log 2 to y = 3."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([math.log(2.0)]))

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(self.w) * x


def test_gd_says_so_and_halves_step_when_loss_rises() -> None:
    model, x, y = ExpModel(), torch.ones(1, 1), torch.full((1, 1), 3.0)
    result = train(model, x, y, steps=30, recheck_every=1000)
    assert result.step_size == pytest.approx(0.5, rel=1e-6)  # β(w₀) = 2·(4 − 3) = 2
    rises = [e for e in result.events if "rose" in e]
    assert rises and "η halved to 0.25" in rises[0]
    halvings = sum(1 for a, b in zip(result.losses, result.losses[1:], strict=False) if b > a)
    assert result.final_step_size == pytest.approx(0.5 / 2**halvings, rel=1e-6)
    assert result.final_loss < 1e-6 * result.loss0  # it still converges


def test_gd_rate_for_any_step_bounds_every_quadratic_mode() -> None:
    mu, beta = 0.3, 5.0
    assert gd_rate_for_step(1 / beta, beta, mu) == pytest.approx(
        theory.gd_rate(beta, mu), rel=1e-14
    )
    assert gd_radius_for_step(1 / beta, beta, mu, 2.0) == pytest.approx(
        theory.gd_radius(beta, mu, 2.0), rel=1e-12
    )
    # On L = ½ Σ λ_i w_i² with λ_i ∈ [μ, β], each mode's loss ratio is (1 − ηλ)² ≤ rate(η).
    for eta in np.linspace(0.01, 1.99, 50) / beta:
        rate = gd_rate_for_step(eta, beta, mu)
        for lam in np.linspace(mu, beta, 50):
            assert (1 - eta * lam) ** 2 <= rate + 1e-15
    assert gd_rate_for_step(2.0 / beta, beta, mu) == 1.0
    assert gd_radius_for_step(1.5 / beta, beta, mu, 2.0) == math.inf  # path bound needs η ≤ 1/β


def test_interruption_returns_the_run_so_far() -> None:
    model, x, y = linear_problem(4, 10, seed=4)
    w0 = model.weight.detach().clone()

    def stop_at_five(phase: str, done: float, total: float) -> None:
        if phase == "train" and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as caught:
        train(model, x, y, steps=50, progress=stop_at_five)
    partial = caught.value.result
    assert partial.interrupted and partial.steps == 5 and len(partial.losses) == 6
    reached = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.copy_(w0)
    train(model, x, y, steps=5)
    assert torch.equal(model.weight.detach(), reached)  # the model holds step 5 exactly


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"lr": -1.0},
        {"lr": "fast"},
        {"method": "adam"},
        {"method": "sgd", "batch_size": 0},
        {"method": "sgd", "batch_size": 5},
        {"batch_size": 2},
        {"eps": 0.0},
    ],
)
def test_train_refuses_bad_arguments(kwargs: dict) -> None:
    model, x, y = linear_problem(4, 10, seed=5)
    with pytest.raises(PlstarInputError):
        train(model, x, y, **kwargs)


def test_train_refuses_a_monitor_that_did_not_start_at_the_current_parameters() -> None:
    model, x, y = linear_problem(4, 10, seed=6)
    monitor = Monitor(model, x, y)
    with torch.no_grad():
        model.weight.add_(0.1)
    with pytest.raises(PlstarInputError, match="start at the current parameters"):
        train(model, x, y, monitor=monitor)
    other, _, _ = linear_problem(4, 10, seed=7)
    with pytest.raises(PlstarInputError, match="another model"):
        train(other, x, y, monitor=Monitor(model, x, y))


def test_envelope_ratio_on_known_curves() -> None:
    from plstar.train import envelope_ratio

    rate = 0.9
    exact = [5.0 * rate**t for t in range(21)]
    assert envelope_ratio(exact, rate) == pytest.approx(1.0)
    assert envelope_ratio([5.0 * 0.5**t for t in range(21)], rate) == pytest.approx(0.5 / 0.9)
    bumped = [*exact[:5], exact[5] * 1.5, *exact[6:]]
    assert envelope_ratio(bumped, rate) == pytest.approx(1.5)
    assert math.isnan(envelope_ratio(exact, 1.0))
    assert envelope_ratio([1.0, math.nan], rate) == math.inf
