"""Small building blocks of the zoo models.

Every block is an ``nn.Module`` made of standard torch layers and a plain ``forward``: torch.fx traces through
them, so the teleportation and probe code sees the underlying Linear/Conv/norm/add/cat operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LONorm(nn.Module):
    """Length-only layer norm of seed 003: ``f / qm(f)`` with ``qm(f) = sqrt(mean_i f_i^2)`` over the last dim.

    ``eps`` is added under the square root only to keep an all-zero vector finite (default 0 keeps the
    operation exactly scale-invariant, which is what the source defines). With ``affine`` a per-feature
    weight and bias follow, as in ``nn.LayerNorm``.
    """

    def __init__(self, num_features: int, affine: bool = False, eps: float = 0.0):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, affine={self.weight is not None}, eps={self.eps}"


class CReLU(nn.Module):
    """Concatenated ReLU ``[ReLU(x), ReLU(-x)]`` along ``dim`` (doubles the width; seed 004 Def. 3.9)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(x), F.relu(-x)], dim=self.dim)


class ResidualBlock(nn.Module):
    """``skip(x) + branch(x)``; ``skip`` is ``nn.Identity`` or a bias-free ``nn.Linear`` (seed 003 §I.1)."""

    def __init__(self, branch: nn.Module, skip: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.skip = skip if skip is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.branch(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity or strided 1x1 conv + BN), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DenseLayer(nn.Module):
    """DenseNet layer: ``cat([x, conv3x3(relu(bn(x)))], dim=1)``."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class QKVAttention(nn.Module):
    """Multi-head self-attention with explicit ``q``, ``k``, ``v`` and ``out`` Linear layers.

    softmax(Q K^T / sqrt(d_head)) V per head, then the output projection; input and output (B, T, d_model).
    """

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}.")
        self.nhead = nhead
        self.d_head = d_model // nhead
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).reshape(b, t, self.nhead, self.d_head).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.nhead, self.d_head).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.nhead, self.d_head).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d_head), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class MHA(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (batch_first), returning only the output tensor."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class TransformerBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d_model: int, nhead: int, dim_ff: int, attention: str = "mha"):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MHA(d_model, nhead) if attention == "mha" else QKVAttention(d_model, nhead)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, dim_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class SequenceClassifier(nn.Module):
    """Embedding (token ``nn.Embedding`` or linear) + learned positions, encoder blocks, final LN, mean-pool, head."""

    def __init__(self, embed: nn.Module, seq_len: int, d_model: int, blocks: list[nn.Module], num_outputs: int):
        super().__init__()
        self.embed = embed
        self.pos = nn.Embedding(seq_len, d_model)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(self.positions)
        h = self.norm(self.blocks(h))
        return self.head(h.mean(dim=1))
