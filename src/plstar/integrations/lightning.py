"""``PLStarCallback``: the PL* picture of a Lightning run, logged beside its own metrics.

    from plstar.integrations.lightning import PLStarCallback
    callback = PLStarCallback(x[:64], y[:64], every_n_steps=10, every=100)
    lightning.Trainer(max_steps=1000, callbacks=[callback]).fit(module, loader)
    callback.monitor.history                     # the records; plstar-monitor.json in log_dir

Needs ``pip install "plstar[lightning]"``. See docs/training.md, "Trainer callbacks".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plstar.integrations.common import WatchingCallback
from plstar.monitor import Record

try:
    import lightning.pytorch as pl
except ImportError as missing:  # pragma: no cover - the optional extra is absent
    raise ImportError(
        f'plstar.integrations.lightning needs lightning ({missing}); pip install "plstar[lightning]"'
    ) from None

__all__ = ["PLStarCallback"]


class PLStarCallback(WatchingCallback, pl.Callback):
    """Watches L = ½‖F − y‖² (summed), ρ, ‖w − w₀‖, K and β on a fixed subsample during ``fit``.

    At train start a :class:`plstar.Monitor` is created on the LightningModule (or the submodule
    ``module`` picks: an attribute path such as ``"model"``, or a callable given the
    LightningModule) with ``x`` (n, ...) and ``y`` (n, k) moved to its device; this fixes w₀ and
    measures L₀, μ = λ_min(K(w₀)) and β. After every ``every_n_steps`` optimizer steps
    (``on_train_batch_end``, once the global step passed a multiple of it) the monitor records
    the module's parameters at ``at_step`` = the trainer's steps since train start, and every
    trainer logger receives ``record.scalars()`` — ``plstar/loss``, ``plstar/pl_ratio``,
    ``plstar/distance``, ``plstar/envelope`` and, where measured (every ``every`` steps),
    ``plstar/lambda_min``, ``plstar/lambda_max``, ``plstar/drift``, ``plstar/sharpness`` — at the
    trainer's global step. They go to the loggers directly rather than through
    ``pl_module.log``, which would write them only at multiples of ``log_every_n_steps``.
    ``plstar/loss`` is the square loss summed over (x, y), not the model's training loss, which
    stays as the user logs it. At train end the last step is recorded (if it was not) and
    ``plstar-monitor.json`` and ``plstar-monitor.png`` are written into ``folder`` (default the
    trainer's ``log_dir``, else its ``default_root_dir``); ``self.monitor`` keeps the records.

    The module is measured in eval mode (Dropout off, BatchNorm on running statistics: the
    deterministic F that plstar refuses to measure otherwise) and each submodule's mode is put
    back after every measurement; parameters, gradients and the random state are left as they
    were, so the training run is the one it would be without the callback. Only the global rank
    0 measures. ``output`` picks F from what the module returns (default: a tensor as it is, the
    ``logits`` of a ``ModelOutput``); ``monitor_options`` are further :class:`plstar.Monitor`
    arguments (``every``: steps between kernel and sharpness measurements, default 100;
    ``kernel_samples``, ``sharpness``, ``mu``, ``beta``, ``seed``, ``tensorboard``, ...).
    Cost: the Monitor's (:class:`plstar.integrations.common.WatchedRun`).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            record = self.run.start(pl_module, trainer.global_step).history[0]
            self._log(trainer, record)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.is_global_zero and self.run.due(trainer.global_step):
            self._log(trainer, self.run.record(trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # log_dir is collective (every rank must ask), so it is read before the rank check
        folder = self.folder or Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            last = self.run.finish(trainer.global_step, folder)
            if last is not None:
                self._log(trainer, last)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.run.monitor is not None:  # flush what TensorBoard has; no files for a failed fit
            self.run.monitor.close()

    def _log(self, trainer: pl.Trainer, record: Record) -> None:
        step = self.run.first_step + record.step  # the trainer's global step of the record
        for logger in trainer.loggers:
            logger.log_metrics(record.scalars(), step=step)
