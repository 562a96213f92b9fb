"""The report in a real browser: a job runs against the built-in server (with 429s and
faults), ``pipeline report`` writes the page, and headless Chromium opens it over the
DevTools protocol: no console error, nothing fetched, every chart drawn, a screenshot.

Chromium is Debian's package (``apt-get install chromium``; ``.ci/run`` installs it when it
is missing). Without it the test is skipped on a developer's machine and fails in CI.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli

ROOT = Path(__file__).resolve().parent.parent
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=800,900",
    "--remote-debugging-port=0",
)
CHARTS = (
    "requests",
    "cap",
    "latency",
    "output-tokens",
    "row-cost",
    "cost-by-kind",
    "failed-rows",
    "failed-attempts",
    "runs",
)
"""Every chart the page has for a run with a timeline."""

CHECK = """JSON.stringify({
  charts: [...document.querySelectorAll('svg')].map(svg => {
    const box = svg.getBoundingClientRect();
    return {chart: svg.dataset.chart || null, marks: Number(svg.dataset.marks || 0),
            width: box.width, height: box.height, children: svg.childElementCount};
  }),
  markers: [...document.querySelectorAll('svg[data-chart=requests] path > title')]
    .map(t => t.textContent).filter(t => t.includes('429')).length,
  fetched: performance.getEntriesByType('resource').map(r => r.name),
  scripts: document.scripts.length,
  height: document.documentElement.scrollHeight,
})"""


def find_chromium() -> str:
    """Chromium's path; skips the test without it (fails in CI, which installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is missing in CI: .ci/run installs it with apt-get")
    pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")


@dataclass
class PageCheck:
    """What the browser saw."""

    errors: list[str] = field(default_factory=list)
    page: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    """From navigating to the load event."""
    screenshot_s: float = 0.0
    """From navigating to the screenshot written."""


class _Session:
    """One DevTools websocket: commands by id, events kept as they come."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        await self.socket.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = json.loads(await self.socket.receive_str())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    async def wait_for(self, method: str) -> None:
        if any(event.get("method") == method for event in self.events):
            return
        while True:
            message = json.loads(await self.socket.receive_str())
            self.events.append(message)
            if message.get("method") == method:
                return


def _errors(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(json.dumps(params.get("exceptionDetails", {}))[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(json.dumps(params.get("args", []))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append(str(params["entry"].get("text"))[:300])
    return found


async def _page_socket(profile: Path, deadline: float) -> str:
    """The DevTools websocket URL of Chromium's first page (port from DevToolsActivePort)."""
    port_file = profile / "DevToolsActivePort"
    while not port_file.is_file() or not port_file.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError("chromium did not open its DevTools port")
        await asyncio.sleep(0.05)
    port = port_file.read_text().split()[0]
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise TimeoutError("chromium has no page target")
            await asyncio.sleep(0.05)


async def _drive(url: str, profile: Path, screenshot: Path) -> PageCheck:
    deadline = time.monotonic() + 60
    check = PageCheck()
    async with aiohttp.ClientSession() as http:
        socket_url = await _page_socket(profile, deadline)
        async with http.ws_connect(socket_url, max_msg_size=0) as socket:
            session = _Session(socket)
            for domain in ("Page", "Runtime", "Log"):
                await session.call(f"{domain}.enable")
            started = time.perf_counter()
            await session.call("Page.navigate", url=url)
            await session.wait_for("Page.loadEventFired")
            check.load_s = time.perf_counter() - started
            found = await session.call("Runtime.evaluate", expression=CHECK, returnByValue=True)
            check.page = json.loads(found["result"]["value"])
            metrics = await session.call("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            shot = await session.call(
                "Page.captureScreenshot",
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            check.screenshot_s = time.perf_counter() - started
            check.errors = _errors(session.events)
    return check


def open_in_chromium(chromium: str, page: Path, screenshot: Path, profile: Path) -> PageCheck:
    """Open ``page`` in headless Chromium, check it, and write a full-page screenshot."""
    profile.mkdir(parents=True, exist_ok=True)
    log = (profile.parent / "chromium.log").open("wb")
    process = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        return asyncio.run(
            asyncio.wait_for(_drive(page.resolve().as_uri(), profile, screenshot), 90)
        )
    finally:
        process.kill()
        process.wait(timeout=30)
        log.close()


def _job(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f"""
name = "browser-report"
[input]
path = "{ROOT / "data/sample/reviews.parquet"}"
id_column = "review_id"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"
prompt = "Label this review: {{text}}"
max_tokens = 48
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = 24
max_attempts = 8
max_retry_wait_s = 0.05
[pricing]
input = 0.14
output = 0.28
[output]
path = "{tmp_path / "out" / "labels.parquet"}"
"""
    )
    return path


@pytest.mark.slow
def test_the_report_opens_in_chromium_with_every_chart_drawn(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    chromium = find_chromium()
    base_url = local_server(
        max_concurrency=6, latency_ms=25, latency_jitter_ms=25, fault_500=0.04, fault_drop=0.01
    )
    job = _job(tmp_path, base_url)
    runner = CliRunner()
    ran = runner.invoke(cli, ["run", str(job)], catch_exceptions=False)
    assert ran.exit_code in (0, 3), ran.output
    assert f"report: pipeline report {job}" in ran.output
    page = tmp_path / "report.html"
    made = runner.invoke(cli, ["report", str(job), "--to", str(page)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    assert f"to {page}" in made.output

    screenshot = tmp_path / "report.png"
    check = open_in_chromium(chromium, page, screenshot, tmp_path / "profile")

    assert check.errors == []
    assert check.page["fetched"] == []  # self-contained: nothing loaded besides the page
    assert check.page["scripts"] == 0
    charts = {chart["chart"]: chart for chart in check.page["charts"]}
    assert sorted(charts) == sorted(CHARTS)
    for chart in check.page["charts"]:
        assert chart["width"] > 100, chart
        assert chart["height"] > 50, chart
        assert chart["children"] > 2, chart
    for name in ("requests", "cap", "latency", "output-tokens", "row-cost", "cost-by-kind"):
        assert charts[name]["marks"] > 0, name
    assert charts["failed-attempts"]["marks"] > 0  # 429s, 500s and dropped connections
    assert check.page["markers"] > 0  # the 429s are marked on the requests chart
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000
