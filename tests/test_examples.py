"""The runnable example (issue 24 §6): ``examples/gpt2_trainer.py --ci`` trains a tiny GPT-2 built from a config on
the standard library's source bytes with the real Trainer and GradcondCallback, offline, and writes the report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradcond.train.run import read_metrics  # noqa: E402

pytestmark = pytest.mark.hf
ROOT = Path(__file__).resolve().parents[1]


def test_gpt2_example_in_ci_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("gpt2_trainer", ROOT / "examples" / "gpt2_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--ci", "--out", str(tmp_path / "out")])
    assert report == tmp_path / "out" / "gradcond" / "report.html" and report.exists()
    rows = read_metrics(report.parent / "metrics.csv")
    probes = {r["probe"] for r in rows}
    assert {"grad_norm", "gsc", "noise_scale", "update_size", "train"} <= probes
    data = mod.ByteChunks(mod.stdlib_bytes(4096), 32)
    assert len(data) == 128 and int(data[0]["input_ids"].max()) < 256  # bytes of real source text
