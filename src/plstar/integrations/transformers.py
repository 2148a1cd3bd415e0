"""``PLStarTrainerCallback``: the PL* picture of a Hugging Face ``Trainer`` run.

    from plstar.integrations.transformers import PLStarTrainerCallback
    callback = PLStarTrainerCallback(input_ids[:64], targets[:64], every_n_steps=10)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    [e for e in trainer.state.log_history if "plstar/loss" in e]   # plstar-monitor.json in output_dir

Needs ``pip install "plstar[transformers]"``. See docs/training.md, "Trainer callbacks".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from plstar.integrations.common import WatchingCallback
from plstar.monitor import Record

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as missing:  # pragma: no cover - the optional extra is absent
    raise ImportError(
        f"plstar.integrations.transformers needs transformers ({missing}); "
        'pip install "plstar[transformers]"'
    ) from None

__all__ = ["PLStarTrainerCallback"]


class PLStarTrainerCallback(WatchingCallback, TrainerCallback):
    """Watches L = ½‖F − y‖² (summed), ρ, ‖w − w₀‖, K and β on a fixed subsample during ``train``.

    At train begin a :class:`plstar.Monitor` is created on the Trainer's model (or the submodule
    ``module`` picks: an attribute path, or a callable given the model) with ``x`` (n, ...) — what
    the model is called with, e.g. token ids (n, t) — and ``y`` (n, k) moved to its device; F is
    the ``logits`` of the returned ``ModelOutput`` unless ``output`` picks otherwise (e.g.
    ``lambda out: out.logits[:, -1]`` for a causal LM). Every ``every_n_steps`` optimizer steps
    (``on_step_end``) the monitor records the model at ``at_step`` = the Trainer's steps since
    train begin, and ``record.scalars()`` — ``plstar/loss``, ``plstar/pl_ratio``,
    ``plstar/distance``, ``plstar/envelope`` and, where measured (every ``every`` steps),
    ``plstar/lambda_min``, ``plstar/lambda_max``, ``plstar/drift``, ``plstar/sharpness`` — is
    appended to ``state.log_history`` as the Trainer's own ``log`` does (with ``epoch`` and
    ``step``), so it is saved in ``trainer_state.json`` with every checkpoint. A callback cannot
    reach the Trainer's ``log``, so the reporting integrations (``report_to``) do not see these
    entries; for TensorBoard pass ``tensorboard=DIR`` (a :class:`plstar.Monitor` option).
    ``plstar/loss`` is the square loss summed over (x, y), not the model's training ``loss``,
    which the Trainer logs as before. At train end the last step is recorded (if it was not) and
    ``plstar-monitor.json`` and ``plstar-monitor.png`` are written into ``folder`` (default
    ``args.output_dir``); ``self.monitor`` keeps the records.

    The model is measured in eval mode (dropout off: the deterministic F that plstar refuses to
    measure otherwise) and each submodule's mode is put back after every measurement;
    parameters, gradients and the random state are left as they were. Only the world process
    zero measures. ``monitor_options`` are further :class:`plstar.Monitor` arguments (``every``,
    default 100; ``kernel_samples``, ``sharpness``, ``mu``, ``beta``, ``seed``, ``tensorboard``).
    Cost: the Monitor's (:class:`plstar.integrations.common.WatchedRun`).
    """

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and model is not None:
            self._log(state, self.run.start(model, state.global_step).history[0])

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and self.run.due(state.global_step):
            self._log(state, self.run.record(state.global_step))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            last = self.run.finish(state.global_step, self.folder or Path(args.output_dir))
            if last is not None:
                self._log(state, last)

    def _log(self, state: TrainerState, record: Record) -> None:
        entry: dict[str, Any] = record.scalars()
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        entry["step"] = self.run.first_step + record.step  # the Trainer's global step
        state.log_history.append(entry)
