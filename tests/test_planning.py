"""Memory plans: each implementation sized with its own bytes, "auto" choosing by cost among
the plans that fit, and no "auto" plan over the budget on the architecture zoo."""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, Selected, build
from conftest import dense_kernel
from torch import Tensor, nn

import plstar
from plstar.functional import make_functional
from plstar.kernel import planned_tangent_kernel

DEFAULT_DTYPE = torch.float64
MiB = 2**20


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def plan(model: nn.Module, x: Tensor, implementation: str, budget: int, output=None):
    fmodel = make_functional(model, x, output=output)
    return plstar.plan_kernel(
        fmodel, x, x.shape[0], implementation=implementation, dtype=torch.float64,
        memory_budget=budget, symmetric=True,
    )  # fmt: skip


@pytest.mark.parametrize("name", [n for n, a in ARCHITECTURES.items() if a.available()])
def test_auto_plans_of_the_zoo_stay_within_every_budget_that_one_fits(name: str) -> None:
    model, x, output = build(name, dtype=torch.float64, seed=0)
    for budget in [MiB, 4 * MiB, 16 * MiB, 2**30]:
        each = [plan(model, x, i, budget, output) for i in ("structured", "jacobian", "ntvp")]
        chosen = plan(model, x, "auto", budget, output)
        if any(p.planned_bytes <= budget for p in each):
            assert chosen.planned_bytes <= budget, (budget, chosen)
            assert chosen.cost == min(p.cost for p in each if p.planned_bytes <= budget)
        else:  # nothing fits even one sample per block: the least memory
            assert chosen.planned_bytes == min(p.planned_bytes for p in each)
    assert chosen.planned_bytes <= 2**30
    # a small budget's plan is the one followed, and it is exact
    budget = 4 * MiB
    K, followed = planned_tangent_kernel(model, x, memory_budget=budget, output=output)
    assert followed == plan(model, x, "auto", budget, output)
    assert relative_error(K, dense_kernel(Selected(model, output), x)) < 1e-10


class ParameterOutsideForward(nn.Module):
    """A wide layer whose weight is also read outside its forward: the entry check fails for
    it, so under "auto" it takes Jacobian rows and the structured kernel loses its advantage."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h) + (h @ self.out.weight.T) ** 2


def test_each_implementation_is_sized_with_its_own_bytes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 3))
    x = torch.randn(40, 8)
    fmodel = make_functional(model, x)
    k, m, budget = fmodel.k, fmodel.m, 2**30
    plans = {i: plan(model, x, i, budget) for i in ("structured", "jacobian", "ntvp")}
    # jacobian: every sample's k·m rows (float64) kept; structured: inputs and cotangents only
    assert plans["jacobian"].planned_bytes >= x.shape[0] * k * m * 8
    assert plans["structured"].planned_bytes < plans["jacobian"].planned_bytes / 3
    # ntvp holds one column block's Jacobian rows (in float64 and the model's dtype)
    assert plans["ntvp"].planned_bytes >= plans["ntvp"].col_block * k * m * 16
    auto = plan(model, x, "auto", budget)
    assert auto.implementation == "structured"
    assert auto.cost == min(p.cost for p in plans.values())


def test_auto_after_a_failed_entry_check_chooses_by_cost_within_the_budget() -> None:
    torch.manual_seed(0)
    model, x = ParameterOutsideForward(400), torch.randn(6, 8)
    fmodel = make_functional(model, x)
    k, m = fmodel.k, fmodel.m
    # Jacobian rows of one sample pair do not fit (≈ 3·k·m·8 bytes at one sample per block);
    # one block of rows for the forward-mode products (≈ 2·k·m·8) does.
    budget = int(2.6 * k * m * 8)
    chosen = plan(model, x, "auto", budget)
    assert chosen.planned_bytes <= budget
    assert plan(model, x, "jacobian", budget).planned_bytes > budget
    assert chosen.implementation in ("ntvp", "structured")
    if chosen.implementation == "structured":  # the rows of "out" only, not of every parameter
        assert set(chosen.rows_parameters) == {"out.weight", "out.bias"}
    K, followed = planned_tangent_kernel(model, x, memory_budget=budget)
    assert followed.planned_bytes <= budget
    assert relative_error(K, dense_kernel(model, x)) < 1e-10


def test_auto_takes_the_forward_mode_products_when_no_block_of_rows_fits() -> None:
    """The ResNet case of issue 11: once the structured kernel is out, the Jacobian rows of a
    block do not fit, and "auto" must not plan them over the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 4))
    x = torch.randn(5, 8)
    fmodel = make_functional(model, x)
    budget = int(2.6 * fmodel.k * fmodel.m * 8)
    chosen = plstar.plan_kernel(
        fmodel, x, 5, implementation="auto", dtype=torch.float64, memory_budget=budget,
        symmetric=True, probe=None,
    )  # fmt: skip
    assert chosen.planned_bytes <= budget
    from plstar.planning import plan_with_probe

    without = plan_with_probe(
        fmodel, x, 5, implementation="auto", dtype=torch.float64, memory_budget=budget,
        symmetric=True, probe=None,
    )  # fmt: skip
    assert without.implementation == "ntvp" and without.planned_bytes <= budget


def test_sample_costs_are_measured_once_per_model_and_shapes(monkeypatch) -> None:
    """Repeated kernels (a monitor, one per training step) skip the counting forward pass; new
    parameter shapes or sample shapes measure again, and the figures are those of a fresh
    measurement."""
    from plstar import costs

    measured = []
    measure = costs._measure
    monkeypatch.setattr(costs, "_measure", lambda *a: measured.append(a[1].shape) or measure(*a))
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    first = costs.sample_costs(make_functional(model, x), x)
    count = lambda: 2.0 * sum(p.numel() for p in model.parameters())  # noqa: E731  (≥ the GEMMs')
    assert first.forward_flops == count() and len(measured) == 1
    other = torch.randn(7, 4, dtype=torch.float64)  # other values, same sample shape
    assert costs.sample_costs(make_functional(model, other), other) == first
    plstar.tangent_kernel(model, x)
    assert len(measured) == 1  # remembered
    model[2] = nn.Linear(8, 2).double()  # new parameter shapes and k
    changed = costs.sample_costs(make_functional(model, x), x)
    assert changed.forward_flops == count() < first.forward_flops and len(measured) == 2
    longer = torch.randn(5, 3, 4, dtype=torch.float64)  # new sample shape
    costs.sample_costs(make_functional(model, longer), longer)
    assert len(measured) == 3
