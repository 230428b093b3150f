"""The reproduction registry: verdicts as data (yes / no / untestable / reported), entries without a judged row fail,
an untestable row keeps an entry from holding, `repro all` and REPRODUCTION.md.

Synthetic entries are registered here and removed again after each test (the registry is a module-level dict);
`load_all` is narrowed to them so that `repro all` runs in milliseconds.
"""

import json

import pytest

import numpy as np
import torch

from gradcond.experiments import judging, registry
from gradcond.experiments.registry import Row

LEARNS = judging.baseline_learns(0.95, chance=0.1)          # met
AT_CHANCE = judging.baseline_learns(0.101, chance=0.1)      # not met

SYNTH = {
    "zz-synth-pass": ("a judged row that holds and a reported one", [
        Row("x equals 1", "seed 999, Eq. 1", "x = 1.0", True, paper="1", criterion="|x - 1| <= tol",
            tolerance="1e-12 (float64 rounding)"),
        Row("y is reported", "seed 999, Table 2", "y = 3.0", None, paper="3.1"),
    ]),
    "zz-synth-na": ("only reported rows", [
        Row("z is reported", "seed 999, Fig. 3", "z = 2.0", None, paper="2"),
        Row("w is reported", "seed 999, Fig. 4", "w = 5.0", None),
    ]),
    "zz-synth-fail": ("a judged row that fails", [
        Row("v below 1", "seed 999, Eq. 5", "v = 2.0", False, paper="0.5", criterion="v < 1", tolerance="none"),
        Row("u holds", "seed 999, Eq. 6", "u = 0", True, criterion="u == 0", tolerance="exact"),
    ]),
    "zz-synth-raises": ("an entry that raises", None),
    "zz-synth-untestable": ("a judged row whose baseline never learned", [
        Row("t faster", "seed 999, Fig. 7", "t saves 0 epochs", False, criterion="saves >= 1 epoch",
            preconditions=[AT_CHANCE]),
        Row("s holds", "seed 999, Eq. 8", "s = 0", True, criterion="s == 0", preconditions=[LEARNS]),
    ]),
}


def _make(rows):
    def fn(quick, out_dir):
        if rows is None:
            raise RuntimeError("synthetic failure | with a pipe")
        (out_dir / "fig.txt").write_text("figure")
        return [Row.from_dict(r.to_dict()) for r in rows]

    fn.__qualname__ = f"synthetic_{id(rows)}"
    return fn


@pytest.fixture
def synth(monkeypatch):
    """Register the synthetic entries; `load_all` returns only them; the registry is restored afterwards."""
    saved = dict(registry._REGISTRY)
    for name, (claim, rows) in SYNTH.items():
        registry.register(name, claim=claim, source="seed 999 (synthetic)")(_make(rows))
    only = {n: registry._REGISTRY[n] for n in sorted(SYNTH)}
    monkeypatch.setattr(registry, "load_all", lambda: dict(only))
    yield only
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_entry_holds_needs_a_judged_row():
    na = [Row("a", "s", "o", None), Row("b", "s", "o", None)]
    assert not registry.entry_holds(na)
    assert registry.entry_reason(na).startswith("no judged row")
    assert registry.counts(na) == (0, 2)
    assert not registry.entry_holds([])  # nothing at all is not a pass either
    ok = [Row("a", "s", "o", True), Row("b", "s", "o", None)]
    assert registry.entry_holds(ok) and registry.counts(ok) == (1, 1)
    bad = [Row("a", "s", "o", True), Row("b", "s", "o", False)]
    assert not registry.entry_holds(bad) and registry.entry_reason(bad) == "1 of 2 judged rows do not hold"


def test_markdown_table_columns_and_verdicts():
    rows = [Row("c|1", "src", "ours", True, paper="p", criterion="crit", tolerance="tol"),
            Row("c2", "src", "ours", False), Row("c3", "src", "ours", None)]
    lines = registry.markdown_table(rows).splitlines()
    assert lines[0] == "| claim | source | paper | ours | criterion | tolerance | preconditions | verdict |"
    assert lines[2] == "| c\\|1 | src | p | ours | crit | tol |  | yes |"
    assert lines[3].endswith("| no |") and lines[4].endswith("| reported, not judged |")


def test_untestable_row_names_its_precondition_and_blocks_the_entry():
    r = Row("faster", "s", "0 epochs saved", False, preconditions=[LEARNS, AT_CHANCE])
    assert r.verdict == "untestable" and r.judged and r.unmet == [AT_CHANCE]
    text = registry.verdict_text(r)
    assert text == ("untestable: the baseline learns: the untreated arm's best test accuracy 10.1 % (needs the "
                    "untreated arm's best test accuracy >= chance 10.0% + 20% = 30.0%)")
    # an untestable row is neither a pass nor a fail: the entry does not hold, and is not counted as failing
    rows = [Row("a", "s", "o", True), r]
    assert registry.entry_status(rows) == "UNTESTABLE" and not registry.entry_holds(rows)
    assert registry.entry_reason(rows) == "1 of 2 judged rows are untestable (a precondition is not met)"
    # a failing row makes the entry fail even beside an untestable one
    assert registry.entry_status(rows + [Row("b", "s", "o", False)]) == "FAILS"
    # with the precondition met the same row is judged on its own verdict
    assert Row("faster", "s", "o", True, preconditions=[LEARNS]).verdict == "yes"
    # an untestable row whose judgement could not be computed at all (holds None) is still untestable
    assert Row("faster", "s", "o", None, preconditions=[AT_CHANCE]).verdict == "untestable"
    assert "[NOT MET]" in registry.preconditions_text(r) and "[met]" in registry.preconditions_text(r)


@pytest.mark.parametrize("false", [np.False_, np.bool_(False), torch.tensor(False), np.array(False)])
def test_numpy_and_torch_false_fail_an_entry(false):
    rows = [Row("a", "s", "o", True), Row("b", "s", "o", false)]
    assert rows[1].holds is False and rows[1].verdict == "no"
    assert not registry.entry_holds(rows) and registry.entry_status(rows) == "FAILS"
    assert registry.entry_holds([Row("a", "s", "o", np.True_), Row("c", "s", "o", torch.tensor(True))])


@pytest.mark.parametrize("bad", ["no", torch.tensor([True, False]), 0.5, np.array([1, 0])])
def test_row_refuses_a_holds_that_is_not_a_boolean(bad):
    with pytest.raises(ValueError, match="must be a boolean"):
        Row("a", "s", "o", bad)


def test_row_round_trips_through_its_dict():
    r = Row("a", "s", "o", False, data={"x": 1}, preconditions=[AT_CHANCE])
    d = r.to_dict()
    assert d["verdict"] == "untestable" and d["preconditions"][0]["met"] is False
    back = Row.from_dict(d)
    assert back == r and back.verdict == "untestable"


def test_only_na_rows_fail(synth, tmp_path, run_cli):
    rows, out = registry.run_experiment("zz-synth-na", tmp_path, quick=True)
    res = json.loads((out / "result.json").read_text())
    assert res["holds"] is False and res["judged"] == 0 and res["reported"] == 2
    assert res["reason"].startswith("no judged row")
    assert all(r["judged"] is False and "criterion" in r and "paper" in r for r in res["rows"])
    md = (out / "result.md").read_text()
    assert "0 yes, 0 no, 0 untestable, 2 reported; FAILS: no judged row" in md
    rc, stdout, _ = run_cli("repro", "run", "zz-synth-na", "--quick", "--out", str(tmp_path))
    assert rc == 1 and "FAILS: no judged row" in stdout


def test_judged_failing_row_exits_1(synth, tmp_path, run_cli):
    rc, stdout, _ = run_cli("repro", "run", "zz-synth-fail", "--out", str(tmp_path))
    assert rc == 1 and "| v below 1 | seed 999, Eq. 5 | 0.5 | v = 2.0 | v < 1 | none |  | no |" in stdout
    rc, _, _ = run_cli("repro", "run", "zz-synth-pass", "--out", str(tmp_path))
    assert rc == 0
    res = json.loads((tmp_path / "zz-synth-pass" / "result.json").read_text())
    assert res["holds"] is True and (res["judged"], res["reported"]) == (1, 1)
    assert res["rows"][0]["tolerance"] == "1e-12 (float64 rounding)"


def test_repro_all_writes_reproduction_md(synth, tmp_path, run_cli):
    out = tmp_path / "rep"
    rc, stdout, err = run_cli("repro", "all", "--quick", "--out", str(out))
    assert rc == 1  # the failing, the n/a-only and the raising entries fail; the others still ran
    assert "zz-synth-raises" in err and "RuntimeError" in err  # one warning line, the run went on
    for name in SYNTH:
        assert name in stdout
    assert (out / "zz-synth-pass" / "result.json").exists() and (out / "zz-synth-fail" / "fig.txt").exists()
    md = (out / "REPRODUCTION.md").read_text()
    assert "`gradcond repro all --quick`" in md
    assert "5 entries: **1 hold, 3 fail, 1 untestable**" in md
    assert "Rows: 3 yes, 1 no, 1 untestable, 3 reported only." in md
    assert "- **zz-synth-pass** (" in md and "1 yes, 0 no, 0 untestable, 1 reported; HOLDS: all 1 judged rows hold" in md
    assert "0 yes, 0 no, 0 untestable, 2 reported; FAILS: no judged row" in md
    assert "1 yes, 1 no, 0 untestable, 0 reported; FAILS: 1 of 2 judged rows do not hold" in md
    assert "UNTESTABLE: 1 of 2 judged rows are untestable (a precondition is not met)" in md
    assert "FAILS: raised RuntimeError: synthetic failure \\| with a pipe" in md
    assert "| entry | claim | source | paper value | ours | criterion | preconditions | verdict |" in md
    assert "| zz-synth-fail | v below 1 | seed 999, Eq. 5 | 0.5 | v = 2.0 | v < 1 (tolerance: none) |  | no |" in md
    assert "| zz-synth-na | z is reported | seed 999, Fig. 3 | 2 | z = 2.0 |  |  | reported, not judged |" in md
    # the untestable row names its precondition and the measured value
    assert "| untestable: the baseline learns: the untreated arm's best test accuracy 10.1 %" in md
    assert "| zz-synth-pass | x equals 1 | seed 999, Eq. 1 | 1 | x = 1.0 | |x - 1|" not in md  # pipes escaped
    assert "| zz-synth-pass | x equals 1 | seed 999, Eq. 1 | 1 | x = 1.0 | \\|x - 1\\| <= tol" in md
    # `repro list` shows the counts of the last run found in --out, without running anything
    rc, stdout, _ = run_cli("repro", "list", "--out", str(out))
    assert rc == 0
    line = {l.split()[0]: l for l in stdout.splitlines()}
    assert "[1 yes, 0 no, 0 untestable, 1 reported (quick run, HOLDS)]" in line["zz-synth-pass"]
    assert "[0 yes, 0 no, 0 untestable, 2 reported (quick run, FAILS)]" in line["zz-synth-na"]
    assert "[1 yes, 0 no, 1 untestable, 0 reported (quick run, UNTESTABLE)]" in line["zz-synth-untestable"]
    assert "[not run yet]" in line["zz-synth-raises"]


def test_repro_all_only_passing_exits_0(synth, tmp_path):
    outcomes, report = registry.run_all(tmp_path, quick=True, names=["zz-synth-pass"])
    assert [o.holds for o in outcomes] == [True] and "1 entries: **1 hold, 0 fail, 0 untestable**" in report.read_text()


def test_repro_all_lists_the_other_modes_runs_beside(synth, tmp_path):
    """A full run stored beside a quick `repro all` appears in its own section (and vice versa)."""
    registry.run_experiment("zz-synth-fail", tmp_path, quick=False)
    assert (tmp_path / "zz-synth-fail" / "result-full.json").exists()
    _, report = registry.run_all(tmp_path, quick=True, names=["zz-synth-pass", "zz-synth-fail"])
    md = report.read_text()
    assert "## Entries (quick mode)" in md and "## Entries (full mode)" in md and "## Claims (full mode)" in md
    full = md[md.index("## Entries (full mode)"):md.index("## Claims (quick mode)")]
    assert "zz-synth-fail" in full and "zz-synth-pass" not in full  # only entries that have a full run
    assert (tmp_path / "zz-synth-fail" / "result-quick.json").exists()
    assert registry.load_result("zz-synth-fail", tmp_path, "full")["quick"] is False


def test_repro_all_bad_input(synth, tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_cli("repro", "all", "--out", str(blocker / "sub"))
    assert rc == 2 and "cannot be created or written" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "zz-synth-pass").exists()
    with pytest.raises(registry.UserError, match="unknown reproduction 'nope'; accepted: zz-synth-fail"):
        registry.run_all(tmp_path, names=["nope"])
