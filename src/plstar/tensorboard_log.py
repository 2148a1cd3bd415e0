"""A Monitor's records as TensorBoard scalars, and its four-panel figure as an image.

Written with ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard`` package:
an optional extra (``pip install "plstar[tensorboard]"``), imported only when a log is asked for.
Tags are ``plstar/<field>`` at global step ``record.step`` (:meth:`plstar.Record.scalars`): every
record gives ``loss``, ``pl_ratio``, ``distance`` and ``envelope``, the records with a kernel
measurement also ``lambda_min``, ``lambda_max``, ``drift`` and ``sharpness``. All are the
square-loss PL* quantities of :mod:`plstar.monitor` (L = ½‖F − y‖² summed over the monitored
samples), not the training loss of the user's own objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plstar.errors import PlstarInputError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from plstar.monitor import Record

FIGURE_TAG = "plstar/training"
INSTALL_HINT = 'pip install "plstar[tensorboard]"'


def summary_writer_class() -> type[SummaryWriter]:
    """``torch.utils.tensorboard.SummaryWriter``, or a PlstarInputError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as missing:  # torch raises ImportError itself when tensorboard is absent
        raise PlstarInputError(
            f"TensorBoard logging needs the tensorboard package ({missing}); install it with "
            f"{INSTALL_HINT}"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """Writes records as scalars as they come, and the figure at :meth:`close`.

    ``target`` is a folder (a writer is opened there at the first record, so that a run refused
    before it leaves no event file) or a ``SummaryWriter`` the caller owns (flushed, never closed
    here). A record written after :meth:`close` opens a new event file in the folder (TensorBoard
    reads a folder's files as one run), and the next close adds the figure again.
    Cost per record: eight scalar events and a flush; at close one figure rendered at 110 dpi.
    """

    def __init__(self, target: str | Path | SummaryWriter) -> None:
        writer_class = summary_writer_class()
        if isinstance(target, writer_class):
            self.folder: Path | None = None
            self._writer: SummaryWriter | None = target
            self._owned = False
        elif isinstance(target, str | Path):
            self.folder, self._writer, self._owned = Path(target), None, True
            if self.folder.exists() and not self.folder.is_dir():
                raise PlstarInputError(
                    f"tensorboard={str(target)!r} is a file; give a folder for the event files"
                )
        else:
            raise PlstarInputError(
                "tensorboard must be a folder (str or Path) or a "
                f"torch.utils.tensorboard.SummaryWriter, got {type(target).__name__}"
            )
        self._unfinished = False  # records written since the last figure

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            self._writer = summary_writer_class()(log_dir=str(self.folder))
        return self._writer

    def write(self, record: Record) -> None:
        """One record's scalars at global step ``record.step``, flushed: records are rare next to
        training steps, and a killed run then keeps every record made (as metrics.jsonl does)."""
        writer = self._open()
        for tag, value in record.scalars().items():
            writer.add_scalar(tag, value, global_step=record.step)
        writer.flush()
        self._unfinished = True

    def close(self, records: Sequence[Record], figure_options: dict[str, Any]) -> None:
        """Add the four-panel figure (:func:`plstar.plots.training_figure` of ``records``) as an
        image at the last record's step, flush, and close a writer opened here. Does nothing when
        no record was written since the last close."""
        if not self._unfinished or not records:
            return
        import numpy as np

        from plstar.plots import training_figure

        figure = training_figure(records, **figure_options)
        figure.canvas.draw()
        # RGBA from the Agg canvas; TensorBoard shows RGB (the alpha channel is opaque anyway)
        image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
        writer = self._open()
        writer.add_image(FIGURE_TAG, image, global_step=records[-1].step, dataformats="HWC")
        writer.flush()
        if self._owned:
            writer.close()
            self._writer = None
        self._unfinished = False
