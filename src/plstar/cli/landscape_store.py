"""The run folder of ``plstar landscape``: what is computed is kept, so ``--resume`` goes on.

Two files, each replaced atomically (temporary file, then rename: an interruption leaves the old
file whole): ``directions.npz`` (the direction vectors and the Lanczos warm start, written once,
before any point) and ``points.json`` (the configuration, its key, and every point computed so far,
rewritten after each batch). A resumed run reads both back when the configuration is the same —
options, and digests of w, x, y and the second point — and recomputes nothing stored; another
configuration is refused, naming the options that differ.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from plstar.directions import Direction
from plstar.errors import PlstarInputError
from plstar.experiments.runner import config_key, plain
from plstar.landscape_results import KernelPoint, LossPoint, point_key
from plstar.report import write_bytes, write_json

POINTS = "points.json"
VECTORS = "directions.npz"


def digest(*tensors: Tensor) -> str:
    """16 hex digits of SHA-256 over the tensors' float64 (or int64) values on the host."""
    found = hashlib.sha256()
    for tensor in tensors:
        wanted = torch.float64 if tensor.is_floating_point() else torch.int64
        found.update(tensor.detach().to("cpu", wanted).contiguous().numpy().tobytes())
    return found.hexdigest()[:16]


class LandscapeStore:
    """Points of one configuration in ``folder`` (module docstring)."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder, self.config, self.key = folder, config, config_key(config)
        self.points: dict[str, dict[str, Any]] = {"loss": {}, "kernel": {}}
        self.labels: list[dict[str, str]] = []

    def resume(self, device: torch.device) -> tuple[list[Direction], Tensor | None] | None:
        """The stored directions and warm start, with the stored points loaded into this store;
        None when nothing is stored. PlstarInputError when the folder holds another
        configuration or damaged files."""
        path = self.folder / POINTS
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            found = stored["key"], stored["config"], stored["directions"]
            with np.load(self.folder / VECTORS, allow_pickle=False) as arrays:
                vectors = {name: torch.from_numpy(arrays[name]).to(device) for name in arrays}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PlstarInputError(
                f"--resume: cannot read what is stored in {self.folder} ({error}); run without "
                "--resume to start again"
            ) from None
        key, config, labels = found
        if key != self.key:
            ours = plain(self.config)
            differ = sorted(k for k in {*config, *ours} if config.get(k) != ours.get(k))
            raise PlstarInputError(
                f"--resume: {self.folder} holds points of another configuration (different "
                f"{', '.join(differ) or 'key'}); run without --resume to replace them, or choose "
                "another --out"
            )
        self.points = {kind: dict(stored.get(kind, {})) for kind in ("loss", "kernel")}
        self.labels = labels
        directions = [Direction(d["kind"], d["label"], vectors[f"direction{i}"], d["description"])
                      for i, d in enumerate(labels)]  # fmt: skip
        return directions, vectors.get("hessian_start")

    def start(self, directions: list[Direction], hessian_start: Tensor | None) -> None:
        """Write the vectors, then an empty points file: a fresh run replaces what was there."""
        arrays = {
            f"direction{i}": d.vector.detach().cpu().numpy() for i, d in enumerate(directions)
        }
        if hessian_start is not None:
            arrays["hessian_start"] = hessian_start.detach().cpu().numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(self.folder / VECTORS, buffer.getvalue())
        self.labels = [{"kind": d.kind, "label": d.label, "description": d.description}
                       for d in directions]  # fmt: skip
        self.points = {"loss": {}, "kernel": {}}
        self._write()

    def add(self, kind: str, points: list[LossPoint | KernelPoint]) -> None:
        """Keep new points (``kind`` "loss" or "kernel") and rewrite the points file."""
        self.points[kind].update({point_key(p.index): asdict(p) for p in points})
        self._write()

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(points) for kind, points in self.points.items()}

    def _write(self) -> None:
        # Not json_safe: NaN is written as the NaN that json reads back as a float.
        write_json(self.folder / POINTS, {
            "key": self.key, "config": self.config, "directions": self.labels, **self.points,
        })  # fmt: skip
