"""`app.py` as a real server for tests, and calls to it made the way its page makes them."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "e2e"  # the browser tests' screenshots
DOC_SHOTS = ROOT / "docs" / "screenshots"  # one of each tab, shown in README.md
CHROMIUM = "/usr/bin/chromium"
# flags this closed network needs: without the background-networking ones Chromium keeps trying to reach Google
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(root: Path, *flags: str, env: dict | None = None, timeout_s: float = 180,
                ready: str = "config") -> Iterator[str]:
    """`python app.py --adapters ROOT/adapters --runs ROOT/runs FLAGS` on a free port until the
    block ends, once `ready` (a path) answers; yields its URL. Its output goes to ROOT/app.log."""
    port = free_port()
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--adapters", str(root / "adapters"), "--runs",
                             str(root / "runs"), "--port", str(port), *flags], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, (root / "app.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class PageSession:
    """One browser session's calls as its page makes them: events by fn_index through Gradio's
    queue, which is also what a crafted request would use. `headers` go with every call."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url = url
        self.session = uuid.uuid4().hex[:11]
        self.http = httpx.Client(base_url=url, headers=headers or {}, timeout=300)
        config = self.http.get("config").json()
        self.fn_index = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}

    def call(self, api_name: str, *data) -> dict:
        """Run the page's event named `api_name` (its Python function's name) with `data`; the
        queue's last message: {"success": bool, "output": {"data": [...]} or {"error": "..."}}."""
        joined = self.http.post("gradio_api/queue/join", json={
            "data": list(data), "fn_index": self.fn_index[api_name], "session_hash": self.session,
            "event_data": None, "trigger_id": None})
        assert joined.status_code == 200, joined.text
        with self.http.stream("GET", f"gradio_api/queue/data?session_hash={self.session}") as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
        raise AssertionError(f"{api_name}: the stream ended without a result")

    def upload(self, path: Path) -> dict:
        """A file as the page uploads it, ready to pass to an event (Gradio's FileData)."""
        with open(path, "rb") as f:
            uploaded = self.http.post("gradio_api/upload", files={"files": (path.name, f)})
        assert uploaded.status_code == 200, uploaded.text
        return {"path": uploaded.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@contextlib.contextmanager
def browser_page(url: str):
    """A page of Debian's headless Chromium (driven by Playwright) open at `url`."""
    import pytest
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    SHOTS.mkdir(parents=True, exist_ok=True)
    DOC_SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()
