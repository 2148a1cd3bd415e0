"""plstar's Lightning callback on a real run: an MLP trained with cross-entropy on the digits.

    python examples/lightning_digits.py [OUT_DIR]

Trains a depth-3 NTK MLP (width 256, float64) for 400 SGD steps (lr 0.5, batches of 64) on 512
digits with 10 classes, while :class:`plstar.integrations.lightning.PLStarCallback` records the
square-loss PL* picture on the first 64 samples every 5 steps (kernel every 50). Writes
plstar-monitor.json and plstar-monitor.png into OUT_DIR (default ./lightning-digits); the figure
of docs/training.md was made by this script. Needs ``pip install "plstar[lightning]"``.
"""

from __future__ import annotations

import sys

import lightning
import torch
from torch import Tensor, nn

from plstar.data import load_digits
from plstar.integrations.lightning import PLStarCallback
from plstar.models import mlp


class DigitsClassifier(lightning.LightningModule):
    """A plain classifier: cross-entropy on the MLP's 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(64, 256, 3, 10, generator_seed=0, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y.argmax(dim=1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main(out: str) -> None:
    data = load_digits(512, outputs=10, seed=0)  # y: centred one-hot, F: the logits
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x, data.y), batch_size=64, shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    callback = PLStarCallback(data.x[:64], data.y[:64], every_n_steps=5, every=50, folder=out)
    trainer = lightning.Trainer(
        max_steps=400, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, accelerator="cpu", precision="64-true",
    )  # fmt: skip
    trainer.fit(DigitsClassifier(), loader)
    first, last = callback.monitor.history[0], callback.monitor.history[-1]
    print(f"square loss on the subsample {first.loss:.1f} → {last.loss:.1f}; "
          f"λ_min(K) {first.lambda_min:.4f} → {last.lambda_min:.4f}; wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lightning-digits")
