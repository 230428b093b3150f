import os

import matplotlib
import pytest
import torch
from hypothesis import settings

# Property tests are derandomised by default so that CI on a fresh clone runs the same examples every time (a
# failure is then a regression, not a new random draw); HYPOTHESIS_PROFILE=explore searches new examples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide AcceleratorState (mixed precision, device); a program makes one Accelerator,
    a test session many (the Trainer makes its own): start every test from a clean state, as a new program would."""
    yield
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


@pytest.fixture
def run_cli(capsys):
    """Run ``gradcond`` in-process; returns (exit code, stdout, stderr)."""
    from gradcond.cli import main

    def _run(*argv):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse --help/--version/usage errors
            rc = exc.code
        out = capsys.readouterr()
        return rc, out.out, out.err

    return _run
