"""Every code block of docs/integrations.md runs (issue 24): python blocks in this process (in a scratch
directory), the one headed ``# torchrun --nproc_per_node 2`` under torchrun with 2 gloo ranks, and the
``gradcond run`` command through the CLI (with ``--out`` and ``--quiet`` added)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "integrations.md"
# ```py blocks (not ```python: tests/test_docs.py runs those in the repository root, in one process)
BLOCKS = re.findall(r"```(py|bash)\n(.*?)```", PAGE.read_text(), re.S)


def test_the_page_is_in_the_nav_and_has_its_blocks():
    assert "integrations.md" in (ROOT / "mkdocs.yml").read_text()
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("py") == 6 and kinds.count("bash") == 1


@pytest.mark.parametrize("i", [i for i, (k, code) in enumerate(BLOCKS) if k == "py"
                               and not code.startswith("# torchrun")])
def test_python_block_runs(i, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[i][1]
    exec(compile(code, f"{PAGE.name}[block {i}]", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert out.strip(), "every block prints what it shows"
    if "optimizer_step_skipped" in code:
        assert out.strip().splitlines()[-1] == "[3]"  # what the comment in the block says
    if "GradcondCallback" in code:
        assert (tmp_path / "out" / "gradcond" / "report.html").exists()


def test_torchrun_block_runs_on_two_ranks(tmp_path):
    code = next(c for k, c in BLOCKS if c.startswith("# torchrun"))
    script = tmp_path / "fsdp2_script.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['domain', 'grad_norm', 'gsc', 'noise_scale'" not in proc.stdout  # domain was not asked for
    assert "'grad_norm', 'gsc', 'noise_scale'" in proc.stdout


@pytest.mark.slow  # the same command path (gradcond run --nproc 2, strategy fsdp2) is in tests/test_run_fsdp2.py
def test_gradcond_run_block(tmp_path, capsys):
    from gradcond.cli import main

    cmd = next(c for k, c in BLOCKS if k == "bash").strip()
    args = shlex.split(cmd)
    assert args[0] == "gradcond"
    assert main(args[1:] + ["--out", str(tmp_path), "--quiet"]) == 0, capsys.readouterr().err
    run = tmp_path / "demo"
    assert (run / "report.html").exists()
    from gradcond.train import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.pt")["strategy"] == "fsdp2"
