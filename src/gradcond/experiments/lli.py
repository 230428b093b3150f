"""``lli-linear-at-init``: a looks-linear ReLU MLP computes an exactly linear map at initialisation."""

from __future__ import annotations

from pathlib import Path

import torch

from .registry import Row, register


def linearity_error(model: torch.nn.Module, in_features: int, n: int = 256, seed: int = 0) -> float:
    """max over samples of ||f(x) - A x|| / ||f(x)||, with A = f(I) read off the basis vectors (f bias-free)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        a = model(torch.eye(in_features, dtype=dtype)).T
        x = torch.randn(n, in_features, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        fx = model(x)
        return float(((fx - x @ a.T).norm(dim=1) / fx.norm(dim=1)).max())


CONTROL_MIN_ERROR = 0.1  # a nonlinear map of the same shape must be this far off, else the check cannot fail


@register(
    "lli-linear-at-init",
    claim="A bias-free ReLU MLP with looks-linear initialisation computes an exactly linear map at initialisation.",
    source="seed 003, App. H (looks-linear initialisation), Sec. 5 and Table 1 (LLI rows: GSC 1.00)",
    protocol="Bias-free ReLU MLPs of width 100 with App. H's looks-linear init (0-based pairs), depths 4 and 16 "
             "(quick; 4, 16, 50 full), float32 and float64. A = f(I) is read off the basis vectors and f(x) is "
             "compared with A x on 256 Gaussian inputs. Tolerances fixed before the run: 1e-5 (float32) and 1e-12 "
             "(float64), room for rounding over 50 layers. Power precondition: the same check on a Gaussian-init "
             "ReLU MLP of the deepest shape must report an error > 0.1, so the check can fail.",
)
def run(quick: bool, out_dir: Path) -> list[Row]:
    from ..report.figures import object_pyplot as _plt  # Agg-canvas figures: the process-wide backend is left alone
    from ..zoo import mlp
    from .judging import at_least

    rows = []
    depths = (4, 16) if quick else (4, 16, 50)
    plt = _plt()
    # control first: the same architecture with Gaussian init is far from linear (the power of every row below)
    ctrl = mlp(100, 100, depth=depths[-1], width=100, init="gaussian", bias=False, seed=0).double()
    cerr = linearity_error(ctrl, 100)
    power = at_least("power", cerr, CONTROL_MIN_ERROR,
                     f"linearity error of a Gaussian-init ReLU MLP of depth {depths[-1]} (the check can fail)",
                     fmt=".2f")
    errs = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        errs[dtype] = []
        for depth in depths:
            model = mlp(100, 100, depth=depth, width=100, init="looks_linear", bias=False, seed=depth).to(dtype)
            err = linearity_error(model, 100)
            errs[dtype].append(err)
            rows.append(
                Row(
                    claim=f"LLI ReLU MLP depth {depth}, width 100, {str(dtype).replace('torch.', '')}: f(x) = A x",
                    source="seed 003, App. H",
                    paper="exactly linear at initialisation",
                    ours=f"max ||f(x) - Ax|| / ||f(x)|| = {err:.2e}",
                    criterion="max over 256 Gaussian inputs of ||f(x) - A x|| / ||f(x)|| < tol, with A = f(I) read "
                              "off the basis vectors",
                    tolerance=f"{tol:g}: room for {str(dtype).replace('torch.', '')} rounding over up to 50 layers "
                              f"(~{tol / torch.finfo(dtype).eps:.0f} x machine epsilon)",
                    holds=err < tol,
                    preconditions=[power],
                    data={"depth": depth, "dtype": str(dtype), "error": err},
                )
            )
    rows.append(Row(claim=f"control: Gaussian-init ReLU MLP depth {depths[-1]} is not linear",
                    source="seed 003, App. H (the property LLI adds)", paper="nonlinear",
                    ours=f"max rel. error = {cerr:.2f} (the power precondition of the rows above)",
                    criterion="reported: the control of the rows above, not a claim of the source",
                    data={"error": cerr}))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dtype, e in errs.items():
        ax.semilogy(depths, e, "o-", label=str(dtype).replace("torch.", ""))
    ax.axhline(cerr, color="gray", ls="--", label="Gaussian init (control)")
    ax.set_xlabel("depth (linear layers)")
    ax.set_ylabel("max ||f(x) - Ax|| / ||f(x)||")
    ax.set_title("Looks-linear init: linearity error at initialisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lli_linear_at_init.png", dpi=110)
    plt.close(fig)
    return rows
