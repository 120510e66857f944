"""iris-demo --serve in a real headless browser: the console script serves a tiny trained pair on a free
port; Chromium loads the page, moves the strength slider, clicks Generate and must see the prior | result
grid and a verdict for every image, made at the strength it set.

Needs Gradio, Playwright and a Chromium executable: IRIS_CHROMIUM, else chromium, chromium-browser or
google-chrome on PATH, else the one `playwright install chromium` downloads. Each missing one skips the
test with the reason; `make browser-deps` installs them. Slow (a server start, about 40 s on 2 cores):
`make test-slow` runs it. Every wait has a limit and the whole test an alarm, so it cannot hang.
"""

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import serve

ROOT = Path(__file__).resolve().parents[1]
TEST_S = 300  # the alarm: one test, server start included
START_S = 180  # the server's start (torch, Keras, Gradio imports; loading the VAE)
GENERATE_MS = 120_000  # the first Generate (the handler's imports, both models loaded)
N, STRENGTH, STEPS = 2, 0.6, 5

pytestmark = pytest.mark.slow


def chromium_executable() -> str | None:
    """IRIS_CHROMIUM, else the first Chromium (or Chrome) on PATH."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return os.environ.get("IRIS_CHROMIUM") or next(filter(None, map(shutil.which, names)), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make browser-deps)")
    with sync_api.sync_playwright() as p:
        executable = chromium_executable()
        if executable is None and Path(p.chromium.executable_path).is_file():
            executable = p.chromium.executable_path  # downloaded by `playwright install chromium`
        if executable is None:
            pytest.skip("no Chromium executable: set IRIS_CHROMIUM or install chromium (make browser-deps)")
        chromium = p.chromium.launch(executable_path=executable, headless=True, timeout=60_000,
                                     args=["--no-proxy-server"])
        yield chromium
        chromium.close()


@pytest.fixture(autouse=True)
def _alarm():
    """Fail a test that runs past TEST_S instead of hanging (POSIX main thread only; elsewhere the
    limits of each wait still hold)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"the browser test ran past {TEST_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Return once `url` answers; fail with the server's log when it exits or START_S passes."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer within {START_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def server(browser, request, tmp_path):
    """`python -m pipeline.cli.demo --serve` on the tiny pair, on a free port: (URL, VAE file, diffusion
    run). The pair is trained only once a browser is there (a skip costs no training)."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[web]')")
    vae, diffusion = request.getfixturevalue("trained_pair")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.demo", "--serve", "--vae", str(vae),
                                 "--diffusion", str(diffusion), "--device", "cpu", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, proc, log_path)
        yield url, vae, diffusion
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def assert_shows_result(page, n: int, strength: float, width: int, timeout_ms: int) -> None:
    """The page shows the prior | result grid (an <img> `width` px wide, loaded) and a verdict for each
    of `n` images, under a summary made at `strength`; AssertionError otherwise."""
    from playwright.sync_api import Error, expect

    summary = re.compile(rf"\d+ of {n} pass circularity-check \(strength {strength:g},")
    expect(page.locator("#summary")).to_contain_text(summary, timeout=timeout_ms)
    image = page.locator("#grid img").first
    expect(image).to_have_attribute("src", re.compile(r"\S"), timeout=timeout_ms)
    try:
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                               timeout=timeout_ms)
    except Error:
        raise AssertionError("the grid image did not load") from None
    assert image.evaluate("img => img.naturalWidth") == width
    verdicts = re.findall(r"^(pass|fail)$", page.locator("#verdicts").inner_text(), re.MULTILINE)
    assert len(verdicts) == n, f"{len(verdicts)} verdicts for {n} images"


def grid_width(n_columns: int, size: int) -> int:
    """Width of the page's grid: `n_columns` images of `size` px with make_grid's 2 px gaps, enlarged."""
    return serve.TILE // size * (n_columns * (size + 2) + 2)


def test_page_generates_at_the_slider_strength(browser, server):
    from playwright.sync_api import expect

    url, vae, diffusion = server
    page = browser.new_page()
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    expect(page.locator("#generate")).to_be_visible(timeout=60_000)
    header = page.locator("#models")
    for text in (str(vae), str(diffusion), "32x32 grey", "2 steps trained", "generating on cpu"):
        expect(header).to_contain_text(text)
    for name, value in (("strength", STRENGTH), ("images", N), ("steps", STEPS)):
        page.locator(f"#{name} input[type=range]").fill(str(value))
        expect(page.locator(f"#{name} input[type=number]")).to_have_value(f"{value:g}")
    page.locator("#generate").click()
    assert_shows_result(page, N, STRENGTH, grid_width(2, 32), GENERATE_MS)
    expect(page.locator("#summary")).to_contain_text(f"seed 0, {STEPS} steps, cpu")


def _png_data_uri(width: int) -> str:
    ok, png = cv2.imencode(".png", np.zeros((width, width), np.uint8))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


@pytest.mark.parametrize("missing", [None, "verdict", "image"])
def test_result_check_fails_on_a_page_without_it(browser, missing):
    """The check above can fail: a static page lacking the verdict, or the grid, does not pass it (and
    the same page with both does)."""
    width = grid_width(2, 32)
    image = "" if missing == "image" else f'<img src="{_png_data_uri(width)}">'
    verdict = "" if missing == "verdict" else (f"{N} of {N} pass circularity-check (strength {STRENGTH:g}, seed 0)"
                                               "<pre id='verdicts'>pass\nfail</pre>")
    page = browser.new_page()
    page.set_content(f"<div id='grid'>{image}</div><div id='summary'>{verdict}</div>")
    if missing is None:
        assert_shows_result(page, N, STRENGTH, width, timeout_ms=1000)
    else:
        with pytest.raises(AssertionError):
            assert_shows_result(page, N, STRENGTH, width, timeout_ms=1000)
    page.close()
