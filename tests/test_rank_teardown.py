"""Ranks of the compression hook end cleanly (issue 25 item 1).

The cause of the random SIGABRT ("terminate called without an active exception"): ``DistributedDataParallel``
imports ``torch._dynamo``; imported after the gloo process group exists, it keeps a reference to the group that
``destroy_process_group`` does not release, so gloo's threads outlive it and are torn down during interpreter
shutdown, where a gloo thread that needs the GIL is terminated inside a ``noexcept`` destructor.
``gradcond.distributed.init_local_group`` imports ``torch._dynamo`` before the group exists: the group and its
threads are then gone when ``destroy_process_group`` returns, which each rank checks (``threads_after_destroy``)."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from gradcond.distributed import describe_exit
from gradcond.experiments.compression_repro import DDP_DEFAULTS, run_ddp

SHORT = dict(DDP_DEFAULTS, modes=["hook"], epochs=1, max_steps=4)


def _status(res) -> list[str]:
    return [f"rank {r}: {describe_exit(c)}" for r, c in enumerate(res["exitcodes"])]


def test_no_gloo_thread_outlives_destroy_process_group(tmp_path):
    """The mechanism, checked directly (spawned ranks, as the reproduction runs them): after training with the
    hook, ``destroy_process_group`` leaves no gloo thread behind (before the fix: two runloops and the transport
    loop, alive until interpreter shutdown)."""
    res = run_ddp(SHORT, tmp_path, world=2, join_timeout=300)
    assert res["exitcodes"] == [0, 0], _status(res)
    for r in res["ranks"]:
        assert r["hook"]["steps"] == 4 and r["hook"]["replicas_identical"]
        assert r["threads_after_destroy"] == [], r


def test_twenty_consecutive_hook_runs_end_without_a_signal(tmp_path):
    """20 consecutive 2-rank runs of the compression hook (4 steps each): every rank exits 0, none is killed by a
    signal. The ranks are forked from a forkserver that has torch imported (the launches then take a fraction of a
    spawn's time); each rank still exits through the interpreter's shutdown, where the abort happened."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "gradcond.compression",
                                "gradcond.experiments.compression_repro"])
    failures = []
    for i in range(20):
        res = run_ddp(SHORT, tmp_path / f"run{i}", world=2, join_timeout=300, start_method="forkserver")
        if res["exitcodes"] != [0, 0] or any(r.get("threads_after_destroy") for r in res["ranks"]):
            failures.append(f"run {i}: {', '.join(_status(res))}; threads: "
                            f"{[r.get('threads_after_destroy') for r in res['ranks']]}")
    assert not failures, failures


@pytest.mark.parametrize("code,words", [(0, "exited normally"), (1, "exited with code 1"), (-6, "killed by SIGABRT"),
                                        (-9, "killed by SIGKILL"), (None, "still running at the deadline (terminated)")])
def test_exit_codes_in_words(code, words):
    assert describe_exit(code) == words
