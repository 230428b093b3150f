"""The model zoo: plain ``nn.Module``s from standard torch layers (plus the tiny blocks in ``layers``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .init import gaussian_, looks_linear_, orthogonal_
from .layers import (
    BasicBlock,
    CReLU,
    DenseLayer,
    LONorm,
    ResidualBlock,
    SequenceClassifier,
    TransformerBlock,
)

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "selu", "elu", "gelu", "crelu")
NORMS = ("none", "batch", "layer", "lo")
INITS = ("default", "gaussian", "orthogonal", "looks_linear")


def _choice(kind: str, value, accepted: Sequence[str]):
    if value not in accepted:
        raise ValueError(f"unknown {kind} {value!r}; accepted: {', '.join(accepted)}.")
    return value


def make_activation(name: str) -> nn.Module:
    _choice("activation", name, ACTIVATIONS)
    return {
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "tanh": nn.Tanh,
        "selu": nn.SELU,
        "elu": nn.ELU,
        "gelu": nn.GELU,
        "crelu": CReLU,
    }[name]()


def make_norm(name: str, width: int, affine: bool) -> nn.Module | None:
    _choice("norm", name, NORMS)
    if name == "none":
        return None
    if name == "batch":
        return nn.BatchNorm1d(width, affine=affine)
    if name == "layer":
        return nn.LayerNorm(width, elementwise_affine=affine, bias=affine)
    return LONorm(width, affine=affine)


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def mlp(
    in_features: int = 64,
    out_features: int = 10,
    depth: int = 3,
    width: int | Sequence[int] = 64,
    act: str = "relu",
    norm: str = "none",
    init: str = "default",
    bias: bool = True,
    affine: bool = True,
    final_norm: bool = False,
    seed: int | None = None,
) -> nn.Sequential:
    """The seed-003 MLP family: ``depth`` Linear layers with ``depth - 1`` nonlinearities between them.

    Layout ``Linear, [Norm], Act, ..., Linear, [Norm if final_norm]`` (seed 003 puts a norm after *every*
    linear layer, the last included: pass ``final_norm=True`` for that protocol). ``width`` is one hidden width
    or the list of the ``depth - 1`` hidden widths. ``crelu`` doubles the width the next Linear sees.
    Inits: ``gaussian`` (variance 2/fan_in after a ReLU-like activation, else 1/fan_in), ``orthogonal`` (Haar),
    ``looks_linear`` (App. H, 0-based pairs, relu + even widths); biases are zero for the three non-default inits.
    """
    _choice("activation", act, ACTIVATIONS)
    _choice("norm", norm, NORMS)
    _choice("init", init, INITS)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    widths = [width] * (depth - 1) if isinstance(width, int) else list(width)
    if len(widths) != depth - 1:
        raise ValueError(f"width list must have depth - 1 = {depth - 1} entries, got {len(widths)}.")
    if init == "looks_linear":
        if act != "relu":
            raise ValueError(f"looks_linear init needs act='relu', got {act!r}.")
        if any(w % 2 for w in widths):
            raise ValueError(f"looks_linear init needs even hidden widths, got {widths}.")
    gen = _generator(seed)
    mult = 2 if act == "crelu" else 1
    dims_in = [in_features] + [w * mult for w in widths]
    dims_out = widths + [out_features]
    layers: list[nn.Module] = []
    for i, (fi, fo) in enumerate(zip(dims_in, dims_out)):
        lin = nn.Linear(fi, fo, bias=bias)
        after_relu = i > 0 and act in ("relu", "leaky_relu", "crelu")
        if init != "default":
            if init == "gaussian":
                gaussian_(lin.weight, after_relu, gen)
            elif init == "orthogonal":
                orthogonal_(lin.weight, gen)
            else:
                pos = "lowest" if i == 0 else ("highest" if i == depth - 1 else "intermediate")
                if depth == 1:
                    orthogonal_(lin.weight, gen)
                else:
                    looks_linear_(lin.weight, pos, gen)
            if bias:
                nn.init.zeros_(lin.bias)
        layers.append(lin)
        last = i == depth - 1
        if not last or final_norm:
            n = make_norm(norm, fo, affine)
            if n is not None:
                layers.append(n)
        if not last:
            layers.append(make_activation(act))
    return nn.Sequential(*layers)


def resnet_mlp(
    in_features: int = 100,
    out_features: int | None = None,
    width: int = 100,
    blocks: int = 25,
    act: str = "relu",
    norm: str = "layer",
    skip: str = "identity",
    bias: bool = False,
    affine: bool = False,
    final_norm: bool = True,
    seed: int | None = None,
) -> nn.Sequential:
    """Seed-003 residual MLP (I.1): a first Linear, ``blocks`` residual blocks
    ``[norm, act, linear, norm, act, linear]`` with identity or Gaussian (variance 1/fan_in) skip matrices, a
    final norm, and a Linear head when ``out_features`` is given. Linear weights use the Gaussian init."""
    _choice("activation", act, ACTIVATIONS)
    _choice("skip", skip, ("identity", "gaussian"))
    if act == "crelu":
        raise ValueError("resnet_mlp does not accept act='crelu' (the residual add needs equal widths).")
    gen = _generator(seed)
    relu_like = act in ("relu", "leaky_relu")

    def lin(fi: int, fo: int, after_relu: bool, with_bias: bool = bias) -> nn.Linear:
        layer = nn.Linear(fi, fo, bias=with_bias)
        gaussian_(layer.weight, after_relu, gen)
        if with_bias:
            nn.init.zeros_(layer.bias)
        return layer

    layers: list[nn.Module] = [lin(in_features, width, False)]
    for _ in range(blocks):
        branch = []
        for _ in range(2):
            n = make_norm(norm, width, affine)
            if n is not None:
                branch.append(n)
            branch += [make_activation(act), lin(width, width, relu_like)]
        skip_mod = lin(width, width, False, with_bias=False) if skip == "gaussian" else None
        layers.append(ResidualBlock(nn.Sequential(*branch), skip_mod))
    if final_norm:
        n = make_norm(norm, width, affine)
        if n is not None:
            layers.append(n)
    if out_features is not None:
        layers.append(lin(width, out_features, False))
    return nn.Sequential(*layers)


def looks_linear_crelu_mlp(
    in_features: int = 64,
    out_features: int = 10,
    depth: int = 4,
    width: int = 64,
    norm: str = "none",
    seed: int | None = None,
) -> nn.Sequential:
    """Seed-004 looks-linear network (Def. 3.9): ``Linear(W_1)``, then ``[Norm], CReLU, Linear([W, -W])`` blocks.

    Each W is Haar orthogonal (top-left block when not square); since ReLU(z) - ReLU(-z) = z the bias-free
    network computes exactly ``W_L ... W_1 x`` at initialisation when ``norm='none'``.
    """
    _choice("norm", norm, ("none", "batch"))
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    gen = _generator(seed)
    dims_in = [in_features] + [width] * (depth - 1)
    dims_out = [width] * (depth - 1) + [out_features]
    layers: list[nn.Module] = []
    for i, (fi, fo) in enumerate(zip(dims_in, dims_out)):
        w = orthogonal_(torch.empty(fo, fi), gen)
        if i == 0:
            lin = nn.Linear(fi, fo, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
        else:
            lin = nn.Linear(2 * fi, fo, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.cat([w, -w], dim=1))
        layers.append(lin)
        if i < depth - 1:
            if norm == "batch":
                layers.append(nn.BatchNorm1d(fo))
            layers.append(CReLU())
    return nn.Sequential(*layers)


def vgg(
    in_channels: int = 1,
    num_classes: int = 10,
    cfg: Sequence[int | str] = (16, "M", 32, "M", 64, "M"),
    batch_norm: bool = True,
) -> nn.Sequential:
    """VGG-style CNN: ``cfg`` ints are conv3x3 (padding 1) [+BN] + ReLU, ``"M"`` a 2x2 max-pool; then
    AdaptiveAvgPool2d(1), Flatten, Linear."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"vgg cfg entries must be positive ints or 'M', got {v!r}.")
        layers.append(nn.Conv2d(c, v, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        c = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def resnet(in_channels: int = 1, num_classes: int = 10, depth: int = 10, width: int = 16) -> nn.Sequential:
    """ResNet-10/18 with BasicBlocks and BatchNorm for small images: conv3x3 stem (stride 1, no max-pool), four
    stages of widths ``width * (1, 2, 4, 8)`` with strides (1, 2, 2, 2) and 1x1-conv+BN downsample shortcuts."""
    per_stage = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}
    if depth not in per_stage:
        raise ValueError(f"resnet depth must be one of 10, 18, got {depth}.")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for stage, n_blocks in enumerate(per_stage[depth]):
        cout = width * 2**stage
        for b in range(n_blocks):
            layers.append(BasicBlock(c, cout, stride=2 if (stage > 0 and b == 0) else 1))
            c = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def densenet(
    in_channels: int = 1,
    num_classes: int = 10,
    growth: int = 8,
    block_layers: Sequence[int] = (2, 2),
    init_features: int = 16,
) -> nn.Sequential:
    """DenseNet: conv3x3 stem, dense blocks of BN-ReLU-conv3x3 layers whose outputs are concatenated, and
    BN-ReLU-conv1x1(halve)-AvgPool2d(2) transitions; final BN-ReLU, global average pool, Linear."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, init_features, 3, padding=1, bias=False)]
    c = init_features
    for i, n in enumerate(block_layers):
        for _ in range(n):
            layers.append(DenseLayer(c, growth))
            c += growth
        if i < len(block_layers) - 1:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def simple_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    channels: Sequence[int] = (16, 32, 64),
    image_size: int = 8,
) -> nn.Sequential:
    """Seed-001 CNN: per stage conv3x3 (padding 1) + ReLU + 2x2 max-pool; Flatten; Linear."""
    layers: list[nn.Module] = []
    c, s = in_channels, image_size
    for cout in channels:
        layers += [nn.Conv2d(c, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, s = cout, s // 2
        if s < 1:
            raise ValueError(f"image_size={image_size} is too small for {len(channels)} pooling stages.")
    layers += [nn.Flatten(), nn.Linear(c * s * s, num_classes)]
    return nn.Sequential(*layers)


def transformer(
    in_features: int | None = 8,
    vocab_size: int | None = None,
    seq_len: int = 8,
    d_model: int = 32,
    nhead: int = 4,
    num_layers: int = 2,
    dim_ff: int = 64,
    num_classes: int = 10,
    attention: str = "mha",
) -> nn.Module:
    """Small pre-LN Transformer encoder classifier/regressor.

    Token embedding (``vocab_size``; input (B, T) long) or linear embedding (``in_features``; input
    (B, T, in_features)), learned positions, ``num_layers`` blocks with ``nn.MultiheadAttention``
    (``attention='mha'``) or explicit q/k/v Linear layers (``'qkv'``), GELU MLP, final LayerNorm, mean-pool, head.
    """
    _choice("attention", attention, ("mha", "qkv"))
    if d_model % nhead:
        raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}.")
    if vocab_size is not None:
        embed: nn.Module = nn.Embedding(vocab_size, d_model)
    elif in_features is not None:
        embed = nn.Linear(in_features, d_model)
    else:
        raise ValueError("transformer needs in_features (linear embedding) or vocab_size (token embedding).")
    blocks = [TransformerBlock(d_model, nhead, dim_ff, attention) for _ in range(num_layers)]
    return SequenceClassifier(embed, seq_len, d_model, blocks, num_classes)



__all__ = [
    "mlp",
    "resnet_mlp",
    "looks_linear_crelu_mlp",
    "vgg",
    "resnet",
    "densenet",
    "simple_cnn",
    "transformer",
]
