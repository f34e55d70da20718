"""The tour notebook in a real browser: JupyterLab + headless Chromium, dashboard values live."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
NEWS = "@jupyterlab/apputils-extension/notification.jupyterlab-settings"
KERNEL_IDLE = (
    "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status"
    " === 'idle'"
)
PPS_POSITIVE = (
    "() => Number((document.querySelector('.emulab-pps')?.textContent ?? '0')"
    ".replace(/[^0-9.]/g, '')) > 0"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A headless JupyterLab over a temp copy of notebooks/, isolated from the user's config."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0:
            pytest.skip(f"{CHROMIUM} missing and not root (`make deps` as root installs chromium)")
        pytest.fail(f"{CHROMIUM} missing although root: run `make deps` (APT_PACKAGES has it)")
    settings = tmp_path / "settings"
    (settings / NEWS).parent.mkdir(parents=True)
    (settings / NEWS).write_text(json.dumps({"fetchNews": "false"}))
    root = shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    token, port = secrets.token_hex(16), _free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1"]
    cmd += [f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    cmd += ["--LabApp.expose_app_in_browser=True"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = tmp_path / "lab.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab not up after 60 s:\n{log.read_text()}")
                time.sleep(0.25)
        yield base, token, log
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


# a trivial execute request through the notebook's own kernel connection, timed in the page
EXECUTE_MS = """async () => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const t0 = performance.now();
  await kernel.requestExecute({code: '1 + 1', silent: true}).done;
  return performance.now() - t0;
}"""


@pytest.mark.timeout(300)
def test_tour_dashboard_renders_live(lab: tuple[str, str, Path]) -> None:
    base, token, log = lab
    console: list[str] = []
    shots = Path(os.environ.get("EMULAB_SCREENSHOTS") or REPO / "build" / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{base}/lab/tree/01-tour.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            # not awaited: the run takes seconds, and the assertions below poll the live DOM
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells') }")
            t_run = time.monotonic()

            dashboard = page.locator(".emulab-dashboard").first
            expect(dashboard).to_be_visible(timeout=90_000)
            pps = page.locator(".emulab-pps").first
            expect(pps).to_have_text(re.compile(r"[\d,]+ pkt/s"), timeout=30_000)
            page.wait_for_function(PPS_POSITIVE, timeout=30_000)
            live_after = time.monotonic() - t_run
            before = pps.inner_text()
            page.wait_for_timeout(1500)
            assert pps.inner_text() != before, f"pkt/s frozen at {before!r}: no live updates"
            # ipywidgets' Image view *is* the <img>, so its class lands on the img itself
            expect(page.locator("img.emulab-chart, .emulab-chart img").first).to_be_visible()
            expect(page.locator(".emulab-status").first).to_contain_text("link=up")
            expect(page.locator(".emulab-regs").first).to_contain_text("QTX_TAIL")
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)  # every cell has run
            # the other tabs fill in live too: vfio-user messages and scapy-decoded packets
            for tab, css, text in (("vfio-user messages", ".emulab-message", "REGION_WRITE"),
                                   ("packets", ".emulab-packet", "UDP")):  # fmt: skip
                page.get_by_role("tab", name=tab).first.click()
                expect(page.locator(css).first).to_contain_text(text, timeout=10_000)
            # the kernel stays responsive while the device, traffic and dashboard run
            took = page.evaluate(EXECUTE_MS)
            print(f"\ndashboard live {live_after:.1f} s after run-all; 1+1 took {took:.0f} ms")
            assert took < 2000, f"the kernel answered a trivial cell in {took:.0f} ms"

            dashboard.screenshot(path=shots / "tour-dashboard.png")
            page.screenshot(path=shots / "tour-page.png", full_page=True)
            print(f"\nscreenshots: {shots / 'tour-dashboard.png'} {shots / 'tour-page.png'}")
        except BaseException:
            print("\n--- browser console ---\n" + "\n".join(console))
            print(f"--- jupyter lab log ---\n{log.read_text()}")
            raise
        finally:
            browser.close()
