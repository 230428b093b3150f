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
