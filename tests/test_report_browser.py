"""The demo report as a person sees it: rendered in headless Chromium, every image loaded, no console error."""

import json

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


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_demo_report_renders_in_headless_chromium(demo_run):
    shot = demo_run / "screenshot.png"
    res = check_report(demo_run / "report.html", screenshot=shot)
    assert res.images >= 6 and res.broken_images == [], res.broken_images
    assert res.console_errors == [], res.console_errors
    assert shot.stat().st_size > 10_000  # the screenshot stays in the run directory as an artifact
    assert res.title.startswith("gradcond run")


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")
def test_browser_check_detects_a_broken_image(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><head><title>t</title></head><body><img alt="x" src="data:image/png;base64,AAAA">'
                    "<script>console.error('boom')</script></body></html>")
    res = check_report(page)
    assert res.broken_images == ["x"] and any("boom" in e for e in res.console_errors) and not res.ok
