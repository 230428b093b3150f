"""Render a report in headless Chromium and check it as a person would see it.

``check_report(path, screenshot=None)`` opens ``path`` in Debian's ``chromium`` (``--headless --no-sandbox
--disable-gpu`` and no background networking), over the DevTools protocol: it waits for the page to load, counts
images whose ``naturalWidth`` is 0 (not loaded), collects console errors and uncaught exceptions, and saves a
full-page screenshot, and reads the text of the page's ``#summary`` element (the run report's summary).
``python -m gradcond.report.browser REPORT.html`` prints the result (exit 1 on problems).

This is a test-time check: the DevTools client needs ``websocket-client``, which is in the ``test`` extra, not a
runtime dependency; it is imported only when a check runs. Without it (or without Chromium) the command line
prints why the check was skipped and exits 0, so ``make demo`` still finishes.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
    "--remote-debugging-port=0", "--remote-allow-origins=*",
]


@dataclass
class BrowserCheck:
    images: int
    broken_images: list[str]
    console_errors: list[str]
    screenshot: str | None
    title: str = ""
    figures: int = 0
    extra: dict = field(default_factory=dict)
    summary: str = ""  # visible text of the element with id "summary" ("" when the page has none)

    @property
    def ok(self) -> bool:
        return self.images > 0 and not self.broken_images and not self.console_errors


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


WEBSOCKET_MISSING = ("the browser check needs the 'websocket-client' package, a test-time dependency "
                     "(pip install 'gradcond[test]').")


def have_websocket() -> bool:
    """Whether ``websocket-client`` (the DevTools transport) can be imported."""
    try:
        import websocket  # noqa: F401
    except ImportError:
        return False
    return True


class _CDP:
    def __init__(self, ws_url: str):
        try:
            import websocket  # websocket-client: test extra, imported only when a check runs
        except ImportError:
            raise ImportError(WEBSOCKET_MISSING) from None

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method} failed: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        end = time.time() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.time() < end:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(f"no {method} within {timeout} s")

    def close(self):
        self.ws.close()


@contextmanager
def _open_page(path: str | Path, timeout: float = 60.0):
    """Headless Chromium with ``path`` loaded from ``file://``; yields the DevTools client (closed afterwards).

    Raises ImportError (with the install command) when ``websocket-client`` is missing and FileNotFoundError when
    Chromium or the page is missing; both are checked before a browser is started."""
    if not have_websocket():
        raise ImportError(WEBSOCKET_MISSING)
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian package 'chromium'); .ci/run installs it.")
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"report {path} does not exist.")
    profile = tempfile.mkdtemp(prefix="gradcond-chromium-")
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        end = time.time() + timeout
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError("chromium did not start its DevTools endpoint.")
            time.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        cdp = _CDP(page["webSocketDebuggerUrl"])
        try:
            cdp.call("Page.enable")
            cdp.call("Runtime.enable")
            cdp.call("Log.enable")
            cdp.call("Network.enable")
            cdp.call("Page.navigate", url=path.as_uri())
            cdp.wait_event("Page.loadEventFired", timeout)
            yield cdp
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _evaluate(cdp, expression: str):
    return cdp.call("Runtime.evaluate", returnByValue=True, awaitPromise=True, expression=expression)["result"].get(
        "value")


def evaluate_page(path: str | Path, expression: str, timeout: float = 60.0) -> dict:
    """Open ``path`` from ``file://`` in headless Chromium, evaluate the JavaScript ``expression`` (a promise is
    awaited) and return ``{"value": its JSON value, "requests": [URLs the page requested that are not file: or
    data: URLs]}`` -- e.g. to check that a documentation page renders its math with no network."""
    with _open_page(path, timeout) as cdp:
        value = _evaluate(cdp, expression)
        requests = [e["params"]["request"]["url"] for e in cdp.events
                    if e.get("method") == "Network.requestWillBeSent"
                    and not e["params"]["request"]["url"].startswith(("file:", "data:"))]
    return {"value": value, "requests": requests}


def check_report(path: str | Path, screenshot: str | Path | None = None, timeout: float = 60.0) -> BrowserCheck:
    """Open ``path`` in headless Chromium; return image/console findings and save a screenshot if asked (cropped
    to the page: its width and height, not a fixed window).

    Raises ImportError (with the install command) when ``websocket-client`` is missing and FileNotFoundError when
    Chromium or the report is missing; both are checked before a browser is started.
    """
    with _open_page(path, timeout) as cdp:
        res = _evaluate(cdp, """
            (async () => {
              const imgs = Array.from(document.images);
              await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; })));
              return {n: imgs.length, broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
                      title: document.title, figures: document.querySelectorAll('figure').length,
                      summary: (document.getElementById('summary') || {innerText: ''}).innerText,
                      height: document.documentElement.scrollHeight};
            })()""")
        errors = []
        for e in cdp.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", "error"))
        shot = None
        if screenshot is not None:
            shot = _screenshot(cdp, screenshot)
        return BrowserCheck(res["n"], res["broken"], errors, shot, res.get("title", ""), res.get("figures", 0),
                            summary=res.get("summary") or "")


SCREENSHOT_WIDTH = 1200  # the window width a report is laid out for in the screenshot


def _screenshot(cdp, screenshot) -> str:
    """A PNG of the whole page cropped to it: laid out at :data:`SCREENSHOT_WIDTH`, then clipped to the content's
    own width and height (no blank window area below a short page or beside a narrow one)."""
    cdp.call("Emulation.setDeviceMetricsOverride", width=SCREENSHOT_WIDTH, height=800, deviceScaleFactor=1,
             mobile=False)
    size = _evaluate(cdp, """(() => { const b = document.body, d = document.documentElement;
        const r = b.getBoundingClientRect();
        return {w: Math.ceil(Math.max(b.scrollWidth, r.right)), h: Math.ceil(Math.max(b.scrollHeight, r.bottom,
                d.scrollHeight > window.innerHeight ? d.scrollHeight : 0))}; })()""")
    width = max(1, min(int(size["w"]), SCREENSHOT_WIDTH))
    height = max(1, min(int(size["h"]), 16000))
    data = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"]
    Path(screenshot).write_bytes(base64.b64decode(data))
    return str(screenshot)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gradcond.report.browser REPORT.html", file=sys.stderr)
        return 2
    report = Path(argv[0])
    if not have_websocket():
        print(f"skipped the browser check of the report: {WEBSOCKET_MISSING}", file=sys.stderr)
        return 0
    if find_chromium() is None:
        print("chromium not installed: skipped the browser check of the report", file=sys.stderr)
        return 0
    if not report.is_file():
        print(f"report {report} does not exist; pass the report.html of a finished run.", file=sys.stderr)
        return 2
    res = check_report(report, report.parent / "screenshot.png")
    print(f"browser check: {res.images} images ({len(res.broken_images)} not loaded), {len(res.console_errors)} console "
          f"errors; screenshot {res.screenshot}")
    return 0 if res.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
