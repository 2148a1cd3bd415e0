"""The Monitor at a trainer's step, its TensorBoard log, and the Lightning and Hugging Face callbacks.

The callbacks are run inside real ``fit``/``train`` calls on tiny float64 models; what the
frameworks logged is read back with their own readers (CSV, tensorboard's EventAccumulator,
``state.log_history``) and compared with the Monitor's records, and the records' L and ρ with a
hand computation by autograd at the final parameters.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import flat_params
from conftest import run_cli as run
from torch import Tensor, nn

from plstar.errors import PlstarInputError
from plstar.integrations.common import WatchedRun, eval_mode_while_measuring, pick_module
from plstar.models import mlp
from plstar.monitor import LOGGED_FIELDS, Monitor, Record

DEFAULT_DTYPE = torch.float64


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models: one intra-op thread is fastest, and on a shared 2-core machine two OpenMP
    threads are pathologically slow (20× here for the BERT below; docs/training.md)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def problem(n: int = 8, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    return mlp(3, 16, 2, 2, generator_seed=seed, dtype=torch.float64), x, y


def descend(model: nn.Module, x: Tensor, y: Tensor, steps: int = 1) -> None:
    """Plain GD steps on the summed square loss, outside any plstar code."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum()).backward()
        optimizer.step()


def loss_and_ratio(model: nn.Module, x: Tensor, y: Tensor, pick: Callable = lambda o: o) -> tuple:
    """Oracle: L = ½‖F − y‖² (summed) and ρ = ‖∇L‖²/(2L) by autograd through the module itself."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = pick(model(x)).reshape(y.shape[0], -1)
        loss = 0.5 * ((out - y.reshape(out.shape)) ** 2).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    squared = sum(float((g.double() ** 2).sum()) for g in grads)
    value = float(loss.detach())
    return value, squared / (2 * value)


def modes(module: nn.Module) -> list[bool]:
    return [sub.training for sub in module.modules()]


def measured_steps(history: list[Record]) -> list[int]:
    return [r.step for r in history if r.lambda_min is not None]


def same_scalars(logged: dict[str, Any], record: Record) -> None:
    """Every logged plstar value equals the record's, and nothing else is logged under plstar/."""
    plstar = {k: v for k, v in logged.items() if k.startswith("plstar/")}
    assert plstar == record.scalars()
    measured = record.lambda_min is not None
    assert len(plstar) == (8 if measured else 4)


# ---------------------------------------------------------------- Monitor.step(at_step=...)


def test_default_steps_equal_explicit_consecutive_steps() -> None:
    histories = []
    for explicit in (False, True):
        model, x, y = problem()
        monitor = Monitor(model, x, y, every=2, sharpness_iterations=3)
        for t in range(1, 6):
            descend(model, x, y)
            monitor.step(at_step=t) if explicit else monitor.step()
        histories.append(monitor.history)
    fields = (
        "step",
        "loss",
        "pl_ratio",
        "distance",
        "envelope",
        "lambda_min",
        "drift",
        "sharpness",
    )
    for implicit, explicit in zip(*histories, strict=True):
        assert [getattr(implicit, f) for f in fields] == [getattr(explicit, f) for f in fields]
    assert measured_steps(histories[0]) == [0, 2, 4]


def test_at_step_sets_the_envelope_and_measures_when_a_multiple_is_crossed() -> None:
    model, x, y = problem(seed=1)
    monitor = Monitor(model, x, y, every=5, sharpness=False)
    loss0 = monitor.reference.loss0
    for t in (3, 7, 8, 12, 20, 21):
        descend(model, x, y)
        record = monitor.step(at_step=t)
        assert record.step == t
        assert record.envelope == pytest.approx(loss0 * monitor.rate**t, rel=1e-12)
    # 7 crosses 5, 12 crosses 10, 20 crosses 15 and 20; 3, 8 and 21 cross none
    assert measured_steps(monitor.history) == [0, 7, 12, 20]
    loss, ratio = loss_and_ratio(model, x, y)
    assert monitor.history[-1].loss == pytest.approx(loss, rel=1e-12)
    assert monitor.history[-1].pl_ratio == pytest.approx(ratio, rel=1e-10)


def test_at_step_must_be_an_integer_after_the_last_record() -> None:
    model, x, y = problem(seed=2)
    monitor = Monitor(model, x, y, sharpness=False)
    monitor.step(at_step=4)
    for bad in (0, 4, -1, 5.0, True, "6"):
        with pytest.raises(PlstarInputError, match="at_step"):
            monitor.step(at_step=bad)  # type: ignore[arg-type]
    assert [r.step for r in monitor.history] == [0, 4]


# ---------------------------------------------------------------- TensorBoard


def read_events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def assert_events_match(events: Any, history: list[Record]) -> None:
    """Each plstar/<field> series is the records' (TensorBoard stores float32)."""
    for name in LOGGED_FIELDS:
        expected = [(r.step, getattr(r, name)) for r in history if getattr(r, name) is not None]
        found = [(e.step, e.value) for e in events.Scalars(f"plstar/{name}")]
        assert found == [(s, float(np.float32(v))) for s, v in expected], name


def test_monitor_writes_every_record_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    model, x, y = problem(seed=3)
    monitor = Monitor(model, x, y, every=2, sharpness_iterations=2, tensorboard=tmp_path / "tb")
    for t in (1, 2, 5):
        descend(model, x, y)
        monitor.step(at_step=t)
    monitor.close()
    monitor.close()  # idempotent
    descend(model, x, y)
    monitor.step(at_step=6)  # after a close: on into a new event file, with its own figure
    monitor.close()
    events = read_events(tmp_path / "tb")
    assert_events_match(events, monitor.history)
    images = events.Images("plstar/training")
    assert [image.step for image in images] == [5, 6]
    assert all(image.encoded_image_string[:4] == b"\x89PNG" for image in images)


def test_monitor_writes_to_a_writer_it_does_not_close(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    model, x, y = problem(seed=4)
    monitor = Monitor(model, x, y, sharpness=False, tensorboard=writer)
    monitor.step()
    monitor.close()
    writer.add_scalar("user/own", 1.5, global_step=1)  # still open: the user's writer
    writer.close()
    events = read_events(tmp_path)
    assert [e.step for e in events.Scalars("plstar/loss")] == [0, 1]
    assert [e.value for e in events.Scalars("user/own")] == [1.5]


def test_tensorboard_refusals_come_before_any_measurement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = problem(seed=5)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(PlstarInputError, match="is a file"):
        Monitor(model, x, y, tensorboard=afile)
    with pytest.raises(PlstarInputError, match="SummaryWriter"):
        Monitor(model, x, y, tensorboard=3)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(PlstarInputError, match=r'pip install "plstar\[tensorboard\]"'):
        Monitor(model, x, y, tensorboard=tmp_path)


def test_cli_train_writes_tensorboard_events(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorboard")
    small = ["--samples", "12", "--width", "16", "--depth", "2", "--every", "2",
             "--kernel-samples", "6"]  # fmt: skip
    board = tmp_path / "board"
    assert run(["train", *small, "--steps", "4", "--out", str(tmp_path / "out"),
                "--tensorboard", str(board)]) == 0  # fmt: skip
    assert f"tensorboard --logdir {board}" in capsys.readouterr().out
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    history = [Record(**json.loads(line)) for line in lines]
    events = read_events(board)
    assert_events_match(events, history)
    assert [e.step for e in events.Images("plstar/training")] == [4]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tensorboard"] == str(board)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert run(["train", *small, "--out", str(tmp_path / "o2"), "--tensorboard", str(afile)]) == 2
    assert "--tensorboard" in capsys.readouterr().err and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------- shared callback part


def test_watched_run_picks_the_module_and_refuses_bad_options() -> None:
    outer = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 1)))
    assert pick_module(outer, None) is outer
    assert pick_module(outer, "1.1") is outer[1][1]
    assert pick_module(outer, lambda m: m[0]) is outer[0]
    with pytest.raises(PlstarInputError, match="no submodule"):
        pick_module(outer, "head")
    with pytest.raises(PlstarInputError, match=r"nn\.Module"):
        pick_module(outer, lambda m: 3)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    with pytest.raises(PlstarInputError, match="unknown Monitor option"):
        WatchedRun(x, y, every_n_steps=2, monitor_options={"evry": 3})
    with pytest.raises(PlstarInputError, match="every_n_steps"):
        WatchedRun(x, y, every_n_steps=0)


def test_watched_run_records_once_per_crossing_and_restores_modes() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    model[0].eval()  # a frozen part the user keeps in eval mode
    before = modes(model)
    watched = WatchedRun(
        torch.randn(6, 3), torch.randn(6, 1), every_n_steps=3, monitor_options={"sharpness": False}
    )
    watched.start(model, global_step=10)  # a resumed trainer: records count from here
    hook_steps = [11, 12, 13, 13, 14, 16, 16, 17, 23]  # a step seen twice: gradient accumulation
    recorded = [t for t in hook_steps if watched.due(t) and watched.record(t)]
    assert recorded == [13, 16, 23]
    assert [r.step for r in watched.monitor.history] == [0, 3, 6, 13]
    assert modes(model) == before
    with pytest.raises(RuntimeError), eval_mode_while_measuring(model):
        raise RuntimeError
    assert modes(model) == before


# ---------------------------------------------------------------- Lightning


def lightning_module() -> Any:
    import lightning.pytorch as pl

    class Regressor(pl.LightningModule):
        """Dropout, so that train mode matters and the global random state is used."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 2))
            self.losses: list[float] = []
            self.modes: list[list[bool]] = []

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.losses.append(float(loss.detach()))
            self.modes.append(modes(self))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Regressor()


def lightning_fit(root: Path, callbacks: list) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    pl.seed_everything(0, verbose=False)
    module = lightning_module()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    trainer = pl.Trainer(
        max_steps=6, precision="64-true", accelerator="cpu", log_every_n_steps=1,
        logger=[CSVLogger(root / "csv"), TensorBoardLogger(root / "tb")], callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer, module


def test_lightning_callback_logs_the_monitor_records(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    from plstar.integrations.lightning import PLStarCallback

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
    callback = PLStarCallback(x, y, every_n_steps=2, module="net", every=4, sharpness_iterations=2)
    trainer, module = lightning_fit(tmp_path / "with", [callback])
    history = callback.monitor.history
    assert [r.step for r in history] == [0, 2, 4, 6] and measured_steps(history) == [0, 4]
    # The records are the monitored subsample's square loss and ρ at the final parameters.
    with eval_mode_while_measuring(module):
        loss, ratio = loss_and_ratio(module, x, y)
    assert history[-1].loss == pytest.approx(loss, rel=1e-12)
    assert history[-1].pl_ratio == pytest.approx(ratio, rel=1e-10)
    # CSV: one plstar row per record at its step, with exactly the record's values; the user's
    # train_loss rows are the losses its training_step computed, untouched.
    rows = list(csv.DictReader((Path(trainer.loggers[0].log_dir) / "metrics.csv").open()))
    logged = [
        {k: float(v) for k, v in row.items() if k.startswith("plstar/") and v} for row in rows
    ]
    plstar_rows = [
        (int(row["step"]), values) for row, values in zip(rows, logged, strict=True) if values
    ]
    assert [step for step, _ in plstar_rows] == [r.step for r in history]
    for (_, values), record in zip(plstar_rows, history, strict=True):
        same_scalars(values, record)
    user = [float(row["train_loss"]) for row in rows if row["train_loss"]]
    assert user == pytest.approx(module.losses, rel=1e-12) and len(user) == 6
    assert_events_match(read_events(trainer.loggers[1].log_dir), history)
    # Files at train end, in the first logger's folder.
    folder = Path(trainer.log_dir)
    saved = json.loads((folder / "plstar-monitor.json").read_text())
    assert [r["step"] for r in saved["history"]] == [0, 2, 4, 6]
    assert (folder / "plstar-monitor.png").read_bytes()[:4] == b"\x89PNG"
    # Training saw the module in train mode at every step, and the run is the one without the
    # callback (same parameters, same Parameter objects): modes, gradients, random state kept.
    assert all(all(step_modes) for step_modes in module.modes) and all(modes(module))
    parameters = list(module.parameters())
    _, alone = lightning_fit(tmp_path / "without", [])
    assert torch.equal(flat_params(module), flat_params(alone))
    assert all(p is q for p, q in zip(parameters, module.parameters(), strict=True))


# ---------------------------------------------------------------- Hugging Face


def hf_train(output_dir: Path, callbacks: list) -> tuple[Any, nn.Module]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(0)
    config = BertConfig(
        vocab_size=24, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8, num_labels=2, problem_type="regression",
    )  # fmt: skip
    model = BertForSequenceClassification(config).double()
    g = torch.Generator().manual_seed(3)
    ids, targets = torch.randint(0, 24, (12, 5), generator=g), torch.randn(12, 2, generator=g)
    data = [{"input_ids": ids[i], "labels": targets[i]} for i in range(12)]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=5, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return trainer, model


def test_hf_trainer_callback_logs_the_monitor_records(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from plstar.integrations.transformers import PLStarTrainerCallback

    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 24, (4, 5), generator=g), torch.randn(4, 2, generator=g)
    callback = PLStarTrainerCallback(x, y, every_n_steps=2, every=4, sharpness_iterations=2)
    trainer, model = hf_train(tmp_path / "with", [callback])
    history = callback.monitor.history
    # every 2 steps, and the last step (5) at train end; the kernel every 4
    assert [r.step for r in history] == [0, 2, 4, 5] and measured_steps(history) == [0, 4]
    with eval_mode_while_measuring(model):  # F = the logits of the ModelOutput
        loss, ratio = loss_and_ratio(model, x, y, pick=lambda out: out.logits)
    assert history[-1].loss == pytest.approx(loss, rel=1e-12)
    assert history[-1].pl_ratio == pytest.approx(ratio, rel=1e-10)
    entries = trainer.state.log_history
    ours = [e for e in entries if any(k.startswith("plstar/") for k in e)]
    assert [e["step"] for e in ours] == [r.step for r in history]
    for entry, record in zip(ours, history, strict=True):
        same_scalars(entry, record)
        assert "loss" not in entry
    user = [e for e in entries if "loss" in e]  # the Trainer's own training loss, every step
    assert [e["step"] for e in user] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(e["loss"]) and not any("plstar" in k for k in e) for e in user)
    saved = json.loads((tmp_path / "with" / "plstar-monitor.json").read_text())
    assert [r["step"] for r in saved["history"]] == [0, 2, 4, 5]
    assert (tmp_path / "with" / "plstar-monitor.png").read_bytes()[:4] == b"\x89PNG"
    # Dropout is on in BERT: the run equals one without the callback only if modes, gradients
    # and the random state were all left as they were.
    assert model.training and all(modes(model))
    _, alone = hf_train(tmp_path / "without", [])
    assert torch.equal(flat_params(model), flat_params(alone))
