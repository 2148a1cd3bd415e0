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

SMALL = ["--n", "16", "--width", "32", "--depth", "2", "--every", "4", "--kernel-samples", "8"]


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
    """A long run in a child process (SIGINT is not ignored there, unlike shell background jobs)."""
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
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
        (["--lr", "-0.1"], "lr"),
        (["--steps", "0"], "steps"),
        (["--method", "sgd", "--batch-size", "0"], "batch_size"),
        (["--every", "0"], "every"),
    ],
)
def test_bad_train_options_exit_2_with_a_message(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    assert run(["train", *SMALL, *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
