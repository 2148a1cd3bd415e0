"""A zoo of the architectures people train, built from scratch: no downloads, no torchvision/timm.

Each factory takes a ``torch.Generator`` (everything random is drawn from it: the weights are
initialised under a forked global RNG seeded from it, so the caller's RNG never advances) and
size keywords (tiny defaults, so a dense float64 jacrev oracle runs in well under a second;
benchmarks/architecture_benchmark.py passes realistic ones), and returns ``(model, x)`` with the
model in eval mode, float32. Norm layers get random affine parameters and running statistics so
that none of them is the identity. ``build`` looks an entry up by name, casts it and returns the
output selector F needs (``None``: plstar's default, a tensor or the ``logits`` of a ModelOutput).

The plain-PyTorch modules are in tests/architecture_layers.py; the Hugging Face entries need
``transformers`` (the optional extra) and build from configs, never from downloaded weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from architecture_layers import (
    AttentionPool,
    BertLike,
    GPT2Like,
    Mixer,
    ResNet,
    TorchvisionViT,
    ViT,
)
from torch import Tensor, nn

Factory = Callable[..., tuple[nn.Module, Tensor]]


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=g))


def _randomize_norms(model: nn.Module, g: torch.Generator) -> None:
    """Random affine parameters and running statistics for every norm layer (a default one, with
    weight 1, bias 0, mean 0 and variance 1, would hide a rule that ignores them)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, norms):
                continue
            for name, spread, centre in (
                ("weight", 0.2, 1.0),
                ("bias", 0.2, 0.0),
                ("running_mean", 0.3, 0.0),
                ("running_var", 0.3, 1.0),
            ):
                tensor = getattr(module, name, None)
                if tensor is not None:
                    draw = torch.randn(tensor.shape, generator=g)
                    tensor.copy_(centre + spread * (draw.abs() if "var" in name else draw))


def _made(g: torch.Generator, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with the global RNG forked and seeded from ``g``, norms randomized, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(g))
        model = make()
    _randomize_norms(model, g)
    return model.eval()


def resnet(
    g: torch.Generator,
    *,
    n: int = 3,
    size: int = 16,
    k: int = 10,
    blocks: tuple[int, ...] = (1, 1),
    widths: tuple[int, ...] = (4, 8),
    stem_kernel: int = 3,
    stem_stride: int = 1,
    pool: bool = False,
) -> tuple[nn.Module, Tensor]:
    """x (n, 3, size, size) -> (n, k). Default: two blocks, the second downsampling (1×1 conv
    shortcut), 1,454 parameters."""
    model = _made(g, lambda: ResNet(k, blocks, widths, stem_kernel, stem_stride, pool))
    return model, torch.randn(n, 3, size, size, generator=g)


def gpt2_like(
    g: torch.Generator, *, n: int = 3, t: int = 6, vocab: int = 24, d: int = 16, layers: int = 2
) -> tuple[nn.Module, Tensor]:
    """tokens (n, t) -> last-position logits (n, vocab); 2 heads."""
    model = _made(g, lambda: GPT2Like(vocab, d, 2, layers, context=2 * t))
    return model, torch.randint(0, vocab, (n, t), generator=g)


def bert_like(
    g: torch.Generator, *, n: int = 3, t: int = 6, vocab: int = 24, d: int = 16, k: int = 2
) -> tuple[nn.Module, Tensor]:
    """tokens (n, t) -> (n, k); 2 layers, 2 heads."""
    model = _made(g, lambda: BertLike(vocab, d, 2, 2, context=2 * t, k=k))
    return model, torch.randint(0, vocab, (n, t), generator=g)


def vit(
    g: torch.Generator, *, n: int = 3, size: int = 8, patch: int = 4, d: int = 16, k: int = 10
) -> tuple[nn.Module, Tensor]:
    """x (n, 3, size, size) -> (n, k); 2 layers, 2 heads, (size / patch)² + 1 tokens."""
    model = _made(g, lambda: ViT(size, patch, d, 2, 2, k))
    return model, torch.randn(n, 3, size, size, generator=g)


def vit_mha(
    g: torch.Generator, *, n: int = 3, size: int = 8, patch: int = 4, d: int = 16, k: int = 10
) -> tuple[nn.Module, Tensor]:
    """torchvision's ViT layout (nn.MultiheadAttention): x (n, 3, size, size) -> (n, k); 2
    layers, 2 heads."""
    model = _made(g, lambda: TorchvisionViT(size, patch, d, 2, 2, k))
    return model, torch.randn(n, 3, size, size, generator=g)


def mixer(
    g: torch.Generator, *, n: int = 3, size: int = 8, patch: int = 4, d: int = 16, k: int = 10
) -> tuple[nn.Module, Tensor]:
    """x (n, 3, size, size) -> (n, k); 2 Mixer blocks over (size / patch)² patches."""
    model = _made(g, lambda: Mixer(size, patch, d, 2, k))
    return model, torch.randn(n, 3, size, size, generator=g)


def cnn1d(
    g: torch.Generator, *, n: int = 3, length: int = 16, c: int = 4, k: int = 3
) -> tuple[nn.Module, Tensor]:
    """x (n, 2, length) -> (n, k): Conv1d padding='same', GroupNorm, a depthwise Conv1d
    (groups = channels, padding='same'), GroupNorm, a 1×1 conv, mean over time, Linear."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(2, c, 5, padding="same"), nn.GroupNorm(2, c), nn.GELU(),
            nn.Conv1d(c, c, 3, padding="same", groups=c), nn.GroupNorm(2, c), nn.ReLU(),
            nn.Conv1d(c, c, 1), nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c, k),
        )  # fmt: skip

    return _made(g, make), torch.randn(n, 2, length, generator=g)


def multihead(
    g: torch.Generator, *, n: int = 3, t: int = 5, d_in: int = 3, d: int = 8, k: int = 4
) -> tuple[nn.Module, Tensor]:
    """x (n, t, d_in) -> (n, k) through nn.MultiheadAttention (2 heads)."""
    model = _made(g, lambda: AttentionPool(d_in, d, 2, k))
    return model, torch.randn(n, t, d_in, generator=g)


# ---------------------------------------------------------------- Hugging Face, from configs


def last_token_logits(output: Any) -> Tensor:
    """F of a causal LM: the logits at the last position, (B, T, vocab) -> (B, vocab)."""
    return output.logits[:, -1, :]


def hf_gpt2(
    g: torch.Generator,
    *,
    n: int = 2,
    t: int = 5,
    vocab: int = 32,
    d: int = 16,
    layers: int = 2,
    heads: int = 2,
) -> tuple[nn.Module, Tensor]:
    """GPT2LMHeadModel, tokens (n, t) -> logits (n, t, vocab) (use :func:`last_token_logits`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=max(2 * t, 8), n_embd=d, n_layer=layers, n_head=heads,
        bos_token_id=vocab - 1, eos_token_id=vocab - 1, use_cache=False,
    )  # fmt: skip
    return _made(g, lambda: GPT2LMHeadModel(config)), torch.randint(0, vocab, (n, t), generator=g)


def hf_bert(
    g: torch.Generator,
    *,
    n: int = 3,
    t: int = 5,
    vocab: int = 32,
    d: int = 16,
    intermediate: int = 32,
    max_positions: int = 8,
) -> tuple[nn.Module, Tensor]:
    """BertForSequenceClassification (2 labels, 2 layers, 2 heads), tokens (n, t) -> logits (n, 2)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=intermediate, max_position_embeddings=max_positions, num_labels=2,
    )  # fmt: skip
    model = _made(g, lambda: BertForSequenceClassification(config))
    return model, torch.randint(0, vocab, (n, t), generator=g)


def hf_vit(
    g: torch.Generator, *, n: int = 2, size: int = 8, patch: int = 4, d: int = 16, k: int = 10
) -> tuple[nn.Module, Tensor]:
    """ViTForImageClassification (2 layers, 2 heads), x (n, 3, size, size) -> logits (n, k)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=size, patch_size=patch, num_channels=3, hidden_size=d, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * d, num_labels=k,
    )  # fmt: skip
    model = _made(g, lambda: ViTForImageClassification(config))
    return model, torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    """A zoo entry: its factory, the output selector F needs (None: plstar's default) and the
    optional package it requires."""

    factory: Factory
    output: Callable[[Any], Tensor] | None = None
    requires: str | None = None

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


ARCHITECTURES: dict[str, Architecture] = {
    "resnet": Architecture(resnet),
    "gpt2-like": Architecture(gpt2_like),
    "bert-like": Architecture(bert_like),
    "vit": Architecture(vit),
    "vit-mha": Architecture(vit_mha),
    "mixer": Architecture(mixer),
    "cnn1d": Architecture(cnn1d),
    "multihead": Architecture(multihead),
    "hf-gpt2": Architecture(hf_gpt2, last_token_logits, "transformers"),
    "hf-bert": Architecture(hf_bert, requires="transformers"),
    "hf-vit": Architecture(hf_vit, requires="transformers"),
}


def build(
    name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **sizes: Any
) -> tuple[nn.Module, Tensor, Callable[[Any], Tensor] | None]:
    """(model in eval mode and ``dtype``, inputs (floating ones in ``dtype``), output selector)
    of zoo entry ``name``, the same for the same seed and sizes."""
    entry = ARCHITECTURES[name]
    model, x = entry.factory(torch.Generator().manual_seed(seed), **sizes)
    return model.to(dtype).eval(), (x.to(dtype) if x.is_floating_point() else x), entry.output


class Selected(nn.Module):
    """``output(model(x))`` as a module with the model's own Parameters: what the dense oracles
    and the torch.func recipe differentiate when a model returns more than F."""

    def __init__(self, model: nn.Module, output: Callable[[Any], Tensor] | None) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: Tensor) -> Tensor:
        raw = self.model(x)
        if self.output is not None:
            return self.output(raw)
        return raw if isinstance(raw, Tensor) else raw["logits"]


def parameter_count(model: nn.Module) -> int:
    """m: trainable parameters, each shared Parameter once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
