"""Splitting a model into the blocks that layer-wise training trains one at a time (seed 002 §6.2.1, Alg. 3)."""

from __future__ import annotations

from torch import nn


def starts_block(layer: nn.Module) -> bool:
    """Whether ``layer`` opens a new block: it holds a parameter with two or more dimensions (a weight matrix or
    kernel: Linear, Conv, a residual block, an embedding). Layers without parameters (ReLU, pooling, Flatten,
    Dropout) and layers whose parameters are all vectors (BatchNorm/LayerNorm affine, PReLU) fold into the block
    before them, as the source folds "no-parameter layers such as pooling" into the preceding block."""
    return any(p.dim() >= 2 for p in layer.parameters())


def split_blocks(model_or_blocks) -> list[nn.Module]:
    """The trainable blocks of a model, bottom-up, sharing the model's modules (nothing is copied).

    Accepted:

    - an ``nn.Sequential`` (every zoo MLP/CNN/VGG/ResNet/DenseNet): a new block starts at every child that holds a
      weight matrix or kernel (:func:`starts_block`); the children after it that do not (activations, pooling,
      normalisation, Flatten) join it. Parameter-free layers before the first weight layer join the first block.
      ResNet ``BasicBlock``s are one block each; a zoo CNN's last hidden block ends with its pooling and Flatten,
      and its final ``Linear`` is a block of its own (the classifier).
    - a list/tuple/``nn.ModuleList`` of modules: used as given (each entry one block, chained in order).

    Each block of a Sequential comes back as an ``nn.Sequential`` of its layers. Cost: a walk over the children.
    Anything else (a custom ``forward`` such as the zoo transformer) cannot be split safely because its
    ``forward`` may do more than chain its children: a ``ValueError`` names what to pass instead.
    """
    if isinstance(model_or_blocks, (list, tuple, nn.ModuleList)):
        blocks = list(model_or_blocks)
        if not blocks:
            raise ValueError("the list of blocks is empty; pass at least one nn.Module.")
        bad = [i for i, b in enumerate(blocks) if not isinstance(b, nn.Module)]
        if bad:
            raise ValueError(f"block {bad[0]} is a {type(blocks[bad[0]]).__name__}, not an nn.Module; pass a list "
                             "of nn.Module blocks.")
        if not any(p.requires_grad for b in blocks for p in b.parameters()):
            raise ValueError("none of the given blocks has a trainable parameter; pass blocks with parameters.")
        return blocks
    if isinstance(model_or_blocks, nn.Sequential):
        groups: list[list[nn.Module]] = []
        pending: list[nn.Module] = []
        for child in model_or_blocks.children():
            if starts_block(child):
                groups.append(pending + [child])
                pending = []
            elif groups:
                groups[-1].append(child)
            else:
                pending.append(child)
        if not groups:
            raise ValueError("the nn.Sequential has no layer with a weight matrix or kernel (Linear, Conv, ...), so it "
                             "has no block to train; pass a model with trainable layers or a list of blocks.")
        return [nn.Sequential(*g) for g in groups]
    if isinstance(model_or_blocks, nn.Module):
        name = type(model_or_blocks).__name__
        raise ValueError(f"cannot split a {name} into blocks: only an nn.Sequential is split automatically (its "
                         f"forward chains its children); pass the blocks as a list of modules instead, e.g. "
                         f"fit_layerwise([stem, block1, block2, classifier], ...).")
    raise ValueError(f"expected an nn.Sequential or a list of nn.Module blocks, got {type(model_or_blocks).__name__}.")


def weight_layers(block: nn.Module) -> list[nn.Module]:
    """The modules inside ``block`` that own a weight of two or more dimensions (directly, not through children),
    in registration order: the Linear/Conv layers whose stable rank the random-robin comparison reads."""
    out = []
    for m in block.modules():
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            out.append(m)
    return out


def is_classifier_block(block: nn.Module, num_classes: int | None) -> bool:
    """Whether ``block`` is a plain classifier: exactly one weight layer, an ``nn.Linear`` whose ``out_features``
    equals ``num_classes`` (any number when ``num_classes`` is None), and nothing after it with a parameter. This is
    Alg. 3's decision layer psi_k, whose role the top block's decision head takes in layer-wise training."""
    layers = weight_layers(block)
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
        return False
    return num_classes is None or layers[0].out_features == num_classes
