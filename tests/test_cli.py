"""The ``plstar`` command end to end: tables, JSON, user data and models, clean refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run

import plstar
from plstar.data import load_digits
from plstar.models import mlp

SMALL = ["--n", "40", "--width", "32", "--depth", "2", "--hessian-outputs", "4"]


def test_analyze_prints_table_and_json_agrees_with_the_python_api(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a.json"
    assert run(["analyze", *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("λ_min(K)", "λ_max(K)", "κ(K)", "ρ(w₀)", "β", "‖H_F‖", "μ", "R", "rate"):
        assert label in printed
    assert "rows scaled to norm sqrt(64)" in printed  # the input scaling is visible
    data = json.loads(out.read_text())
    dataset = load_digits(40, dtype=torch.float64)
    model = mlp(64, 32, 2, 1, generator_seed=0, dtype=torch.float64)
    expected = plstar.analyze(model, dataset.x, dataset.y, hessian_outputs=4)
    assert data["analysis"]["kernel"]["lambda_min"] == pytest.approx(
        expected.kernel.lambda_min, rel=1e-10
    )
    assert data["analysis"]["m"] == expected.m
    assert data["config"]["scaling"] == "sphere"


def test_ten_outputs_give_a_kernel_of_size_ten_n(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert run(["analyze", *SMALL, "--n", "12", "--outputs", "10", "--json", str(out)]) == 0
    analysis = json.loads(out.read_text())["analysis"]
    assert analysis["k"] == 10 and analysis["kernel"]["size"] == 120


def test_user_npz_and_csv_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 1))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    header = "a,b,c,d,e,target"
    np.savetxt(tmp_path / "d.csv", np.hstack([x, y]), delimiter=",", header=header, comments="")
    for name in ("d.npz", "d.csv"):
        out = tmp_path / f"{name}.json"
        assert run(["analyze", *SMALL, "--data", str(tmp_path / name), "--json", str(out)]) == 0
        analysis = json.loads(out.read_text())["analysis"]
        assert analysis["n"] == 20 and analysis["m"] == 5 * 32 + 32 + 32 + 1


def test_user_model_factory(tmp_path: Path) -> None:
    source = tmp_path / "net.py"
    source.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))\n"
    )
    out = tmp_path / "m.json"
    assert run(["analyze", *SMALL, "--model", f"{source}:make", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["analysis"]["m"] == 64 * 16 + 16 + 16 + 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.npz"], "missing.npz"),
        (["--model", "nowhere.py:make"], "nowhere.py"),
        (["--outputs", "3"], "outputs"),
        (["--memory-budget", "lots"], "memory size"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "plstar", "analyze", *SMALL, *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_malformed_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,five,6\n")
    done = subprocess.run(
        [sys.executable, "-m", "plstar", "analyze", "--data", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "five" in done.stderr or "row" in done.stderr
