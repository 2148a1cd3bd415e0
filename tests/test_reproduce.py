"""``plstar reproduce`` end to end on a tiny fake experiment: store, resume, pool, report, exit codes.

The fake experiment (written to a temporary folder and registered as number 99) logs every call of
``run_configuration`` to a file, so a test can count what was computed; it depends on no other
experiment module.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_cli as run
from conftest import sigint_as_python_sets_it
from matplotlib.image import imread

import plstar.experiments as registry
from plstar.experiments.base import Run
from plstar.experiments.report_files import PNG_SIGNATURE
from plstar.experiments.runner import RunStore, config_key, reproduce

FAKE = '''
"""A fake claim: value = 2·index + seed."""
import json, os, time
from plstar.experiments.base import check_range, check_true
from plstar.experiments.common import figure

NUMBER, TITLE, CLAIM = 99, "Fake claim", "Doubling doubles."

def configurations(quick, seeds):
    return [{"index": i, "seed": s, "log": os.environ["FAKE_LOG"],
             "sleep": float(os.environ.get("FAKE_SLEEP", "0")) if i > 0 else 0.0,
             "explode": i == int(os.environ.get("FAKE_EXPLODE", "-1"))}
            for i in range(4 if quick else 6) for s in range(seeds)]

def run_configuration(config, progress):
    with open(config["log"], "a") as log:
        log.write(json.dumps({"index": config["index"], "seed": config["seed"]}) + "\\n")
    if progress is not None:
        progress("fake work", 0, 1)
    time.sleep(config["sleep"])
    if config["explode"]:
        raise RuntimeError("the fake run exploded")
    return {"value": 2 * config["index"] + config["seed"], "pid": os.getpid()}

def summarize(runs):
    values = [r.data["value"] for r in runs]
    good = all(r.data["value"] == 2 * r.config["index"] + r.config["seed"] for r in runs)
    wanted = float(os.environ.get("FAKE_WANT", "0"))
    return {"values": values}, [
        check_true("values are doubled indices", good, str(values), "2·index + seed",
                   control=True),
        check_range("largest value", max(values), wanted, float("inf")),
    ]

def figures(result):
    fig, (ax,) = figure()
    ax.plot(result.data["values"], "o-")
    return {"values": fig}
'''

DRIVER = """
import sys
sys.path.insert(0, {folder!r})
import fake_claim
import plstar.experiments as registry
registry.EXPERIMENTS[99] = "fake_claim"
original = registry.load
registry.load = lambda number: fake_claim if number == 99 else original(number)
import plstar.cli.reproduce
from plstar.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Registers the fake experiment as number 99 in this process; returns its call log."""
    folder = tmp_path / "module"
    folder.mkdir()
    (folder / "fake_claim.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(folder))
    import importlib

    module = importlib.import_module("fake_claim")
    monkeypatch.setitem(registry.EXPERIMENTS, 99, "fake_claim")
    original = registry.load
    monkeypatch.setattr(registry, "load", lambda n: module if n == 99 else original(n))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_SLEEP", raising=False)
    monkeypatch.delenv("FAKE_EXPLODE", raising=False)
    monkeypatch.delenv("FAKE_WANT", raising=False)
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_config_key_is_a_stable_hash_of_the_canonical_json() -> None:
    assert config_key({"a": 1, "b": [2, 3]}) == config_key({"b": [2, 3], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})
    assert config_key({"seed": 0, "width": 32}) == "de2cebc25d247360"  # never changes across runs


def test_store_returns_only_the_run_of_the_same_config(tmp_path: Path, fake: Path) -> None:
    store = RunStore(tmp_path / "out")
    config = {"index": 1, "seed": 0}
    assert store.load(99, config) is None
    saved = store.save(99, Run(config, {"value": 2.5, "pair": (1, 2), "bad": math.inf}, 0.25))
    path = store.path(99, config)
    assert path.parent.name == "99-fake_claim" and path.stem == config_key(config)
    assert saved == Run(config, {"value": 2.5, "pair": [1, 2], "bad": math.inf}, 0.25)
    assert store.load(99, config) == saved
    assert store.load(99, {"index": 1, "seed": 1}) is None
    path.write_text('{"config": {"ind')  # a damaged file counts as not finished
    assert store.load(99, config) is None


def test_report_files_embed_and_write_nonblank_pngs(tmp_path: Path, fake: Path) -> None:
    out = tmp_path / "out"
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out)]) == 0
    assert len(calls(fake)) == 4
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 1 and "<img" in page and "Fake claim" in page
    assert 'src="figures/' not in page  # self-contained: no file references
    png = base64.b64decode(embedded[0])
    assert png.startswith(PNG_SIGNATURE) and imread(io.BytesIO(png)).var() > 0
    on_disk = out / "figures" / "99-fake_claim-values.png"
    assert on_disk.read_bytes() == png
    results = json.loads((out / "results.json").read_text())
    assert results["passed"] and not results["interrupted"]
    (experiment,) = results["experiments"]
    assert experiment["data"]["values"] == [0, 2, 4, 6]
    assert [c["passed"] for c in experiment["checks"]] == [True, True]
    assert results["meta"]["seeds"] == 1 and "torch" in results["meta"]["versions"]
    markdown = (out / "report.md").read_text()
    assert "figures/99-fake_claim-values.png" in markdown and "largest value" in markdown
    # a control is labelled as one and not counted as evidence for the claim
    assert [c["control"] for c in experiment["checks"]] == [True, False]
    assert "| values are doubled indices | control |" in markdown
    assert "| largest value | evidence |" in markdown
    assert "all 2 checks of 1 experiments (1 evidence for the claims, 1 controls)" in markdown


def test_resume_skips_finished_runs_and_a_plain_rerun_recomputes(
    tmp_path: Path, fake: Path
) -> None:
    out = tmp_path / "out"
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out)]) == 0
    fresh = json.loads((out / "results.json").read_text())["experiments"]
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out), "--resume"]) == 0
    assert len(calls(fake)) == 4
    results = json.loads((out / "results.json").read_text())
    assert results["runs_reused"] == 4 and results["runs_computed"] == 0
    resumed = results["experiments"]
    for entry in (*fresh, *resumed):
        entry.pop("seconds")
        for stored in entry["runs"]:
            stored.pop("seconds")
    assert resumed == fresh
    # Other seeds are other configurations: only the new ones run.
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out), "--resume",
                "--seeds", "2"]) == 0  # fmt: skip
    assert len(calls(fake)) == 8
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out)]) == 0
    assert len(calls(fake)) == 12


def test_two_jobs_run_in_other_processes_with_the_same_numbers(tmp_path: Path, fake: Path) -> None:
    one = reproduce([99], out=tmp_path / "one", quick=True, seeds=2, jobs=1)
    two = reproduce([99], out=tmp_path / "two", quick=True, seeds=2, jobs=2)
    assert one.passed and two.passed and two.computed == 8
    assert [r.data["value"] for r in two.results[0].runs] == [
        r.data["value"] for r in one.results[0].runs
    ]
    pids = {r.data["pid"] for r in two.results[0].runs}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_failing_check_exits_1_after_writing_the_report(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_WANT", "100")
    out = tmp_path / "out"
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out)]) == 1
    assert (
        "FAILED" in capsys.readouterr().err and "largest value" in (out / "report.md").read_text()
    )
    assert not json.loads((out / "results.json").read_text())["passed"]


def test_a_run_that_raises_is_reported_and_the_others_finish(
    tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_EXPLODE", "2")
    out = tmp_path / "out"
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out)]) == 1
    assert "the fake run exploded" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["incomplete"] == {"99": {"finished": 3, "total": 4}}
    assert len(list((out / "runs" / "99-fake_claim").glob("*.json"))) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "42"], "unknown experiment"),
        (["--only", "one"], "--only"),
        (["--seeds", "0"], "seeds"),
        (["--jobs", "0"], "jobs"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert run(["reproduce", "--quick", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_exits_130_keeps_finished_runs_and_resume_skips_them(
    tmp_path: Path, fake: Path, jobs: int
) -> None:
    """Config 0 finishes at once, the others sleep; SIGINT once run 0 is on disk, then --resume."""
    out, folder = tmp_path / "out", tmp_path / "module"
    command = [sys.executable, "-c", DRIVER.format(folder=str(folder)), "reproduce", "--quick",
               "--only", "99", "--out", str(out), "--jobs", str(jobs)]  # fmt: skip
    env = os.environ | {"FAKE_SLEEP": "60"}
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=sigint_as_python_sets_it,
    )  # fmt: skip
    runs = out / "runs" / "99-fake_claim"
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if runs.is_dir() and any(runs.glob("*.json")):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no run was stored: {child.communicate()[0][-2000:]}")
    time.sleep(0.5)  # let the sleeping runs start
    child.send_signal(signal.SIGINT)
    output = child.communicate(timeout=60)[0]
    assert child.returncode == 130, output[-2000:]
    assert "Traceback" not in output and "interrupted" in output
    assert len(list(runs.glob("*.json"))) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] and results["incomplete"] == {"99": {"finished": 1, "total": 4}}
    assert (out / "report.html").exists()
    assert [c["index"] for c in calls(fake)].count(0) == 1
    assert run(["reproduce", "--quick", "--only", "99", "--out", str(out), "--resume"]) == 0
    indices = [c["index"] for c in calls(fake)]
    assert indices.count(0) == 1 and {1, 2, 3} <= set(indices)
