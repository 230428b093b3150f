"""The demo report as a person sees it: rendered in headless Chromium, every image loaded, no console error."""

import json
import re
import sys

import pytest

from gradcond.report.browser import check_report, find_chromium


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from gradcond import config, runner

    out = tmp_path_factory.mktemp("runs")
    cfg = config.resolve(config.DEMO, ["train.epochs=3"])
    report = runner.run(cfg, out=out)
    return report.parent


def test_demo_report_has_figures_and_teleport_comparison(demo_run):
    html = (demo_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6
    assert len(list((demo_run / "figures").glob("*.png"))) >= 6
    assert (demo_run / "teleport" / "metrics.csv").exists()  # the teleported twin run
    events = [json.loads(l) for l in (demo_run / "teleport" / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "teleport" for e in events) == 1
    assert "Teleport events" in html
    # the summary at the top says in words what the teleport changed and what the monitor measured
    summary = re.sub("<[^>]+>", " ", re.search(r'<div id="summary".*?</div>', html, re.S).group(0))
    assert re.search(r"raised the gradient norm from [\d.e+-]+ to [\d.e+-]+", summary)
    assert "Epochs saved (measured on this run, by training loss)" in summary
    assert re.search(r"GSC was measured (once|twice|\d+ times) \(step", summary)


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_demo_report_renders_in_headless_chromium(demo_run):
    shot = demo_run / "screenshot.png"
    res = check_report(demo_run / "report.html", screenshot=shot)
    assert res.images >= 6 and res.broken_images == [], res.broken_images
    assert res.console_errors == [], res.console_errors
    assert shot.stat().st_size > 10_000  # the screenshot stays in the run directory as an artifact
    assert res.title.startswith("gradcond run")
    # what a reader sees rendered: the summary names the teleport's effect and the monitor's coverage in words
    assert re.search(r"raised the gradient norm from [\d.e+-]+ to [\d.e+-]+", res.summary), res.summary
    assert "Monitor coverage." in res.summary and re.search(r"GSC was measured", res.summary), res.summary


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")
def test_browser_check_detects_a_broken_image(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><head><title>t</title></head><body><img alt="x" src="data:image/png;base64,AAAA">'
                    "<script>console.error('boom')</script></body></html>")
    res = check_report(page)
    assert res.broken_images == ["x"] and any("boom" in e for e in res.console_errors) and not res.ok


def test_browser_check_without_websocket_client_degrades(monkeypatch, tmp_path, capsys):
    from gradcond.report import browser

    monkeypatch.setitem(sys.modules, "websocket", None)  # as if websocket-client (test extra) were not installed
    page = tmp_path / "r.html"
    page.write_text("<html><body></body></html>")
    with pytest.raises(ImportError, match=r"needs the 'websocket-client' package.*pip install 'gradcond\[test\]'"):
        check_report(page)
    assert browser.main([str(page)]) == 0  # make demo goes on
    assert "skipped the browser check of the report: the browser check needs the 'websocket-client'" in capsys.readouterr().err
