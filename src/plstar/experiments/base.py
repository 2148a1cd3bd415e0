"""The contract every reproduced claim follows, so that one runner can resume, parallelise and report.

An experiment is a module of ``plstar.experiments`` with these names:

``NUMBER: int``, ``TITLE: str``, ``CLAIM: str``
    Its place in the paper's list, a short title, and the claim in one sentence.
``configurations(quick: bool, seeds: int) -> list[dict]``
    The independent units of work (one width and seed, one batch size, ...), each a JSON-safe dict
    with a ``"seed"`` entry. ``quick`` picks the CPU-minutes configuration run by the test suite.
``run_configuration(config: dict, progress: ProgressCallback | None) -> dict``
    Measures one configuration and returns JSON-safe raw numbers. Deterministic in ``config``: it
    seeds every generator it uses from ``config["seed"]`` and never reads global RNG state that it
    did not seed itself. Module-level, so a process pool can call it.
``summarize(runs: list[Run]) -> tuple[dict, list[Check]]``
    From all finished runs: the data the figures need (JSON-safe) and the named checks. A check is
    never loosened to pass: a claim that does not hold is reported as failing.
``figures(result: ExperimentResult) -> dict[str, Figure]``
    Named matplotlib figures (``matplotlib.figure.Figure`` on an Agg canvas; never ``pyplot``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """One named, measured claim: ``passed`` is the comparison of ``measured`` with ``expected``.

    ``control``: the check holds by construction (a rank count, a chain-rule identity, a bound
    proved to hold): it guards the measurement and must pass, but it is no evidence for the
    paper's claim, and reports count it apart.
    """

    name: str
    passed: bool
    measured: str
    expected: str
    control: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_range(
    name: str, value: float, low: float, high: float, digits: int = 3, control: bool = False
) -> Check:
    """``low ≤ value ≤ high`` (either end may be ±inf); a NaN value fails."""
    ends = [f"{v:.{digits}g}" if math.isfinite(v) else "" for v in (low, high)]
    expected = f"in [{ends[0]}, {ends[1]}]" if all(ends) else (
        f"≥ {ends[0]}" if ends[0] else f"≤ {ends[1]}"
    )  # fmt: skip
    passed = math.isfinite(value) and low <= value <= high
    return Check(name, passed, f"{value:.{digits}g}", expected, control)


def check_true(
    name: str, passed: bool, measured: str, expected: str, control: bool = False
) -> Check:
    """A check whose comparison the caller has made (e.g. "at every step")."""
    return Check(name, bool(passed), measured, expected, control)


@dataclass(frozen=True)
class Run:
    """One finished configuration: its config, its raw numbers and the seconds it took."""

    config: dict[str, Any]
    data: dict[str, Any]
    seconds: float


@dataclass
class ExperimentResult:
    """What the report shows for one experiment."""

    number: int
    name: str
    title: str
    claim: str
    data: dict[str, Any]
    checks: list[Check]
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def evidence(self) -> list[Check]:
        """The checks that are evidence for the claim (controls left out)."""
        return [c for c in self.checks if not c.control]

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number, "name": self.name, "title": self.title, "claim": self.claim,
            "passed": self.passed, "checks": [c.to_dict() for c in self.checks],
            "data": self.data, "seconds": self.seconds,
            "runs": [asdict(r) for r in self.runs],
        }  # fmt: skip
