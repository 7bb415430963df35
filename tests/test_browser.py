"""The browser page (service/static): served by the app, and driven in real headless Chromium.

The integration test starts ``facestream serve`` with the shipped weights, points Chromium's fake
webcam at a face clip (a .y4m made with ffmpeg) and drives the page over the Chrome DevTools
Protocol (the ``websockets`` package; nothing is downloaded at run time): masks arrive and are
drawn, the statistics show numbers, the scheduler selector and the knob reconfigure the stream,
and a screenshot shows the mask colours over the face. Chromium and ffmpeg are Debian packages;
``.ci/install-peers`` installs them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import websockets
from fastapi.testclient import TestClient

from facestream.service.app import STATIC, create_app
from facestream.service.bench import free_port, wait_ready
from facestream.service.settings import ServiceSettings

CLIP = "lp_d3.mp4"
TOKEN = "browser-s3cret"
SKIN_RGB = (45, 125, 255)  # PALETTE[1] in service/static/app.js, drawn at alpha 0.5
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",  # Chromium picks the port and writes it to DevToolsActivePort
    "--window-size=1280,1100",
    "--force-device-scale-factor=1",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-gpu",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
]
INSTALL_HINT = "run .ci/install-peers (apt-get install chromium ffmpeg)"


# ---------------------------------------------------------------------------- fast: the app serves it


def test_page_and_assets_are_served() -> None:
    def no_networks(settings: ServiceSettings) -> Any:
        raise RuntimeError("serving the page needs no networks")  # /readyz says so; / still works

    with TestClient(create_app(ServiceSettings(), loader=no_networks)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
        script = client.get("/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "window.facestream" in script.text
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_page_loads_nothing_from_elsewhere() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_page_labels_every_control() -> None:
    html = (STATIC / "index.html").read_text()
    for control in ("scheduler", "knob", "show-mask"):
        assert f'id="{control}"' in html and f'for="{control}"' in html, control


# ---------------------------------------------------------------------------- integration: real Chromium


@pytest.fixture
def chromium() -> str:
    """The Chromium binary (``$FACESTREAM_CHROMIUM`` or on PATH); skips the test without one."""
    for candidate in (os.environ.get("FACESTREAM_CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.skip(f"Chromium is not installed (Debian package 'chromium'); {INSTALL_HINT}")


@pytest.fixture
def ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if not found:
        pytest.skip(f"ffmpeg is not installed (Debian package 'ffmpeg'); {INSTALL_HINT}")
    return found


@pytest.fixture
def fake_camera(ffmpeg: str, videos_dir: Path, tmp_path: Path) -> Path:
    """Four seconds of a face clip as the .y4m Chromium's fake webcam plays (in a loop)."""
    clip = videos_dir / CLIP
    if not clip.is_file():
        pytest.skip(f"face clip {clip} is missing")
    y4m = tmp_path / "camera.y4m"
    command = [ffmpeg, "-loglevel", "error", "-y", "-i", str(clip), "-t", "4"]
    subprocess.run(command + ["-vf", "scale=640:480", "-pix_fmt", "yuv420p", str(y4m)], check=True)
    return y4m


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    """A ``facestream serve`` process with the shipped weights and a token; its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "facestream.cli", "serve", "--port", str(port), "--token", TOKEN]
    command += ["--scheduler", "fixed", "--knob", "30"]  # what the page starts with, whatever the env says
    env = {**os.environ, "FACESTREAM_LOG_LEVEL": "warning"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server, timeout=60)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        print(f"--- service log\n{log.read_text()[-3000:]}")


@pytest.fixture
def browser(chromium: str, fake_camera: Path, tmp_path: Path) -> Iterator[str]:
    """Headless Chromium with the clip as its webcam; the DevTools WebSocket URL of its page."""
    profile = tmp_path / "chromium-profile"
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--use-file-for-fake-video-capture={fake_camera}",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    log = tmp_path / "chromium.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield page_target(devtools_port(profile, process, log))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def devtools_port(profile: Path, process: subprocess.Popen, log: Path, timeout: float = 30) -> int:
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Chromium exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        if active.is_file() and active.read_text().strip():
            return int(active.read_text().split()[0])
        time.sleep(0.1)
    raise RuntimeError(f"Chromium opened no DevTools port within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def page_target(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
        targets = json.loads(response.read())
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


class DevTools:
    """A minimal Chrome DevTools Protocol client: commands in order, events ignored."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        command_id = next(self.ids)
        await self.connection.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.connection.recv())
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, userGesture=True
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 30) -> Any:
        """Poll ``expression`` until it is truthy; on timeout, fail showing the page's state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        page = await self.evaluate(PAGE_STATE)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the page: {page}")

    async def open(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && !!window.facestream", f"{url} to load")


PAGE_STATE = """(() => {
  const f = window.facestream || {};
  const text = (id) => document.getElementById(id).textContent;
  return {
    results: Number(document.body.dataset.results), sent: f.sent, dropped: f.dropped, errors: f.errors,
    lost: f.lost, facesSeen: f.facesSeen, overlayDrawn: f.overlayDrawn, maskPixels: f.maskPixels,
    lastResult: f.lastResult, configs: f.configs, config: f.config, log: (f.log || []).slice(-40),
    status: text('status'), fps: text('fps'), keyRatio: text('key-ratio'), rtt: text('rtt'),
    backend: text('backend'), scheduler: document.getElementById('scheduler').value,
    schedulers: [...document.getElementById('scheduler').options].map((o) => o.value),
    knobDisabled: document.getElementById('knob').disabled, knobLabel: text('knob-label'),
    overlay: (({x, y, width, height}) => ({x, y, width, height}))(
      document.getElementById('overlay').getBoundingClientRect()),
  };
})()"""

CLICK_START = "document.getElementById('start').click()"
DENY_CAMERA = (
    "navigator.mediaDevices.getUserMedia = () =>"
    " Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
)


def select_scheduler(name: str) -> str:
    return (
        "(() => { const s = document.getElementById('scheduler');"
        f" s.value = {json.dumps(name)}; s.dispatchEvent(new Event('change')); }})()"
    )


def submit_knob(value: float) -> str:
    return (
        f"(() => {{ document.getElementById('knob').value = '{value}';"
        " document.getElementById('knob-form').requestSubmit(); })()"
    )


def skin_blend_fraction(bgr: np.ndarray) -> float:
    """The share of pixels tinted by the skin colour at alpha 0.5: blue at least half-saturated and
    well above red (a face on camera is redder than it is blue)."""
    b, r = bgr[..., 0].astype(int), bgr[..., 2].astype(int)
    return float(((b >= 120) & (b - r >= 50)).mean())


async def drive_page(devtools_url: str, base: str, tmp_path: Path) -> dict[str, Any]:
    async with websockets.connect(devtools_url, max_size=None) as connection:
        tools = DevTools(connection)
        await tools.open(f"{base}/?token={TOKEN}")
        await tools.evaluate(CLICK_START)
        await tools.wait_for(
            "Number(document.body.dataset.results) > 10 && window.facestream.overlayDrawn",
            "10 results and a mask",
        )
        before = await tools.evaluate(PAGE_STATE)

        await tools.evaluate(select_scheduler("rl"))
        await tools.wait_for("window.facestream.config && window.facestream.config.scheduler === 'rl'", "rl")
        await tools.evaluate(submit_knob(0.25))
        await tools.wait_for("window.facestream.configs >= 2", "the knob's config reply")
        tuned = await tools.evaluate(PAGE_STATE)

        await tools.evaluate(select_scheduler("always"))
        await tools.wait_for("window.facestream.configs >= 3", "the config reply for 'always'")
        await tools.wait_for(
            "window.facestream.log.filter((a) => a.configs >= 3 && a.type === 'result').length >= 5",
            "5 results after the switch to 'always'",
        )
        await tools.wait_for("window.facestream.lastResult.face && window.facestream.overlayDrawn", "a face")
        after = await tools.evaluate(PAGE_STATE)
        shot = await tools.call("Page.captureScreenshot", format="png")
        screenshot = tmp_path / "browser-screenshot.png"
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        await tools.evaluate(CLICK_START)  # now the Stop button
        stopped = await tools.wait_for(
            "document.getElementById('status').textContent === 'Stopped.'"
            " && !window.facestream.running && document.getElementById('video').srcObject === null",
            "Stop to end the stream",
        )

        await tools.open(f"{base}/?token=wrong")
        await tools.evaluate(CLICK_START)
        refused = await tools.wait_for(
            "document.getElementById('status').textContent.includes('4401')"
            " && document.getElementById('status').textContent",
            "the wrong token to be refused",
        )

        await tools.call("Page.addScriptToEvaluateOnNewDocument", source=DENY_CAMERA)
        await tools.open(f"{base}/?token={TOKEN}")
        await tools.evaluate(CLICK_START)
        denied = await tools.wait_for(
            "document.getElementById('status').textContent.includes('permission denied')"
            " && document.getElementById('status').textContent",
            "the camera refusal to be shown",
        )
    return {
        "before": before,
        "tuned": tuned,
        "after": after,
        "screenshot": screenshot,
        "stopped": stopped,
        "refused": refused,
        "denied": denied,
    }


@pytest.mark.integration
def test_page_in_headless_chromium(
    chromium: str, ffmpeg: str, service: str, browser: str, videos_dir: Path, tmp_path: Path
) -> None:
    seen = asyncio.run(asyncio.wait_for(drive_page(browser, service, tmp_path), timeout=120))
    before, tuned, after = seen["before"], seen["tuned"], seen["after"]

    assert before["results"] > 10 and before["facesSeen"] > 0 and before["overlayDrawn"]
    assert before["maskPixels"]["skin"] > 1000, before["maskPixels"]
    assert float(before["fps"]) > 0 and 0 <= float(before["keyRatio"]) <= 1
    assert float(before["rtt"]) > 0 and before["backend"].startswith("onnxruntime")
    assert before["sent"] - before["results"] - before["dropped"] - before["errors"] <= 2  # flow control
    assert before["scheduler"] == "fixed" and {"always", "fixed", "rl"} <= set(before["schedulers"])
    results = [a for a in before["log"] if a["type"] == "result"]
    assert any(not a["key"] for a in results), "the default fixed-interval scheduler warps between keys"

    assert tuned["config"]["scheduler"] == "rl" and tuned["config"]["knob"] == {"tau": 0.25}
    assert tuned["knobLabel"] == "Knob (tau)" and not tuned["knobDisabled"]

    assert after["config"]["scheduler"] == "always" and after["knobDisabled"]
    switched = [a for a in after["log"] if a["type"] == "result" and a["configs"] >= 3]
    assert all(a["key"] for a in switched[1:]), switched  # the first may have been under way
    assert after["lastResult"]["key"] and float(after["keyRatio"]) > 0

    screenshot, box = seen["screenshot"], after["overlay"]
    if os.environ.get("FACESTREAM_ARTIFACTS"):
        artifacts = Path(os.environ["FACESTREAM_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, artifacts / screenshot.name)
    page = cv2.imread(str(screenshot))
    x, y, w, h = (round(box[k]) for k in ("x", "y", "width", "height"))
    assert w > 100 and h > 100, box
    overlay_region = page[y : y + h, x : x + w]
    assert skin_blend_fraction(first_frame(videos_dir / CLIP)) < 0.002, (
        "the clip itself must not look like the overlay"
    )
    assert skin_blend_fraction(overlay_region) > 0.05, f"no skin overlay in the screenshot {screenshot}"

    assert seen["stopped"]
    assert "4401" in seen["refused"], seen["refused"]
    assert "Camera permission denied" in seen["denied"], seen["denied"]


def first_frame(path: Path, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """The clip's first frame, BGR, at ``size`` = (width, height)."""
    capture = cv2.VideoCapture(str(path))
    try:
        ok, bgr = capture.read()
    finally:
        capture.release()
    assert ok, f"cannot read {path}"
    return cv2.resize(bgr, size)
