"""Seed-001 (teleportation with null-space gradient projection) reproductions the first pass left out, at CPU scale:

* ``nullspace-input-variance`` (Sec. 4.5 / Fig. 6a): how much of a layer's input energy the top eigenvectors of its
  representation matrix capture (eq. 3), for the second layer of the MLP, CNN and Transformer of the training
  entries, and how large the exact (tau = 1) input null space is on a teleport batch.
* ``nullspace-resnet`` (Sec. 4.2 / Fig. 3, Tiny-ImageNet panel): the residual CNN (channels
  [3,64,64,64,128,128,128,256,256,256] with strides and 3 residual connections), scaled to digits 8x8 with channels
  [1,16,16,16,32,32,32,64,64,64] (quick: [1,8,8,8,16,16,16,32,32,32]), through the training protocol of
  :mod:`.nullspace_repro` (b = 32, absolute CAP, 5-epoch schedule, 5 seeds, every guard off).
* ``nullspace-runtime-scaling`` (Sec. 4.4 / Fig. 5): time of one teleport schedule of the null-space teleport and of
  the symmetry teleport as t, d, n, l and b vary, judged on the scaling the source states.
* ``nullspace-lm`` (Sec. 4.3 / Fig. 4, Penn-Treebank panel; App. A.2: "replace the first linear layer with an
  embedding layer"): a small causal Transformer language model whose token ``nn.Embedding`` is a null-space layer,
  trained on a synthetic Markov-chain corpus (no text corpus ships with gradcond; the chain's entropy rate is the
  lowest reachable loss), through the same protocol as the other training entries; plus a direct check of what an
  embedding teleport moves (the rows of the tokens not in the teleport batch) and keeps (the rows of those in it).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.experiments.registry import Row, register

from ._training import train_steps
from .nullspace_repro import GUARDS_OFF, OPTIMIZERS, PROTOCOL, QUICK_OPTIMIZERS, TrainingSetup, run_training_entry


def _plt():
    from ..report.figures import object_pyplot  # Agg-canvas figures: the process-wide backend is left alone

    return object_pyplot()


# ------------------------------------------------------------------------------------------------------------
# Fig. 6a: input variance captured by the kept eigenvectors
# ------------------------------------------------------------------------------------------------------------
ENERGY_LEVEL = 0.9
SMALL_FRACTION = 0.25
NULL_FRACTION = 0.10


def energy_curve(features: torch.Tensor, bias: bool = True) -> list[float]:
    """Cumulative fraction of ``||R||_F^2`` captured by the top-k left singular vectors of ``R = features^T``, for
    k = 1..D (eq. 3's ``||R_k||_F^2 / ||R||_F^2``); ``features`` is N x D (one input row per column of R), with a
    constant-1 column appended when ``bias`` (the layer's bias folds in as an input, as in the teleport).
    Cost: one SVD of an N x D matrix, O(N D min(N, D))."""
    if bias:
        features = torch.cat([features, features.new_ones(features.shape[0], 1)], 1)
    s = torch.linalg.svdvals(features.double())
    e = torch.cumsum(s ** 2, 0)
    curve = (e / e[-1]).tolist() if float(e[-1]) > 0 else [0.0] * len(s)
    return curve + [1.0] * (features.shape[1] - len(curve))


def dims_for(curve: list[float], level: float) -> int:
    """Smallest k with ``curve[k-1] >= level`` (eq. 3's k for ``tau = level``)."""
    for i, c in enumerate(curve):
        if c >= level - 1e-12:
            return i + 1
    return len(curve)


def judge_small_fraction(curve: list[float], level: float = ENERGY_LEVEL, fraction: float = SMALL_FRACTION
                         ) -> tuple[bool, float]:
    """Fig. 6a's claim for one layer: a fraction ``<= fraction`` of the sorted eigenvectors captures ``>= level`` of
    the input energy. Returns (holds, the fraction needed). An empty curve fails."""
    if not curve:
        return False, float("nan")
    need = dims_for(curve, level) / len(curve)
    return need <= fraction, need


def judge_null_space(dim: int, rank: int, fraction: float = NULL_FRACTION) -> tuple[bool, float]:
    """Sec. 4.5's 'sufficient dimensions are typically available in the null space' (tau = 1) for one layer: the
    exact null space ``dim - rank`` is at least ``fraction`` of the input dimension. Returns (holds, the free
    fraction)."""
    free = (dim - rank) / dim if dim > 0 else float("nan")
    return bool(dim > 0 and free >= fraction), free


def _second_layer_rows(model, layer_name, key, X, n_teleport):
    """``(rows, rank, dim)``: the representation rows of ``layer_name`` on ``X`` (one per sample, patch or token),
    the numerical rank (tau = 1, with the bias column) of the representation on the first ``n_teleport`` samples
    (one teleport batch) and the input dimension with the bias. Captured through the teleport's own hooks, so these
    are the rows the teleport sees; forward passes in eval mode without gradients, the model's mode is restored.
    Cost: two forward passes and one SVD of the teleport batch's representation."""
    from gradcond.teleport.nullspace import _Capture, null_space_basis  # the rows the teleport itself sees

    layer = model.get_submodule(layer_name)
    was = model.training
    model.eval()
    try:
        feats = []
        for xs in (X, X[:n_teleport]):
            cap = _Capture([(layer_name, layer)])
            with torch.no_grad(), cap:
                model(xs)
            feats.append(cap.matrix((layer_name, key)))
    finally:
        model.train(was)
    _, rank = null_space_basis(feats[1], 1.0, bias=True)
    return feats[0], rank, feats[1].shape[1] + 1


@register(
    "nullspace-input-variance",
    claim="Most of the variance of a layer's input is captured by a relatively small proportion of the sorted "
          "eigenvectors of its representation matrix, so the exact (tau = 1) input null space leaves enough "
          "dimensions to teleport in.",
    source="seed 001, Sec. 4.5 / Fig. 6a (second layer of the MLP, CNN and Transformer of Secs. 4.1-4.3)",
    protocol="The second layer of the training entries' MLP ([1024, 1024]; quick [256, 256]), CNN (16, 32, 64) and "
             "Transformer (2 x 64, 2 heads) on digits, at initialisation and after 450 SGD steps (quick: 90; lr "
             "0.05, batch 32, seed 0). Energy curve of the representation of 256 training samples (eq. 3, bias as a "
             "constant-1 input); exact null space on one teleport batch of the matching training entry's size (32, "
             "32, 4 samples). Thresholds fixed before the run: 25 % of the eigenvectors for 90 % of the energy; a "
             "free null space of >= 10 % of the input dimension.",
)
def input_variance(quick: bool, out_dir: Path) -> list[Row]:
    width = 256 if quick else 1024
    flat = load_dataset("digits", form="flat")
    img = load_dataset("digits", form="image")
    seq = load_dataset("digits", form="sequence")
    # (model, data, second layer, captured key, teleport batch size of the matching training entry)
    archs = {
        f"MLP [{width}, {width}]": (lambda: zoo.mlp(in_features=64, out_features=10, depth=3, width=width), flat,
                                    "2", "in", 32),
        "CNN (16, 32, 64)": (lambda: zoo.simple_cnn(in_channels=1, num_classes=10, image_size=8), img, "3", "in", 32),
        "Transformer (2 x 64, 2 heads)": (
            lambda: zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128), seq,
            "blocks.0.attn.attn", "q", 4),
    }
    steps = 90 if quick else 450  # ~2 (10) epochs of batch-32 SGD on digits: the representation during training
    n_rows = 256
    rows, curves = [], {}
    for arch, (build, data, layer, key, n_tp) in archs.items():
        X, Y = data.train.tensors
        torch.manual_seed(0)
        model = build()
        out = {}
        for stage in ("init", "trained"):
            if stage == "trained":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    train_steps(model, X, Y, "sgd", steps, 32, torch.Generator().manual_seed(0), lr=0.05, momentum=0.0)
            feats, rank, dim = _second_layer_rows(model, layer, key, X[:n_rows], n_tp)
            out[stage] = (energy_curve(feats), rank, dim)
        curves[arch] = {k: v[0] for k, v in out.items()}
        curve, rank, dim = out["trained"]
        ok, need = judge_small_fraction(curve)
        k99, k999 = dims_for(curve, 0.99), dims_for(curve, 0.999)
        ci, ri, _ = out["init"]
        rows.append(Row(
            f"{arch}, second layer (input dim {dim} with the bias), digits, after {steps} SGD steps: share of the "
            f"sorted eigenvectors that captures {ENERGY_LEVEL:.0%} of the input energy ({n_rows} samples)",
            "seed 001, Sec. 4.5 / Fig. 6a",
            f"{need:.1%} of the eigenvectors for {ENERGY_LEVEL:.0%} ({dims_for(curve, ENERGY_LEVEL)}/{dim}); "
            f"{k99}/{dim} for 99 %, {k999}/{dim} for 99.9 %; at initialisation {dims_for(ci, ENERGY_LEVEL)}/{dim} "
            f"for {ENERGY_LEVEL:.0%}", ok,
            {"curve_trained": curve, "curve_init": ci, "dim": dim, "needed_fraction": need},
            paper="'most variance of input is captured by ... a relatively small proportion of total dimensions' "
                  "(curves, no numbers)",
            criterion=f"the smallest k with ||R_k||_F^2 >= {ENERGY_LEVEL} ||R||_F^2 (eq. 3, tau = {ENERGY_LEVEL}) is "
                      f"at most {SMALL_FRACTION:.0%} of the input dimension",
            tolerance=f"{SMALL_FRACTION:.0%} of the dimensions for {ENERGY_LEVEL:.0%} of the energy: our reading of "
                      "'a relatively small proportion' (a quarter), fixed before the run"))
        free_ok, free = judge_null_space(dim, rank)
        rows.append(Row(
            f"{arch}, second layer: the exact (tau = 1) input null space on a teleport batch of {n_tp} samples "
            "(the batch size of the matching training entry)", "seed 001, Sec. 4.5 (text on Fig. 6a)",
            f"numerical rank {rank} of {dim} input dims: {dim - rank} free ({free:.1%}); at initialisation rank "
            f"{ri}", free_ok, {"rank": rank, "dim": dim, "free_fraction": free, "rank_init": ri},
            paper="'even without approximating the input null space, sufficient dimensions are typically available "
                  "in the null space'",
            criterion=f"input dimension minus numerical rank of the representation (tau = 1) >= {NULL_FRACTION:.0%} "
                      "of the input dimension",
            tolerance=f"{NULL_FRACTION:.0%}: at least a tenth of the weights' input directions free to move; fixed "
                      "before the run"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arch, cs in curves.items():
        for stage, ls in (("trained", "-"), ("init", ":")):
            c = cs[stage]
            ax.plot([100 * (i + 1) / len(c) for i in range(len(c))], c, ls, label=f"{arch} ({stage})")
    ax.set(xlabel="% of sorted eigenvectors", ylabel="input energy captured", title="second-layer input (Fig. 6a)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "nullspace_input_variance.png", dpi=100)
    plt.close(fig)
    return rows


# ------------------------------------------------------------------------------------------------------------
# the residual CNN of Sec. 4.2 (Tiny-ImageNet), scaled to digits
# ------------------------------------------------------------------------------------------------------------
def residual_cnn(in_channels: int = 1, num_classes: int = 10, channels=(16, 32, 64)) -> nn.Sequential:
    """Seed 001's residual CNN (Sec. 4.2: channels [3,64,64,64,128,128,128,256,256,256], larger strides instead of
    max-pool, 3 residual connections between channels of the same shape): per stage a 3x3 conv to ``c`` channels
    with stride 2 (8x8 digits -> 4x4 -> 2x2 -> 1x1: the strides replace the pooling) + ReLU, then a residual block
    ``x + conv(relu(conv(x)))`` + ReLU; global
    average pool and a Linear head. No normalisation (the source names none)."""
    from gradcond.zoo.layers import ResidualBlock

    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU(),
                   ResidualBlock(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                               nn.Conv2d(c, c, 3, padding=1))),
                   nn.ReLU()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


# learning rates chosen on baseline runs only (seed 0, 8 epochs, no teleport): the former (0.1, 0.02, 0.02, 2e-3)
# left the SGD and momentum baselines at chance (loss 2.29) within the quick budget
RESNET_LRS = {"sgd": 0.3, "momentum": 0.05, "adagrad": 0.02, "adam": 2e-3}


@register("nullspace-resnet", claim="Null-space teleport accelerates the training of a residual CNN",
          source="seed 001 Sec. 4.2, Fig. 3 (Tiny-ImageNet panel: residual CNN [3,64,64,64,128,128,128,256,256,256] "
                 "with strides and 3 residual connections; 40 warm-up steps)",
          protocol=PROTOCOL + " Residual CNN scaled to digits 8x8: channels [1,16,16,16,32,32,32,64,64,64] (quick: "
                              "[1,8,8,8,16,16,16,32,32,32]), stride-2 convs instead of pooling, 3 residual blocks, no "
                              "normalisation (the source names none); 40 warm-up steps (App. A.2); n = 32; 20 epochs; "
                              "quick: SGD only, 8 epochs. Learning rates chosen on baseline runs (SGD 0.3, "
                              "momentum 0.05, Adagrad 0.02, Adam 2e-3): the former SGD 0.1 left the baseline at "
                              "chance.")
def run_resnet(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="image")
    ch = (8, 16, 32) if quick else (16, 32, 64)
    label = ",".join(str(c) for c in ch for _ in range(3))
    return run_training_entry(TrainingSetup(
        f"nullspace-resnet[{label}]", lambda: residual_cnn(1, 10, ch), d, "digits-image", RESNET_LRS,
        8 if quick else 20, warmup=40, optimizers=QUICK_OPTIMIZERS if quick else OPTIMIZERS,
        reduced="Quick mode: channels (8, 16, 32), SGD only, 8 epochs" if quick else ""), out_dir)


# ------------------------------------------------------------------------------------------------------------
# Fig. 5: runtime scaling, null-space vs symmetry teleport
# ------------------------------------------------------------------------------------------------------------
BASE = dict(t=8, d=256, n=32, l=3, b=4)
BASE_QUICK = dict(t=4, d=128, n=32, l=3, b=2)
LINEAR_PARAMS = ("t", "l", "b")
CONST_PARAMS = ("d", "n")
LINEAR_SLOPE_MAX = 1.25
CONST_SLOPE_MAX = 0.25
SYM_SLOPE_MIN = 0.5
FASTER_FACTOR = 2.0


def _mlp(d: int, l: int, seed: int = 0) -> nn.Sequential:
    """Bias-free MLP of ``l`` square d x d Linear layers with LeakyReLU(0.1) between them (both methods apply)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(l):
        mods.append(nn.Linear(d, d, bias=False))
        if i < l - 1:
            mods.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*mods)


def _time_pair(ns, sy, t, d, n, l, b, repeats: int) -> tuple[float, float]:
    """Medians over ``repeats`` of the CPU seconds of the calling thread (``time.thread_time``) that one ``teleport``
    over ``b`` Gaussian batches of ``n`` takes, for the null-space teleport ``ns`` and the symmetry teleport ``sy``,
    measured interleaved (ns, sy, ns, sy, ...) on fresh copies of the same MLP.

    Why thread CPU time, interleaved: wall-clock counts the time the process waits for a core, which on a shared
    machine depends on the other load; the CPU time of the one computing thread (torch runs on 1 thread here) does
    not, and interleaving gives both methods the same cache and frequency conditions. What still moves it: cache and
    memory-bandwidth contention from other processes, so the verdict is kept out of the asserted tests (TIMING).
    Operation counts were considered and not used: the source's "near-constant in d and n" is a statement about
    parallel hardware (its GPU), which a count of operations -- growing as d^2 n by construction -- cannot test."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)) for _ in range(b)]
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for i, tp in enumerate((ns, sy)):
            model = _mlp(d, l)
            tp.steps = t
            c0 = time.thread_time()
            tp.teleport(model, data)
            times[i].append(time.thread_time() - c0)
    return statistics.median(times[0]), statistics.median(times[1])


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x) (1 = linear, 0 = constant); NaN with a non-positive value."""
    if len(xs) < 2 or any(v <= 0 for v in list(xs) + list(ys)):
        return float("nan")
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den if den > 0 else float("nan")


def judge_scaling(param: str, values, t_null, t_sym) -> tuple[bool, dict]:
    """Fig. 5's claim for one parameter.

    ``t``, ``l``, ``b``: the null-space time grows at most linearly (log-log slope <= ``LINEAR_SLOPE_MAX``) and the
    symmetry time grows 'at a significantly faster rate': its increase in seconds over the range is at least
    ``FASTER_FACTOR`` times the null-space increase (the source plots seconds on linear axes).
    ``d``, ``n``: the null-space time is near-constant (slope <= ``CONST_SLOPE_MAX``) while the symmetry time grows
    (slope >= ``SYM_SLOPE_MIN``).  Returns (holds, numbers)."""
    sn, ss = loglog_slope(values, t_null), loglog_slope(values, t_sym)
    dn, ds = t_null[-1] - t_null[0], t_sym[-1] - t_sym[0]
    num = {"slope_null": sn, "slope_sym": ss, "increase_null": dn, "increase_sym": ds}
    if not all(math.isfinite(v) for v in (sn, ss, dn, ds)):
        return False, num
    if param in LINEAR_PARAMS:
        return bool(sn <= LINEAR_SLOPE_MAX and ds >= FASTER_FACTOR * max(dn, 0.0) and ds > 0), num
    if param in CONST_PARAMS:
        return bool(sn <= CONST_SLOPE_MAX and ss >= SYM_SLOPE_MIN), num
    raise ValueError(f"unknown parameter {param!r}; accepted: t, d, n, l, b.")


@register(
    "nullspace-runtime-scaling",
    claim="The null-space teleport's runtime scales linearly with t, l and b and is near-constant in d and n, while "
          "the symmetry teleport's runtime grows significantly faster.",
    source="seed 001, Sec. 4.4 / Fig. 5 (MLPs; runtime vs t, d, n, l, b)",
    protocol="Bias-free MLPs of l square d x d layers (LeakyReLU 0.1, both methods apply), MSE on b Gaussian batches "
             "of n, t steps, eta 1e-3, every guard and the symmetry step-size control off (the algorithms alone, as "
             "in the source's timings). Base t = 8, d = 256, n = 32, l = 3, b = 4 (quick: t = 4, d = 128, b = 2); "
             "each parameter swept alone over 4 values (quick: 2). Measured: CPU seconds of the one computing thread "
             "(torch on 1 thread, time.thread_time), null space and symmetry interleaved on fresh copies of the same "
             "MLP, median of 5 repeats (quick: 3) -- not wall-clock, which counts the waits of a shared machine. "
             "The source timed on a GPU; its 'near-constant in d and n' relies on parallel hardware, which one CPU "
             "thread is not. Timing-based: reported in REPRODUCTION.md, never asserted in the tests.",
)
def runtime_scaling(quick: bool, out_dir: Path) -> list[Row]:
    from gradcond.teleport.nullspace import NullSpaceTeleport
    from gradcond.teleport.symmetry import SymmetryTeleport

    # quick: two values per parameter around a smaller base (the symmetry teleport at d = 1024 alone takes ~50 s)
    base = BASE_QUICK if quick else BASE
    grid = (dict(t=[2, 8], d=[64, 256], n=[16, 64], l=[2, 4], b=[1, 4]) if quick else
            dict(t=[2, 4, 8, 16], d=[128, 256, 512, 1024], n=[16, 32, 64, 128], l=[2, 3, 4, 6], b=[1, 2, 4, 8]))
    repeats = 3 if quick else 5
    # the algorithms themselves are timed: guards (a held-out forward and a norm per batch, early stops that would
    # shorten the schedule) and the symmetry step-size control are off, as in the source's timings
    off = dict(batch_loss_tol=None, held_out_tol=None, max_weight_growth=None)
    ns = NullSpaceTeleport("mse", eta=1e-3, **off)
    sy = SymmetryTeleport("mse", eta=1e-3, action="inverse", max_step_change=None, **off)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time_pair(ns, sy, 1, 64, 8, 2, 1, 1)  # warm-up
        table = {}
        for p, values in grid.items():
            pairs = [_time_pair(ns, sy, repeats=repeats, **dict(base, **{p: v})) for v in values]
            table[p] = (values, [a for a, _ in pairs], [b for _, b in pairs])
    finally:
        torch.set_num_threads(threads)
    rows = []
    for p, (values, tn, ts) in table.items():
        ok, num = judge_scaling(p, values, tn, ts)
        lin = p in LINEAR_PARAMS
        rows.append(Row(
            f"runtime of one teleport schedule vs {p} ({', '.join(map(str, values))}; others {base}, CPU time of 1 "
            f"thread, interleaved, median "
            f"of {repeats})", "seed 001, Sec. 4.4 / Fig. 5",
            f"null-space {', '.join(f'{x:.3f}' for x in tn)} s (log-log slope {num['slope_null']:.2f}); symmetry "
            f"{', '.join(f'{x:.3f}' for x in ts)} s (slope {num['slope_sym']:.2f}); increase over the range: "
            f"symmetry {num['increase_sym']:.3f} s vs null-space {num['increase_null']:.3f} s", ok,
            {"values": list(values), "null_s": tn, "sym_s": ts, **num},
            paper=("'linear scaling with respect to t, l, and b, while the runtime of the symmetry teleportation "
                   "increases at a significantly faster rate'" if lin else
                   "'for d and n, our approach achieves near-constant runtime in contrast to the linear-to-polynomial "
                   "runtime of the symmetry teleport'") + " (GPU curves, no numbers)",
            criterion=(f"null-space log-log slope <= {LINEAR_SLOPE_MAX} and the symmetry time's increase over the "
                       f"range >= {FASTER_FACTOR:g}x the null-space increase" if lin else
                       f"null-space log-log slope <= {CONST_SLOPE_MAX} (near-constant) and symmetry slope >= "
                       f"{SYM_SLOPE_MIN}"),
            tolerance=(f"slope {LINEAR_SLOPE_MAX}: linear up to timing noise; {FASTER_FACTOR:g}x: our reading of "
                       "'significantly faster'" if lin else
                       f"slope {CONST_SLOPE_MAX}: a 4x larger {p} costs at most 1.4x the time; {SYM_SLOPE_MIN}: "
                       "clearly growing") + "; thread CPU time on a shared CPU (cache contention remains): a rerun can move a "
                      "borderline verdict"))
    plt = _plt()
    fig, axes = plt.subplots(1, len(table), figsize=(3 * len(table), 2.8), squeeze=False)
    for ax, (p, (values, tn, ts)) in zip(axes[0], table.items()):
        ax.plot(values, tn, "o-", label="null space")
        ax.plot(values, ts, "s-", label="symmetry")
        ax.set(xlabel=p, ylabel="seconds", title=f"vary {p}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "nullspace_runtime_scaling.png", dpi=100)
    plt.close(fig)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Sec. 4.3 / Fig. 4 (Penn Treebank): nn.Embedding as a null-space layer in a small causal language model
# ------------------------------------------------------------------------------------------------------------
LM_VOCAB, LM_SEQ = 24, 16


class TinyCausalLM(nn.Module):
    """Causal pre-LN Transformer language model: token ``nn.Embedding`` + learned positions, ``num_layers`` blocks
    of causal ``nn.MultiheadAttention`` and a GELU MLP, final LayerNorm, Linear head to the vocabulary; ``tie``:
    the head is bias-free and shares the embedding's weight (GPT-style tied embeddings).

    Input (B, T) token ids; output logits laid out (B, vocab, T), so ``F.cross_entropy(out, targets)`` with (B, T)
    targets is the mean next-token loss (the library's trainer and teleports use that loss unchanged)."""

    def __init__(self, vocab: int = LM_VOCAB, seq_len: int = LM_SEQ, d_model: int = 32, nhead: int = 2,
                 num_layers: int = 2, dim_ff: int = 64, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.register_buffer("mask", torch.triu(torch.full((seq_len, seq_len), float("-inf")), 1), persistent=False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(d_model),
                           "attn": nn.MultiheadAttention(d_model, nhead, batch_first=True), "ln2": nn.LayerNorm(d_model), "fc1": nn.Linear(d_model, dim_ff),
                           "fc2": nn.Linear(dim_ff, d_model)}) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        # GPT-2's embedding init (N(0, 0.02^2)): with the default N(0, 1) a tied head starts with logits of std
        # ~sqrt(d_model) and does not learn in a few epochs
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.head = nn.Linear(d_model, vocab, bias=not tie)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos(self.positions[:t])
        for b in self.blocks:
            a = b["ln1"](h)
            h = h + b["attn"](a, a, a, attn_mask=self.mask[:t, :t].to(a.dtype), need_weights=False)[0]
            h = h + b["fc2"](nn.functional.gelu(b["fc1"](b["ln2"](h))))
        return self.head(self.norm(h)).transpose(1, 2)


def markov_corpus(n_train: int = 800, n_test: int = 200, vocab: int = LM_VOCAB, seq_len: int = LM_SEQ,
                  concentration: float = 0.3, seed: int = 0):
    """A synthetic language: a first-order Markov chain over ``vocab`` tokens whose transition rows are
    Dirichlet(``concentration``) draws (a few likely successors per token), started from its stationary
    distribution. Returns ``(DatasetBundle, entropy rate in nats)``: inputs are ``seq_len`` tokens, targets the same
    sequence shifted by one (next-token prediction). The entropy rate ``sum_i pi_i H(P_i)`` is the lowest expected
    next-token loss any model can reach (from the second token on). Cost: O((n_train + n_test) * seq_len)."""
    from torch.utils.data import TensorDataset

    from gradcond.data import DatasetBundle

    import numpy as np

    g = torch.Generator().manual_seed(seed)
    # numpy's seeded Dirichlet: torch.distributions would draw from (and depend on) the global generator
    P = torch.from_numpy(np.random.RandomState(seed).dirichlet([concentration] * vocab, size=vocab))
    P = P.clamp_min(1e-12)
    P = P / P.sum(1, keepdim=True)
    evals, evecs = torch.linalg.eig(P.T)
    pi = evecs[:, int(torch.argmin((evals - 1).abs()))].real
    pi = (pi / pi.sum()).clamp_min(0)
    pi = pi / pi.sum()
    H = float(-(pi * (P * P.log()).sum(1)).sum())
    n = n_train + n_test
    seq = torch.empty(n, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.multinomial(pi.expand(n, vocab), 1, generator=g).squeeze(1)
    for t in range(seq_len):
        seq[:, t + 1] = torch.multinomial(P[seq[:, t]], 1, generator=g).squeeze(1)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    bundle = DatasetBundle("markov-lm", TensorDataset(x[:n_train], y[:n_train]),
                           TensorDataset(x[n_train:], y[n_train:]),
                           (seq_len,), vocab, "classification", "cross_entropy",
                           {"entropy_rate": H, "vocab": vocab, "concentration": concentration})
    return bundle, H


def judge_embedding_move(seen_max: float, unseen_min: float, rel_loss: float, tol: float = 1e-4) -> tuple[bool, str]:
    """Verdict of "an embedding is a null-space layer": after a teleport, the rows of the tokens in the teleport
    batch are unchanged (largest change ``seen_max`` == 0 up to float rounding, <= 1e-12 relative), the rows of
    the other tokens moved (smallest change ``unseen_min`` > 0: all of them) and the batch loss is kept
    (``rel_loss < tol``). NaN fails."""
    ok = (math.isfinite(seen_max) and seen_max <= 1e-12 and math.isfinite(unseen_min) and unseen_min > 0
          and math.isfinite(rel_loss) and rel_loss < tol)
    return ok, (f"largest relative change of a seen token's row {seen_max:.1e}; smallest of an unseen token's row "
                f"{unseen_min:.1e}; relative batch-loss change {rel_loss:.1e}")


LM_LRS = {"sgd": 0.5, "momentum": 0.1, "adagrad": 0.05, "adam": 3e-3}


@register("nullspace-lm",
          claim="Null-space teleport accelerates the training of a Transformer language model whose first layer is "
                "an embedding, early in training (both runs end at the same loss)",
          source="seed 001 Sec. 4.3, Fig. 4 (Penn Treebank panel: causal LM, 4 heads x 64 x 4 layers, sequence 256; "
                 "App. A.2: the first linear layer replaced by an embedding layer)",
          protocol=PROTOCOL + " Causal Transformer LM (2 layers x 2 heads, d_model 32, tied embedding / head) on a "
                              "synthetic first-order Markov language (vocabulary 24, sequences of 16, 4000 training "
                              "sequences; quick: 800; PTB is not bundled; its entropy rate is the lowest reachable "
                              "loss); n = 1 sequence (16 tokens) per teleport batch: with n x 16 tokens >= 33 input "
                              "dims the attention layers and the tied head have no null space at tau = 1 (the former "
                              "n = 4 moved nothing: gain 1.000); 20 epochs; quick: SGD only, 6 epochs. The "
                              "baseline learns when its best test loss is 20 % below ln 24 (a uniform predictor).")
def run_lm(quick: bool, out_dir: Path) -> list[Row]:
    from gradcond.teleport.nullspace import NullSpaceTeleport

    data, H = markov_corpus(n_train=800 if quick else 4000)
    rows = run_training_entry(TrainingSetup(
        f"nullspace-lm[vocab {LM_VOCAB}, seq {LM_SEQ}, 2x32, 2 heads]", lambda: TinyCausalLM(), data, "markov",
        LM_LRS, 6 if quick else 20, n=1, optimizers=QUICK_OPTIMIZERS if quick else OPTIMIZERS, chance=None,
        lm_vocab=LM_VOCAB, reduced="Quick mode: 800 training sequences, SGD only, 6 epochs" if quick else ""),
        out_dir)
    # the embedding itself: one teleport of an untrained model on one sequence (16 tokens of 24 possible; 16 hidden
    # states of dimension 32, so the tied head leaves a 16-dim null space for the unseen rows)
    X, Y = data.train.tensors
    x, y = X[:1], Y[:1]
    seen = sorted(set(x.reshape(-1).tolist()))
    unseen = [i for i in range(LM_VOCAB) if i not in seen]
    moves = {}
    for tie in (True, False):
        torch.manual_seed(0)
        model = TinyCausalLM(tie=tie).double()
        w0 = model.embed.weight.detach().clone()
        layers = ["embed", "head"] if tie else ["embed"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = NullSpaceTeleport("cross_entropy", layers=layers, eta=0.05, steps=4, **GUARDS_OFF).teleport(
                model, (x, y)).batches[0]
        dw = ((model.embed.weight.detach() - w0).norm(dim=1) / w0.norm(dim=1)).tolist()
        moves[tie] = (dw, rec)
    dw, rec = moves[True]
    seen_max = max(dw[i] for i in seen)
    unseen_min = min((dw[i] for i in unseen), default=float("nan"))
    ok, why = judge_embedding_move(seen_max, unseen_min, rec.rel_loss_change)
    dwu, recu = moves[False]
    rows.insert(1, Row(  # after the setting row
        claim=f"an nn.Embedding is a null-space layer: a teleport of the tied embedding / LM head keeps the rows of "
              f"the tokens in the teleport batch ({len(seen)} of {LM_VOCAB}) and the batch loss, and moves the other rows",
        source="seed 001 Sec. 3.2-3.3 (the gradient lies in the span of the layer's input: for an embedding the "
               "one-hot rows of the batch's tokens) and App. A.2 (embedding as the first layer)",
        paper="implied: the source uses an embedding layer under the same algorithm (no numbers)",
        ours=(f"{why}; gradient norm {rec.grad_norm_before:.4f} -> {rec.grad_norm_after:.4f}; float64, eta 0.05, "
              "4 steps, guards off"),
        holds=ok,
        criterion=("float64, guards off, tied embedding and head selected: every seen token's row changes by <= 1e-12 "
                   "(relative), every unseen token's row changes (> 0), and the relative teleport-batch loss change "
                   "is < 1e-4"),
        tolerance="1e-12: a row outside the move is untouched exactly (only rounding of a zero update); 1e-4 as for "
                  "the other null-space exactness rows",
        data={"row_change": dw, "seen": seen, "grad_norm": [rec.grad_norm_before, rec.grad_norm_after],
              "rel_loss_change": rec.rel_loss_change}))
    rows.insert(2, Row(
        claim="an UNTIED token embedding (the first layer) cannot move under the null-space teleport",
        source="seed 001 Sec. 3.2 (the gradient lies in the span of the layer's input; this consequence is noted by "
               "gradcond, not by the source)",
        paper="(not discussed in the source)",
        ours=(f"largest relative row change {max(dwu):.1e}; gradient norm {recu.grad_norm_before:.4f} -> "
              f"{recu.grad_norm_after:.4f}: the teleport objective depends on a first layer only through its outputs "
              "on the batch, so its whole gradient lies in the kept space and the projected update is zero"),
        holds=None, criterion="reported, not judged", tolerance="-",
        data={"row_change": dwu, "grad_norm": [recu.grad_norm_before, recu.grad_norm_after]}))
    rows.append(Row(
        claim="the synthetic language's entropy rate (the lowest reachable next-token loss)",
        source="seed 001 Sec. 4.3 / Fig. 4, scaled down (the yardstick is gradcond's: a synthetic corpus has a known "
               "entropy rate)",
        paper="(PTB: not comparable)",
        ours=f"entropy rate {H:.3f} nats/token (vocab {LM_VOCAB}, Dirichlet(0.3) transitions); compare with the final "
             "train losses above",
        holds=None, criterion="reported, not judged", tolerance="-", data={"entropy_rate": H}))
    return rows
