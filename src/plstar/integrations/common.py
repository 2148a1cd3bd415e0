"""What the Lightning and Hugging Face callbacks share: one monitored run inside a trainer.

:class:`WatchedRun` holds the fixed subsample (x, y), picks the module whose F is measured,
creates the :class:`plstar.Monitor` when training starts, says when a trainer step is due for a
record, records it at the trainer's step, and writes the Monitor's files at the end. The
callbacks only translate their framework's hooks and loggers to it.

Trainers train with the module in train mode, while plstar measures only a deterministic,
per-sample F (it refuses train-mode Dropout and BatchNorm): every measurement here runs with the
module in eval mode and puts back each submodule's own mode afterwards
(:func:`eval_mode_while_measuring`), so the trainer's next step sees the module as it left it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, check_data, output_selector
from plstar.monitor import Monitor, Record
from plstar.validation import whole_number

MONITOR_JSON = "plstar-monitor.json"
MONITOR_PNG = "plstar-monitor.png"
ModuleChoice = str | Callable[[nn.Module], nn.Module] | None
"""Which nn.Module's F is measured: None for the trainer's own module, a dotted attribute path
of it (``"model"``, ``"backbone.net"``), or a callable given the trainer's module."""

# The Monitor's own arguments that a callback sets itself; the others pass through.
_SET_BY_THE_CALLBACK = {"self", "model", "x", "y", "output", "on_record", "progress"}
MONITOR_OPTIONS = frozenset(inspect.signature(Monitor.__init__).parameters) - _SET_BY_THE_CALLBACK
"""Keyword arguments of :class:`plstar.Monitor` a callback forwards (``every``,
``kernel_samples``, ``sharpness``, ``sharpness_iterations``, ``mu``, ``beta``, ``seed``,
``memory_budget``, ``tensorboard``)."""


@contextlib.contextmanager
def eval_mode_while_measuring(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block, then give every submodule its own mode back.

    Each submodule's ``training`` flag is restored one by one (a user may keep a frozen part in
    eval mode inside a training model), even when the block raises.
    """
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def pick_module(root: nn.Module, choice: ModuleChoice) -> nn.Module:
    """The module whose F is measured (see :data:`ModuleChoice`); PlstarInputError otherwise."""
    if choice is None:
        picked: object = root
    elif isinstance(choice, str):
        try:
            picked = root.get_submodule(choice)
        except AttributeError:
            raise PlstarInputError(
                f"module={choice!r}: {type(root).__name__} has no submodule {choice!r}; name an "
                "attribute path such as 'model' or pass a callable"
            ) from None
    else:
        picked = choice(root)
    if not isinstance(picked, nn.Module):
        raise PlstarInputError(
            f"module= must select a torch.nn.Module, got {type(picked).__name__}"
        )
    return picked


class WatchedRun:
    """A :class:`plstar.Monitor` driven by a trainer's hooks (the callbacks' shared part).

    ``x`` (n, ...) and ``y`` (n, k) or (n,): the fixed monitored subsample, moved to the module's
    device at :meth:`start` (a floating x also cast to its dtype). ``every_n_steps``: trainer
    (optimizer) steps between records. ``module``: see :data:`ModuleChoice`. ``output``: picks F
    from what the module returns (default a tensor as it is, the ``logits`` of a ``ModelOutput``
    or dict). ``monitor_options``: further
    :class:`plstar.Monitor` arguments (:data:`MONITOR_OPTIONS`), e.g. ``every`` (trainer steps
    between kernel and sharpness measurements, default 100) and ``kernel_samples``.
    Record steps count trainer steps since the monitor's w₀, the trainer's state at
    :meth:`start`: the trainer's global step when it trains from scratch.
    Cost: :class:`plstar.Monitor`'s — at start μ = λ_min(K(w₀)) on all of (x, y) and β; per record
    one forward and reverse pass over (x, y); every ``every`` steps a kernel of
    ``kernel_samples`` samples and a few loss HVPs. Keep (x, y) small.
    Raises PlstarInputError for a non-tensor x or y, every_n_steps < 1, an unknown option.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        every_n_steps: int,
        module: ModuleChoice = None,
        output: OutputSelector | None = None,
        monitor_options: dict[str, Any] | None = None,
    ) -> None:
        self.x, self.y = check_data("x", x), check_data("y", y)
        self.every_n_steps = whole_number("every_n_steps", every_n_steps, minimum=1)
        if module is not None and not isinstance(module, str) and not callable(module):
            raise PlstarInputError(
                f"module must be None, an attribute path or a callable, got {type(module).__name__}"
            )
        self.module_choice, self.output = module, output_selector(output)
        options = dict(monitor_options or {})
        unknown = sorted(set(options) - MONITOR_OPTIONS)
        if unknown:
            raise PlstarInputError(
                f"unknown Monitor option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(MONITOR_OPTIONS))}"
            )
        self.monitor_options = options
        self.monitor: Monitor | None = None
        self.module: nn.Module | None = None
        self.first_step = 0
        self.files: tuple[Path, Path] | None = None

    def start(self, root: nn.Module, global_step: int) -> Monitor:
        """Create the monitor on the picked module at the trainer's current state (its w₀)."""
        self.module = pick_module(root, self.module_choice)
        parameter = next(self.module.parameters(), None)
        x, y = self.x, self.y
        if parameter is not None:
            # As a trainer's precision setting does with its batches: floating inputs in the
            # model's dtype (token ids stay integers); y is cast by the Monitor itself.
            dtype = parameter.dtype if x.is_floating_point() else x.dtype
            x, y = x.to(parameter.device, dtype), y.to(parameter.device)
        self.first_step = int(global_step)
        with eval_mode_while_measuring(self.module):
            self.monitor = Monitor(self.module, x, y, output=self.output, **self.monitor_options)
        self.files = None
        return self.monitor

    def steps_since_start(self, global_step: int) -> int:
        """The trainer's step counted from the monitor's w₀."""
        return int(global_step) - self.first_step

    def due(self, global_step: int) -> bool:
        """Whether a record is due: the trainer's step passed a multiple of ``every_n_steps``
        since the last record (several hook calls per step, as with gradient accumulation, give
        one record)."""
        if self.monitor is None:
            return False
        step, last = self.steps_since_start(global_step), self.monitor.steps
        return step > last and step // self.every_n_steps > last // self.every_n_steps

    def record(self, global_step: int) -> Record:
        """Record the module's current parameters as the trainer's ``global_step``."""
        assert self.monitor is not None and self.module is not None, "start() first"
        with eval_mode_while_measuring(self.module):
            return self.monitor.step(at_step=self.steps_since_start(global_step))

    def finish(self, global_step: int, folder: str | Path | None) -> Record | None:
        """Record the last step if it was not yet, write ``plstar-monitor.json`` and
        ``plstar-monitor.png`` into ``folder`` (none written when it is None), and close the
        monitor's TensorBoard log. Returns the new last record, if one was made."""
        if self.monitor is None:
            return None
        last = None
        if self.steps_since_start(global_step) > self.monitor.steps:
            last = self.record(global_step)
        title = f"plstar on {type(self.module).__name__}"
        if folder is not None:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            self.files = (
                self.monitor.to_json(folder / MONITOR_JSON),
                self.monitor.plot(folder / MONITOR_PNG, title=title),
            )
        self.monitor.close(title=title)
        return last


class WatchingCallback:
    """The arguments, the :class:`WatchedRun` and ``monitor`` of both trainer callbacks; each
    adds only its framework's hooks and logging (it is listed before the framework's base)."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        every_n_steps: int = 50,
        module: ModuleChoice = None,
        output: OutputSelector | None = None,
        folder: str | Path | None = None,
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        self.run = WatchedRun(
            x, y, every_n_steps=every_n_steps, module=module, output=output,
            monitor_options=monitor_options,
        )  # fmt: skip
        self.folder = None if folder is None else Path(folder)

    @property
    def monitor(self) -> Monitor | None:
        """The Monitor of the current (or last) training run; None before training starts."""
        return self.run.monitor
