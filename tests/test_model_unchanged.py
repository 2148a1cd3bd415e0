"""Every public measurement leaves the user's model, and global torch state, exactly as it was.

For every zoo model (tied modules, shared blocks, weights tied across modules, parametrizations
included) and every measuring function: the same Parameter objects under every name, bitwise the
same values, requires_grad, .grad, training flags, buffers, hook dictionaries and the module
tree; the grad mode, the default dtype and the global random states unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ZOO
from torch import Tensor, nn

import plstar
from plstar.certify import kernel_spectrum, lambda_min_descent, per_sample_smoothness
from plstar.directions import make_directions
from plstar.landscape import LandscapeGrid, landscape

DEFAULT_DTYPE = torch.float64


def _hooks(module: nn.Module) -> dict[str, tuple[int, list[tuple[Any, Any]]]]:
    """Every hook dictionary of a module: its identity and its entries."""
    return {
        name: (id(value), list(value.items()))
        for name, value in vars(module).items()
        if "hook" in name and isinstance(value, dict)
    }


def _global_hooks() -> dict[str, list[tuple[Any, Any]]]:
    from torch.nn.modules import module as torch_module

    return {
        name: list(value.items())
        for name, value in vars(torch_module).items()
        if name.startswith("_global_") and isinstance(value, dict)
    }


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What a measurement must not change, with the objects themselves for identity checks."""
    return {
        "params": [
            (
                name,
                p,
                type(p),
                p.detach().clone(),
                p.requires_grad,
                p.grad,
                None if p.grad is None else p.grad.clone(),
            )
            for name, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [
            (name, b, b.detach().clone()) for name, b in model.named_buffers(remove_duplicate=False)
        ],
        "modules": [
            (
                name,
                sub,
                sub.training,
                list(sub._parameters),
                list(sub._buffers),
                list(sub._modules),
                set(vars(sub)),
                _hooks(sub),
            )
            for name, sub in model.named_modules(remove_duplicate=False)
        ],
        "global hooks": _global_hooks(),
        "grad enabled": torch.is_grad_enabled(),
        "default dtype": torch.get_default_dtype(),
        "torch rng": torch.random.get_rng_state(),
        "numpy rng": np.random.get_state()[1].copy(),
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert [row[0] for row in after["params"]] == [row[0] for row in before["params"]]
    for old, new in zip(before["params"], after["params"], strict=True):
        name, param, kind, value, flag, grad, grad_value = old
        assert new[1] is param, f"{name} is another object"
        assert type(new[1]) is kind is nn.Parameter, f"{name} is a {type(new[1]).__name__}"
        assert torch.equal(new[3], value), f"{name} changed value"
        assert new[4] == flag, f"{name}.requires_grad changed"
        assert new[5] is grad, f"{name}.grad changed"
        assert grad is None or torch.equal(new[6], grad_value), f"{name}.grad changed value"
    assert [row[0] for row in after["buffers"]] == [row[0] for row in before["buffers"]]
    for (name, buffer, value), new in zip(before["buffers"], after["buffers"], strict=True):
        assert new[1] is buffer and torch.equal(new[2], value), f"buffer {name} changed"
    for old, new in zip(before["modules"], after["modules"], strict=True):
        assert new[1] is old[1], f"module {old[0]} replaced"
        assert new[2:] == old[2:], f"module {old[0]}: mode, members or hooks changed"
    for key in ("global hooks", "grad enabled", "default dtype"):
        assert after[key] == before[key], key
    assert torch.equal(after["torch rng"], before["torch rng"]), "global torch RNG advanced"
    assert np.array_equal(after["numpy rng"], before["numpy rng"]), "global numpy RNG advanced"


def _monitor(model: nn.Module, x: Tensor, y: Tensor) -> None:
    monitor = plstar.Monitor(model, x, y, every=1, kernel_samples=3, sharpness_iterations=2)
    monitor.step()


def _operator(implementation: str) -> Callable[[nn.Module, Tensor, Tensor], None]:
    def run(model: nn.Module, x: Tensor, y: Tensor) -> None:
        op = plstar.kernel_operator(model, x, implementation=implementation)  # type: ignore[arg-type]
        v = torch.ones(op.shape[0], dtype=torch.float64)
        op @ v
        op @ torch.stack([v, -v], dim=1)
        op.transpose_product(v)
        op.to_scipy().matvec(v.numpy())

    return run


def _plan(model: nn.Module, x: Tensor, y: Tensor) -> None:
    fmodel = plstar.make_functional(model, x)
    for implementation in ("auto", "structured", "jacobian", "ntvp"):
        plstar.plan_kernel(
            fmodel, x, x.shape[0], implementation=implementation,  # type: ignore[arg-type]
            dtype=torch.float64, memory_budget=2**20,
        )  # fmt: skip


CALLS: dict[str, Callable[[nn.Module, Tensor, Tensor], Any]] = {
    **{
        f"tangent_kernel-{impl}": (
            lambda model, x, y, impl=impl: plstar.tangent_kernel(model, x, implementation=impl)
        )
        for impl in ("auto", "structured", "jacobian", "ntvp")
    },
    "tangent_kernel-x2": lambda model, x, y: plstar.tangent_kernel(model, x[:2], x[1:]),
    "tangent_kernel-blocks": lambda model, x, y: plstar.tangent_kernel(model, x, memory_budget=1),
    **{f"kernel_operator-{impl}": _operator(impl) for impl in ("auto", "structured", "ntvp")},
    "pl_ratio": lambda model, x, y: plstar.pl_ratio(model, x, y),
    "loss_gradient": lambda model, x, y: plstar.loss_gradient(model, x, y),
    "loss_sharpness": lambda model, x, y: plstar.loss_sharpness(model, x, y, max_iter=5),
    "model_hessian_norm": lambda model, x, y: plstar.model_hessian_norm(
        model, x, outputs=2, max_iter=5
    ),
    "analyze": lambda model, x, y: plstar.analyze(model, x, y, hessian_outputs=2),
    "certify": lambda model, x, y: plstar.certify(
        model, x, y, samples=1, shells=(1.0,), hessian_outputs=1
    ),
    "certify-radius": lambda model, x, y: plstar.certify(
        model, x, y, radius=0.5, mu=1e-3, samples=1, shells=(0.5,), hessian_outputs=1
    ),
    "kernel_spectrum": lambda model, x, y: kernel_spectrum(model, x),
    "lambda_min_descent": lambda model, x, y: lambda_min_descent(model, x),
    "per_sample_smoothness": lambda model, x, y: per_sample_smoothness(
        model, x, y, hessian_outputs=1
    ),
    "monitor": _monitor,
    "jacobian_rows": lambda model, x, y: plstar.jacobian_rows(
        plstar.make_functional(model, x), x, torch.float64
    ),
    "make_functional": lambda model, x, y: plstar.make_functional(model, x),
    "landscape": lambda model, x, y: landscape(
        model,
        x,
        y,
        make_directions(model, x, y, ["random", "gradient"], biases="scaled"),
        LandscapeGrid.regular([(-0.5, 0.5)] * 2, 3, 2),
        hessian_steps=2,
    ),
    "plan_kernel": _plan,
}


def _targets(model: nn.Module, x: Tensor) -> Tensor:
    k = plstar.make_functional(model, x).k
    return torch.randn(x.shape[0], k, generator=torch.Generator().manual_seed(4))


def _with_a_gradient(model: nn.Module) -> nn.Module:
    """The first parameter carries a .grad (a user mid-training); the others have none."""
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.25)
    return model


@pytest.mark.parametrize("call", sorted(CALLS))
def test_measurement_leaves_model_and_global_state_unchanged(zoo_case, call: str) -> None:
    _, model, x = zoo_case
    y = _targets(_with_a_gradient(model), x)
    before = snapshot(model)
    CALLS[call](model, x, y)
    assert_unchanged(before, model)


def decorated() -> tuple[nn.Module, Tensor]:
    """Hooks, a frozen parameter, an eval-mode BatchNorm's buffers and a training-mode flag that
    matters to nothing: what a user's model carries besides its weights."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(5, generator=g))
        model[1].running_var.copy_(torch.rand(5, generator=g) + 0.5)
    model.eval()
    model[2].train()  # Tanh has no mode-dependent behaviour; its flag must survive anyway
    model[0].bias.requires_grad_(False)
    model[0].register_forward_hook(lambda module, args, out: None)
    model[3].register_forward_pre_hook(lambda module, args: None)
    model.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)
    return model, torch.randn(6, 4, generator=g)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_decorated_model_keeps_hooks_buffers_modes_and_frozen_parameters(call: str) -> None:
    model, x = decorated()
    y = _targets(_with_a_gradient(model), x)
    before = snapshot(model)
    CALLS[call](model, x, y)
    assert_unchanged(before, model)


def test_parameters_are_restored_when_certify_is_interrupted_midway() -> None:
    torch.manual_seed(0)
    model, x = ZOO["tied-module-k1"](torch.Generator().manual_seed(1))
    model = model.double().eval()
    y = _targets(model, x)
    before = snapshot(model)

    def progress(phase: str, done: float, total: float) -> None:
        if phase.startswith("certify"):  # the model is at a point of the ball right now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plstar.certify(model, x, y, samples=2, shells=(0.5,), hessian_outputs=1, progress=progress)
    assert_unchanged(before, model)


def test_tied_module_keeps_its_parameter_and_an_optimizer_still_trains_it() -> None:
    """Issue 10's reproduction: after a kernel, the shared Linear's weight is still the
    Parameter an optimizer holds, and one SGD step moves it."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 4)
    weight = layer.weight
    plstar.tangent_kernel(model, x)
    assert layer.weight is weight and model[2].weight is weight
    assert isinstance(weight, nn.Parameter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = weight.detach().clone()
    model(x).sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), start)


@pytest.mark.parametrize("name", ["tied-module-k1", "shared-block-k2", "tied-head-k5"])
def test_tied_models_give_the_derivatives_of_a_jacrev_oracle(name: str) -> None:
    """Binding each Parameter once per owning module keeps every use in the derivatives: DF and
    β match jacrev / hessian of F(w) over the flat parameters, float64."""
    from conftest import as_function_of_flat, flat_params

    torch.manual_seed(0)
    model, x = ZOO[name](torch.Generator().manual_seed(1))
    model = model.double().eval()
    forward, w = as_function_of_flat(model, x), flat_params(model)
    jacobian = torch.func.jacrev(lambda v: forward(v).reshape(-1))(w)
    fmodel = plstar.make_functional(model, x)
    rows = torch.cat(list(plstar.jacobian_rows(fmodel, x, torch.float64).values()), dim=1)
    assert torch.allclose(rows, jacobian, rtol=1e-12, atol=1e-14)
    y = torch.randn(jacobian.shape[0], generator=torch.Generator().manual_seed(2)).reshape(
        x.shape[0], -1
    )
    exact = torch.func.hessian(lambda v: 0.5 * ((forward(v) - y) ** 2).sum())(w)
    top = float(torch.linalg.eigvalsh(exact)[-1])
    beta = plstar.loss_sharpness(model, x, y, tol=1e-10, max_iter=200)
    assert abs(beta.value - top) <= beta.error_bound + 1e-10 * abs(top)
