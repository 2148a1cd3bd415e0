"""``plstar certify``: the bracket of the PL* region against the GD ball, for one model and across
widths (a user factory called with the width), its files, and its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli as run

FACTORY = """
import torch
from plstar.models import mlp

def net(width):
    return mlp(64, width, 2, 1, dtype=torch.float64)

def fixed():
    return mlp(64, 8, 2, 1, dtype=torch.float64)
"""


def test_one_model_writes_the_bracket_a_verdict_and_a_figure(tmp_path: Path, capsys) -> None:
    out, figure = tmp_path / "c.json", tmp_path / "c.png"
    code = run(["certify", "-n", "12", "--width", "32", "--depth", "2", "--directions", "1",
                "--json", str(out), "--figure", str(figure)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["results"][0]
    assert result["mu"] == pytest.approx(result["lambda0"] / 2)
    assert result["radius"] <= result["radius_ball"]
    upper = math.inf if isinstance(result["upper"], str) else result["upper"]
    assert 0 <= result["lower"] <= upper
    names = [c["name"] for c in result["region"]["crossings"]]
    assert names == ["adversarial", "toward zero", "gradient", "random 1"]
    assert result["verdict"] and figure.read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "PL* region ≤ (nearest crossing)" in printed and "done in" in printed


def test_widths_call_the_factory_with_each_width_and_fit_the_bracket(tmp_path: Path) -> None:
    factory = tmp_path / "nets.py"
    factory.write_text(FACTORY)
    out = tmp_path / "w.json"
    code = run(["certify", "-n", "8", "--model", f"{factory}:net", "--widths", "16,64,256",
                "--directions", "0", "--json", str(out), "--figure", str(tmp_path / "w.png")])  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert [r["width"] for r in results] == [16, 64, 256]
    assert [r["m"] for r in results] == [64 * w + 2 * w + 1 for w in (16, 64, 256)]
    upper = payload["fit"]["upper"]
    assert upper is not None and upper["slope"] > 0 and upper["width"] > 0
    assert upper["slope_error"] is not None and upper["width_range"] is not None
    assert payload["fit"]["verdict"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--widths", "64,32"], "increasing widths"),
        (["--widths", "64"], "at least two"),
        (["--model", "{factory}:fixed", "--widths", "8,16"], "must take 1 argument(s)"),
    ],
)
def test_refusals_exit_2_with_one_line(tmp_path: Path, capsys, arguments, message) -> None:
    factory = tmp_path / "nets.py"
    factory.write_text(FACTORY)
    arguments = [a.replace("{factory}", str(factory)) for a in arguments]
    assert run(["certify", "-n", "4", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_keeps_the_widths_already_measured(tmp_path: Path, monkeypatch, capsys) -> None:
    from plstar.cli import certify

    real, calls = certify._certify_one, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(certify, "_certify_one", interrupted_second)
    out = tmp_path / "partial.json"
    code = run(["certify", "-n", "6", "--depth", "2", "--widths", "8,16", "--directions", "0",
                "--json", str(out)])  # fmt: skip
    assert code == 130
    assert "1 of 2 widths were measured; they were written" in capsys.readouterr().err
    results = json.loads(out.read_text())["results"]
    assert [r["width"] for r in results] == [8]
