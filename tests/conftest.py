import matplotlib
import pytest
import torch

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
