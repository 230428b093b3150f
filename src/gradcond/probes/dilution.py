"""k-dilution of residual blocks, Theorem 3 and Proposition 7 of seed 003 (notes/003 §1.9).

A residual block computes ``f_b(u) = S_b u + rho_b(u)`` (skip path S_b, branch rho_b). Per block, over a dataset:

* dilution (Def. 4): ``k_b = Q||S_b u|| / Q||rho_b(u)||``;
* GSC growth of the branch alone (Thm. 3): ``r_b = Q||g R(u)||_qm Q||u|| / (Q||g||_qm Q||rho(u)||)`` with g the
  gradient arriving at the block output and R the Jacobian of rho (qm norms divide by sqrt(width); for equal
  input/output widths this is the theorem's formula);
* observed growth across the block: ``GSC(u, 0) / GSC(f_b, 0)``;
* Theorem 3 prediction: ``sqrt((k^2 + r^2) / (k^2 + 1))``;
* dilution-corrected growth (Fig. 3C / Table 3): ``1 + (k^2 + 1)(observed - 1)``, multiplied up from the top;
* Proposition 7 composed dilution of blocks 1..b: predicted ``((prod (1 + 1/k^2)) - 1)^(-1/2)``, measured as
  ``Q||S_{1..b} u_1|| / Q||F_{1..b}(u_1) - S_{1..b} u_1||`` (needs consecutive blocks whose skip paths are
  identities or chains of modules; NaN otherwise).

Blocks are found in the ``torch.fx`` graph: every ``add`` of two tensors that share a common ancestor. The block
input u is their nearest common ancestor; the operand reached through fewer graph nodes is the skip path (ties:
the first operand). A block is named by the innermost module that contains the add (``name[i]`` for the i-th add
of a module). Gradients use the summed error, like :func:`gradcond.probes.scale.gsc_profile`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..losses import get_loss
from ..utils import as_batches
from . import _hooks as H

__all__ = ["Block", "DilutionProfile", "find_blocks", "dilution_profile", "composed_dilution"]

_ADD = {"add", "iadd", "__add__", "__iadd__"}


@dataclass
class Block:
    name: str
    add: str  # fx node names
    input: str
    skip: str
    branch: str
    skip_modules: list = field(default_factory=list)  # module targets along the skip path (empty: identity)
    skip_is_chain: bool = True


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function":
        return getattr(n.target, "__name__", "") in _ADD or n.target is torch.add
    return n.op == "call_method" and n.target in ("add", "add_")


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise ValueError(f"could not trace the model with torch.fx ({type(exc).__name__}: {exc}); residual blocks "
                         f"are found in the traced graph, so the model needs a traceable forward.") from None


def find_blocks(model: nn.Module, gm: fx.GraphModule | None = None) -> list[Block]:
    """Residual blocks (add of a skip path and a branch) in forward order, from the traced graph."""
    gm = gm if gm is not None else _trace(model)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    anc: dict = {}
    for n in nodes:  # ancestors including the node itself
        s = {n}
        for a in n.all_input_nodes:
            s |= anc[a]
        anc[n] = s
    blocks, seen = [], {}
    for n in nodes:
        if not _is_add(n) or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            continue
        common = [c for c in anc[a] & anc[b] if c.op != "get_attr"]
        common = [c for c in common if any(p.op == "placeholder" for p in anc[c])]
        if not common:
            continue
        ca = max(common, key=pos.get)
        pa = sorted(anc[a] - anc[ca], key=pos.get)
        pb = sorted(anc[b] - anc[ca], key=pos.get)
        (sk, skp), (br, _) = ((a, pa), (b, pb)) if len(pa) <= len(pb) else ((b, pb), (a, pa))
        stack = n.meta.get("nn_module_stack") or {}
        base = list(stack.keys())[-1] if stack else n.name
        base = str(base)
        idx = seen.get(base, 0)
        seen[base] = idx + 1
        chain = all(p.op == "call_module" for p in skp) and all(len(p.all_input_nodes) == 1 for p in skp)
        blocks.append(Block(base if idx == 0 else f"{base}[{idx}]", n.name, ca.name, sk.name, br.name,
                            [p.target for p in skp] if chain else [], chain))
    return blocks


def composed_dilution(ks) -> float:
    """Proposition 7: ``((prod_b (1 + 1/k_b^2)) - 1)^(-1/2)`` (inf when every k_b is inf)."""
    prod = float(np.prod([1.0 + 1.0 / (k * k) for k in ks]))
    return math.inf if prod == 1.0 else (prod - 1.0) ** -0.5


@dataclass
class DilutionProfile:
    """Per block (forward order) dilution, growth, Theorem-3 prediction and dilution-corrected GSC.

    Lists: ``blocks``, ``k`` (dilution), ``r`` (branch-alone growth), ``growth`` (observed GSC growth across the
    block), ``predicted`` (Thm. 3), ``corrected_growth``, ``gsc_in`` / ``gsc_out`` (measured GSC(., 0) at the block
    input/output), ``corrected_gsc_in`` (input GSC with every block above and including it dilution-corrected),
    ``composed_k_predicted`` / ``composed_k_measured`` (Prop. 7 for blocks 1..b), ``corr_forward`` =
    E[(S u).rho(u)] / (Q||Su|| Q||rho||) and ``corr_backward`` = E[(gR).(gS)] / (Q||gR|| Q||gS||) (Thm. 3 assumes 0).
    """

    blocks: list
    k: list
    r: list
    growth: list
    predicted: list
    corrected_growth: list
    gsc_in: list
    gsc_out: list
    corrected_gsc_in: list
    composed_k_predicted: list
    composed_k_measured: list
    corr_forward: list
    corr_backward: list
    n_samples: int

    @property
    def abs_error(self) -> list:
        """|observed - predicted| growth per block."""
        return [abs(a - b) for a, b in zip(self.growth, self.predicted)]

    @property
    def raw_lowest(self) -> float:
        """Measured GSC at the lowest block's input."""
        return self.gsc_in[0]

    @property
    def corrected_lowest(self) -> float:
        """Dilution-corrected GSC at the lowest block's input (Fig. 3C / Table 3 'corrected')."""
        return self.corrected_gsc_in[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(abs_error=self.abs_error, raw_lowest=self.raw_lowest, corrected_lowest=self.corrected_lowest)
        return d

    def to_frame(self) -> list[dict]:
        """One dict per block (pandas-free)."""
        keys = ["k", "r", "growth", "predicted", "corrected_growth", "gsc_in", "gsc_out", "corrected_gsc_in",
                "composed_k_predicted", "composed_k_measured", "corr_forward", "corr_backward"]
        return [{"block": b, **{k: getattr(self, k)[i] for k in keys}, "abs_error": self.abs_error[i]}
                for i, b in enumerate(self.blocks)]

    def plot(self):
        """Left: observed vs Thm-3 growth per block; right: raw and corrected log10 GSC at block inputs."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.5))
        a, b = fig.subplots(1, 2)
        xs = range(len(self.blocks))
        a.plot(xs, self.growth, "o-", ms=3, label="observed")
        a.plot(xs, self.predicted, "x--", ms=3, label="Theorem 3")
        a.plot(xs, self.r, ":", label="branch alone r")
        a.set_xlabel("block")
        a.set_ylabel("GSC growth")
        a.legend()
        b.plot(xs, np.log10(self.gsc_in), "o-", ms=3, label="raw")
        b.plot(xs, np.log10(self.corrected_gsc_in), "x-", ms=3, label="dilution-corrected")
        b.set_xlabel("block")
        b.set_ylabel("log10 GSC(block input, 0)")
        b.legend()
        fig.tight_layout()
        return fig


class _Recorder(fx.Interpreter):
    def __init__(self, gm, want):
        super().__init__(gm)
        self.want, self.vals = want, {}

    def run_node(self, n):
        v = super().run_node(n)
        if n.name in self.want:
            self.vals[n.name] = v
        return v


def _sq(t):
    return t.reshape(t.shape[0], -1).double().pow(2).sum(1)


def dilution_profile(model: nn.Module, data, loss_fn="dot", blocks=None) -> DilutionProfile:
    """Dilution analysis of every residual block (or the blocks named in ``blocks``), see the module docstring.

    Cost: one forward, one backward, and one branch-only VJP per block, per batch. The model's mode is used as it
    is; buffers, parameters and ``.grad`` are unchanged. ``data`` must carry targets for ``loss_fn``.
    """
    loss = get_loss(loss_fn)
    gm = _trace(model)
    found = find_blocks(model, gm)
    if blocks is not None:
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        by = {b.name: b for b in found}
        unknown = [n for n in names if n not in by]
        if unknown:
            raise ValueError(f"unknown block name(s) {', '.join(map(repr, unknown))}; residual blocks found: "
                             f"{', '.join(by) or 'none'}.")
        found = [by[n] for n in names]
    if not found:
        raise ValueError("no residual block (an add of a skip path and a branch) was found in the traced graph.")
    nb = len(found)
    keys = ("s", "rho", "u", "o", "gi", "go", "gr", "gs", "srho", "grgs")
    acc = {k: np.zeros(nb) for k in keys}
    comp = {"s": np.zeros(nb), "d": np.zeros(nb)}
    consecutive = all(found[i].add == found[i + 1].input for i in range(nb - 1))
    chain_ok = consecutive and all(b.skip_is_chain for b in found)
    q_loss2, n = 0.0, 0
    dims_in, dims_out = [0] * nb, [0] * nb
    want = {x for b in found for x in (b.add, b.input, b.skip, b.branch)}
    with H.measurement(model):
        for batch in as_batches(data, targets=False):
            if len(batch) < 2:
                raise ValueError("dilution_profile needs targets: pass data as (x, y).")
            x, y = batch[0], batch[1]
            rec = _Recorder(gm, want)
            out = rec.run(H.prepare_input(x))
            ell, _ = H.per_sample_losses(loss, out, y)
            v = rec.vals
            us = [v[b.input] for b in found]
            os_ = [v[b.add] for b in found]
            grads = torch.autograd.grad(ell.sum(), os_ + us, retain_graph=True, allow_unused=True)
            go, gi = grads[:nb], grads[nb:]
            for i, b in enumerate(found):
                u, s, rho, o = us[i], v[b.skip], v[b.branch], os_[i]
                if go[i] is None or gi[i] is None:
                    raise ValueError(f"block {b.name!r} is not on the gradient path to the loss.")
                (gr,) = torch.autograd.grad(rho, [u], go[i], retain_graph=True, allow_unused=True)
                gr = torch.zeros_like(u) if gr is None else gr
                gs = gi[i] - gr  # the block input feeds only the skip path and the branch
                dims_in[i], dims_out[i] = int(u[0].numel()), int(o[0].numel())
                for key, t in (("s", s), ("rho", rho), ("u", u), ("o", o), ("gi", gi[i]), ("go", go[i]), ("gr", gr),
                               ("gs", gs)):
                    acc[key][i] += float(_sq(t.detach()).sum())
                acc["srho"][i] += float((s.detach().double() * rho.detach().double()).sum())
                acc["grgs"][i] += float((gr.double() * gs.double()).sum())
            if chain_ok:
                with torch.no_grad():
                    cur = us[0].detach()
                    for i, b in enumerate(found):
                        for t in b.skip_modules:
                            cur = gm.get_submodule(t)(cur)
                        comp["s"][i] += float(_sq(cur).sum())
                        comp["d"][i] += float(_sq(os_[i].detach() - cur).sum())
            q_loss2 += float((ell.detach().double() ** 2).sum())
            n += int(ell.shape[0])
    q = {k: np.sqrt(a / n) for k, a in acc.items() if k not in ("srho", "grgs")}
    q_loss = math.sqrt(q_loss2 / n)
    din, dout = np.sqrt(dims_in), np.sqrt(dims_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = q["s"] / q["rho"]
        r = (q["gr"] / din * q["u"]) / (q["go"] / dout * q["rho"])
        gsc_in = q["gi"] / din * q["u"] / q_loss
        gsc_out = q["go"] / dout * q["o"] / q_loss
        growth = gsc_in / gsc_out
        pred = np.sqrt((k ** 2 + r ** 2) / (k ** 2 + 1))
        corr_g = 1 + (k ** 2 + 1) * (growth - 1)
        cf = (acc["srho"] / n) / (q["s"] * q["rho"])
        cb = (acc["grgs"] / n) / (q["gr"] * q["gs"])
    if not np.all(np.isfinite(k)) or np.any(q["u"] == 0):
        H.nan_warning("some block has an all-zero branch or input: its dilution/GSC values are inf or NaN.")
    factor = np.cumprod((corr_g / growth)[::-1])[::-1]  # product over this block and every block above it
    corrected_in = gsc_in * factor
    kp = [composed_dilution(k[: i + 1]) for i in range(nb)]
    if chain_ok:
        km = list(np.sqrt(comp["s"] / n) / np.sqrt(comp["d"] / n))
    else:
        km = [float("nan")] * nb
    f = lambda a: [float(t) for t in a]  # noqa: E731
    return DilutionProfile([b.name for b in found], f(k), f(r), f(growth), f(pred), f(corr_g), f(gsc_in), f(gsc_out),
                           f(corrected_in), f(kp), f(km), f(cf), f(cb), n)
