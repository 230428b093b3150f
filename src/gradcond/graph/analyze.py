"""Change-of-basis (CoB) analysis of an unmodified ``nn.Module`` (seed 000, Sec. 3 and appendix).

:func:`analyze` traces the model with ``torch.fx`` (standard layers are leaves; where fx fails, e.g. on Python control
flow over tensor shapes, it falls back to ``torch.export`` and rebuilds a module-level graph, see
:mod:`gradcond.graph._export`), runs the traced graph once on the
example input, and propagates, next to every tensor, a tensor of the same shape holding *atom ids*: the tau that
multiplies that entry in the teleported network (z_V = z_W * tau, seed 000 eq. 12).  Each operation either
creates fresh atoms (the outputs of Linear / Conv / norm affine parameters / embeddings / attention dims), moves
them (reshape, permute, cat, split, slicing, pooling...), ties them (residual add: equal taus; attention
q.k: tau_q * tau_k = 1) or pins them (tau = 1: model inputs and outputs, norm inputs, softmax, unknown ops).
Ties are kept in a union-find with inversion parity (:mod:`._unionfind`).

Rules (decisions where the source is silent are marked *decision*):

* Linear / Conv1d/2d/3d (any groups, stride, dilation, padding mode) / ConvTranspose1d/2d/3d: ``v = tau_out /
  tau_in * w`` (eq. 1), bias ``* tau_out``; one tau per channel, shared over space (condition 3) -- a layer whose
  input taus vary over space ties them.
* BatchNorm1d/2d/3d (train and eval): the input is pinned (tau = 1, seed 000 appendix) so running and batch
  statistics stay valid; gamma and beta are scaled by the free output tau.  *Decision*: no running-statistics
  rescaling -- with eps inside the square root that is not exact per channel.  LayerNorm / GroupNorm /
  InstanceNorm / RMSNorm / zoo ``LONorm``: input pinned, output tau free through the affine parameters (pinned
  without them).
* ReLU / LeakyReLU / PReLU / abs / max-pooling (positively homogeneous, per channel): pass tau; when tau < 0 they
  are rewritten as ``s * f(s * x)`` (exact, no rounding) -- ``kind="sign"`` sites.  Max-pooling ties the taus of
  one channel over space.
* Every other elementwise activation (tanh, sigmoid, GELU, SiLU, ELU, SELU, softplus, ...): passes tau and is
  rewritten as ``tau * f(x / tau)`` (eq. 2) when tau != 1 -- ``kind="scale"`` sites.  With ``rewrite=False`` the
  taus at such sites are pinned (and the sign sites constrained to tau > 0) so teleport never rewrites a module.
* Dropout / Identity / neg / dtype casts / ``torchvision.ops.stochastic_depth`` and ``StochasticDepth``
  (recognised by name; a random per-sample scale) commute; avg / adaptive-avg pooling and interpolation tie a channel's
  taus over space and commute.
* add / sub of two tensors ties the operands (condition 2); adding a non-zero constant pins the other operand;
  ``x + p`` with ``p`` a parameter (e.g. learned positions) makes ``p`` a bias scaled by tau.
* mul / div: scalar factors commute; for tensor * tensor the second operand is pinned (*decision*; gating and
  ``x * sigmoid(x)`` stay exact), division pins the divisor.
* cat concatenates atoms (condition 5); split / chunk / getitem / unbind / view / reshape / flatten / permute /
  transpose / squeeze / expand... move them (zero padding is compatible with any tau).
* matmul: ``(A @ B)`` with B pinned scales rows of A; A pinned, columns of B; if A varies only over its last dim
  and B only over its second-to-last dim, ``tau_A * tau_B = 1`` is tied per contraction index (the explicit
  ``q @ k^T`` of attention); otherwise B is pinned.  ``F.scaled_dot_product_attention``: per head-dim
  ``tau_q * tau_k = 1``, output tau = tau_v.
* ``nn.MultiheadAttention``: per embedding dim ``tau_q = 1 / tau_k`` (free, any sign) and ``tau_v`` (free) for the
  in-projection, ``out_proj`` maps tau_v to a free output tau; ``bias_k`` / ``bias_v`` follow tau_k / tau_v.
* Embedding: output tau free (weight columns scaled); ``max_norm`` embeddings are frozen.
* softmax / log-softmax: input pinned.  sum / mean: tie along the reduced dims and commute; amax / amin / max /
  min over dims: tie, and constrain tau > 0.
* A parameter used at several places gets the ties that make its factors agree (a Linear called twice ties the
  input taus and output taus of both calls); if the roles differ, the parameter is pinned.
* Weights computed from other tensors: ``parametrizations.weight_norm`` / legacy ``torch.nn.utils.weight_norm``
  (``W = g * v / ||v||``): ``g`` takes the factors constant on each normalised slice (for ``dim=0``: the output
  taus), ``v`` is unchanged, the other factors (the layer's input taus) are pinned (*decision*, exact, keeps every
  map diagonal).  ``torch.nn.utils.prune`` (``W = weight_orig * weight_mask``): ``weight_orig`` takes the factor,
  the mask is kept.  Any other parametrization (``spectral_norm``, ``orthogonal``, user ones) or tensor attribute:
  the factors it would take are pinned, listed in ``structure.frozen``.
* Modules with user forward hooks / forward pre-hooks (other than the pre-hooks of legacy weight norm and
  pruning) are kept as frozen leaves (a hook may change the output); hooks on the model itself or global module
  hooks pin every tau.  Parameters with ``requires_grad=False`` are pinned unless
  ``analyze(..., teleport_frozen_params=True)``.
* ``torch.nn`` composites (``Transformer``, ``TransformerEncoder``/``Decoder`` and their layers) are traced into,
  as when they are the root model (the MHA fast path is switched off while tracing).  Activation modules inside
  an ``nn.TransformerEncoderLayer`` are never wrapped (its eval fast path bypasses them): they are rewritten in
  the graph (fx) or pinned (export).  Where neither fx nor export can trace into them (``nn.TransformerEncoder``
  given a mask compares mask values), they are kept as frozen leaves and ``structure.tracer`` says why.
* The ops of Hugging Face models (issue 19; docs page "Hugging Face models"): ``x @ W (+ b)`` / ``addmm`` with a 2-D
  parameter ``W`` stored ``(in, out)`` (GPT-2's ``Conv1D``) is a Linear with the weight transposed; ``p * x`` with a
  parameter ``p`` and a constant ``x`` makes ``p`` an affine scale with fresh taus, and ``x ** k`` (k != 1) pins
  ``x``, which together give the hand-written RMSNorm ``w * (x * rsqrt(mean(x**2) + eps))`` its norm rule; rotary
  embeddings need no rule of their own (products with the constant cos/sin tables commute, ``rotate_half`` moves
  atoms and the add ties dims ``i`` and ``i + d/2``: one tau per rotated pair per head, ``tau_k = 1 / tau_q``);
  grouped-query attention ties each q head to its repeated k head (``repeat_kv`` moves atoms; ``sdpa(...,
  enable_gqa=True)`` repeats the k/v ids); a weight used twice (an embedding tied to the LM head) ties the factors
  that are not fixed to 1; ops whose tensor inputs carry no free tau (masks, positions, rotary tables: ``arange``,
  comparisons, ``cos``/``sin``, casts, unknown ATen ops of an exported graph) give constants; the activation
  modules of ``transformers.activations`` are elementwise scale sites.  Only the outputs selected by ``output=``
  are pinned (:func:`gradcond.utils.output_tensors`).
* Anything else (unknown functions, unknown ``torch.nn`` leaf modules such as ``nn.LSTM``): inputs and outputs
  pinned, listed in ``structure.frozen`` with the reason.  The function is never changed silently, and every
  teleport checks it (:func:`gradcond.teleport.teleport`).

Cost: one traced forward on the example input (keep the example batch small, 2 is enough) plus integer id
tensors that are mostly broadcast views (a layer's taus are shared over the batch and over space, so the
bookkeeping scales with the number of channels, not with the activation size; see :mod:`gradcond.graph.propagate`)
and one Python union-find operation per distinct tied pair.  A densenet121-shaped model analyses in about 0.2 s of
CPU time at 32 x 32 and 0.4 s at 224 x 224 (``benchmarks/analyze.py``).

Where things live: this module holds the entry point :func:`analyze` (orchestration: trace, propagate, finalize)
and the rule list above; :mod:`gradcond.graph.tracing` makes the graph (fx, export fallback, leaf decisions,
hooks); :mod:`gradcond.graph.propagate` holds the atom-id state, the run loop and the final structure;
:mod:`gradcond.graph.rules` the per-op rules; :mod:`gradcond.graph.dispatch` the op tables and which rule a node
gets; :mod:`gradcond.graph._unionfind`, :mod:`gradcond.graph._export` and :mod:`gradcond.graph.structure` the
union-find, the torch.export glue and the result type.
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils import split_inputs
from ._export import flat_inputs
from .dispatch import Analyzer
from .structure import CoBStructure, Note
from .tracing import COMPOSITE_MODULES, CompositesUntraceable, global_hooks, trace, user_hooks

__all__ = ["analyze"]


def analyze(model: nn.Module, example_input, *, rewrite: bool = True, leaf_modules: tuple = (),
            tracer: str = "auto", teleport_frozen_params: bool = False, output=None) -> CoBStructure:
    """Derive the change-of-basis structure of ``model`` (see the module docstring for the rules).

    ``example_input``: a tensor, a tuple of positional inputs, or a dict of keyword inputs (``{"input_ids": ids,
    "attention_mask": mask}``, a tokenizer's ``BatchEncoding``); a batch of 2 is enough, only shapes matter.
    ``output``: which outputs the structure preserves, for models returning a ``ModelOutput`` / dataclass / dict /
    tuple (:func:`gradcond.utils.output_tensors`): ``None`` -- a ``logits`` field when there is one (a causal LM:
    its cache and hidden states are not preserved), else every tensor of the output; or a key / attribute name,
    an index or a callable (:func:`gradcond.utils.select_output`).  Only the preserved outputs are pinned, and
    teleport's self-check compares only them.
    ``rewrite=False``: never plan activation rewrites (pin the taus of non-homogeneous activations, keep the taus
    of ReLU-like ones and max-pools positive), so :func:`gradcond.teleport.teleport` always returns an
    instance of the user's class.  ``leaf_modules``: extra module classes to keep as opaque (frozen) leaves (e.g.
    ``nn.TransformerEncoderLayer``, which is traced into by default).
    ``tracer``: ``"auto"`` (torch.fx symbolic tracing, falling back to ``torch.export`` when fx fails, e.g. on
    Python control flow over tensor shapes), ``"fx"`` (no fallback) or ``"export"`` (export only; see
    :mod:`gradcond.graph._export`: the structure then holds for inputs of the example's shapes, and activations
    that are function calls or modules called several times are pinned instead of rewritten).
    ``structure.tracer`` (and the summary) say which was used, and why fx failed.
    ``teleport_frozen_params``: by default parameters with ``requires_grad=False`` (frozen pretrained layers) are
    pinned (left unchanged by every teleport, listed in ``structure.frozen``); ``True`` teleports them too.
    The example input is kept (detached copy) as ``structure.example_input``: every ``teleport`` compares the
    original and teleported outputs on it (see :func:`gradcond.teleport.teleport`).

    The model is run once on ``example_input`` in eval mode under ``torch.no_grad()`` (its modes are restored;
    no buffer changes).  Raises ``ValueError`` when the model cannot be traced, naming the construct.
    Cost: one forward pass plus integer bookkeeping; densenet/resnet-18 analyse in well under a second.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze expects an nn.Module, got {type(model).__name__}.")
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}.")
    inputs, kwargs = split_inputs(example_input)
    try:
        gm, exported, how = trace(model, tuple(inputs), tuple(leaf_modules), tracer, kwargs=kwargs, output=output)
        why = None
    except CompositesUntraceable as exc:
        why = exc.why
    if why is not None:
        # tracing into a nested torch.nn composite failed (e.g. nn.TransformerEncoder given a causal mask compares
        # mask values, which neither fx nor torch.export can trace): analyse again with the composites as leaves
        s = analyze(model, example_input, rewrite=rewrite, leaf_modules=tuple(leaf_modules) + COMPOSITE_MODULES,
                    tracer=tracer, teleport_frozen_params=teleport_frozen_params, output=output)
        s.tracer += f"; nested torch.nn composites kept as frozen leaves: tracing into them failed{why}"
        return s
    modes = {m: m.training for m in model.modules()}
    param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    fp = [p for p in model.parameters() if p.is_floating_point()]
    tau_dtype = fp[0].dtype if fp else torch.float32
    an = Analyzer(model, gm, rewrite, exported=exported)
    an.tracer = how
    an.teleport_frozen_params = bool(teleport_frozen_params)
    an.output = output
    try:
        model.eval()
        with torch.no_grad():
            if exported:  # the exported graph's placeholders are the flattened (args, kwargs) leaves
                an.run(flat_inputs(gm, tuple(inputs), kwargs))
            else:
                an.run(tuple(inputs), kwargs)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"analyze could not run the traced {type(model).__name__} on example_input: {exc}".rstrip(".") + "."
        ) from exc
    finally:
        for m, t in modes.items():
            m.training = t
    outer = user_hooks(model) + global_hooks()
    if outer:
        # hooks on the root module (or global ones) run outside the traced graph: nothing can be verified
        for a in range(2, len(an.uf)):
            an.uf.pin(a)
        an.frozen.append(Note(type(model).__name__, "model",
                              f"{', '.join(outer)} registered on the model itself (or globally): its effect is "
                              "outside the traced graph; every tau pinned"))
    structure = an.finalize(param_shapes, tau_dtype)
    # kept for teleport's self-check (teleported vs original outputs); a detached copy on the model's device
    structure.example_input = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    structure.example_kwargs = ({k: x.detach().clone() if isinstance(x, torch.Tensor) else x
                                 for k, x in kwargs.items()} or None)
    structure.output = output
    return structure
