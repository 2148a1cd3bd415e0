"""plstar computes on the model's device (src/plstar/devices.py), proved without a GPU.

The stand-in for "another device" is PyTorch's ``meta`` device made the default: under
``torch.device("meta")`` every factory call that names no device creates a tensor without data.
Model and data stay on the CPU, so a tensor plstar creates without following the model's device
lands on meta, and the measurement fails (meta tensors have no values) or changes. Each public
entry point and every architecture of the zoo is run that way and must give the numbers it gives
normally. A static check then covers the code paths no test reaches: every factory call of the
core names its device. The rest: device resolution and its errors, data on another device than
the model, and where a kernel too large for a device's memory is assembled.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES, build
from conftest import run_cli
from torch import Tensor, nn

import plstar
import plstar.experiments as experiments
from plstar import devices, planning
from plstar.cli.common import problem_device
from plstar.directions import make_directions
from plstar.errors import DataError, PlstarInputError
from plstar.functional import check_device, jacobian_matrix, make_functional
from plstar.landscape import LandscapeGrid, landscape
from plstar.models import mlp
from plstar.region import certify_region

SOURCE = Path(plstar.__file__).parent


@contextlib.contextmanager
def factories_elsewhere() -> Iterator[None]:
    """Factory calls that name no device create meta tensors (no data) while this is active."""
    with torch.device("meta"):
        yield


def _problem() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = mlp(5, 12, 2, 2, generator_seed=3, dtype=torch.float64)
    return model, torch.randn(6, 5, generator=g).double(), torch.randn(6, 2, generator=g).double()


def _numbers(value: Any) -> np.ndarray:
    """The numbers of a result: a tensor's entries, a float, or a dataclass's finite floats."""
    if isinstance(value, Tensor):
        assert value.device.type == "cpu", value.device
        return value.detach().double().reshape(-1).numpy()
    if isinstance(value, float | int | list | np.ndarray):
        return np.asarray(value, dtype=float).reshape(-1)
    found = (
        value
        if isinstance(value, dict)
        else (value.to_dict() if hasattr(value, "to_dict") else vars(value))
    )
    flat: list[float] = []

    def visit(item: Any) -> None:
        if isinstance(item, bool) or item is None or isinstance(item, str):
            return
        if isinstance(item, float | int):
            flat.append(float(item))
        elif isinstance(item, dict):
            for key in sorted(item):
                if key not in ("seconds", "timings"):  # wall times differ run to run
                    visit(item[key])
        elif isinstance(item, list | tuple):
            for entry in item:
                visit(entry)

    visit(found)
    return np.array(flat)


ENTRY_POINTS: dict[str, Callable[[nn.Module, Tensor, Tensor], Any]] = {
    "tangent_kernel auto": lambda m, x, y: plstar.tangent_kernel(m, x),
    "tangent_kernel structured": lambda m, x, y: plstar.tangent_kernel(
        m, x, implementation="structured"
    ),
    "tangent_kernel jacobian": lambda m, x, y: plstar.tangent_kernel(
        m, x, implementation="jacobian"
    ),
    "tangent_kernel ntvp": lambda m, x, y: plstar.tangent_kernel(m, x, implementation="ntvp"),
    "tangent_kernel x2": lambda m, x, y: plstar.tangent_kernel(m, x[:4], x[2:]),
    "kernel_operator and spectrum": lambda m, x, y: plstar.spectrum(
        plstar.kernel_operator(m, x), tol=1e-10
    ),
    "operator to_scipy": lambda m, x, y: plstar.kernel_operator(m, x).to_scipy() @ np.ones(12),
    "jacobian_matrix": lambda m, x, y: jacobian_matrix(make_functional(m, x), x, torch.float64),
    "loss_gradient": lambda m, x, y: plstar.loss_gradient(m, x, y)[1],
    "pl_ratio": lambda m, x, y: plstar.pl_ratio(m, x, y),
    "loss_sharpness": lambda m, x, y: plstar.loss_sharpness(m, x, y),
    "model_hessian_norm": lambda m, x, y: plstar.model_hessian_norm(m, x, outputs=None),
    "analyze": lambda m, x, y: plstar.analyze(m, x, y, hessian_time_share=None),  # untimed
    "certify": lambda m, x, y: plstar.certify(m, x, y, radius=0.05, samples=2),
    "certify_region": lambda m, x, y: certify_region(m, x, y, directions=1),
    "train gd with a monitor": lambda m, x, y: (
        plstar.train(
            m, x, y, steps=4, monitor=plstar.Monitor(m, x, y, every=2, kernel_samples=4)
        ).losses
    ),
    "train sgd": lambda m, x, y: plstar.train(m, x, y, steps=4, method="sgd", batch_size=2).losses,
    "landscape": lambda m, x, y: landscape(
        m,
        x,
        y,
        make_directions(m, x, y, ["random", "lambda-min"], biases="scaled"),
        LandscapeGrid.regular([(-0.5, 0.5)] * 2, 3, 2),
        hessian_steps=2,
    ).to_dict(),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_points_create_nothing_off_the_model_device(name: str) -> None:
    model, x, y = _problem()
    expected = _numbers(ENTRY_POINTS[name](model, x, y))
    model, x, y = _problem()  # train changes its model: start again from the same w₀
    with factories_elsewhere():
        found = ENTRY_POINTS[name](model, x, y)
    np.testing.assert_allclose(_numbers(found), expected, rtol=1e-9, atol=1e-12)


def test_large_dense_spectrum_path_follows_the_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Cholesky + Lanczos path of a dense spectrum (above DENSE_EIGVALSH_LIMIT) creates its
    factor's status and Lanczos basis on the matrix's device."""
    monkeypatch.setattr(sys.modules["plstar.spectrum"], "DENSE_EIGVALSH_LIMIT", 10)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 30, generator=g, dtype=torch.float64)
    matrix = a @ a.T + 0.5 * torch.eye(40, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(matrix)
    with factories_elsewhere():
        found = plstar.spectrum(matrix)
    assert found.method == "dense-cholesky-lanczos-float64"
    assert found.lambda_min == pytest.approx(float(exact[0]), rel=1e-9)
    assert found.lambda_max == pytest.approx(float(exact[-1]), rel=1e-9)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_zoo_kernels_create_nothing_off_the_model_device(name: str) -> None:
    requires = ARCHITECTURES[name].requires
    if requires is not None:
        pytest.importorskip(requires)
    model, x, output = build(name, torch.float64)
    selected = {} if output is None else {"output": output}
    expected = plstar.tangent_kernel(model, x, **selected)
    with factories_elsewhere():
        found = plstar.tangent_kernel(model, x, **selected)
    assert found.device == expected.device
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-12)


FACTORIES = {
    "empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange",
    "linspace", "logspace", "eye", "tensor", "as_tensor", "scalar_tensor", "Generator",
}  # fmt: skip


def test_every_factory_call_names_its_device() -> None:
    """Statically, for the paths no test reaches: every torch factory call in plstar (core, CLI,
    experiments, data loading and model builders alike) says where its tensor goes, the model's
    device or, on purpose, the host."""
    missing = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in FACTORIES
                and not any(k.arg == "device" for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(SOURCE)}:{node.lineno} torch.{node.func.attr}")
    assert not missing, "factory calls without device=: " + ", ".join(missing)


EXPERIMENT_CASES = [(n, 0, {}) for n in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)] + [
    (6, 0, {"epochs": 4, "streams": 1}),  # the quick unit runs 40 epochs × 3 streams
    (3, -1, {"width": 32, "steps": 10}),  # the regime where the hypothesis holds
]


@pytest.mark.parametrize(("number", "index", "changes"), EXPERIMENT_CASES)
def test_experiments_create_nothing_off_their_device(
    number: int, index: int, changes: dict[str, Any]
) -> None:
    """``plstar reproduce --device``: each experiment's problems and networks are made on the host
    and moved to the experiments' device; nothing else is made anywhere else."""
    module = experiments.load(number)
    config = {**module.configurations(True, 1)[index], **changes}
    expected = _numbers(module.run_configuration(config, None))
    with factories_elsewhere():
        found = _numbers(module.run_configuration(config, None))
    np.testing.assert_allclose(found, expected, rtol=1e-9, atol=1e-12)


def test_resolve_device() -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(None) == devices.resolve_device("auto")
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(PlstarInputError, match="no CUDA device"):
                devices.resolve_device(name)
    for name in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(PlstarInputError, match="device must be cpu, cuda, cuda:N"):
            devices.resolve_device(name)


def test_data_on_another_device_than_the_model_is_refused() -> None:
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(DataError, match=r"x is on meta but the model's parameters are on cpu"):
        check_device("x", torch.empty(3, 2, device="meta"), params)
    with pytest.raises(PlstarInputError, match="several devices"):
        check_device("x", torch.zeros(1), {**params, "v": torch.empty(1, device="meta")})
    model, x, _ = _problem()
    with pytest.raises(DataError, match=r"^y is"):
        plstar.loss_sharpness(model, x, torch.empty(6, 2, device="meta", dtype=torch.float64))


def test_plans_budget_the_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the default budget is half its free memory, and a kernel that does not fit
    beside the working memory there is assembled in host memory; on the host nothing changes."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(devices, "free_memory", lambda d: 10_000 if d.type == "cuda" else None)
    assert planning.default_memory_budget(cuda) == 5_000
    assert planning.default_memory_budget(torch.device("cpu")) == planning.default_memory_budget()
    assert devices.result_device(cuda, 6_000, 4_000) == cuda
    assert devices.result_device(cuda, 6_001, 4_000) == torch.device("cpu")
    cpu = torch.device("cpu")
    assert devices.result_device(cpu, 10**15, 10**15) == cpu


def test_draws_are_the_same_on_every_device() -> None:
    """Random draws come from a host generator and are moved: meta gets the shape, the host the
    same numbers as a plain torch.randn with that seed."""
    g = torch.Generator().manual_seed(5)
    drawn = devices.host_normal((4,), g, torch.device("cpu"))
    plain = torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(drawn, plain)
    moved = devices.host_normal((4,), torch.Generator().manual_seed(5), torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (4,)
    perm = devices.host_permutation(6, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert sorted(perm.tolist()) == list(range(6))


def test_distributed_takes_its_devices_from_the_ranks() -> None:
    args = argparse.Namespace(distributed=True, device="cpu")
    with pytest.raises(PlstarInputError, match="--device with --distributed"):
        problem_device(args)
    assert problem_device(argparse.Namespace(distributed=True, device="auto")).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", ["analyze", "train", "certify", "landscape"])
def test_cli_refuses_an_absent_device(command: str, capsys: pytest.CaptureFixture) -> None:
    assert run_cli([command, "-n", "4", "--width", "8", "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_cli_records_the_device(tmp_path: Path) -> None:
    out = tmp_path / "analysis.json"
    assert run_cli(["analyze", "-n", "8", "--width", "16", "--device", "cpu", "--json",
                    str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["config"]["device"] == "cpu"
