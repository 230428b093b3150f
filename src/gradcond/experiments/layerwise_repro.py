"""Seed 002 (Øland), ch. 6 -- layer-wise training (DLL), segment-wise windows (DSL) and random robin, at laptop scale.

* ``dll-vs-backprop`` (Table 6.1, Tables 6.2/6.3, §6.7): DLL reaches backprop's test accuracy at a fraction of its
  peak training memory, and test accuracy peaks part-way up the network. Digits CNN (a VGG-style stack of six
  3x3 convs with BatchNorm) over three seeds, and a digits MLP.
* ``dsl-window`` (§6.5, Fig. 6.2): training windows of k consecutive blocks, larger k gives higher test accuracy
  ("depth regularises"); no dropout of either kind, as in Fig. 6.2.
* ``random-robin-stable-rank`` (§6.6.2, Alg. 4, Fig. 6.3): the per-layer stable rank of random-robin-trained
  weights is closer to backprop's than that of bottom-up DLL.

Protocol shared by all entries: sklearn digits (1,437 train / 360 test images, 8x8), 20 % of the training images
held out as a validation split (drawn from the seed). Every model selection (backprop's best epoch, DLL's early
stopping and best depth) uses the validation split; the test split is only reported. The criteria were fixed
before the runs; a claim that does not hold at our scale says "no". Backprop trains through
:func:`gradcond.train.fit`; the layer-wise methods through :func:`gradcond.train.layerwise.fit_layerwise`.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .registry import Row, register

SOURCE = "seed 002"
BATCH = 64


def _splits(seed: int, form: str = "image", dataset: str = "digits"):
    """(train, val, test) loaders; the validation split is 20 % of the training set drawn with ``seed``."""
    from ..data import load_dataset

    bundle = load_dataset(dataset, form=form)
    X, Y = bundle.train.tensors
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_val = len(X) // 5
    val, train = perm[:n_val], perm[n_val:]
    tr = DataLoader(TensorDataset(X[train], Y[train]), batch_size=BATCH, shuffle=True,
                    generator=torch.Generator().manual_seed(seed))
    va = DataLoader(TensorDataset(X[val], Y[val]), batch_size=512)
    te = DataLoader(bundle.test, batch_size=512)
    return tr, va, te


def digits_cnn(seed: int) -> torch.nn.Sequential:
    """The digits CNN of ``dll-vs-backprop``: VGG-style convs 32-32-32, max-pool, 64-64-64 (3x3, BatchNorm, ReLU),
    global average pool, Linear: six conv blocks and the classifier; activations (not weights) dominate its training
    memory."""
    from .. import zoo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return zoo.vgg(in_channels=1, num_classes=10, cfg=(32, 32, 32, "M", 64, 64, 64), batch_norm=True)


def digits_mlp(seed: int, depth: int = 6, width: int = 128) -> torch.nn.Sequential:
    from .. import zoo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return zoo.mlp(in_features=64, out_features=10, depth=depth, width=width)


def _backprop(model, tr, va, te, *, epochs: int, lr: float, seed: int, weight_decay: float = 1e-6) -> dict:
    """Full backprop with AdamW, LR x0.1 at half the epochs; the epoch with the best validation accuracy is kept
    (its test accuracy reported) and its model returned."""
    from ..train import Callback, fit
    from ..train.trainer import evaluate

    class _Select(Callback):
        def __init__(self):
            self.best = {"val": -1.0}

        def on_epoch_end(self, state):
            ce = torch.nn.functional.cross_entropy
            v = evaluate(state.model, va, ce, "classification")[1]
            if v > self.best["val"]:
                t = evaluate(state.model, te, ce, "classification")[1]
                self.best = {"val": v, "test": t, "epoch": state.epoch, "model": copy.deepcopy(state.model)}

    sel = _Select()
    with torch.random.fork_rng(devices=[]):
        fit(model, tr, None, optimizer="adamw", lr=lr, weight_decay=weight_decay, epochs=epochs, seed=seed,
            schedule="step", schedule_kwargs={"step_size": max(1, epochs // 2), "gamma": 0.1}, callbacks=[sel],
            progress=False)
    return sel.best


def _layerwise(model, tr, va, te, seed: int, **kw):
    from ..train.layerwise import fit_layerwise

    with torch.random.fork_rng(devices=[]):
        return fit_layerwise(model, tr, te, val_loader=va, seed=seed, progress_bar=False, **kw)


def _figure(path: Path, curves: dict, ylabel: str, title: str, xlabel: str = "depth (blocks)") -> None:
    from ..report.figures import new_figure

    fig, ax = new_figure(figsize=(5.5, 3.5), layout="tight")
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def _pp(x: float) -> str:
    return f"{100 * x:.2f}"


# The DLL settings of the digits CNN (chosen on the validation split of seed 0 before the judged runs). Table 6.3's
# defaults are kept where they fit: AdamW, base LR 3e-3 and WD 1e-6 with the 0.8^i / 1.15^i per-block schedules, LR
# x0.1 at 50 % and 75 % of each block's epochs, memory budget as a fraction of backprop, max decision convs 2.
# Input dropout p0 = 0.3 instead of 0.8 (8x8 digit images lose too much at 0.8); gradient dropout off.
CNN_DLL = dict(lr=3e-3, weight_decay=1e-6, lr_drops=(0.5, 0.75), input_dropout=0.3, grad_dropout=0.0,
               max_decision_convs=2, memory_budget=0.48)


@register(
    "dll-vs-backprop",
    "Deep layer-wise learning matches full backprop's test accuracy at a fraction of its peak training memory, and "
    "test accuracy peaks part-way up the network",
    "seed 002, Table 6.1, Tables 6.2/6.3, §6.2.2, §6.7",
)
def dll_vs_backprop(quick: bool, out_dir: Path) -> list[Row]:
    seeds = [0, 1, 2]
    bp_epochs, dll_epochs = (8, 8) if quick else (12, 15)
    rows: list[Row] = []
    cnn = []
    for seed in seeds:
        tr, va, te = _splits(seed)
        bp = _backprop(digits_cnn(seed), tr, va, te, epochs=bp_epochs, lr=3e-3, seed=seed)
        res = _layerwise(digits_cnn(seed), tr, va, te, seed, epochs=dll_epochs, **CNN_DLL)
        cnn.append({"seed": seed, "backprop_test": bp["test"], "backprop_epoch": bp["epoch"],
                    "dll_test": res.best_test_accuracy, "dll_best_depth": res.best_depth,
                    "dll_test_per_depth": res.test_accuracy, "dll_val_per_depth": res.val_accuracy,
                    "memory_ratio": res.memory_ratio, "memory_ratio_per_block": res.memory_ratios,
                    "backprop_memory_bytes": res.backprop_memory.total,
                    "heads": [str(c) for c in res.head_configs], "n_blocks": len(res.test_accuracy)})
    bp_mean = statistics.mean(r["backprop_test"] for r in cnn)
    dll_mean = statistics.mean(r["dll_test"] for r in cnn)
    mem_max = max(r["memory_ratio"] for r in cnn)
    per_seed = "; ".join(f"seed {r['seed']}: {_pp(r['backprop_test'])} / {_pp(r['dll_test'])} (depth "
                         f"{r['dll_best_depth']}/{r['n_blocks']}, memory {r['memory_ratio']:.1%})" for r in cnn)
    rows.append(Row(
        claim="DLL reaches full backprop's test accuracy (CNN)",
        source=f"{SOURCE}, Table 6.1 (CNN-4: 99.54 / 99.58 on MNIST) and Table 6.2",
        paper="CNN-4 MNIST 99.54 / 99.58, FashionMNIST 92.02 / 92.20, KMNIST 97.09 / 96.72 (baseline / DLL)",
        ours=f"digits CNN, mean of 3 seeds: backprop {_pp(bp_mean)} %, DLL {_pp(dll_mean)} % ({per_seed})",
        criterion="mean DLL test accuracy (best depth chosen on validation) >= mean backprop test accuracy (best "
                  "epoch chosen on validation) - 1 pp, over seeds 0, 1, 2",
        tolerance="1 pp: the issue's bar; the thesis's own CNN-4 differences reach 0.37 pp and digits' 360 test "
                  "images make one image 0.28 pp",
        holds=dll_mean >= bp_mean - 0.01,
        data={"seeds": cnn},
    ))
    rows.append(Row(
        claim="DLL trains with at most half of backprop's peak training memory (CNN)",
        source=f"{SOURCE}, Tables 6.2/6.3 (relative memory use 18-40 %), §6.2.2 (memory falls by 40-70 %)",
        paper="30 % typical (budget 30 +- 0.5 %), 18-40 % over Table 6.2",
        ours=f"largest step over all blocks and seeds: {mem_max:.1%} of backprop "
             f"({cnn[0]['backprop_memory_bytes']} B at batch {BATCH}, CPU saved-tensor accounting incl. heads, "
             f"parameters, gradients and AdamW state)",
        criterion="max over seeds and blocks of (feednet + block + head step memory) / (full backprop step memory) "
                  "<= 0.50",
        tolerance="none beyond the 50 % bar (the memory budget given to DLL is 48 %)",
        holds=mem_max <= 0.50,
        data={"memory_ratio_per_block": {r["seed"]: r["memory_ratio_per_block"] for r in cnn}},
    ))
    rel_peaks = [r["dll_best_depth"] / r["n_blocks"] for r in cnn]
    test_peaks = [1 + max(range(r["n_blocks"]), key=lambda i: (r["dll_test_per_depth"][i], -i)) for r in cnn]
    below_top = sum(p < r["n_blocks"] for p, r in zip(test_peaks, cnn))
    rows.append(Row(
        claim="Test accuracy peaks part-way up the network (upper blocks are redundant)",
        source=f"{SOURCE}, §6.7 and Table 6.3 (peak layer, e.g. VGG-13 peaks at 5 of 10)",
        paper="peaks about halfway up (Table 6.3: 2/33 to 14/17)",
        ours=f"peak depth by test accuracy per seed: {test_peaks} of {cnn[0]['n_blocks']} blocks; by validation: "
             f"{[r['dll_best_depth'] for r in cnn]} (relative {', '.join(f'{p:.2f}' for p in rel_peaks)})",
        criterion="in at least 2 of 3 seeds the test accuracy of the DLL network peaks strictly below the top block",
        tolerance="ties go to the shallower depth",
        holds=below_top >= 2,
        data={"test_peaks": test_peaks, "val_peaks": [r["dll_best_depth"] for r in cnn]},
    ))
    curve = [statistics.mean(r["dll_test_per_depth"][d] for r in cnn) for d in range(cnn[0]["n_blocks"])]
    rows.append(Row(
        claim="Per-block test-accuracy curve of DLL (CNN, mean of 3 seeds)",
        source=f"{SOURCE}, Table 6.3 (peak layer)",
        ours="depth 1..n: " + ", ".join(_pp(a) for a in curve) + f"; backprop {_pp(bp_mean)}",
        data={"curve": curve},
    ))

    # MLP (Table 6.1's pattern on the second architecture; memory reported: weights dominate an MLP on digits)
    tr, va, te = _splits(0, form="flat")
    mlp_epochs = 10 if quick else 20
    bp = _backprop(digits_mlp(0), tr, va, te, epochs=mlp_epochs, lr=3e-3, seed=0)
    res = _layerwise(digits_mlp(0), tr, va, te, 0, epochs=mlp_epochs, lr=3e-3, lr_drops=(0.5, 0.75),
                     input_dropout=0.3)
    rows.append(Row(
        claim="DLL reaches full backprop's test accuracy (MLP)",
        source=f"{SOURCE}, Table 6.1",
        paper="differences -0.37 to +0.18 pp (CNN-4, VGG-13)",
        ours=f"digits MLP (6 Linear, width 128), seed 0: backprop {_pp(bp['test'])} %, "
             f"DLL {_pp(res.best_test_accuracy)} % "
             f"(depth {res.best_depth}/{len(res.test_accuracy)}; per depth "
             f"{', '.join(_pp(a) for a in res.test_accuracy)}); memory {res.memory_ratio:.1%} of backprop",
        criterion="DLL test accuracy >= backprop test accuracy - 1 pp (one seed)",
        tolerance="1 pp as for the CNN",
        holds=res.best_test_accuracy >= bp["test"] - 0.01,
        data={"backprop_test": bp["test"], "dll_test_per_depth": res.test_accuracy,
              "memory_ratio": res.memory_ratio, "memory_ratios": res.memory_ratios},
    ))
    curves = {f"DLL seed {r['seed']}": r["dll_test_per_depth"] for r in cnn}
    _figure(out_dir / "dll_per_depth.png", curves, "test accuracy",
            f"DLL on the digits CNN (backprop mean {_pp(bp_mean)} %)")
    (out_dir / "dll_vs_backprop.json").write_text(json.dumps({"cnn": cnn}, indent=2, default=str))
    return rows


@register(
    "dsl-window",
    "Training windows of k consecutive blocks (DSL), larger k reaches higher test accuracy: depth regularises",
    "seed 002, §6.5, Fig. 6.2",
)
def dsl_window(quick: bool, out_dir: Path) -> list[Row]:
    seeds = [0, 1]
    windows = [1, 2, 3]
    epochs = 8 if quick else 15
    accs: dict[int, list[float]] = {k: [] for k in windows}
    tops: dict[int, list[float]] = {k: [] for k in windows}
    for seed in seeds:
        tr, va, te = _splits(seed, form="flat")
        for k in windows:
            res = _layerwise(digits_mlp(seed), tr, va, te, seed, method="dsl", window=k, epochs=epochs, lr=3e-3,
                             lr_drops=(0.5, 0.75), input_dropout=0.0, grad_dropout=0.0)
            accs[k].append(res.best_test_accuracy)
            tops[k].append(res.test_accuracy[-1])
    mean = {k: statistics.mean(v) for k, v in accs.items()}
    mean_top = {k: statistics.mean(v) for k, v in tops.items()}
    rows = [Row(
        claim="A larger DSL window gives a higher test accuracy (depth regularises)",
        source=f"{SOURCE}, Fig. 6.2 (MobileNetV2, CIFAR-10, transfer learning, 50 epochs per subnet)",
        paper="test accuracy rises with the subnet size k (figure; no table)",
        ours="digits MLP (6 Linear, width 128), mean of seeds 0, 1, test accuracy at the best depth: "
             + ", ".join(f"k={k}: {_pp(mean[k])} %" for k in windows)
             + "; at the top depth: " + ", ".join(f"k={k}: {_pp(mean_top[k])} %" for k in windows),
        criterion=f"mean test accuracy (best depth on validation) at k={windows[-1]} > at k=1",
        tolerance="strictly greater; no margin (a trend claim read off a figure)",
        holds=mean[windows[-1]] > mean[1],
        data={"best_depth_accuracy": accs, "top_depth_accuracy": tops},
    )]
    _figure(out_dir / "dsl_window.png", {f"seed {s}": [accs[k][i] for k in windows] for i, s in enumerate(seeds)},
            "test accuracy (best depth)", "DSL window size vs test accuracy (digits MLP)", xlabel="window k")
    return rows


def _stable_ranks(blocks) -> list[float]:
    from ..probes.representation import stable_rank
    from ..train.layerwise import weight_layers

    return [stable_rank(layer.weight) for b in blocks for layer in weight_layers(b)]


@register(
    "random-robin-stable-rank",
    "Per-layer stable rank of random-robin DLL is closer to backprop's than that of bottom-up DLL",
    "seed 002, §6.6.2, Algorithm 4, Fig. 6.3",
)
def random_robin_stable_rank(quick: bool, out_dir: Path) -> list[Row]:
    from .. import zoo
    from ..train.layerwise import split_blocks

    seed = 0
    epochs = 6 if quick else 12

    def cnn():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return zoo.vgg(in_channels=1, num_classes=10, cfg=(16, 16, "M", 32, 32), batch_norm=True)

    tr, va, te = _splits(seed)
    bp = _backprop(cnn(), tr, va, te, epochs=epochs, lr=3e-3, seed=seed)
    common = dict(lr=3e-3, lr_drops=(), input_dropout=0.3, max_decision_convs=1)
    dll = _layerwise(cnn(), tr, va, te, seed, method="dll", epochs=epochs, **common)
    rr = _layerwise(cnn(), tr, va, te, seed, method="random_robin", epochs=epochs, epochs_per_round=1, **common)
    bp_blocks = split_blocks(bp["model"])[:len(dll.blocks)]
    sr = {"backprop": _stable_ranks(bp_blocks), "dll": _stable_ranks(dll.blocks),
          "random_robin": _stable_ranks(rr.blocks)}

    def dist(a):
        return statistics.mean(abs(math.log(x) - math.log(y)) for x, y in zip(sr[a], sr["backprop"]))

    d_dll, d_rr = dist("dll"), dist("random_robin")
    fmt = {k: ", ".join(f"{v:.2f}" for v in vs) for k, vs in sr.items()}
    rows = [Row(
        claim="Random robin's per-layer stable rank is closer to backprop's than bottom-up DLL's",
        source=f"{SOURCE}, Fig. 6.3 (VGG-13)",
        paper="random robin 'clearly much closer to the baseline' (figure; no numbers)",
        ours=f"digits VGG (4 convs), stable rank per conv: backprop [{fmt['backprop']}], DLL [{fmt['dll']}], "
             f"random robin [{fmt['random_robin']}]; mean |log ratio| to backprop: DLL {d_dll:.3f}, "
             f"random robin {d_rr:.3f}",
        criterion="mean over conv layers of |log sr(method) - log sr(backprop)|: random robin < DLL",
        tolerance="strictly smaller; same epochs per block for DLL and random robin (one epoch per round)",
        holds=d_rr < d_dll,
        data={"stable_rank": sr, "distance": {"dll": d_dll, "random_robin": d_rr}},
    ), Row(
        claim="Test accuracy of the three trainings (best depth / best epoch on validation)",
        source=f"{SOURCE}, §6.6.2",
        paper="random robin matched backprop on VGG where bottom-up DLL could not",
        ours=f"backprop {_pp(bp['test'])} %, DLL {_pp(dll.best_test_accuracy)} %, random robin "
             f"{_pp(rr.best_test_accuracy)} %",
        data={"backprop": bp["test"], "dll": dll.test_accuracy, "random_robin": rr.test_accuracy},
    )]
    _figure(out_dir / "stable_rank.png", sr, "stable rank", "Stable rank per conv layer (digits VGG)",
            xlabel="conv layer")
    return rows
