"""Open a report in headless Chromium and check it: no console errors, every image loaded, a screenshot.

Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4, messages
separated by NUL bytes), so it needs only the standard library and a ``chromium`` binary (Debian's
``chromium`` package; ``scripts/install.sh`` installs it). Used by the tests and handy for CI::

    python -m posbias.reports.browser report.html --screenshot report.png
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posbias.errors import PosbiasError

__all__ = ["BrowserCheck", "find_chromium", "check_html", "CHROMIUM_FLAGS"]

#: flags that keep headless Chromium quiet and offline on a CI machine
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)

_PAGE_PROBE = r"""
JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                                                 data: i.src.startsWith('data:')})),
  scripts: document.scripts.length,
  links: Array.from(document.querySelectorAll('link[href], [src]')).map(e => e.getAttribute('href') || e.getAttribute('src'))
           .filter(u => u && !u.startsWith('data:') && !u.startsWith('#')),
  sections: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  toc: Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href')),
  text: document.body ? document.body.innerText : '',
  height: Math.max(document.body ? document.body.scrollHeight : 0, document.documentElement.scrollHeight),
})
"""


@dataclass
class BrowserCheck:
    """What the browser saw.

    Attributes
    ----------
    title : str
    images : list of dict
        Per ``<img>``: ``alt``, ``complete``, natural width ``w`` and height ``h``, ``data`` (a data URI).
    console_errors : list of str
        Console errors, uncaught exceptions and failed loads logged by the page.
    scripts : int
        ``<script>`` elements in the DOM.
    external : list of str
        ``src``/``href`` values that are not data URIs or in-page anchors.
    sections, toc : list of str
        ``<h2>`` texts and table-of-contents targets.
    text : str
        The page's visible text.
    screenshot : Path or None
    """

    title: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    scripts: int = 0
    external: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    toc: list[str] = field(default_factory=list)
    text: str = ""
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """Images that did not load (incomplete or zero-sized)."""
        return [i for i in self.images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """Minimal CDP client over the browser's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int) -> None:
        self.proc, self.wfd, self.rfd = proc, to_browser, from_browser
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.wfd, json.dumps(msg).encode("utf-8") + b"\0")
        want = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == want:
                if "error" in m:
                    raise PosbiasError(f"chromium: {method} failed: {m['error'].get('message')}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PosbiasError("chromium did not answer in time; is the chromium binary working (run it with --headless)?")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if ready:
                chunk = os.read(self.rfd, 1 << 20)
                if not chunk:
                    raise PosbiasError(f"chromium exited (code {self.proc.poll()}) before answering")
                self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw.decode("utf-8"))


def check_html(path: str | Path, *, screenshot: str | Path | None = None, width: int = 1200, timeout: float = 60.0,
               chromium: str | None = None) -> BrowserCheck:
    """Load an HTML file in headless Chromium and report what it saw.

    Parameters
    ----------
    path : path
        The HTML file.
    screenshot : path, optional
        PNG of the whole page to write.
    width : int
        Viewport width in CSS pixels.
    timeout : float
        Seconds to wait for each step.
    chromium : str, optional
        Browser binary (default: :func:`find_chromium`).

    Returns
    -------
    BrowserCheck
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise PosbiasError("no chromium binary found; install it (apt-get install chromium, or scripts/install.sh)")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="posbias-chromium-") as profile:
        to_b_r, to_b_w = os.pipe()
        from_b_r, from_b_w = os.pipe()

        def child_fds() -> None:  # runs in the child: browser reads fd 3, writes fd 4
            import fcntl

            a = fcntl.fcntl(to_b_r, fcntl.F_DUPFD, 10)  # move out of the way of 3 and 4 first
            b = fcntl.fcntl(from_b_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [exe, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=child_fds, pass_fds=(3, 4, to_b_r, from_b_w), close_fds=True)
        os.close(to_b_r)
        os.close(from_b_w)
        cdp = _Pipe(proc, to_b_w, from_b_r)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}, timeout=timeout)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                cdp.send(f"{domain}.enable", session=session, timeout=timeout)
            cdp.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                     session=session, timeout=timeout)
            cdp.send("Page.navigate", {"url": url}, session=session, timeout=timeout)
            cdp.wait_event("Page.loadEventFired", timeout=timeout)
            res = cdp.send("Runtime.evaluate", {"expression": _PAGE_PROBE, "returnByValue": True}, session=session, timeout=timeout)
            probe = json.loads(res["result"]["value"])
            shot = None
            if screenshot is not None:
                height = int(min(max(probe["height"], 900), 16000))
                cdp.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                         session=session, timeout=timeout)
                data = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session, timeout=timeout)
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                shot.write_bytes(base64.b64decode(data["data"]))
            errors: list[str] = []
            # drain pending events (console messages logged during load)
            try:
                cdp.send("Runtime.evaluate", {"expression": "1"}, session=session, timeout=timeout)
            except PosbiasError:
                pass
            for e in cdp.events:
                m, p = e.get("method"), e.get("params", {})
                if m == "Runtime.exceptionThrown":
                    errors.append(str(p.get("exceptionDetails", {}).get("text", "exception")))
                elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
                elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                    errors.append(str(p["entry"].get("text", "")))
            try:
                cdp.send("Browser.close", timeout=10)
            except PosbiasError:
                pass
        finally:
            os.close(to_b_w)
            os.close(from_b_r)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
    return BrowserCheck(title=probe["title"], images=probe["images"], console_errors=errors, scripts=int(probe["scripts"]),
                        external=list(probe["links"]), sections=list(probe["sections"]), toc=list(probe["toc"]),
                        text=probe["text"], screenshot=shot)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="check an HTML report in headless Chromium")
    ap.add_argument("html")
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--width", type=int, default=1200)
    args = ap.parse_args(argv)
    res = check_html(args.html, screenshot=args.screenshot, width=args.width)
    print(f"title: {res.title}\nimages: {len(res.images)} ({len(res.broken_images)} broken)\n"
          f"console errors: {res.console_errors}\nscripts: {res.scripts}\nexternal refs: {res.external}")
    return 1 if (res.broken_images or res.console_errors or res.external) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
