"""The documentation site builds with ``mkdocs build --strict`` and its API reference covers the public API."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# Packages whose every public name must be in the reference (issue 12 §2), and the reference page of each.
REFERENCED = {
    "gradcond.teleport": "teleport",
    "gradcond.probes": "probes",
    "gradcond.graph": "graph",
    "gradcond.monitor": "monitor",
}
PAGES = ["index", "getting-started", "concepts", "cli", "run-directory", "reproductions",
         "methods/neural-teleportation", "methods/null-space-teleportation", "methods/gradient-scale",
         "methods/gradient-conditioning", "methods/efficient-training", "integrations"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _ids(html: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html))


@pytest.mark.parametrize("package", sorted(REFERENCED))
def test_every_public_name_is_in_the_reference(site, package):
    html = (site / "reference" / f"{REFERENCED[package]}.html").read_text()
    ids = _ids(html)
    mod = importlib.import_module(package)
    assert mod.__all__, f"{package} exports nothing"
    missing, undocumented = [], []
    for name in mod.__all__:
        if f"{package}.{name}" not in ids:
            missing.append(name)
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            # The anchor must be followed by the rendered object itself: its defining path is a heading id.
            if f"{obj.__module__}.{obj.__qualname__}" not in ids:
                undocumented.append(name)
    assert not missing, f"{package}: no reference anchor for {missing}"
    assert not undocumented, f"{package}: no rendered docstring for {undocumented}"


@pytest.mark.parametrize("package, name", [("gradcond.teleport", "teleport"), ("gradcond.probes", "gsc_profile"),
                                           ("gradcond.graph", "analyze"), ("gradcond.monitor", "Schedule")])
def test_reference_renders_the_docstring_under_its_heading(site, package, name):
    import html as html_lib

    obj = getattr(importlib.import_module(package), name)
    page = (site / "reference" / f"{REFERENCED[package]}.html").read_text()
    anchor = page.index(f'id="{obj.__module__}.{obj.__qualname__}"')
    section = html_lib.unescape(re.sub(r"<[^>]+>", "", page[anchor:anchor + 20000]))
    first_line = inspect.getdoc(obj).split("\n")[0].replace("``", "").replace("`", "")
    assert " ".join(first_line.split()) in " ".join(section.split())


def test_pages_exist(site):
    for page in PAGES:
        path = site / f"{page}.html"  # use_directory_urls: false, so the site also works from disk
        assert path.exists(), f"docs page {page} was not built"


def test_event_kinds_are_documented():
    """Every event kind the code logs (``state.log_event("kind", ...)``) is described in the run-directory page."""
    kinds = set()
    for path in (ROOT / "src" / "gradcond").rglob("*.py"):
        text = path.read_text()
        kinds |= set(re.findall(r"""log_event\(\s*["']([a-z_]+)["']""", text))
        # kinds passed through a helper first (e.g. self._not_done(state, "teleport_skipped", ...))
        kinds |= set(re.findall(r"""["']([a-z]+_(?:failed|skipped))["']""", text))
    assert "teleport" in kinds  # the scan itself works
    page = (ROOT / "docs" / "run-directory.md").read_text()
    undocumented = sorted(k for k in kinds if f"`{k}`" not in page)
    assert not undocumented, f"event kinds missing from docs/run-directory.md: {undocumented}"


def test_metric_columns_are_documented():
    from gradcond.train import METRIC_FIELDS

    page = (ROOT / "docs" / "run-directory.md").read_text()
    assert ",".join(METRIC_FIELDS) in page


@pytest.mark.parametrize("test_rc, docs_rc, expected", [(0, 0, 0), (0, 2, 2), (1, 0, 1), (1, 2, 1), (5, 2, 5)])
def test_ci_builds_the_docs_and_keeps_the_test_exit_code(tmp_path, test_rc, docs_rc, expected):
    """.ci/run runs ``make test`` then ``make docs``; a failed test run keeps its code, else a failed docs build fails."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").write_text(
        f'#!/bin/sh\necho "$1" >> {calls}\n[ "$1" = test ] && exit {test_rc}\n[ "$1" = docs ] && exit {docs_rc}\nexit 99\n'
    )
    (bin_dir / "chromium").write_text("#!/bin/sh\nexit 0\n")  # present, so the script installs nothing
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert calls.read_text().split() == ["test", "docs"]
    assert proc.returncode == expected, proc.stdout + proc.stderr
    assert ("documentation build (make docs) failed" in proc.stdout) == (docs_rc != 0)


def test_docs_python_examples_run_each_on_its_own():
    """Every ```python block of the docs pages runs as written in a fresh namespace (a reader copies one at a time)."""
    blocks = [(md.relative_to(ROOT), code) for md in sorted((ROOT / "docs").rglob("*.md"))
              for code in re.findall(r"```python\n(.*?)```", md.read_text(), re.S)]
    assert blocks, "no Python examples found in docs/"
    for where, code in blocks:
        exec(compile(code, str(where), "exec"), {})


def test_logged_metric_names_are_documented():
    """Every (probe, name) pair that training with every monitor probe writes to metrics.csv is in the docs page."""
    import torch

    from gradcond import zoo
    from gradcond.monitor import PROBES, Monitor
    from gradcond.train import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0)
    model = zoo.build("mlp", in_features=6, out_features=3, depth=3, width=8)
    monitor = Monitor({name: "epoch" for name in PROBES}, budget=1)
    history = fit(model, loader, loader, epochs=1, callbacks=[monitor], progress=False)
    pairs = {(r["probe"], r["name"]) for r in history.metrics}
    assert {p for p, _ in pairs} >= set(PROBES) | {"train", "test", "optim"}  # every probe ran and logged
    page = (ROOT / "docs" / "run-directory.md").read_text()
    table = {line for line in page.splitlines() if line.startswith("| `")}
    undocumented = sorted(
        (p, n) for p, n in pairs if not any(line.startswith(f"| `{p}` |") and f"`{n}`" in line for line in table)
    )
    assert not undocumented, f"metrics.csv rows missing from docs/run-directory.md: {undocumented}"


# ---- math without a network (issue 25 item 8) ------------------------------------------------------------------
MATH_PAGES = ["concepts", "methods/neural-teleportation", "methods/null-space-teleportation",
              "methods/gradient-scale", "methods/gradient-conditioning", "methods/efficient-training",
              "methods/compression", "methods/closed-form"]


@pytest.mark.parametrize("page", MATH_PAGES)
def test_pages_carry_mathml_and_no_raw_tex_or_cdn(site, page):
    """The TeX of every page is turned into MathML at build time (docs/hooks/math.py): nothing is left for a
    script to typeset, and no page loads anything from the network."""
    html = (site / f"{page}.html").read_text()
    assert "<math " in html, page
    assert "\\(" not in html and "\\[" not in html and 'class="arithmatex"' not in html, page
    assert not re.findall(r'<(?:script|link)[^>]*(?:src|href)="(?:https?:)?//', html), page


def test_math_hook_fails_loudly_on_tex_it_cannot_render():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradcond_docs_math_hook", ROOT / "docs" / "hooks" / "math.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    out = hook.to_mathml('<p><span class="arithmatex">\\(\\frac{a}{b} &lt; \\lVert x \\rVert\\)</span></p>')
    assert out.startswith('<p><math xmlns="http://www.w3.org/1998/Math/MathML" display="inline">') and "<mfrac>" in out
    assert "&lt;" in out or "&#x0003C;" in out  # the escaped "<" of the HTML became a MathML operator
    with pytest.raises(ValueError, match="cannot render TeX"):
        hook.to_mathml('<span class="arithmatex">\\(\\left( x\\)</span>', "p.md")


def test_a_method_page_shows_rendered_math_from_file_in_headless_chromium(site):
    from gradcond.report.browser import evaluate_page, find_chromium, have_websocket

    if find_chromium() is None or not have_websocket():
        pytest.skip("chromium (Debian package, installed by .ci/run) or websocket-client is not installed")
    res = evaluate_page(site / "methods" / "gradient-scale.html", """(() => {
        const maths = Array.from(document.querySelectorAll('math'));
        const frac = document.querySelector('mfrac');
        const num = frac && frac.children[0].getBoundingClientRect(), den = frac && frac.children[1].getBoundingClientRect();
        return {n: maths.length, text: document.body.innerText,
                laidOut: maths.filter(m => { const r = m.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length,
                display: maths.length ? getComputedStyle(maths[0]).display : '',
                fracStacked: !!frac && num.bottom <= den.top + 1 && num.height > 0 && den.height > 0};
    })()""")
    v = res["value"]
    assert v["n"] > 10 and v["laidOut"] == v["n"], v  # every formula has a box on the page
    assert "\\(" not in v["text"] and "\\frac" not in v["text"] and "\\lVert" not in v["text"]  # no raw TeX shown
    assert v["fracStacked"], v  # a fraction is typeset: its numerator sits above its denominator
    assert "math" in v["display"], v  # laid out by the browser's MathML engine, not as unknown inline text
    assert res["requests"] == [], res["requests"]  # opened from file:// with nothing fetched from a network
