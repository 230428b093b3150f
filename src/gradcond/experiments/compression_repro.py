"""Seed 002, chapter 3: entropy-coded weight compression (``compression-bits``) and its use on real
``torch.distributed`` ranks (``compression-ddp``).

``compression-bits`` is the source's experiment simulated in one process: the source's 784-392-50-10 tanh MLP
trained with MSE for 100 epochs on MNIST-shaped inputs (:func:`digits28`: ``digits`` upsampled and padded to 28x28,
as MNIST is not bundled), all weights quantised by the codec after every epoch
(:class:`~gradcond.compression.CompressedWeightSync` with ``every_epochs=1``), for c in {5, 6}, M = 4, against fixed
8-bit quantisation and float32 (protocol: :data:`SIM_DEFAULTS`; why the bit rate comes out as it does:
:func:`run_compression_bits`).

``compression-ddp`` runs 2 gloo ranks on the loopback interface (``tcp://127.0.0.1:<free port>``): plain DDP, DDP
with :func:`~gradcond.compression.entropy_compress_hook`, and local SGD with a compressed weight sync every k steps;
plus a rank killed mid-run, after which the survivor must exit with a clear error.

:func:`run_ddp` is the launcher (``torch.multiprocessing`` spawn context, one process per rank); :func:`ddp_worker`
is the per-rank program.  Both are reused by ``tests/test_compression_ddp.py``.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch

from ..distributed import describe_exit, gloo_threads, init_local_group
from . import judging as J
from ._launch import launch_ranks
from .registry import Row, register

SOURCE = "seed 002 (Øland 2024, CMU-CS-24-147), ch. 3, §3.8-3.9, fig. 3.4-3.5"


# ----------------------------------------------------------------------------------------------------------------
# data and model shared by both reproductions
def _digits(dtype=torch.float32):
    from ..data import load_dataset

    b = load_dataset("digits", form="flat", seed=0, dtype=dtype)
    return b


def _tensors(bundle, split: str):
    ds = getattr(bundle, split) if hasattr(bundle, split) else None
    if ds is None:
        raise RuntimeError(f"dataset bundle has no {split!r} split")
    if hasattr(ds, "tensors"):
        return ds.tensors
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.tensor(ys)


def _mlp(sizes, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------------------------------------------
# compression-ddp: launcher and worker
def _train_ddp(rank: int, world: int, cfg: dict, mode: str, result: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..compression import EntropyHookState, entropy_compress_hook, sync_weights_compressed

    bundle = _digits()
    xtr, ytr = _tensors(bundle, "train")
    xte, yte = _tensors(bundle, "test")
    # each rank trains on its own strided shard of the training set (data parallelism)
    xtr, ytr = xtr[rank::world], ytr[rank::world]
    model = _mlp([xtr.shape[1], *cfg["hidden"], 10], cfg["seed"])
    state = None
    if mode in ("plain", "hook"):
        net = DDP(model)
        if mode == "hook":
            state = EntropyHookState(c=cfg["c"], M=cfg["M"], seed=cfg["seed"])
            net.register_comm_hook(state, entropy_compress_hook)
    else:
        net = model
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9)
    g = torch.Generator().manual_seed(cfg["seed"] + 1000 * rank)
    bs, step, sync_bits = cfg["batch_size"], 0, []
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - bs + 1, bs):
            if cfg.get("max_steps") is not None and step >= cfg["max_steps"]:
                break  # a short run (tests)
            if cfg.get("die_rank") == rank and step == cfg.get("die_at_step"):
                os._exit(17)  # fault injection for the test: the rank vanishes without a goodbye
            if cfg.get("hang_rank") == rank and step == cfg.get("hang_at_step"):
                time.sleep(cfg["hang_seconds"])  # fault injection: the rank stops answering but stays alive
                os._exit(18)
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            step += 1
            if mode == "local" and step % cfg["every_steps"] == 0:
                rep = sync_weights_compressed(model, cfg["c"], cfg["M"], generator=g)
                sync_bits.append(rep.bits_per_param)
    if mode == "local":  # a last sync so the replicas agree before evaluation
        sync_bits.append(sync_weights_compressed(model, cfg["c"], cfg["M"], generator=g).bits_per_param)
    # replicas must agree: gather a checksum of the parameters
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()]))
    result[mode] = {
        "accuracy": _accuracy(model, xte, yte),
        "replicas_identical": all(torch.equal(s, sums[0]) for s in sums),
        "steps": step,
        "param_checksum": [float(v) for v in sums[0]],  # lets a caller check the modes trained differently
        "bits_per_value": (state.mean_bits_per_value if state is not None else
                           (sum(sync_bits) / len(sync_bits) if sync_bits else 32.0)),
    }


def ddp_worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """One rank: join the gloo group on 127.0.0.1, train each mode in ``cfg["modes"]``, write ``rank{r}.json``.

    Any failure is written as ``{"error": ...}`` and the process exits with code 1 (the launcher reads it).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    code = 0
    try:
        init_local_group("gloo", port, rank, world, cfg.get("timeout_s", 30))  # torch._dynamo first: see there
        for mode in cfg["modes"]:
            _train_ddp(rank, world, cfg, mode, result)
        dist.barrier()  # waits with the GIL released: gloo's workers finish any release that needs it
        dist.destroy_process_group()
        result["threads_after_destroy"] = gloo_threads()  # none: the group and its threads are gone
    except Exception as exc:  # report, then exit non-zero: the launcher turns it into one clear message
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = 1
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if code:
        os._exit(code)  # skip destroy_process_group: the peer may be gone


def run_ddp(cfg: dict, out_dir: str | Path, world: int = 2, join_timeout: float = 300.0,
            start_method: str = "spawn") -> dict:
    """Start ``world`` ranks of :func:`ddp_worker` on a free loopback port and wait (at most ``join_timeout`` s).

    Returns ``{"exitcodes": [...], "seconds": [...] (per rank, from start to exit), "ranks": [rank results]}``;
    a rank still alive after the timeout is terminated and reported with exit code None.
    """
    t0 = time.monotonic()
    codes, exited, ranks = launch_ranks(ddp_worker, world, cfg, out_dir, join_timeout, start_method=start_method)
    seconds = [None if e is None else e - t0 for e in exited]
    return {"exitcodes": codes, "seconds": seconds, "ranks": ranks}


DDP_DEFAULTS = {"hidden": [64], "seed": 0, "lr": 0.05, "batch_size": 32, "epochs": 20, "c": 6, "M": 4,
                "every_steps": 10, "timeout_s": 30}


def _ddp_preconditions(plain: dict, coded: dict) -> list[J.Precondition]:
    """Plain DDP learns; the coded mode compressed (>= 2x) and trained differently from plain DDP."""
    changed = coded["param_checksum"] != plain["param_checksum"]
    return [J.baseline_learns(plain["accuracy"], 0.1, what="plain DDP's final test accuracy"),
            J.treatment_happened(32.0 / coded["bits_per_value"], 2.0, "compression ratio vs float32", fmt=".2f",
                                 unit="x"),
            J.Precondition("the treatment happened", "the coded run's final parameters differ from plain DDP's "
                           "(the compression changed the training)",
                           "parameters " + ("differ" if changed else "bit-identical to plain DDP's"), changed)]


def ddp_accuracy_rows(cfg: dict, plain: dict, hook: dict, local: dict, hook_identical: list[bool],
                      local_identical: list[bool]) -> list[Row]:
    """The accuracy rows of ``compression-ddp`` from the per-mode results of rank 0 (and every rank's replica
    check)."""
    diff = 100 * (hook["accuracy"] - plain["accuracy"])
    ldiff = 100 * (local["accuracy"] - plain["accuracy"])
    return [
        Row(claim=f"DDP + entropy hook (c={cfg['c']}, M={cfg['M']}) vs plain DDP: final test accuracy, digits MLP",
            source="seed 002 §3.9 (compressed exchange, no loss of accuracy)",
            paper="no loss of accuracy",
            criterion="|final test accuracy (hook) - (plain DDP)| <= 0.5 pp, same seed and data order",
            tolerance="0.5 pp: 'no loss' read as within the run-to-run noise of one digits run (~0.3-0.5 pp); fixed "
                      "before the run",
            ours=f"{100 * hook['accuracy']:.2f} % vs {100 * plain['accuracy']:.2f} % ({diff:+.2f} pp) at "
                 f"{hook['bits_per_value']:.2f} bits/gradient value (vs 32)",
            holds=abs(diff) <= 0.5, preconditions=_ddp_preconditions(plain, hook),
            data={"plain": plain, "hook": hook}),
        Row(claim="replicas stay identical under the hook (all ranks decode and average in rank order)",
            source="DDP invariant (library requirement, not a source claim)",
            criterion="every rank's parameters are bit-identical after training", tolerance="exact (bitwise)",
            ours=f"identical: {all(hook_identical)}", holds=all(hook_identical)),
        Row(claim=f"local SGD with compressed weight sync every {cfg['every_steps']} steps vs plain DDP",
            source="seed 002 §3.6-3.9 (weights, not gradients, synchronised)",
            paper="no loss of accuracy",
            criterion="|final test accuracy (local SGD + compressed sync) - (plain DDP)| <= 2 pp and replicas "
                      "identical",
            tolerance="2 pp: local SGD syncs every few steps, so a larger gap than gradient exchange is expected at "
                      "this scale; fixed before the run",
            ours=f"{100 * local['accuracy']:.2f} % ({ldiff:+.2f} pp) at {local['bits_per_value']:.2f} bits/param per "
                 f"sync, {cfg['every_steps']}x fewer exchanges",
            holds=abs(ldiff) <= 2.0 and all(local_identical), preconditions=_ddp_preconditions(plain, local),
            data={"local": local}),
    ]


@register(
    "compression-ddp",
    claim="Entropy-coded gradient exchange (DDP comm hook, 2 gloo ranks) trains as well as plain DDP at a fraction "
          "of the bits; a rank that dies makes the other exit with a clear error.",
    source=SOURCE + "; §3.9 (no loss of accuracy); the dead-rank behaviour is a library requirement, not a "
                    "source claim",
    protocol="2 gloo ranks on the loopback interface, each on its strided half of digits; MLP 64-64-10 tanh, SGD "
             "momentum 0.9, lr 0.05, batch 32 per rank, 8 epochs (full: 30), seed 0, the same data order in every "
             "mode. Modes: plain DDP; DDP with the entropy-coded gradient hook (c = 6, M = 4, the source's "
             "'excellent' setting); local SGD with a compressed weight sync every 10 steps (the source compresses "
             "weights). Preconditions fixed before the run: plain DDP learns (test accuracy >= 30 %); each coded "
             "mode compressed (>= 2x fewer bits than float32) and trained differently from plain DDP (its final "
             "parameters differ). Then rank 1 is killed at step 5 of a hook run.",
)
def run_compression_ddp(quick: bool, out_dir: Path) -> list[Row]:
    cfg = dict(DDP_DEFAULTS, modes=["plain", "hook", "local"], epochs=8 if quick else 30)
    res = run_ddp(cfg, out_dir / "ranks", world=2)
    rows = []
    if any(c != 0 for c in res["exitcodes"]):
        errs = "; ".join(f"rank {i} {describe_exit(c)}" + (f" ({r['error']})" if r.get("error") else "")
                         for i, (c, r) in enumerate(zip(res["exitcodes"], res["ranks"])))
        return [Row("2 gloo ranks train", "library requirement (the DDP runs must complete)",
                    f"failed: exit codes {res['exitcodes']}: {errs}", False,
                    criterion="both ranks exit with code 0", tolerance="exact")]
    r0 = res["ranks"][0]
    plain, hook, local = r0["plain"], r0["hook"], r0["local"]
    rows += ddp_accuracy_rows(cfg, plain, hook, local, [r["hook"]["replicas_identical"] for r in res["ranks"]],
                              [r["local"]["replicas_identical"] for r in res["ranks"]])
    kill = dict(cfg, modes=["hook"], epochs=1000, die_rank=1, die_at_step=5)
    kres = run_ddp(kill, out_dir / "kill", world=2, join_timeout=120)
    survivor = kres["ranks"][0].get("error", "")
    t0, t1 = kres["seconds"]
    t = None if t0 is None or t1 is None else t0 - t1  # from rank 1's death to rank 0's exit
    rows.append(Row(
        claim="rank 1 killed at step 5: rank 0 exits with a clear error",
        source="library requirement (fault handling; not a claim of the source)",
        criterion="rank 0 exits with code 1 and the message 'exchange of compressed packages failed' < 60 s after "
                  "rank 1 dies",
        tolerance="60 s: the gloo timeout budget the library promises",
        ours=f"rank 0 {describe_exit(kres['exitcodes'][0])}, {t if t is None else round(t, 1)} s after rank 1 died: "
             f"{survivor[:160]}",
        holds=kres["exitcodes"][0] == 1 and t is not None and t < 60 and "exchange of compressed packages failed"
        in survivor, data={"seconds": t, "error": survivor}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# compression-bits: the one-process simulation of §3.7-3.9
#: The simulation's protocol.  Given by the source (§3.1, §3.7): the 784-392-50-10 MLP, tanh on every layer, MSE,
#: 100 epochs, all weights quantised after every epoch, M = 4, c in {5, 6}.  Not given: the learning rate, batch
#: size, optimizer, initialisation and targets.  Ours: PyTorch's default initialisation, one-hot (0/1) targets, SGD
#: with momentum 0.9, batch 4 and learning rate 0.05.  Batch 4 gives 360 steps per epoch on the 1438 training
#: images of ``digits`` -- 36 000 steps in 100 epochs, the count of an MNIST run (60 000 images) at batch ~170 --
#: so "100 epochs" means about as much training as in the source (whose batch size is not stated either).  The
#: bit rate depends on how far training has moved the weights (steps x learning rate, see the ``compression-bits``
#: docstring), so the full run also reports the rate at learning rate 0.02 (reported, not judged).
SIM_DEFAULTS = {"hidden": (392, 50), "lr": 0.05, "momentum": 0.9, "batch_size": 4, "epochs": 100,
                "seeds": (0, 1, 2), "quick_epochs": 20, "quick_seeds": (0,), "sensitivity_lr": 0.02}


def digits28(dtype=torch.float32):
    """``digits`` laid out like MNIST: each 8x8 image bilinearly upsampled to 20x20 and zero-padded to 28x28
    (MNIST centres its digits in a 20x20 box of a 28x28 frame), flattened to 784 inputs in [0, 1].

    Returns ``(x_train, y_train, x_test, y_test)`` (the fixed 80/20 split of ``load_dataset("digits")``).
    Why not the 64 raw inputs: as in MNIST, the border pixels are always 0, so the first layer's weights from them
    never receive a gradient and keep their initial values while the weights from the digit's pixels grow; that
    first layer holds 94 % of the parameters, and its weight histogram (the quantity the codec compresses) is shaped
    by exactly this.  Cost: one interpolation of 1797 images, well under a second.
    """
    bundle = _digits(dtype)
    out = []
    for split in ("train", "test"):
        x, y = _tensors(bundle, split)
        up = torch.nn.functional.interpolate(x.reshape(-1, 1, 8, 8), size=(20, 20), mode="bilinear",
                                             align_corners=False)
        out += [torch.nn.functional.pad(up, (4, 4, 4, 4)).reshape(len(x), 784), y]
    return tuple(out)


def _layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model if isinstance(m, torch.nn.Linear)]


def _flat(layer: torch.nn.Linear) -> torch.Tensor:
    # one package per layer, bias folded in: the source's W_i includes the bias row (ch. 2)
    return torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])


def layer_entropy(w: torch.Tensor, M: int = 4) -> float:
    """Entropy in bits of the ``2^M``-bin uniform histogram of **all** of ``w`` over ``[min, max]`` (the source's
    Fig. 3.3 quantity; the codec estimates it from a fraction F).  O(n)."""
    from ..compression import quantize_indices

    lo, hi = float(w.min()), float(w.max())
    p = torch.bincount(quantize_indices(w, lo, hi, M), minlength=2 ** M).double() / w.numel()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def train_source_mlp(epochs: int, seed: int, lr: float = SIM_DEFAULTS["lr"],
                     batch_size: int = SIM_DEFAULTS["batch_size"], after_epoch=None, data=None):
    """Train the source's 784-392-50-10 tanh MLP with MSE on :func:`digits28` (protocol: :data:`SIM_DEFAULTS`).

    ``after_epoch(epoch, model)`` runs after every epoch (the simulation quantises there).  Returns the model.  The
    global RNG is left untouched (initialisation and batch order come from ``seed``).  Cost: ``epochs`` x 360 SGD
    steps of a 330 k-parameter MLP, about 0.3 s per epoch on one core.
    """
    xtr, ytr, _, _ = data if data is not None else digits28()
    with torch.random.fork_rng(devices=[]):
        model = _mlp([784, *SIM_DEFAULTS["hidden"], 10], seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=SIM_DEFAULTS["momentum"])
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.one_hot(ytr, 10).to(xtr.dtype)
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            # tanh on the output too: "the activation functions of all neurons were tanh" (§3.1)
            torch.nn.functional.mse_loss(torch.tanh(model(xtr[idx])), target[idx]).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(epoch, model)
    return model


def _quantize_fixed(model: torch.nn.Module, bits: int) -> None:
    """Fixed N-bit uniform quantisation of each module's weights+bias to bin centres (the source's §3.2)."""
    from ..compression import quantize_indices

    with torch.no_grad():
        for mod in model.modules():
            ps = list(mod.parameters(recurse=False))
            if not ps:
                continue
            flat = torch.cat([p.reshape(-1) for p in ps])
            lo, hi = float(flat.min()), float(flat.max())
            if hi == lo:
                continue
            q = quantize_indices(flat, lo, hi, bits).to(flat.dtype)
            new = lo + (q + 0.5) / 2 ** bits * (hi - lo)
            for p, v in zip(ps, new.split([p.numel() for p in ps])):
                p.copy_(v.reshape(p.shape))


def simulate(setting: str, epochs: int, seed: int, lr: float = SIM_DEFAULTS["lr"], data=None) -> dict:
    """The source's simulation for one ``setting`` (``"float32"``, ``"fixed8"``, ``"c5"``, ``"c6"``): train with
    :func:`train_source_mlp`; after every epoch quantise all weights per ``setting`` (the weights keep training
    from the quantised values) and record the test accuracy and the bit rates.

    Per epoch: ``bits`` (transmitted bits/param, headers included), ``payload`` (coded indices alone, the source's
    Fig. 3.5 quantity), ``n_bits`` (N averaged over parameters: the quantisation-only rate), ``H`` (per layer, the
    M = 4 entropy of all weights, Fig. 3.3).  For ``float32``/``fixed8`` the codec (c = 5 and 6) is also run on the
    weights as a measurement only (``codec_c5``/``codec_c6`` payload bits/param; nothing is applied), and
    ``huffman_c5``/``huffman_c6`` the bits/param the source's canonical Huffman code of the same indices would take
    (computed from each package's histogram: :func:`gradcond.compression.huffman.expected_length`).
    """
    from ..compression import CompressedWeightSync, encode

    data = data if data is not None else digits28()
    _, _, xte, yte = data
    rec = {"setting": setting, "seed": seed, "lr": lr, "acc": [], "bits": [], "payload": [], "n_bits": [], "H": [],
           "codec_c5": [], "codec_c6": [], "huffman_c5": [], "huffman_c6": []}
    sync = CompressedWeightSync(every_epochs=1, c=int(setting[1]), M=4, seed=seed) if setting in ("c5", "c6") \
        else None
    g_measure = torch.Generator().manual_seed(10_000 + seed)  # measurement-only samples: never touch training

    class _S:  # the minimal TrainState the callback reads (model; no run logger)
        run = None

    def after_epoch(epoch, model):
        layers = _layers(model)
        sizes = [layer.weight.numel() + layer.bias.numel() for layer in layers]
        n = sum(sizes)
        if sync is not None:
            st = _S()
            st.model = model
            rep = sync.sync(st)
            rec["bits"].append(rep.bits_per_param)
            rec["payload"].append(rep.payload_bits_per_param)
            rec["n_bits"].append(sum(k * rep.n_bits[str(i)] for i, k in zip(range(0, 2 * len(layers), 2), sizes)) / n)
        else:
            if setting == "fixed8":
                _quantize_fixed(model, 8)
            rec["bits"].append(32.0 if setting == "float32" else 8.0)
            rec["payload"].append(rec["bits"][-1])
            rec["n_bits"].append(rec["bits"][-1])
            for c in (5, 6):
                pk = [encode(_flat(layer), c=c, M=4, generator=g_measure) for layer in layers]
                rec[f"codec_c{c}"].append(sum(k * p.payload_bits_per_value for k, p in zip(sizes, pk)) / n)
                rec[f"huffman_c{c}"].append(sum(k * _huffman_bits(p.counts) for k, p in zip(sizes, pk)) / n)
        rec["H"].append([layer_entropy(_flat(layer)) for layer in layers])
        rec["acc"].append(_accuracy(model, xte, yte))

    train_source_mlp(epochs, seed, lr=lr, after_epoch=after_epoch, data=data)
    accs = rec["acc"]
    best = max(range(epochs), key=lambda e: (accs[e], -e))
    rec.update(best_acc=accs[best], best_epoch=best + 1, final_acc=accs[-1])
    for key in ("bits", "payload", "n_bits", "codec_c5", "codec_c6", "huffman_c5", "huffman_c6"):
        if rec[key]:
            rec[f"mean_{key}"] = sum(rec[key]) / len(rec[key])
    return rec


#: The bit-rate and convergence claims are averages over the source's 100-epoch runs (§3.7; Fig. 3.4 over 50
#: trials): judged only on runs of at least this many epochs and seeds (quick mode: untestable, naming its setting).
FULL_SETTING = {"epochs": 100, "seeds": 3}
#: A coded run "compressed" when it sends at most half the bits of float32 (compression ratio >= 2).
MIN_COMPRESSION = 2.0
#: "Converges" = the epoch of the best test accuracy (§3.9); judged only when float32's mean best epoch lies in the
#: first 80 % of the run (else the run's length caps it).
CAP_FRACTION = 0.8
CHANCE = 0.1

BITS_PROTOCOL = (
    "The source's §3.7-3.9 simulation in one process: the 784-392-50-10 tanh MLP (tanh on every layer, MSE, "
    "100 epochs, all weights quantised after every epoch, M = 4, c in {5, 6}; §3.1, §3.7) on digits laid out as "
    "28x28 (MNIST is not bundled), PyTorch's default init, one-hot targets, SGD momentum 0.9, batch 4, lr 0.05 "
    "(not given by the source; 36,000 steps, the count of an MNIST run at batch ~170), against fixed 8-bit "
    "quantisation and float32; 3 seeds (quick: 20 epochs, 1 seed). One rule for both modes: the bit-rate and "
    "convergence rows are claims about 100-epoch averages and are untestable (the setting is not the claim's) on "
    "shorter runs; the entropy and accuracy rows are judged in both. Preconditions fixed before the run: float32 "
    "learns (best test accuracy >= 30 %); a coded run compressed (>= 2x fewer bits than float32); float32's best "
    "epoch lies in the first 80 % of the run for the convergence row.")


def _full_setting(epochs: int, n_seeds: int) -> J.Precondition:
    """The setting is the claim's: a 100-epoch average over >= 3 seeds (:data:`FULL_SETTING`)."""
    e, n = FULL_SETTING["epochs"], FULL_SETTING["seeds"]
    return J.setting_matches(epochs >= e and n_seeds >= n,
                             f"the source's {e}-epoch runs (the claim is an average over training), >= {n} seeds",
                             f"{epochs} epochs, {n_seeds} seed(s)", float(epochs))


def _float32_learns(best_acc: float) -> J.Precondition:
    return J.baseline_learns(best_acc, CHANCE, what="float32's mean best test accuracy")


def _compressed(bits: float) -> J.Precondition:
    return J.treatment_happened(32.0 / bits, MIN_COMPRESSION, "compression ratio vs float32 (32 / mean bits)",
                                fmt=".2f", unit="x")


def bits_row(setting: str, paper: float, payload: float, transmitted: float, last: float, epochs: int,
             n_seeds: int) -> Row:
    """Mean coded bits/param over training within 1 bit of the source's value (a 100-epoch claim)."""
    return Row(
        claim=f"{setting[0]} = {setting[1]}, M = 4: average bits/param over training (entropy-coded)",
        source="seed 002 §3.8-3.9, fig. 3.5",
        paper=f"{paper} bits/param",
        criterion="mean coded-index bits/param over a 100-epoch run within 1 bit of the source's value",
        tolerance="1 bit: a different data set (digits laid out as 28x28 vs MNIST) and unknown learning rate "
                  "shift the entropy; fixed before the run",
        ours=f"{payload:.2f} bits/param for the coded indices ({transmitted:.2f} transmitted, headers included), "
             f"last epoch {last:.2f}; {n_seeds} seed(s) x {epochs} epochs",
        holds=abs(payload - paper) <= 1.0,
        preconditions=[_full_setting(epochs, n_seeds), _compressed(transmitted)],
        data={"bits": transmitted, "payload_bits": payload})


def n_bits_row(n5: float, epochs: int, n_seeds: int) -> Row:
    return Row(
        claim="c = 5, M = 4: average bit width N over training (quantisation only, before entropy coding)",
        source="seed 002 §3.8, fig. 3.5",
        paper="6.8 bits/param (compression 4.70)",
        criterion="parameter-weighted mean N over a 100-epoch run within 1 bit of 6.8",
        tolerance="1 bit, as for the coded rate; fixed before the run",
        ours=f"{n5:.2f} bits/param (compression {32 / n5:.2f}); {n_seeds} seed(s) x {epochs} epochs",
        holds=abs(n5 - 6.8) <= 1.0, preconditions=[_full_setting(epochs, n_seeds)], data={"mean_n_bits": n5})


def accuracy_row(setting: str, acc: float, base_acc: float, bits: float, epochs: int, n_seeds: int) -> Row:
    return Row(
        claim=f"{setting}: best test accuracy vs float32",
        source="seed 002 §3.2, §3.9, fig. 3.4",
        paper="no loss (8-bit matches the baseline; c = 6 better than the baseline)",
        criterion="best test accuracy >= float32's - 1 pp",
        tolerance="1 pp: seed-to-seed spread of the best test accuracy on digits; fixed before the run",
        ours=f"{100 * acc:.2f} % vs {100 * base_acc:.2f} % ({100 * (acc - base_acc):+.2f} pp) at {bits:.2f} "
             f"bits/param; {n_seeds} seed(s) x {epochs} epochs",
        holds=(acc - base_acc) >= -0.01, preconditions=[_float32_learns(base_acc), _compressed(bits)],
        data={"best_acc": acc, "float32": base_acc, "bits": bits})


def convergence_row(ep6: float, base_ep: float, epochs: int, n_seeds: int) -> Row:
    return Row(
        claim="c = 6: epochs to the best test accuracy vs float32",
        source="seed 002 §3.9, fig. 3.4d",
        paper="20 % fewer iterations than the baseline (c = 6, M = 4)",
        criterion="mean epoch of the best test accuracy <= 0.9 x float32's, over a 100-epoch run",
        tolerance="10 %: half the source's saving, to allow for the epoch granularity of the run",
        ours=f"{ep6:.1f} vs {base_ep:.1f} epochs ({100 * (ep6 - base_ep) / base_ep:+.0f} %); {n_seeds} seed(s) x "
             f"{epochs} epochs",
        holds=ep6 <= 0.9 * base_ep,
        preconditions=[_full_setting(epochs, n_seeds),
                       J.setting_matches(base_ep <= CAP_FRACTION * epochs,
                                         f"float32's mean best epoch <= {CAP_FRACTION:.0%} of the {epochs}-epoch run "
                                         "(convergence not capped by the run)", f"mean best epoch {base_ep:.1f}",
                                         base_ep)],
        data={"c6": ep6, "float32": base_ep})


def _huffman_bits(counts) -> float:
    """Payload bits per value of the canonical Huffman code of indices with histogram ``counts`` (nothing is sent
    for a single used bin, as with rANS)."""
    import numpy as np

    from ..compression.huffman import expected_length

    return 0.0 if np.count_nonzero(counts) <= 1 else expected_length(counts)


@register(
    "compression-bits",
    claim="Quantising the weights to N = ceil(H + c) bits and entropy coding them needs about 3.5-3.8 bits/param "
          "with no loss of accuracy, and c = 6 converges in fewer epochs than float32.",
    source=SOURCE + ": 3.55 bits/param (c=5), 3.78 (c=6), 6.8 bits/param before coding (c=5), 8-bit fixed matches "
                    "float32, c=6 converges in 20 % fewer epochs, weight entropy falls with training (fig. 3.3)",
    protocol=BITS_PROTOCOL,
)
def run_compression_bits(quick: bool, out_dir: Path) -> list[Row]:
    """The source's §3.7-3.9 simulation (:func:`simulate`) for float32, fixed 8-bit, c = 5 and c = 6.

    Why the bit rate is what it is: for a weight histogram that is smooth at the bin scale, refining the M-bit
    quantisation to N bits adds N - M bits of entropy, so the coded indices cost about
    ``H_M + (N - M) = 2 H_M + c - M + (ceiling)`` bits/param.  The source's 3.55 bits at c = 5 (and its 6.8 bits
    before coding, i.e. mean N) therefore need H_4 of about 1.3 bits averaged over training: a range [w_min, w_max]
    stretched by a few large weights so that most weights share one or two of the 16 bins.  PyTorch's uniform
    initialisation has H_4 = 4 (10 bits at c = 6); the entropy only falls as training grows the large weights
    (fig. 3.3), so the average over training depends on how far training goes (steps x learning rate) -- hence
    the faithful protocol of :data:`SIM_DEFAULTS` and the learning-rate sensitivity row.  Raising c by one splits
    every bin in two, which on the *same* weights adds about 1 bit (the row "c = 6 minus c = 5" measures it); the
    source's two numbers differ by 0.23 bit.  The simulation's feedback narrows the gap only a little: the weights
    that never move (those of the always-zero border pixels) sit exactly on the previous epoch's bin centres, point
    masses that re-encoding does not spread, but each setting re-encodes on its own grid, and the c = 6 grid has
    twice as many points (full run, 3 seeds x 100 epochs: +0.98 bit on the same weights, +0.79 between the two
    simulations).

    Full run (3 seeds x 100 epochs, ~8 CPU-minutes): H_4 of the first layer falls from 3.5 to 0.8; mean coded rate
    4.39 bits/param at c = 5 (source 3.55: within the 1-bit tolerance) and 5.18 at c = 6 (source 3.78: not within
    it), 3.98 / 4.65 at the last epoch; mean N at c = 5 7.13 (source 6.8); best accuracy within 0.3 pp of float32
    for fixed 8-bit, c = 5 and c = 6; c = 6 peaks 26 % sooner than float32 (42.0 vs 56.7 epochs, a noisy quantity on
    a plateau).  The codec run on float32 weights (nothing applied) averages 4.08 / 5.05 bits at lr 0.05 and
    5.02 / 6.02 at lr 0.02 (c = 5 / 6).
    """
    epochs = SIM_DEFAULTS["quick_epochs"] if quick else SIM_DEFAULTS["epochs"]
    seeds = SIM_DEFAULTS["quick_seeds"] if quick else SIM_DEFAULTS["seeds"]
    data = digits28()
    settings = ["float32", "fixed8", "c5", "c6"]
    res = {s: [simulate(s, epochs, seed, data=data) for seed in seeds] for s in settings}
    sens = None if quick else simulate("float32", epochs, seeds[0], lr=SIM_DEFAULTS["sensitivity_lr"], data=data)

    def mean(s, key):
        return sum(r[key] for r in res[s]) / len(res[s])

    run_txt = f"{len(seeds)} seed(s) x {epochs} epochs"
    rows = []
    h_first = [r["H"][0] for r in res["float32"]]
    h_last = [r["H"][-1] for r in res["float32"]]
    falls = all(b < a for f, l_ in zip(h_first, h_last) for a, b in zip(f, l_))
    rows.append(Row(
        claim="the entropy of every layer's weight histogram falls during training",
        source="seed 002 §3.4, fig. 3.3",
        paper="entropy generally less than N and decreasing with the epochs, all layers",
        criterion="float32 run, every seed and layer: H (M = 4 bins over [w_min, w_max], all weights) after the last "
                  "epoch < after the first",
        tolerance="none (strict decrease): the claim is a direction",
        ours="H_4 per layer, epoch 1 -> last (seed " + str(seeds[0]) + "): " + ", ".join(
            f"{a:.2f} -> {b:.2f}" for a, b in zip(h_first[0], h_last[0])) + f"; {run_txt}",
        holds=falls, preconditions=[_float32_learns(mean("float32", "best_acc"))],
        data={"first": h_first, "last": h_last}))
    for s, paper in (("c5", 3.55), ("c6", 3.78)):
        rows.append(bits_row(s, paper, mean(s, "mean_payload"), mean(s, "mean_bits"),
                             sum(r["payload"][-1] for r in res[s]) / len(seeds), epochs, len(seeds)))
    rows.append(n_bits_row(mean("c5", "mean_n_bits"), epochs, len(seeds)))
    gap_sim = mean("c6", "mean_payload") - mean("c5", "mean_payload")
    gap_same = mean("float32", "mean_codec_c6") - mean("float32", "mean_codec_c5")
    rows.append(Row(
        claim="c = 6 minus c = 5: extra coded bits/param",
        source="seed 002 §3.8-3.9 (3.78 - 3.55)",
        paper="0.23 bits/param",
        criterion="reported, not judged: the difference of the two simulations' mean coded rates, and the codec at "
                  "c = 6 and c = 5 on the same (float32-trained) weights",
        ours=f"{gap_sim:+.2f} between the simulations; {gap_same:+.2f} on the same weights; {run_txt}",
        holds=None, data={"simulations": gap_sim, "same_weights": gap_same}))
    rows.append(Row(
        claim="the source's coder on the same weights: canonical Huffman vs rANS, c = 5 / c = 6",
        source="seed 002 §3.6, Algorithms 1-2 (HuffmanCodebook) and §3.8-3.9 (3.55 / 3.78 bits/param with Huffman)",
        paper="3.55 / 3.78 bits/param (Huffman)",
        criterion="reported, not judged: mean coded bits/param over training of the codec run on the float32 weights "
                  "(nothing applied), with each coder on the same indices",
        ours=f"Huffman {mean('float32', 'mean_huffman_c5'):.2f} / {mean('float32', 'mean_huffman_c6'):.2f}, rANS "
             f"{mean('float32', 'mean_codec_c5'):.2f} / {mean('float32', 'mean_codec_c6'):.2f} bits/param; {run_txt}",
        holds=None, data={"huffman": [mean("float32", "mean_huffman_c5"), mean("float32", "mean_huffman_c6")],
                          "rans": [mean("float32", "mean_codec_c5"), mean("float32", "mean_codec_c6")]}))
    for s in ("fixed8", "c5", "c6"):
        rows.append(accuracy_row(s, mean(s, "best_acc"), mean("float32", "best_acc"), mean(s, "mean_bits"), epochs,
                                 len(seeds)))
    rows.append(convergence_row(mean("c6", "best_epoch"), mean("float32", "best_epoch"), epochs, len(seeds)))
    if sens is not None:
        rows.append(Row(
            claim="sensitivity: the codec's rate on float32 weights at two learning rates (the source gives none)",
            source="seed 002 §3.7 (protocol; learning rate not stated)",
            criterion="reported, not judged: mean coded bits/param over training of the codec (c = 5 / c = 6) run on "
                      "the float32 weights, nothing applied",
            ours=f"lr {SIM_DEFAULTS['lr']}: {mean('float32', 'mean_codec_c5'):.2f} / "
                 f"{mean('float32', 'mean_codec_c6'):.2f}; lr {SIM_DEFAULTS['sensitivity_lr']}: "
                 f"{sens['mean_codec_c5']:.2f} / {sens['mean_codec_c6']:.2f} (seed {seeds[0]}, {epochs} epochs)",
            holds=None, data={"lr": SIM_DEFAULTS["lr"], "sensitivity": sens}))
    (out_dir / "simulation.json").write_text(json.dumps(res))
    return rows
