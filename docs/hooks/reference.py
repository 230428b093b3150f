"""MkDocs hook: write the API reference pages from each public package's ``__all__`` at build time.

Why a hook: ``gradcond.teleport`` and ``gradcond.probes`` export their names lazily (module ``__getattr__``), and
``gradcond.zoo`` builds ``__all__`` from a registry, so griffe's static analysis cannot list them. Here the package is
imported, every name of ``__all__`` is resolved to the object's defining module (``obj.__module__``, or griffe for
constants and modules), and one ``::: <defining path>`` block is emitted per name, preceded by an anchor with the
public path (``gradcond.teleport.teleport``), so the reference follows the public API even when private modules are
renamed or split. The pages are generated in memory (``File.generated``); nothing is written under ``docs/``.
"""

from __future__ import annotations

import html
import importlib
import inspect
import re
import sys
import types
from pathlib import Path

from mkdocs.structure.files import File

# (package, page title); the order is the navigation order.
PACKAGES = [
    ("gradcond.graph", "graph"),
    ("gradcond.teleport", "teleport"),
    ("gradcond.probes", "probes"),
    ("gradcond.monitor", "monitor"),
    ("gradcond.train", "train"),
    ("gradcond.zoo", "zoo"),
    ("gradcond.data", "data"),
    ("gradcond.compression", "compression"),
    ("gradcond.closedform", "closedform"),
    ("gradcond.presets", "presets"),
    ("gradcond.experiments", "experiments"),
    ("gradcond.integrations", "integrations"),
]

_GRIFFE = {}
_SRC: list[str] = []


def _griffe_package(package: str):
    if package not in _GRIFFE:
        import griffe

        _GRIFFE[package] = griffe.load(package, search_paths=_SRC, resolve_aliases=False)
    return _GRIFFE[package]


def _griffe_definition(package: str, name: str) -> str | None:
    """Path of the module-level, non-imported definition of ``name`` under ``package`` (first in a module walk)."""
    root = _griffe_package(package)
    member = root.members.get(name)
    if member is not None:
        if member.is_alias:
            return member.target_path
        return member.path
    stack, found = [root], []
    while stack:
        mod = stack.pop()
        for sub_name, member in sorted(mod.members.items()):
            if member.is_alias:
                continue
            if member.is_module:
                stack.append(member)
            elif sub_name == name:
                found.append(member.path)
    if len(found) > 1:
        raise RuntimeError(f"{package}.{name} is defined in several modules ({', '.join(found)}); the reference "
                           "cannot tell which one is exported.")
    return found[0] if found else None


def canonical_path(package: str, name: str) -> str:
    """Where the object exported as ``package.name`` is defined (a dotted path mkdocstrings can collect)."""
    obj = getattr(importlib.import_module(package), name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isfunction(obj):
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        # only objects defined in gradcond itself (a re-exported torch function would pull torch into griffe)
        if module and module.split(".")[0] == package.split(".")[0] and "<" not in qualname:
            return f"{module}.{qualname}"
    path = _griffe_definition(package, name)
    if path is None:
        raise RuntimeError(f"cannot find where {package}.{name} (in __all__) is defined under {package}.")
    return path


def _kind(obj) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const|ref):`(~?)([^`]+)`")


def _summary(obj) -> str:
    """First paragraph of the docstring, on one line, Sphinx roles shown as code (as griffe_roles.py does)."""
    if _kind(obj) == "constant":
        return ""
    # the object's own docstring: inspect.getdoc would show a class's base-class docstring when it has none
    doc = inspect.cleandoc((vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__) or "")
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", first)
    return _table_cell(first)


def _table_cell(text: str) -> str:
    """``text`` (with ``code`` spans) as one Markdown table cell: code spans become <code> with a pipe entity
    (Markdown tables would show ``\\|`` literally inside backticks), other text is HTML-escaped with pipes escaped."""
    out, pos = [], 0
    for m in re.finditer(r"``(.+?)``|`([^`]+)`", text):
        out.append(html.escape(text[pos:m.start()], quote=False).replace("|", "\\|"))
        code = html.escape(m.group(1) or m.group(2), quote=False).replace("|", "&#124;")
        out.append(f"<code>{code}</code>")
        pos = m.end()
    out.append(html.escape(text[pos:], quote=False).replace("|", "\\|"))
    return "".join(out)


def public_names(package: str) -> list[str]:
    return list(importlib.import_module(package).__all__)


def reference_page(package: str, title: str) -> str:
    mod = importlib.import_module(package)
    names = public_names(package)
    paths = {name: canonical_path(package, name) for name in names}
    lines = [
        f"# `{package}`",
        "",
        f"::: {package}",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "      show_root_toc_entry: false",
        "",
        "| name | kind | summary |",
        "|---|---|---|",
    ]
    for name in names:
        obj = getattr(mod, name)
        lines.append(f"| [`{name}`](#{package}.{name}) | {_kind(obj)} | {_summary(obj)} |")
    lines.append("")
    for name in names:
        path, public = paths[name], f"{package}.{name}"
        obj = getattr(mod, name)
        if path != public:
            lines.append(f"[](){{#{public}}}")
            lines.append("")
        lines += [f"::: {path}", "    options:", "      heading_level: 2", "      show_root_full_path: false"]
        if isinstance(obj, types.ModuleType):
            # Names this page documents on their own are left out of the module's listing (one anchor each).
            dup = [n for n in names if paths[n].rsplit(".", 1)[0] == path]
            lines.append("      show_submodules: false")
            if dup:
                lines.append("      filters:")
                lines.append('        - "!^_"')
                lines += [f'        - "!^{n}$"' for n in dup]
        lines.append("")
    return "\n".join(lines)


def _cli_help() -> str:
    """``--help`` of ``gradcond`` and of every subcommand, from the real parser (so it cannot drift)."""
    import argparse

    from gradcond.cli import build_parser

    parser = build_parser()
    parts = [("gradcond", parser)]

    def walk(prefix, p):
        for action in p._actions:  # argparse keeps subparsers here; there is no public accessor
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    parts.append((f"{prefix} {name}", sub))
                    walk(f"{prefix} {name}", sub)

    walk("gradcond", parser)
    out = []
    for title, p in parts:
        p.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        out += [f"### `{title}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _repro_list() -> str:
    """The registered reproductions, from the registry."""
    from gradcond.experiments import load_all

    lines = ["| name | claim |", "|---|---|"]
    for name, exp in load_all().items():
        lines.append(f"| `{name}` | {_table_cell(str(exp.claim).replace(chr(10), ' '))} |")
    return "\n".join(lines)


_MARKERS = {"<!-- gradcond:cli-help -->": _cli_help, "<!-- gradcond:repro-list -->": _repro_list}


def on_page_markdown(markdown, page, config, files):
    for marker, make in _MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def on_config(config):
    # The sources next to mkdocs.yml are documented, whether or not gradcond is installed (editable) in this env.
    src = str(Path(config["config_file_path"]).resolve().parent / "src")
    _SRC[:] = [src]
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_files(files, config):
    for package, title in PACKAGES:
        files.append(File.generated(config, f"reference/{title}.md", content=reference_page(package, title)))
    return files
