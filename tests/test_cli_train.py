"""``plstar train`` end to end: its four files, clean Ctrl-C, a killed run, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli as run
from conftest import sigint_as_python_sets_it

SMALL = [
    "--samples",
    "16",
    "--width",
    "32",
    "--depth",
    "2",
    "--every",
    "4",
    "--kernel-samples",
    "8",
]
RESULTS = ("metrics.jsonl", "config.json", "summary.json", "training.png")


def lines_of(path: Path) -> list[dict]:
    """Every line must be complete JSON: the file is read as a reader after a crash would."""
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_train_writes_metrics_config_summary_and_figure(tmp_path: Path, capsys) -> None:
    assert run(["train", *SMALL, "--steps", "12", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "plstar train" in printed and "PL*_ε" in printed
    records = lines_of(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(13))
    assert [r["step"] for r in records if r["lambda_min"] is not None] == [0, 4, 8, 12]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["interrupted"] and summary["result"]["steps"] == 12
    assert summary["result"]["final_loss"] == pytest.approx(records[-1]["loss"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "gd" and config["n"] == 16 and "torch" in config["versions"]
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_sgd_reports_step_rate_and_saturation_batch_size(tmp_path: Path) -> None:
    args = ["train", *SMALL, "--method", "sgd", "--batch-size", "4", "--steps", "5"]
    assert run([*args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "summary.json").read_text())["result"]
    assert result["method"] == "sgd" and result["batch_size"] == 4
    assert result["per_sample_smoothness"] > 0 and result["saturation_batch_size"] > 1
    assert 0 < result["rate"] < 1
    assert len(lines_of(tmp_path / "metrics.jsonl")) == 6


def start(out: Path) -> subprocess.Popen:
    """A long run in a child process that stops on SIGINT (:func:`sigint_as_python_sets_it`)."""
    command = [
        sys.executable,
        "-m",
        "plstar",
        "train",
        *SMALL,
        "--steps",
        "1000000",
        "--out",
        str(out),
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=sigint_as_python_sets_it,
    )  # fmt: skip


def wait_for_lines(child: subprocess.Popen, path: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not write {count} lines: {child.communicate()[0][-2000:]}")


def test_interrupted_run_leaves_valid_metrics_and_a_summary(tmp_path: Path) -> None:
    child = start(tmp_path)
    wait_for_lines(child, tmp_path / "metrics.jsonl", 30)
    child.send_signal(signal.SIGINT)
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 130, output[-2000:]
    assert "Traceback" not in output and "interrupted" in output
    records = lines_of(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(len(records))) and len(records) >= 30
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and summary["result"]["interrupted"]
    assert summary["result"]["steps"] in (len(records) - 1, len(records))
    assert (tmp_path / "training.png").exists()


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_killed_run_leaves_every_written_line_parseable(tmp_path: Path) -> None:
    child = start(tmp_path)
    wait_for_lines(child, tmp_path / "metrics.jsonl", 30)
    child.kill()
    child.communicate(timeout=60)
    records = lines_of(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(len(records))) and len(records) >= 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "fast"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--steps", "0"], "--steps"),
        (["--method", "sgd", "--batch-size", "0"], "--batch-size"),
        (["--method", "sgd", "--batch-size", "17"], "--batch-size 17 exceeds the n = 16"),
        (["--every", "0"], "--every"),
        (["--eps", "-1"], "--eps"),
    ],
)
def test_bad_train_options_exit_2_with_a_message(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    assert run(["train", *SMALL, *args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def earlier_results(folder: Path) -> dict[str, bytes]:
    """An earlier run's four files (placeholders) in ``folder``; their contents."""
    folder.mkdir(exist_ok=True)
    for name in RESULTS:
        (folder / name).write_text(f"earlier run: {name}\n")
    return {name: (folder / name).read_bytes() for name in RESULTS}


def test_a_new_run_replaces_every_file_of_an_earlier_one(tmp_path: Path, capsys) -> None:
    earlier_results(tmp_path)
    assert run(["train", *SMALL, "--steps", "3", "--out", str(tmp_path)]) == 0
    assert not any(b"earlier run" in (tmp_path / name).read_bytes() for name in RESULTS)
    assert [r["step"] for r in lines_of(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert "training.png" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["w0", "summary", "figure"])
def test_ctrl_c_before_the_first_step_or_while_writing_keeps_the_folder_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, where: str
) -> None:
    """Ctrl-C during w₀'s measurements leaves an earlier run untouched; a (second) Ctrl-C while
    the summary or the figure is written leaves this run's files only, and says which."""
    import plstar
    from plstar.cli import train as command

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "w0":
        monkeypatch.setattr(plstar, "Monitor", stop)
    elif where == "summary":
        original = command.report.write_json
        monkeypatch.setattr(command.report, "write_json",
                            lambda path, payload: (stop if Path(path).name == "summary.json"
                                                   else original)(path, payload))  # fmt: skip
    else:
        monkeypatch.setattr(plstar.Monitor, "plot", stop)
    before = earlier_results(tmp_path)
    assert run(["train", *SMALL, "--steps", "3", "--out", str(tmp_path)]) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert "interrupted" in line
    on_disk = {p.name for p in tmp_path.iterdir()}
    if where == "w0":
        assert "nothing was written" in line and "untouched" in line
        assert {name: (tmp_path / name).read_bytes() for name in RESULTS} == before
        return
    assert f"steps 0–3 kept in {tmp_path / 'metrics.jsonl'}" in line
    assert ("summary.json written" in line) == (where == "figure")
    assert "training.png written" not in line
    expected = {"metrics.jsonl", "config.json"} | ({"summary.json"} if where == "figure" else set())
    assert on_disk == expected  # no earlier file, no temporary file
    assert not any(b"earlier run" in (tmp_path / name).read_bytes() for name in on_disk)


def test_a_figure_that_cannot_be_written_is_not_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import plstar

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plstar.Monitor, "plot", fail)
    assert run(["train", *SMALL, "--steps", "2", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert "No space left on device" in line
    assert "training.png" not in captured.out and not (tmp_path / "training.png").exists()


def test_an_interpolating_start_is_a_complete_zero_step_run(tmp_path: Path, capsys) -> None:
    """L(w₀) = 0 is a global minimum: exit 0, the verdict says so, and the folder holds one whole
    run of 0 steps (not a half-written one)."""
    import numpy as np

    source = tmp_path / "zero.py"
    source.write_text(
        "import torch\n"
        "def make():\n"
        "    net = torch.nn.Linear(3, 1)\n"
        "    torch.nn.init.zeros_(net.weight)\n"
        "    torch.nn.init.zeros_(net.bias)\n"
        "    return net\n"
    )
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "zero.npz", x=rng.normal(size=(6, 3)), y=np.zeros(6))
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "zero.npz"), "--model", f"{source}:make",
            "--steps", "5", "--every", "1", "--out", str(out)]  # fmt: skip
    assert run(args) == 0
    assert "global minimum" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULTS)
    assert [r["step"] for r in lines_of(out / "metrics.jsonl")] == [0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"]["steps"] == 0 and not summary["interrupted"]


def test_ctrl_c_while_a_metrics_line_is_written_keeps_it_once(tmp_path: Path) -> None:
    """A Ctrl-C that lands between writing a line and counting it used to leave the line pending,
    so the summary wrote it again (a duplicated step, seen once in a full run)."""
    from plstar.cli.train import _RunFolder

    folder = _RunFolder(tmp_path, {"command": "test"})
    folder.pending = ['{"step": 0}\n', '{"step": 1}\n']
    folder.start()
    assert folder.handle is not None
    real_write = folder.handle.write

    def interrupted_write(text: str) -> int:
        written = real_write(text)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before the line is counted
        return written

    folder.handle.write = interrupted_write  # type: ignore[method-assign]
    folder.pending = ['{"step": 2}\n', '{"step": 3}\n']
    with pytest.raises(KeyboardInterrupt):
        folder.start()
    assert folder.lines == 3 and folder.pending == ['{"step": 3}\n']
    folder.handle.write = real_write  # type: ignore[method-assign]
    folder.start()
    folder.close()
    steps = [r["step"] for r in lines_of(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]
