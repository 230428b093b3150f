"""Seed 002, chapter 3: entropy-coded weight compression (``compression-bits``) and its use on real
``torch.distributed`` ranks (``compression-ddp``).

``compression-bits`` is the source's experiment simulated in one process: the tanh MLP (source: 784-392-50-10 on
MNIST; here the same hidden sizes on the ``digits`` inputs, 64-392-50-10) trained with MSE, all weights quantised
by the codec after every epoch (:class:`~gradcond.compression.CompressedWeightSync` with ``every_epochs=1``), for
c in {5, 6}, M = 4, against fixed 8-bit quantisation and float32.

``compression-ddp`` runs 2 gloo ranks on the loopback interface (``tcp://127.0.0.1:<free port>``): plain DDP, DDP
with :func:`~gradcond.compression.entropy_compress_hook`, and local SGD with a compressed weight sync every k steps;
plus a rank killed mid-run, after which the survivor must exit with a clear error.

:func:`run_ddp` is the launcher (``torch.multiprocessing`` spawn context, one process per rank); :func:`ddp_worker`
is the per-rank program.  Both are reused by ``tests/test_compression_ddp.py``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

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
def free_port() -> int:
    """A free TCP port on the loopback interface (bound and released; a race with another process is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg.get("timeout_s", 30)))
        for mode in cfg["modes"]:
            _train_ddp(rank, world, cfg, mode, result)
    except Exception as exc:  # report, then exit non-zero: the launcher turns it into one clear message
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = 1
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if code:
        os._exit(code)  # skip destroy_process_group: the peer may be gone
    dist.destroy_process_group()


def run_ddp(cfg: dict, out_dir: str | Path, world: int = 2, join_timeout: float = 300.0) -> dict:
    """Start ``world`` ranks of :func:`ddp_worker` on a free loopback port and wait (at most ``join_timeout`` s).

    Returns ``{"exitcodes": [...], "seconds": [...] (per rank, from start to exit), "ranks": [rank results]}``;
    a rank still alive after the timeout is terminated and reported with exit code None.
    """
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    t0 = time.monotonic()
    procs = [ctx.Process(target=ddp_worker, args=(r, world, port, cfg, str(out_dir)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    seconds: list[float | None] = [None] * world
    deadline = t0 + join_timeout
    while time.monotonic() < deadline and any(s is None for s in seconds):
        for r, p in enumerate(procs):
            if seconds[r] is None and not p.is_alive():
                seconds[r] = time.monotonic() - t0
        time.sleep(0.05)
    codes = []
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    ranks = []
    for r in range(world):
        f = out_dir / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {})
    return {"exitcodes": codes, "seconds": seconds, "ranks": ranks}


DDP_DEFAULTS = {"hidden": [64], "seed": 0, "lr": 0.05, "batch_size": 32, "epochs": 20, "c": 6, "M": 4,
                "every_steps": 10, "timeout_s": 30}


@register(
    "compression-ddp",
    claim="Entropy-coded gradient exchange (DDP comm hook, 2 gloo ranks) trains as well as plain DDP at a fraction "
          "of the bits; a rank that dies makes the other exit with a clear error.",
    source=SOURCE + "; §3.9 (no loss of accuracy); the dead-rank behaviour is a library requirement, not a "
                    "source claim",
)
def run_compression_ddp(quick: bool, out_dir: Path) -> list[Row]:
    cfg = dict(DDP_DEFAULTS, modes=["plain", "hook", "local"], epochs=8 if quick else 30)
    res = run_ddp(cfg, out_dir / "ranks", world=2)
    rows = []
    if any(c != 0 for c in res["exitcodes"]):
        errs = "; ".join(r.get("error", "no result") for r in res["ranks"])
        return [Row("2 gloo ranks train", "library requirement (the DDP runs must complete)",
                    f"failed: exit codes {res['exitcodes']}: {errs}", False,
                    criterion="both ranks exit with code 0", tolerance="exact")]
    r0 = res["ranks"][0]
    plain, hook, local = r0["plain"], r0["hook"], r0["local"]
    diff = 100 * (hook["accuracy"] - plain["accuracy"])
    rows.append(Row(
        claim=f"DDP + entropy hook (c={cfg['c']}, M={cfg['M']}) vs plain DDP: final test accuracy, digits MLP",
        source="seed 002 §3.9 (compressed exchange, no loss of accuracy)",
        paper="no loss of accuracy",
        criterion="|final test accuracy (hook) - (plain DDP)| <= 0.5 pp, same seed and data order",
        tolerance="0.5 pp: 'no loss' read as within the run-to-run noise of one digits run (~0.3-0.5 pp); fixed "
                  "before the run",
        ours=f"{100 * hook['accuracy']:.2f} % vs {100 * plain['accuracy']:.2f} % ({diff:+.2f} pp) at "
             f"{hook['bits_per_value']:.2f} bits/gradient value (vs 32)",
        holds=abs(diff) <= 0.5, data={"plain": plain, "hook": hook}))
    rows.append(Row(
        claim="replicas stay identical under the hook (all ranks decode and average in rank order)",
        source="DDP invariant (library requirement, not a source claim)",
        criterion="every rank's parameters are bit-identical after training", tolerance="exact (bitwise)",
        ours=f"identical: {all(r['hook']['replicas_identical'] for r in res['ranks'])}",
        holds=all(r["hook"]["replicas_identical"] for r in res["ranks"])))
    ldiff = 100 * (local["accuracy"] - plain["accuracy"])
    rows.append(Row(
        claim=f"local SGD with compressed weight sync every {cfg['every_steps']} steps vs plain DDP",
        source="seed 002 §3.6-3.9 (weights, not gradients, synchronised)",
        paper="no loss of accuracy",
        criterion="|final test accuracy (local SGD + compressed sync) - (plain DDP)| <= 2 pp and replicas identical",
        tolerance="2 pp: local SGD syncs every few steps, so a larger gap than gradient exchange is expected at this "
                  "scale; fixed before the run",
        ours=f"{100 * local['accuracy']:.2f} % ({ldiff:+.2f} pp) at {local['bits_per_value']:.2f} bits/param per "
             f"sync, {cfg['every_steps']}x fewer exchanges",
        holds=abs(ldiff) <= 2.0 and all(r["local"]["replicas_identical"] for r in res["ranks"]),
        data={"local": local}))
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
        ours=f"rank 0 exit code {kres['exitcodes'][0]}, {t if t is None else round(t, 1)} s after rank 1 died: "
             f"{survivor[:160]}",
        holds=kres["exitcodes"][0] == 1 and t is not None and t < 60 and "exchange of compressed packages failed"
        in survivor, data={"seconds": t, "error": survivor}))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# compression-bits: the one-process simulation of §3.8-3.9
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


def simulate(setting: str, epochs: int, seed: int, hidden=(392, 50), lr: float = 0.1) -> dict:
    """Train the tanh MLP with MSE on one-hot digits targets; quantise all weights after every epoch per ``setting``
    (``"float32"``, ``"fixed8"``, ``"c5"``, ``"c6"``).  Returns per-epoch test accuracies and bits/param."""
    from ..compression import CompressedWeightSync

    bundle = _digits()
    xtr, ytr = _tensors(bundle, "train")
    xte, yte = _tensors(bundle, "test")
    model = _mlp([xtr.shape[1], *hidden, 10], seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    sync = None
    if setting in ("c5", "c6"):
        sync = CompressedWeightSync(every_epochs=1, c=int(setting[1]), M=4, seed=seed)

    class _S:  # the minimal TrainState the callback reads (model; no run logger)
        run = None

    st = _S()
    st.model = model
    accs, bits = [], []
    target = torch.nn.functional.one_hot(ytr, 10).to(xtr.dtype)
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 32):
            idx = perm[i:i + 32]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(torch.tanh(model(xtr[idx])), target[idx])
            loss.backward()
            opt.step()
        if sync is not None:
            bits.append(sync.sync(st).bits_per_param)
        elif setting == "fixed8":
            _quantize_fixed(model, 8)
            bits.append(8.0)
        else:
            bits.append(32.0)
        accs.append(_accuracy(model, xte, yte))
    best = max(range(epochs), key=lambda e: (accs[e], -e))
    out = {"setting": setting, "acc": accs, "bits": bits, "best_acc": accs[best], "best_epoch": best + 1,
           "final_acc": accs[-1], "mean_bits": sum(bits) / len(bits)}
    if sync is not None:
        out["mean_payload_bits"] = sum(h.payload_bits_per_param for h in sync.history) / len(sync.history)
    return out


@register(
    "compression-bits",
    claim="Quantising the weights to N = ceil(H + c) bits and entropy coding them needs about 3.5-3.8 bits/param "
          "with no loss of accuracy, and c = 6 converges in fewer epochs than float32.",
    source=SOURCE + ": 3.55 bits/param (c=5), 3.78 (c=6), 8-bit fixed matches float32, c=6 converges in 20 % "
                    "fewer epochs",
)
def run_compression_bits(quick: bool, out_dir: Path) -> list[Row]:
    epochs, seeds = (6, [0]) if quick else (40, [0, 1, 2, 3, 4])
    settings = ["float32", "fixed8", "c5", "c6"]
    res = {s: [simulate(s, epochs, seed) for seed in seeds] for s in settings}

    def mean(s, key):
        return sum(r[key] for r in res[s]) / len(res[s])

    base_acc, base_ep = mean("float32", "best_acc"), mean("float32", "best_epoch")
    rows = []
    for s, paper in (("c5", 3.55), ("c6", 3.78)):
        b, pb = mean(s, "mean_bits"), mean(s, "mean_payload_bits")
        rows.append(Row(
            claim=f"{s[0]} = {s[1]}, M = 4: average bits/param over training (entropy-coded)",
            source="seed 002 §3.8-3.9, Fig. 3.5",
            paper=f"{paper} bits/param",
            criterion="mean coded-index bits/param over training within 1 bit of the source's value",
            tolerance="1 bit: a different model and data set (digits MLP vs the source's networks) shift the entropy; "
                      "fixed before the run",
            ours=f"{b:.2f} bits/param transmitted ({pb:.2f} for the coded indices alone), {len(seeds)} seed(s) x "
                 f"{epochs} epochs",
            holds=abs(pb - paper) <= 1.0, data={"bits": b, "payload_bits": pb}))
    for s in ("fixed8", "c5", "c6"):
        a = mean(s, "best_acc")
        rows.append(Row(
            claim=f"{s}: best test accuracy vs float32",
            source="seed 002 §3.2, §3.9, Fig. 3.4",
            paper="no loss (8-bit matches the baseline; c = 6 better than the baseline)",
            criterion="best test accuracy >= float32's - 1 pp",
            tolerance="1 pp: seed-to-seed spread of the best test accuracy on digits; fixed before the run",
            ours=f"{100 * a:.2f} % vs {100 * base_acc:.2f} % ({100 * (a - base_acc):+.2f} pp)",
            holds=(a - base_acc) >= -0.01, data={"best_acc": a, "float32": base_acc}))
    ep6 = mean("c6", "best_epoch")
    rows.append(Row(
        claim="c = 6: epochs to the best test accuracy vs float32",
        source="seed 002 §3.9",
        paper="20 % fewer iterations than the baseline (c = 6, M = 4)",
        criterion="full mode only (quick: 6 epochs, 1 seed, not judged): mean epoch of the best test accuracy <= "
                  "0.9 x float32's",
        tolerance="10 %: half the source's saving, to allow for the epoch granularity of a 40-epoch run",
        ours=f"{ep6:.1f} vs {base_ep:.1f} epochs ({100 * (ep6 - base_ep) / base_ep:+.0f} %)",
        holds=ep6 <= 0.9 * base_ep if not quick else None,
        data={"c6": ep6, "float32": base_ep}))
    (out_dir / "simulation.json").write_text(json.dumps(res))
    return rows
