"""The plain-PyTorch modules of the architecture zoo (tests/architectures.py builds them).

They mirror the patterns of torchvision, Hugging Face and timm that matter to plstar:
``ReLU(inplace=True)`` and ``out += identity``; HF's ``Conv1D`` (weight (in, out), applied to
the rows of a flattened batch); position embeddings indexed by a broadcast (1, T) ``arange``;
timm's ``LayerNorm`` subclass; ``nn.MultiheadAttention``'s packed in-projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------- ResNet (torchvision's layout)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLU and an in-place residual sum."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stem conv + BN + in-place ReLU (+ max-pool), stages of BasicBlocks (each after the first
    halves the resolution), global average pooling, Linear head. blocks=(2, 2, 2, 2),
    widths=(64, 128, 256, 512), stem_kernel=7, stem_stride=2, pool=True is ResNet-18."""

    def __init__(
        self,
        k: int,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        stem_kernel: int,
        stem_stride: int,
        pool: bool,
    ) -> None:
        super().__init__()
        stem: list[nn.Module] = [
            nn.Conv2d(3, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        if pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, c_in = [], widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                stages.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


# ---------------------------------------------------------------- transformers in plain PyTorch


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: a Linear whose weight is stored (in, out), applied with addmm to the
    rows of the flattened batch."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class LayerNorm(nn.LayerNorm):
    """timm's LayerNorm: a subclass of nn.LayerNorm with its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, d) -> (B, heads, T, d / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class Attention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention with a packed q/k/v projection
    (HF Conv1D for GPT-2, Linear otherwise) and an output projection."""

    def __init__(self, d: int, heads: int, causal: bool, conv1d: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = Conv1D(3 * d, d) if conv1d else nn.Linear(d, 3 * d)
        self.proj = Conv1D(d, d) if conv1d else nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Transformer block: attention and a GELU MLP, each with a residual; pre-LN (GPT-2, ViT) or
    post-LN (BERT)."""

    def __init__(
        self, d: int, heads: int, *, causal: bool, pre_ln: bool, conv1d: bool, norm: type
    ) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.ln_1, self.ln_2 = norm(d), norm(d)
        self.attn = Attention(d, heads, causal, conv1d)
        linear = (
            Conv1D if conv1d else (lambda out, into: nn.Linear(into, out))
        )  # (out, in) as Conv1D
        up, down = linear(4 * d, d), linear(d, 4 * d)
        self.mlp = nn.Sequential(up, nn.GELU(approximate="tanh" if conv1d else "none"), down)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class GPT2Like(nn.Module):
    """GPT-2 layout: token + learned position embeddings (positions a broadcast (1, T) arange),
    pre-LN causal blocks with Conv1D projections, final LN, LM head tied to the token embedding.
    tokens (B, T) -> last-position logits (B, vocab)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        block = dict(causal=True, pre_ln=True, conv1d=True, norm=nn.LayerNorm)
        self.h = nn.ModuleList(Block(d, heads, **block) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        h = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            h = block(h)
        return self.lm_head(self.ln_f(h))[:, -1, :]


class BertLike(nn.Module):
    """BERT layout: token + position + segment embeddings (positions and segments (1, T) buffers
    broadcast over the batch), LN, post-LN bidirectional blocks, tanh pooler on the first token,
    classifier. tokens (B, T) -> (B, k)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int, k: int) -> None:
        super().__init__()
        self.word, self.position = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.segment = nn.Embedding(2, d)
        self.register_buffer("position_ids", torch.arange(context)[None], persistent=False)
        self.ln = nn.LayerNorm(d)
        block = dict(causal=False, pre_ln=False, conv1d=False, norm=nn.LayerNorm)
        self.layers = nn.Sequential(*(Block(d, heads, **block) for _ in range(layers)))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, k)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        positions = self.position_ids[:, :t]
        segments = (positions >= t // 2).long()  # two segments: the halves of the sequence
        h = self.word(tokens) + self.position(positions) + self.segment(segments)
        h = self.layers(self.ln(h))
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


class ViT(nn.Module):
    """timm's ViT layout: patch Conv2d, cls token and position embedding as Parameters, pre-LN
    blocks with the LayerNorm subclass, final norm, head on the cls token. x (B, 3, S, S) -> (B, k)."""

    def __init__(self, size: int, patch: int, d: int, heads: int, layers: int, k: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d) * 0.1)
        block = dict(causal=False, pre_ln=True, conv1d=False, norm=LayerNorm)
        self.blocks = nn.Sequential(*(Block(d, heads, **block) for _ in range(layers)))
        self.norm = LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(h))[:, 0])


class TorchvisionViT(nn.Module):
    """torchvision's ViT layout: patch Conv2d, class token and position embedding as Parameters,
    pre-LN encoder blocks with nn.MultiheadAttention (batch-first, nn.TransformerEncoderLayer
    with norm_first and GELU computes torchvision's EncoderBlock), final LN, head on the class
    token. x (B, 3, S, S) -> (B, k)."""

    def __init__(self, size: int, patch: int, d: int, heads: int, layers: int, k: int) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos_embedding = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d) * 0.1)
        self.layers = nn.Sequential(*(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        ))  # fmt: skip
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.class_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.ln(self.layers(h + self.pos_embedding))[:, 0])


class MixerBlock(nn.Module):
    """Token-mixing MLP across patches, then channel-mixing MLP, each after a LayerNorm and with
    a residual."""

    def __init__(self, tokens: int, d: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.channel_mlp = nn.Sequential(
            nn.Linear(d, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, d)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer: patch Conv2d stem, Mixer blocks, LN, mean over patches, head."""

    def __init__(self, size: int, patch: int, d: int, layers: int, k: int) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.stem = nn.Conv2d(3, d, patch, patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, d, d // 2, 4 * d) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(h).mean(dim=1))


class AttentionPool(nn.Module):
    """Input projection, nn.MultiheadAttention self-attention (packed in_proj_weight) with a
    residual, LayerNorm, mean over positions, head. x (B, T, d_in) -> (B, k)."""

    def __init__(self, d_in: int, d: int, heads: int, k: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(dim=1))
