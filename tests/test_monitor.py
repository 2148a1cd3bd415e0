"""The Monitor in a plain user loop, against dense float64 oracles (kernels, exact Hessians)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import as_function_of_flat, dense_kernel, flat_params
from torch import Tensor, nn
from torch.func import hessian

from plstar.errors import PlstarInputError
from plstar.models import mlp
from plstar.monitor import Monitor

DEFAULT_DTYPE = torch.float64


def problem(n: int = 10, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.randn(n, 2, generator=g)
    return mlp(3, 24, 2, 2, generator_seed=seed, dtype=torch.float64), x, y


def summed_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((model(x) - y) ** 2).sum()


def exact_sharpness(model: nn.Module, x: Tensor, y: Tensor) -> float:
    forward = as_function_of_flat(model, x)
    h = hessian(lambda w: 0.5 * ((forward(w) - y) ** 2).sum())(flat_params(model))
    return float(torch.linalg.eigvalsh(h)[-1])


def user_loop(model: nn.Module, x: Tensor, y: Tensor, monitor: Monitor, steps: int) -> list[Tensor]:
    """A user's own loop (mean loss, torch.optim): the monitor only sees the parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    path = [flat_params(model)]
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        monitor.step()
        path.append(flat_params(model))
    return path


def test_records_in_a_user_loop_match_independent_oracles() -> None:
    model, x, y = problem()
    K0 = dense_kernel(model, x)
    mu = float(torch.linalg.eigvalsh(K0)[0])
    beta = exact_sharpness(model, x, y)
    monitor = Monitor(model, x, y, every=100, sharpness_iterations=40)
    assert monitor.mu == pytest.approx(mu, rel=1e-9)
    assert monitor.beta == pytest.approx(beta, rel=1e-6)
    path = user_loop(model, x, y, monitor, steps=6)
    loss0 = monitor.history[0].loss
    for record, w in zip(monitor.history, path, strict=True):
        # The loss and ρ at the recorded point, by plain autograd on a copy at those parameters.
        probe = mlp(3, 24, 2, 2, dtype=torch.float64)
        torch.nn.utils.vector_to_parameters(w, probe.parameters())
        loss = summed_loss(probe, x, y)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, probe.parameters())])
        value = float(loss.detach())
        assert record.loss == pytest.approx(value, rel=1e-12)
        assert record.pl_ratio == pytest.approx(float(grad @ grad) / (2 * value), rel=1e-10)
        assert record.distance == pytest.approx(float((w - path[0]).norm()), abs=1e-12)
        assert record.envelope == pytest.approx((1 - mu / beta) ** record.step * loss0, rel=1e-6)
    assert [r.step for r in monitor.history] == list(range(7))


def test_kernel_extremes_and_drift_every_k_steps_on_the_fixed_subsample() -> None:
    model, x, y = problem(n=12, seed=1)
    monitor = Monitor(model, x, y, every=3, kernel_samples=7, sharpness=False)
    sub = monitor.subsample
    assert len(sub) == 7 and len(set(sub.tolist())) == 7
    K0 = dense_kernel(model, x[sub])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(6):
        optimizer.zero_grad()
        summed_loss(model, x, y).backward()
        optimizer.step()
        monitor.step()
    measured = [r for r in monitor.history if r.lambda_min is not None]
    assert [r.step for r in measured] == [0, 3, 6]
    Kt = dense_kernel(model, x[sub])  # the last record is at the current parameters
    values = torch.linalg.eigvalsh(Kt)
    last = measured[-1]
    assert last.lambda_min == pytest.approx(float(values[0]), rel=1e-9)
    assert last.lambda_max == pytest.approx(float(values[-1]), rel=1e-12)
    drift = float(torch.linalg.matrix_norm(Kt - K0) / torch.linalg.matrix_norm(K0))
    assert last.drift == pytest.approx(drift, rel=1e-9)
    # Cauchy interlacing: a principal submatrix's λ_min is ≥ that of the full kernel.
    assert measured[0].lambda_min >= monitor.mu * (1 - 1e-12)


def test_warm_started_sharpness_tracks_the_exact_hessian() -> None:
    model, x, y = problem(n=6, seed=2)
    monitor = Monitor(model, x, y, every=2, sharpness_iterations=40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    for _ in range(4):
        optimizer.zero_grad()
        summed_loss(model, x, y).backward()
        optimizer.step()
        monitor.step()
    record = monitor.history[-1]
    assert record.step == 4
    assert record.sharpness == pytest.approx(exact_sharpness(model, x, y), rel=1e-6)


def test_to_json_and_plot_write_complete_files(tmp_path: Path) -> None:
    model, x, y = problem(n=6, seed=3)
    monitor = Monitor(model, x, y, every=2)
    user_loop(model, x, y, monitor, steps=4)
    saved = json.loads(monitor.to_json(tmp_path / "m.json").read_text())
    assert [r["step"] for r in saved["history"]] == [0, 1, 2, 3, 4]
    assert saved["reference"]["mu"] == pytest.approx(monitor.mu)
    assert math.isfinite(saved["reference"]["radius"])
    figure = monitor.plot(tmp_path / "fig" / "training.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"kernel_samples": 0}, {"sharpness_iterations": 0}, {"every": 1.5}]
)
def test_monitor_refuses_bad_settings(kwargs: dict) -> None:
    model, x, y = problem(n=4)
    with pytest.raises(PlstarInputError):
        Monitor(model, x, y, **kwargs)
