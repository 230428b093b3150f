"""The README's and docs/cli.md's command tables agree with the parser (issue 25 item 11): every command and every
option that argparse accepts is in each table, and nothing else; the --help epilog lists every exit code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gradcond.cli import build_parser

ROOT = Path(__file__).parents[1]


def _parser_commands() -> dict[str, set[str]]:
    """``{"run": {"--out", ...}, "repro run": {...}, ...}``: each (sub)command's option strings (no -h/--help)."""
    out = {}

    def walk(p: argparse.ArgumentParser, prefix: str):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and prefix:
            out[prefix] = {o for a in p._actions for o in a.option_strings if o not in ("-h", "--help")}
        for sp in subs:
            for name, child in sp.choices.items():
                walk(child, f"{prefix} {name}".strip())

    walk(build_parser(), "")
    return out


def _table_commands(path: Path) -> dict[str, set[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\| `gradcond ([^`]*)`", line)
        if not m or m.group(1).startswith("--version"):
            continue
        words = m.group(1).split()
        cmd = " ".join(w for w in words[:2] if re.fullmatch(r"[a-z]+", w))
        rows[cmd] = set(re.findall(r"--[a-z][a-z-]*", m.group(1)))
    return rows


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md"])
def test_command_table_lists_every_command_and_option(doc):
    parser, table = _parser_commands(), _table_commands(ROOT / doc)
    assert set(table) == set(parser), (sorted(table), sorted(parser))
    for cmd, options in parser.items():
        assert table[cmd] == options, (doc, cmd, sorted(table[cmd] ^ options))


def test_help_epilog_and_docs_list_every_exit_code():
    from gradcond.utils import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_RANK_LOST

    run = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    epilog = " ".join(run.epilog.split())
    cli_md = (ROOT / "docs" / "cli.md").read_text()
    for code in (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RANK_LOST, EXIT_INTERRUPTED):
        assert f" {code} " in epilog, code
        assert f"| {code} |" in cli_md, code


def test_user_facing_text_has_no_internal_jargon():
    """Issue numbers, notes sections and files a user does not have stay out of the docs, README and --help."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]}
    texts["--help"] = " ".join(p.format_help() for p in [build_parser()] + [
        c for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()])
    bench = re.compile(r"<!-- bench:start -->.*?<!-- bench:end -->", re.S)  # written by `make bench`
    for where, text in texts.items():
        text = bench.sub("", text)
        for pattern in (r"\bissue \d+", r"notes §", r"shared/notes", r"\(issue \d+", r"in progress\b"):
            assert not re.search(pattern, text), (str(where), pattern, re.search(pattern, text).group(0))
