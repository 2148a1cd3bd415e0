"""The ``plstar`` command end to end: tables, JSON, user data and models, clean refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run

import plstar
from plstar.data import load_digits
from plstar.models import mlp

MODEL = ["--width", "32", "--depth", "2", "--hessian-outputs", "4"]
SMALL = ["--samples", "40", *MODEL]


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
    assert run(["analyze", *MODEL, "-n", "12", "--outputs", "10", "--json", str(out)]) == 0
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
        assert run(["analyze", *MODEL, "--data", str(tmp_path / name), "--json", str(out)]) == 0
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


UNSEEDED_FACTORY = """
import random
import numpy as np
import torch
def make():
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():  # draws from all three global generators, none of them seeded here
        net[0].bias.add_(torch.from_numpy(np.random.randn(16)).float() * random.random())
    return net
"""


def test_seed_seeds_an_unseeded_model_factory_and_restores_the_generators(tmp_path: Path) -> None:
    source = tmp_path / "net.py"
    source.write_text(UNSEEDED_FACTORY)
    states = torch.get_rng_state(), np.random.get_state()[1].copy()
    found = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        out = tmp_path / f"{name}.json"
        args = ["analyze", *MODEL, "-n", "12", "--model", f"{source}:make", "--seed", seed,
                "--json", str(out)]  # fmt: skip
        assert run(args) == 0
        found[name] = json.loads(out.read_text())["analysis"]
    # Unseeded, two runs differ at O(1); seeded, only round-off could separate them.
    for key in ("loss0", "pl_ratio"):
        assert found["a"][key] == pytest.approx(found["b"][key], rel=1e-12), key
    assert found["a"]["kernel"]["lambda_max"] == pytest.approx(
        found["b"]["kernel"]["lambda_max"], rel=1e-12
    )
    assert found["a"]["loss0"] != pytest.approx(found["c"]["loss0"], rel=1e-3)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])


def test_hessian_outputs_zero_means_every_output_in_analyze_and_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a.json"
    # n·k = 20 outputs: more than the default 16, so "all" is told apart from the default
    assert run(["analyze", *MODEL, "-n", "20", "--hessian-outputs", "0", "--json", str(out)]) == 0
    norm = json.loads(out.read_text())["analysis"]["hessian_norm"]
    assert norm["outputs_examined"] == norm["outputs_total"] == 20
    seen = {}
    original = plstar.train

    def spy(*args, **kwargs):
        seen["hessian_outputs"] = kwargs["hessian_outputs"]
        return original(*args, **kwargs)

    monkeypatch.setattr(plstar, "train", spy)
    assert run(["train", *MODEL, "-n", "6", "--hessian-outputs", "0", "--steps", "1",
                "--every", "1", "--kernel-samples", "4", "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    assert seen == {"hessian_outputs": None}  # the API's "all outputs", as in analyze


def test_the_old_n_spelling_still_works(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert run(["analyze", *MODEL, "--n", "7", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["analysis"]["n"] == 7


def _long_options() -> dict[str, list[str]]:
    """Every long option of every sub-command, by sub-command (argparse's --help left out)."""
    import argparse

    from plstar.cli import command_parser

    parser = command_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [o for a in sub._actions for o in a.option_strings
               if o.startswith("--") and o != "--help"]
        for name, sub in commands.choices.items()
    }  # fmt: skip


def test_no_option_is_an_abbreviation_torchrun_would_claim() -> None:
    """torchrun's parser reads every argument, even after ``-m plstar``, and stops at a prefix of
    its own options; only the old ``--n`` is one (documented: use --samples or -n there)."""
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    for command, options in _long_options().items():
        clashes = [o for o in options if any(t.startswith(o) for t in theirs)]
        assert clashes == (["--n"] if command != "reproduce" else []), (command, clashes)
        line = [command, *[w for o in options if o != "--n" for w in (o, "1")], "-n", "5"]
        parsed = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "plstar", *line])
        assert parsed.training_script == "plstar" and parsed.training_script_args == line


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (ships with torch) absent")
def test_torchrun_launches_plstar_as_people_type_it(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    command = [
        "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "plstar", "analyze",
        "--samples", "24", "--width", "16", "--depth", "2", "--hessian-outputs", "2",
        "--distributed", "--json", str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["distributed"]["ranks"] == 2 and data["analysis"]["n"] == 24


# --- atomic writes --------------------------------------------------------------------------


class _CutWrite:
    """A file handle whose write stops half-way with Ctrl-C."""

    def __init__(self, fd: int, mode: str, opener: Callable = os.fdopen) -> None:
        self.handle = opener(fd, mode)

    def __enter__(self) -> _CutWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: bytes) -> None:
        self.handle.write(data[: len(data) // 2])
        raise KeyboardInterrupt


@pytest.mark.parametrize("cut", ["write", "chmod", "replace"])
def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    from plstar import report

    target = tmp_path / "a.json"
    target.write_text("old\n")

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if cut == "write":
        opener = os.fdopen
        monkeypatch.setattr(report.os, "fdopen", lambda fd, mode: _CutWrite(fd, mode, opener))
    else:
        monkeypatch.setattr(report.os, cut, stop)
    with pytest.raises(KeyboardInterrupt):
        report.write_json(target, {"new": [1.0] * 1000})
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# --- --output, and a stage that fails after the kernel ---------------------------------------

DICT_FACTORY = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)
    def forward(self, x):
        hidden = torch.tanh(self.body(x))
        logits = self.head(hidden)
        steps = torch.arange(1.0, 4.0, dtype=x.dtype)[None, :, None]
        return {"hidden": hidden, "logits": logits, "states": logits[:, None, :] * steps}
def make():
    return Net()
def second_hidden(out):
    return out["hidden"][:, 1:2]
"""


def test_output_picks_f_from_what_a_model_factory_returns(tmp_path: Path) -> None:
    """A --model factory may return a dict: the default takes its logits; --output takes another
    value, by key path (states:last = 3·logits, so K is 9 times larger) or by a file's function."""
    source = tmp_path / "net.py"
    source.write_text(DICT_FACTORY)
    found = {}
    for spec in (None, "logits", "states:last", f"{source}:second_hidden"):
        out = tmp_path / "a.json"
        chosen = [] if spec is None else ["--output", spec]
        assert run(["analyze", "-n", "8", "--hessian-outputs", "2", "--model", f"{source}:make",
                    *chosen, "--json", str(out)]) == 0  # fmt: skip
        data = json.loads(out.read_text())
        assert data["analysis"]["k"] == 1 and data["config"]["output"] == (spec or "default")
        found[spec] = data["analysis"]["kernel"]["lambda_max"]
    assert found["logits"] == pytest.approx(found[None], rel=1e-12)
    assert found["states:last"] == pytest.approx(9 * found[None], rel=1e-10)
    assert found[f"{source}:second_hidden"] != pytest.approx(found[None], rel=1e-3)


def test_a_bad_output_spec_is_refused_in_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    for spec, says in (("logits[:, -1]", "cannot read"), ("logits:middle", "cannot read"),
                       ("nope", "has no 'nope'"), ("ghost.py:f", "file not found")):  # fmt: skip
        assert run(["analyze", *MODEL, "-n", "6", "--output", spec]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, (spec, err)


FIRST_ORDER_FACTORY = """
import torch
class Cube(torch.autograd.Function):
    generate_vmap_rule = True
    @staticmethod
    def forward(x):
        return x ** 3
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)
    def forward(self, x):
        return self.b(Cube.apply(torch.tanh(self.a(x))))
def make():
    return Net()
"""


def test_a_failed_second_order_stage_still_prints_and_writes_the_rest(
    tmp_path: Path, capsys
) -> None:
    source, out = tmp_path / "net.py", tmp_path / "a.json"
    source.write_text(FIRST_ORDER_FACTORY)
    code = run(["analyze", "-n", "10", "--model", f"{source}:make", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 1
    assert "λ_min(K)" in printed.out and "failed" in printed.out and "Traceback" not in printed.err
    assert printed.err.count("\n") == 1 and "incomplete" in printed.err
    data = json.loads(out.read_text())["analysis"]
    assert data["beta"] is None and data["kernel"]["lambda_min"] > 0
    assert sorted(data["failed"]) == ["model hessian", "sharpness"]


def test_hessian_time_share_zero_lets_the_model_hessian_norm_converge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}
    original = plstar.analyze

    def spy(*args, **kwargs):
        seen["share"] = kwargs["hessian_time_share"]
        return original(*args, **kwargs)

    monkeypatch.setattr(plstar, "analyze", spy)
    out = tmp_path / "a.json"
    assert run(["analyze", *SMALL, "--hessian-time-share", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert seen == {"share": None} and data["config"]["hessian_time_share"] == 0.0
    assert data["analysis"]["hessian_norm"]["converged"] is True
