"""Every way a user can get the ``plstar`` command wrong, run through the installed console script.

Each failure must end with exactly one non-empty line on stderr, no traceback, and exit code 2
(130 for Ctrl-C), with nothing half-written: refused runs leave an earlier results folder as it
was, and no temporary file is left behind. COLUMNS=80 checks that long messages are not wrapped.

The refusals run side by side in a module fixture (each is a Python start-up, mostly importing
torch); the Ctrl-C cases each run one process and signal it at a known point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, sigint_as_python_sets_it

PLSTAR = shutil.which("plstar")
pytestmark = pytest.mark.skipif(
    PLSTAR is None, reason="the plstar console script is not on PATH (pip install -e .)"
)
ENV = os.environ | {"COLUMNS": "80", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--width", "8", "--depth", "2", "--hessian-outputs", "2"]
TRAIN = [*TINY, "--every", "2", "--kernel-samples", "4"]
RESULTS = ("metrics.jsonl", "config.json", "summary.json", "training.png")

SLEEPY_FACTORY = """
import os, pathlib, time, torch
def make():
    pathlib.Path(os.environ["PLSTAR_TEST_MARKER"]).touch()
    time.sleep(300)
    return torch.nn.Linear(64, 1)
"""
SLOW_MODEL = """
import os, pathlib, time, torch
class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 1)
    def forward(self, x):
        pathlib.Path(os.environ["PLSTAR_TEST_MARKER"]).touch()
        time.sleep(0.5)
        return self.linear(x)
def make():
    return Slow()
"""
FAILING_FACTORY = "def make():\n    raise RuntimeError('no weights here\\nsecond line')\n"


def _write_pt(path: Path, content: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saving a quantized tensor warns (TypedStorage)
        torch.save(content, path)


def _files(folder: Path) -> None:
    """Inputs shared by every case: data files good and hostile, model factories, an earlier
    run's results, a plain file where a folder is expected."""
    rng = np.random.default_rng(0)
    np.savez(folder / "f.npz", x=rng.normal(size=(12, 3)), y=rng.normal(size=12))
    np.savetxt(folder / "f.csv", rng.normal(size=(6, 3)), delimiter=",")
    zeros = torch.zeros(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated: still in old files
        quantized = torch.quantize_per_tensor(torch.ones(4, 3), 0.1, 0, torch.qint8)
    pt = {
        "sparse.pt": {"x": torch.eye(4).to_sparse(), "y": zeros},
        "meta.pt": {"x": torch.empty(4, 3, device="meta"), "y": zeros},
        "complex.pt": {"x": torch.ones(4, 3, dtype=torch.complex64), "y": zeros},
        "bool.pt": {"x": torch.ones(4, 3, dtype=torch.bool), "y": zeros},
        "quantized.pt": {"x": quantized, "y": zeros},
        "numpy.pt": {"x": np.ones((4, 3)), "y": np.zeros(4)},
    }
    for name, content in pt.items():
        _write_pt(folder / name, content)
    (folder / "garbage.pt").write_bytes(b"\x80\x04garbage that is no pickle")
    (folder / "sleepy.py").write_text(SLEEPY_FACTORY)
    (folder / "slow.py").write_text(SLOW_MODEL)
    (folder / "failing.py").write_text(FAILING_FACTORY)
    (folder / "a-file").write_text("not a folder\n")
    (folder / "a-folder").mkdir()
    earlier = folder / "earlier"
    earlier.mkdir()
    for name in RESULTS:
        (earlier / name).write_text(f"earlier run: {name}\n")


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _unwritable(folder: Path) -> Path | None:
    """A folder this process cannot create files in (none when root bypasses permissions and
    /sys is writable)."""
    locked = folder / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    return None


def _plstar(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert PLSTAR is not None
    return subprocess.run(
        [PLSTAR, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def assert_one_line(done: subprocess.CompletedProcess | tuple[int, str], code: int) -> str:
    """Exit ``code``, no traceback, exactly one non-empty line on stderr; that line."""
    returncode, stderr = done if isinstance(done, tuple) else (done.returncode, done.stderr)
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), stderr[-3000:]
    return lines[0]


# (arguments, words the one line must contain); paths are relative to the shared folder.
# fmt: off
REFUSALS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    # usage errors, found by the parser
    "dtype float16": (["analyze", "--dtype", "float16"], ("--dtype", "float16")),
    "unknown option": (["analyze", "--bogus"], ("--bogus",)),
    "train --n abc": (["train", "--n", "abc"], ("--n", "abc")),
    "missing value": (["train", "--samples"], ("--samples", "expected one argument")),
    "unknown command": (["frobnicate"], ("frobnicate",)),
    "samples -5 with data": (["analyze", "--data", "f.npz", "--n", "-5"], ("--samples", "-5")),
    "samples 0": (["analyze", "--samples", "0"], ("--samples",)),
    "every 0": (["train", "--every", "0"], ("--every",)),
    "steps 0": (["train", "--steps", "0"], ("--steps",)),
    "batch-size 0": (["train", "--method", "sgd", "--batch-size", "0"], ("--batch-size",)),
    "kernel-samples 0": (["train", "--kernel-samples", "0"], ("--kernel-samples",)),
    "lr -1": (["train", "--lr", "-1"], ("--lr",)),
    "lr nan": (["train", "--lr", "nan"], ("--lr",)),
    "eps 0": (["train", "--eps", "0"], ("--eps",)),
    "memory-budget 0": (["analyze", "--memory-budget", "0"], ("--memory-budget",)),
    "memory-budget 1e999": (["analyze", "--memory-budget", "1e999"], ("--memory-budget",)),
    "timeout 0": (["analyze", "--timeout", "0"], ("--timeout",)),
    "target-loss -1": (["analyze", "--target-loss", "-1"], ("--target-loss",)),
    "hessian-outputs -1": (["train", "--hessian-outputs", "-1"], ("--hessian-outputs",)),
    "seed -1": (["analyze", "--seed", "-1"], ("--seed",)),
    "width 0": (["analyze", "--width", "0"], ("--width",)),
    "seeds 0": (["reproduce", "--seeds", "0"], ("--seeds",)),
    "jobs 0": (["reproduce", "--jobs", "0"], ("--jobs",)),
    # combinations and sizes, found before any computation
    "only x": (["reproduce", "--only", "x"], ("--only",)),
    "samples above the file": (["analyze", "--data", "f.npz", "--samples", "50"], ("50", "12")),
    "samples above the digits": (["analyze", "--samples", "1798"], ("--samples", "1797")),
    "outputs with data": (["analyze", "--data", "f.npz", "--outputs", "10"], ("--outputs",)),
    "target without data": (["analyze", "--target", "y"], ("--target",)),
    "target with npz": (["analyze", "--data", "f.npz", "--target", "y"], ("--target",)),
    "batch-size with gd": (["train", "--batch-size", "4"], ("--batch-size", "sgd")),
    "batch-size above n": (["train", "--data", "f.npz", "--method", "sgd", "--batch-size", "13"],
                           ("--batch-size", "12")),
    # output paths, refused before any computation
    "json names a folder": (["analyze", "--json", "a-folder"], ("--json", "folder")),
    "json in a missing folder": (["analyze", "--json", "missing/a.json"], ("--json", "missing")),
    "json in a file": (["analyze", "--json", "a-file/a.json"], ("--json", "a-file")),
    "train out is a file": (["train", "--out", "a-file"], ("--out", "a-file")),
    "train out through a file": (["train", "--out", "a-file/run"], ("--out", "a-file")),
    "reproduce out is a file": (["reproduce", "--out", "a-file"], ("--out", "a-file")),
    # model and data files
    "model file missing": (["analyze", "--model", "nowhere.py:make"], ("nowhere.py",)),
    "model factory raises": (["analyze", "--model", "failing.py:make"], ("no weights here",)),
    "data file missing": (["analyze", "--data", "missing.csv"], ("missing.csv",)),
    **{
        f"pt {kind}": (["analyze", *TINY, "--data", f"{kind}.pt"], (f"{kind}.pt", reason))
        for kind, reason in [
            ("sparse", "sparse"), ("meta", "meta"), ("complex", "complex"), ("bool", "bool"),
            ("quantized", "quantized"), ("numpy", "objects other than tensors"),
            ("garbage", "torch.save"),
        ]
    },
    # refusals with --out on an earlier run's results: the folder must stay as it was
    "earlier: bad data": (["train", *TRAIN, "--data", "garbage.pt", "--out", "earlier"],
                          ("garbage.pt",)),
    "earlier: samples above the file": (["train", *TRAIN, "--data", "f.npz", "--samples", "99",
                                         "--out", "earlier"], ("--samples",)),
    "earlier: failing model": (["train", *TRAIN, "--model", "failing.py:make", "--out",
                                "earlier"], ("failing.py",)),
    "earlier: bad option": (["train", "--steps", "0", "--out", "earlier"], ("--steps",)),
}
# The failures the issue names, run through the installed command (each is a Python start-up);
# every case above also runs in-process, where it costs nothing.
INSTALLED = [
    "dtype float16", "unknown option", "train --n abc", "missing value", "samples -5 with data",
    "samples 0", "samples above the file", "outputs with data", "every 0", "steps 0",
    "batch-size 0", "kernel-samples 0", "lr -1", "eps 0", "memory-budget 0", "timeout 0",
    "json names a folder", "json in a missing folder", "train out is a file",
    "reproduce out is a file", "pt sparse", "pt meta", "pt complex", "pt quantized", "pt numpy",
    "earlier: bad data", "earlier: failing model",
]
# fmt: on


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile")
    _files(path)
    return path


@pytest.fixture(scope="module")
def refused(folder: Path) -> dict[str, subprocess.CompletedProcess]:
    """The issue's refusals through the installed command, a few at a time."""
    before = _snapshot(folder / "earlier")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_plstar, REFUSALS[name][0], folder) for name in INSTALLED}
        done = {name: future.result() for name, future in futures.items()}
    assert _snapshot(folder / "earlier") == before  # refusals touched nothing there
    return done


def _check_refusal(case: str, line: str) -> None:
    for words in REFUSALS[case][1]:
        assert words in line, line
    assert "weights_only" not in line


@pytest.mark.parametrize("case", INSTALLED)
def test_installed_command_refuses_in_one_line_with_exit_2(
    refused: dict[str, subprocess.CompletedProcess], case: str
) -> None:
    _check_refusal(case, assert_one_line(refused[case], 2))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_refusal_is_one_line_naming_the_problem_and_exit_2(
    folder: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(folder)
    before = _snapshot(folder / "earlier")
    code = run_cli(REFUSALS[case][0])
    _check_refusal(case, assert_one_line((code, capsys.readouterr().err), 2))
    assert _snapshot(folder / "earlier") == before


def test_refusals_leave_no_temporary_files(
    refused: dict[str, subprocess.CompletedProcess], folder: Path
) -> None:
    assert not list(folder.rglob("*.tmp")) and not list(folder.rglob(".plstar-probe-*"))
    assert not (folder / "missing").exists() and not (folder / "plstar-train").exists()


def test_unwritable_folders_are_refused_before_any_work(folder: Path) -> None:
    target = _unwritable(folder)
    if target is None:
        pytest.skip("every folder is writable here (root, and /sys is writable)")
    for args in (["analyze", "--json", str(target / "a.json")],
                 ["train", "--out", str(target / "run")],
                 ["reproduce", "--out", str(target / "run")]):  # fmt: skip
        line = assert_one_line(_plstar(args, folder), 2)
        assert str(target) in line and "cannot create files" in line


def test_bare_plstar_prints_the_help_and_exits_0(folder: Path) -> None:
    done = _plstar([], folder)
    assert done.returncode == 0 and done.stderr == ""
    assert "analyze" in done.stdout and "train" in done.stdout and "reproduce" in done.stdout


def test_command_help_lists_every_option_with_its_help(folder: Path) -> None:
    done = _plstar(["train", "--help"], folder)
    assert done.returncode == 0 and done.stderr == ""
    for words in ("--samples", "--every", "Steps between kernel", "--kernel-samples", "--out"):
        assert words in done.stdout


# --- Ctrl-C ------------------------------------------------------------------------------------


def _start(args: list[str], cwd: Path, marker: Path | None = None) -> subprocess.Popen:
    """The installed command in a child whose SIGINT is Python's (even when the test runner was
    started with SIGINT ignored, as shell background jobs are)."""
    assert PLSTAR is not None
    env = ENV | ({"PLSTAR_TEST_MARKER": str(marker)} if marker is not None else {})
    return subprocess.Popen(
        [PLSTAR, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=sigint_as_python_sets_it,
    )  # fmt: skip


def _wait_until(child: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            raise AssertionError(
                f"never ready; exit {child.returncode}: {out[-1500:]}{err[-1500:]}"
            )
        time.sleep(0.02)


def _interrupt(child: subprocess.Popen) -> tuple[int, str, str]:
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=240)
    return child.returncode, out, err


def _lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("command", ["analyze", "train"])
def test_ctrl_c_while_the_model_factory_runs(folder: Path, tmp_path: Path, command: str) -> None:
    marker, out = tmp_path / "factory-started", tmp_path / "earlier"
    shutil.copytree(folder / "earlier", out)
    before = _snapshot(out)
    target = ["--out", str(out)] if command == "train" else ["--json", str(tmp_path / "a.json")]
    child = _start([command, *TINY, "--model", str(folder / "sleepy.py") + ":make", *target],
                   tmp_path, marker)  # fmt: skip
    _wait_until(child, marker.exists)
    code, _, err = _interrupt(child)
    line = assert_one_line((code, err), 130)
    assert "interrupted" in line and "nothing was written" in line
    assert _snapshot(out) == before and not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_ctrl_c_while_the_command_starts_up(tmp_path: Path, delay: float) -> None:
    """Within the first second torch, numpy and scipy are still loading; wherever the Ctrl-C lands
    after Python's own start-up, the outcome must be the same: one line, 130, nothing written
    (a KeyboardInterrupt inside numpy's import once ended in a RecursionError)."""
    json_path = tmp_path / "a.json"
    child = _start(["analyze", *TINY, "--json", str(json_path)], tmp_path)
    time.sleep(delay)
    code, _, err = _interrupt(child)
    line = assert_one_line((code, err), 130)
    assert "interrupted: nothing was written" in line and not json_path.exists()


def test_ctrl_c_during_the_measurements_of_analyze(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "forward-called"
    json_path = tmp_path / "a.json"
    child = _start(["analyze", *TINY, "--model", str(folder / "slow.py") + ":make", "--json",
                    str(json_path)], tmp_path, marker)  # fmt: skip
    _wait_until(child, marker.exists)
    code, _, err = _interrupt(child)
    line = assert_one_line((code, err), 130)
    assert "interrupted: nothing was written" in line and not json_path.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def _training(tmp_path: Path, folder: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "run"
    shutil.copytree(folder / "earlier", out)
    child = _start(["train", *TRAIN, "--samples", "8", "--steps", "1000000", "--out", str(out)],
                   tmp_path)  # fmt: skip
    metrics = out / "metrics.jsonl"
    _wait_until(child, lambda: metrics.exists() and metrics.read_text().count("\n") >= 5)
    return child, out


def test_ctrl_c_during_training_keeps_every_step_and_says_which(
    folder: Path, tmp_path: Path
) -> None:
    child, out = _training(tmp_path, folder)
    code, _, err = _interrupt(child)
    line = assert_one_line((code, err), 130)
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(len(records)))
    assert f"steps 0–{len(records) - 1} kept in {out / 'metrics.jsonl'}" in line
    assert "summary.json and training.png written" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["result"]["steps"] in (len(records) - 1, len(records))
    assert json.loads((out / "config.json").read_text())["steps"] == 1000000
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))


def test_a_second_ctrl_c_while_the_summary_is_written(folder: Path, tmp_path: Path) -> None:
    child, out = _training(tmp_path, folder)
    child.send_signal(signal.SIGINT)
    # The earlier run's summary.json went when training started: this one is the new run's,
    # and training.png comes next.
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if (out / "summary.json").exists():
            break
        time.sleep(0.002)
    code, _, err = _interrupt(child)
    line = assert_one_line((code, err), 130)
    assert "interrupted" in line and f"kept in {out / 'metrics.jsonl'}" in line
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(len(records)))
    assert json.loads((out / "summary.json").read_text())["interrupted"]
    assert not list(out.glob(".*.tmp"))
    figure = out / "training.png"
    assert not figure.exists() or figure.read_bytes()[:4] == b"\x89PNG"
    assert ("training.png" in line) == figure.exists()


def test_ctrl_c_during_reproduce(tmp_path: Path) -> None:
    out = tmp_path / "reproduce"
    child = _start(["reproduce", "--quick", "--only", "1", "--out", str(out)], tmp_path)
    assert child.stdout is not None
    header = child.stdout.readline()
    assert "plstar reproduce" in header
    time.sleep(1.0)
    code, _, err = _interrupt(child)
    line = assert_one_line((code, err), 130)
    assert "interrupted" in line and str(out) in line
    assert not list(tmp_path.rglob("*.tmp"))
