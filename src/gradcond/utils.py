"""Small shared helpers: progress bars that respect a global quiet switch, devices, atomic file writes, errors."""

from __future__ import annotations

import contextlib

import os
import sys
import tempfile
from pathlib import Path

_QUIET = False


# exit codes of the command line (documented in README "Command line" and `gradcond run --help`)
EXIT_OK, EXIT_CLAIM_FAILS, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RANK_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class UserError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the CLI prints the message on one line and exits with code 3."""


class RankLost(RuntimeError):
    """A training process of ``gradcond run --nproc N`` died (killed by a signal, or exited without an error of its
    own); the message names the rank and says what was kept. The CLI prints it on one line and exits with code 4."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run; the message says what was kept and how to continue. Exit code 130."""


def set_quiet(quiet: bool) -> None:
    """Switch every progress bar of this process off (``--quiet``) or back on (where stderr is a terminal)."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


# a bar appears only once its task has run this long: quick calls (a tiny fit, a short teleport) stay silent
PROGRESS_DELAY_S = 1.0


def progress_enabled(stream=None) -> bool:
    """Whether :func:`progress` would draw on ``stream`` (default: the current ``sys.stderr``): not quiet, and the
    stream is a terminal. Logs, pipes, CI output and pytest's capture are not terminals, so they get no bar."""
    if _QUIET:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = False, file=None,
             delay: float | None = None, **kw):
    """A tqdm progress bar on ``file`` (default: the current ``sys.stderr``), used like ``tqdm`` (wrap an iterable,
    or call ``update``/``set_postfix``/``close``).

    Drawn only when :func:`progress_enabled` holds (a terminal, not ``--quiet``) and only after ``delay`` seconds
    (default :data:`PROGRESS_DELAY_S`), so that steps under a second print nothing. Disabled, it costs a counter
    increment per update and writes nothing.
    """
    from tqdm.std import tqdm  # the plain terminal bar: tqdm.auto would pick notebook widgets

    stream = sys.stderr if file is None else file
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=stream, disable=not progress_enabled(stream),
                delay=PROGRESS_DELAY_S if delay is None else delay, dynamic_ncols=True, **kw)


DEVICES_ACCEPTED = "cpu, cuda, cuda:N (a CUDA device index) or auto (cuda when available, else cpu)"


def resolve_device(device="auto", flag: str = "--device"):
    """The :class:`torch.device` named by ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when
    ``torch.cuda.is_available()``, else the CPU) or a ``torch.device``.

    Raises :class:`UserError` (one sentence naming ``flag``, the option the user set) for any other name, for
    CUDA when this machine has none, and for a CUDA index beyond the devices present. Cheap: no CUDA context is
    created beyond what ``torch.cuda.is_available`` / ``device_count`` do.
    """
    import torch

    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise UserError(f"{flag} must be a device name, got {device!r}; accepted: {DEVICES_ACCEPTED}.")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown {flag} {device!r}; accepted: {DEVICES_ACCEPTED}.")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {spec} was requested but CUDA is not available here (torch.cuda.is_available() is "
                        f"False); use {flag} cpu or auto.")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise UserError(f"{flag} {spec} was requested but this machine has {n} CUDA device(s) (cuda:0 to "
                        f"cuda:{n - 1}); use one of those, cpu or auto.")
    return dev


def module_device(model):
    """The device of ``model``'s first parameter (else first buffer; the CPU for a module without tensors): where
    its inputs must be. For a model split over several devices this is the device of its first layer."""
    import torch

    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model, modules=None):
    """Context: every module of ``model`` in eval mode for the block; each module's own training flag is restored afterwards.
    ``modules``: ``model.modules()`` when the caller has already listed them (saves a walk of the module tree).

    When no module overrides ``nn.Module.train``, the flags are written directly (what ``Module.train(False)`` sets,
    without its ``Module.__setattr__`` per module: a few microseconds each, which mattered for small models measured
    often); a model with a ``train`` override gets ``model.eval()``, so the override runs."""
    from torch import nn

    mods = list(model.modules()) if modules is None else modules
    flags = [(m, m.training) for m in mods]
    try:
        if any(t for _, t in flags):
            if all(type(m).train is nn.Module.train for m in mods):
                for m, t in flags:
                    if t:
                        m.__dict__["training"] = False
            else:
                model.eval()
        yield
    finally:
        for m, t in flags:
            if m.training != t:
                m.__dict__["training"] = t


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """Module-level ``__getattr__``/``__dir__``/``__all__`` that import ``name`` from ``package.module`` on first use.

    ``exports`` maps a submodule to the names it provides; keeps ``import gradcond.x`` cheap (no torch.fx etc.).
    """
    import importlib

    where = {name: mod for mod, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            setattr(importlib.import_module(package), name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(where))

    return __getattr__, __dir__, sorted(where)


# ----------------------------------------------------------------------------------------------- batches
# The one place that turns what a user passes as "data" into (x, y) batches; the probes, the teleports and the CoB
# optimiser all call these, so every entry point accepts the same inputs and words its refusal the same way.


def _is_tensor(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor)


def _is_one_batch(obj) -> bool:
    """True for one batch: a tuple/list whose first element (and second, if any) is a tensor."""
    return (isinstance(obj, (tuple, list)) and len(obj) >= 1 and _is_tensor(obj[0])
            and (len(obj) == 1 or _is_tensor(obj[1])))


def _checked_batch(batch, targets: bool) -> tuple:
    """``(x, y)`` (or ``(x,)`` when targets are optional and absent) from one batch, after the shape checks."""
    if _is_tensor(batch):
        batch = (batch,)
    if not _is_one_batch(batch):
        raise ValueError(f"every batch must be a tuple (x, y) of tensors, got {type(batch).__name__}.")
    if len(batch) < 2:
        if targets:
            raise ValueError("a batch needs targets: pass (x, y) tensors, not the inputs x alone.")
        x = batch[0]
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"the batch is empty; pass at least one sample (x has shape {tuple(x.shape)}).")
        return (x,)
    x, y = batch[0], batch[1]
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"batch tensors must share a leading batch dimension; got x {tuple(x.shape)} and y {tuple(y.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError("the batch is empty; pass at least one sample.")
    return (x, y)


def _unwrap(data):
    """A dataset bundle (``.train``/``.test``, see :mod:`gradcond.data`) stands for its training split; a
    ``TensorDataset`` is one batch of all its rows."""
    import torch

    if hasattr(data, "train") and hasattr(data, "test") and not isinstance(data, (tuple, list)):
        data = data.train
    if isinstance(data, torch.utils.data.TensorDataset):
        return tuple(data.tensors)
    return data


_ACCEPTED = ("a batch (x, y) of tensors, a TensorDataset, a dataset bundle, or a non-empty loader/iterable of "
             "(x, y) batches")


def as_batches(data, *, targets: bool = True) -> list[tuple]:
    """Normalise ``data`` to a list of batches ``(x, y)``.

    Accepted: one batch -- a tuple/list ``(x, y, ...)`` of tensors; a ``TensorDataset`` (one batch of all its rows);
    a dataset bundle with ``.train``/``.test`` (its training split); or any iterable of such batches (a list of
    ``(x, y)`` pairs, a ``DataLoader``).  With ``targets=False`` the inputs alone are accepted too (a tensor ``x``,
    or batches ``(x,)``), and such batches come back as ``(x,)``.  Tensors after the second (sample weights,
    indices) are dropped: everything here reads ``(x, y)``.

    Assumes dimension 0 of ``x`` and ``y`` is the batch dimension (checked: they must agree, and be non-empty).
    Cost: one pass over an iterable (a whole ``DataLoader`` epoch); tensors are not copied.  Bad input is a
    ValueError in one sentence naming what is accepted.
    """
    data = _unwrap(data)
    if _is_tensor(data) or _is_one_batch(data):
        return [_checked_batch(data, targets)]
    try:
        items = list(data)
    except TypeError:
        raise ValueError(f"expected {_ACCEPTED}, got {type(data).__name__}.") from None
    if not items:
        raise ValueError("the data holds no batches; pass at least one (x, y) batch.")
    return [_checked_batch(b, targets) for b in items]


def as_batch(data, *, targets: bool = True) -> tuple:
    """One batch ``(x, y)``: ``data`` itself when it is one batch, else the FIRST batch of a loader / iterable.

    Accepts what :func:`as_batches` accepts, with the same checks and errors; an iterable is read up to its first
    batch only (cost: one batch of a ``DataLoader``).
    """
    data = _unwrap(data)
    if _is_tensor(data) or _is_one_batch(data):
        return _checked_batch(data, targets)
    try:
        first = next(iter(data))
    except (TypeError, StopIteration):
        raise ValueError(f"expected {_ACCEPTED}, got {type(data).__name__}.") from None
    return _checked_batch(first, targets)


# ----------------------------------------------------------------------------------------------- model outputs
# Models that return something other than a tensor (a Hugging Face ``ModelOutput``, a dataclass, a dict, a tuple)
# and models called with keyword inputs (``input_ids=``, ``attention_mask=``): the one place that decides which
# tensor of an output is "the output" and how an example input is passed, so analyze, teleport's self-check, the
# probes, diagnose and the Monitor agree.

OUTPUT_ACCEPTED = ("None (the 'logits' field, else the first tensor), a key or attribute name (str), an index "
                   "(int) or a callable output -> tensor")


def _fields(out):
    """``(name, value)`` pairs of a container output in order: dict / ``ModelOutput`` items (``ModelOutput`` is
    an ``OrderedDict`` holding its non-None fields), tuple / list items, dataclass fields; None for anything else."""
    import dataclasses
    from collections.abc import Mapping

    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    return None


def _first_tensor(out, is_tensor, name="output"):
    """``(name, leaf)``: the first tensor leaf of ``out`` (depth first), or None."""
    if is_tensor(out):
        return name, out
    items = _fields(out)
    for k, v in items or ():
        hit = _first_tensor(v, is_tensor, f"{name}[{k!r}]")
        if hit is not None:
            return hit
    return None


def _logits(out, is_tensor):
    """``out['logits']`` / ``out.logits`` when ``out`` (a container, not a tensor) has a tensor logits field."""
    from collections.abc import Mapping

    if is_tensor(out):
        return None
    v = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return v if v is not None and is_tensor(v) else None


def select_output(out, output=None, *, is_tensor=None):
    """The one tensor of a model output that losses and probes use.

    ``out``: what the model returned -- a tensor, a Hugging Face ``ModelOutput``, a dataclass, a dict, a tuple or
    a list (nested containers are searched). ``output``: ``None`` (default) -- the ``logits`` field when there is
    one (key or attribute), else the first tensor (depth first, fields in order); a ``str`` -- that key (dict,
    ``ModelOutput``) or attribute (dataclass); an ``int`` -- that position (tuple / list; for a dict or
    ``ModelOutput`` the position among its values, like ``ModelOutput.to_tuple()``); a callable -- ``output(out)``.
    ``is_tensor``: the leaf test (default ``isinstance(x, torch.Tensor)``; the analyzer passes a test on traced
    graph nodes). Raises ``ValueError`` (one sentence: what was found, what is accepted) when the selection finds
    no tensor. Cost: a walk over the output's fields.
    """
    import torch

    is_tensor = is_tensor or (lambda t: isinstance(t, torch.Tensor))
    kind = type(out).__name__
    if output is None:
        if is_tensor(out):
            return out
        lg = _logits(out, is_tensor)
        if lg is not None:
            return lg
        hit = _first_tensor(out, is_tensor)
        if hit is None:
            raise ValueError(f"the model returned a {kind} that holds no tensor; pass output= as {OUTPUT_ACCEPTED}.")
        return hit[1]
    if callable(output) and not isinstance(output, (str, int)):
        got = output(out)
        if not is_tensor(got):
            raise ValueError(f"output={getattr(output, '__name__', output)!r} returned a {type(got).__name__}, not a "
                             "tensor; the selector must return one tensor of the model's output.")
        return got
    if isinstance(output, bool) or not isinstance(output, (str, int)):
        raise TypeError(f"output must be {OUTPUT_ACCEPTED}; got {type(output).__name__}.")
    items = _fields(out)
    if items is None:
        raise ValueError(f"output={output!r} selects a field, but the model returned a {kind} (no fields); pass "
                         "output=None for a tensor output.")
    if isinstance(output, str):
        got = dict((str(k), v) for k, v in items).get(output, getattr(out, output, None) if not isinstance(
            out, dict) else None)
        names = [str(k) for k, _ in items]
        if got is None:
            raise ValueError(f"output={output!r} is not a field of the model's {kind}; its fields are "
                             f"{', '.join(names) or 'none'}.")
    else:
        vals = [v for _, v in items if v is not None]
        if not -len(vals) <= output < len(vals):
            raise ValueError(f"output={output} is out of range: the model's {kind} holds {len(vals)} entries.")
        got = vals[output]
    if not is_tensor(got):
        raise ValueError(f"output={output!r} selects a {type(got).__name__}, not a tensor; select a tensor field "
                         "of the model's output.")
    return got


def output_tensors(out, output=None, *, is_tensor=None) -> list:
    """``[(name, tensor)]``: the tensors of a model output that a function-preserving operation must preserve
    (what :func:`gradcond.graph.analyze` pins and teleport's self-check compares).

    With a selector (``output`` not None): the one tensor :func:`select_output` picks. With ``output=None``: a
    tensor output as is; an output with a ``logits`` field (``...ForCausalLM``, ``...ForSequenceClassification``)
    its logits only (the rest are caches and hidden states, which change under a teleport); any other output every
    tensor in it (a tuple / dict / dataclass of tensors is preserved whole; non-tensor objects such as key/value
    caches are skipped). Raises ``ValueError`` when there is no tensor to preserve.
    """
    import torch

    is_tensor = is_tensor or (lambda t: isinstance(t, torch.Tensor))
    if output is not None:
        return [(f"output (selected by output={getattr(output, '__name__', output)!r})",
                 select_output(out, output, is_tensor=is_tensor))]
    if is_tensor(out):
        return [("output", out)]
    lg = _logits(out, is_tensor)
    if lg is not None:
        return [("output['logits']", lg)]
    found = []

    def walk(x, name):
        if is_tensor(x):
            found.append((name, x))
            return
        for k, v in _fields(x) or ():
            walk(v, f"{name}[{k!r}]")

    walk(out, "output")
    if not found:
        raise ValueError(f"the model returned a {type(out).__name__} that holds no tensor; pass output= as "
                         f"{OUTPUT_ACCEPTED}.")
    return found


def split_inputs(example) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a model call from an example input: a tensor -> ``((x,), {})``; a tuple / list ->
    its entries as positional inputs; a mapping (a dict, a tokenizer's ``BatchEncoding``) -> keyword inputs
    (``model(**example)``, e.g. ``{"input_ids": ids, "attention_mask": mask}``); a pair ``(args_tuple,
    kwargs_dict)`` is not guessed: pass a dict for keyword inputs."""
    from collections.abc import Mapping

    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def call_model(model, example):
    """``model(*args, **kwargs)`` with ``(args, kwargs) = split_inputs(example)``."""
    args, kwargs = split_inputs(example)
    return model(*args, **kwargs)


@contextlib.contextmanager
def plain_forward(model):
    """While open, ``model(...)`` runs the model's own forward, not the mixed-precision wrapper that
    ``accelerate.Accelerator.prepare`` installs on the instance (autocast around the forward, outputs converted to
    float32; recognised by accelerate's ``_original_forward`` attribute). Measurements then run in the parameters'
    dtype -- the float32 reference -- while training keeps its autocast; the wrapper is put back on exit. A model
    without such a wrapper is left as it is. Cost: two attribute writes."""
    d = getattr(model, "__dict__", {})
    if "_original_forward" not in d or "forward" not in d:
        yield model
        return
    saved, orig = d["forward"], d["_original_forward"]
    if getattr(orig, "__func__", None) is type(model).forward:
        del d["forward"]  # the class's forward
    else:
        d["forward"] = orig  # an instance forward the model had before prepare
    try:
        yield model
    finally:
        d["forward"] = saved


class selecting_output:
    """Context: while it is open, ``model(...)`` (and ``torch.func.functional_call(model, ...)``) returns
    :func:`select_output` of what the model's forward returns, so code written for tensor outputs (losses,
    per-sample ``vmap`` s, hooks-based probes) accepts models returning a ``ModelOutput`` / dataclass / dict /
    tuple without a wrapper module.

    How: an instance attribute ``forward`` (a method bound to the model) shadows the class's forward and is removed
    on exit (an instance ``forward`` the model already had is put back), so parameter and module names stay the
    user's. A deep copy made inside the context carries the selection (the bound method is re-bound to the copy):
    copies made inside are for the measurement only. With ``output=None`` and a model whose class forward returns
    a tensor this is the identity. Cost: one attribute set and removed; one field look-up per call.
    """

    def __init__(self, model, output=None):
        self.model, self.output = model, output

    def __enter__(self):
        import functools
        import types

        import torch

        m, output = self.model, self.output
        self.skip = not isinstance(m, torch.nn.Module)
        if self.skip:  # not a module: nothing to select (the caller's own checks say what is wrong)
            return m
        self.had = "forward" in m.__dict__
        self.prev = m.__dict__.get("forward")
        inner = self.prev if self.had else None

        @functools.wraps(type(m).forward)
        def forward(self_, *args, **kwargs):
            f = inner if (inner is not None and self_ is m) else type(self_).forward.__get__(self_)
            return select_output(f(*args, **kwargs), output)

        m.forward = types.MethodType(forward, m)
        return m

    def __exit__(self, *exc):
        if self.skip:
            return False
        if self.had:
            self.model.forward = self.prev
        else:
            self.model.__dict__.pop("forward", None)
        return False


def accepts_model_output(fn):
    """Decorator for a measurement ``fn(model, ...)``: adds the keyword ``output=`` (see :func:`select_output`)
    and runs ``fn`` with the model's calls returning the selected tensor (:class:`selecting_output`)."""
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(model, *args, output=None, **kwargs):
        with selecting_output(model, output):
            return fn(model, *args, **kwargs)

    try:  # the documented signature shows the added keyword
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if "output" not in sig.parameters:
            extra = inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=None)
            var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
            params.insert(var_kw[0] if var_kw else len(params), extra)
            wrapper.__signature__ = sig.replace(parameters=params)
    except (TypeError, ValueError):
        pass
    wrapper.__doc__ = (fn.__doc__ or "").rstrip() + (
        "\n\n    ``output=`` (keyword): for models returning a ``ModelOutput`` / dataclass / dict / tuple, which "
        "tensor is the model's output (default: the ``logits`` field, else the first tensor; "
        ":func:`gradcond.utils.select_output`).\n")
    return wrapper
