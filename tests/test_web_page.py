"""The web page at `/` in a real browser: Debian's chromium driven by Playwright.

Needs `apt-get install -y chromium` (Playwright's own browser download is never used). Without
chromium these tests fail, naming what to install; SDLAB_NO_BROWSER=1 skips them instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_server import LiveServer, make_app, one_torch_thread  # noqa: F401 (autouse fixture)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("SDLAB_NO_BROWSER") == "1":
        pytest.skip("SDLAB_NO_BROWSER=1: browser tests skipped")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the web page test needs Debian's chromium "
                    "(apt-get install -y chromium), or SDLAB_NO_BROWSER=1 to skip it",
                    pytrace=False)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the playwright package is not installed (pip install playwright; "
                    "no `playwright install` needed)", pytrace=False)
    expect.set_options(timeout=TIMEOUT_MS)  # generous: CI machines can be busy
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_model, tiny_pipe):
    with LiveServer(make_app(tiny_model, tiny_pipe)) as live:
        yield live


@pytest.fixture(scope="module")
def keyed_server(tiny_model, tiny_pipe):
    with LiveServer(make_app(tiny_model, tiny_pipe, api_key="pa55word")) as live:
        yield live


@pytest.fixture()
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    yield page
    context.close()


def generate(page, prompt: str, *, steps: int = 2, seed: int | None = None) -> None:
    page.fill("#prompt", prompt)
    page.locator("#steps").fill(str(steps))
    if seed is not None:
        page.fill("#seed", str(seed))
    page.click("#generate")


def test_generate_shows_image_with_parameters_then_img2img(browser, server, page, tiny_pipe):
    from playwright.sync_api import expect
    page.goto(server.url + "/")
    expect(page.locator("#status")).to_have_text("ready")
    assert page.locator("#sampler option").count() >= 10
    assert page.input_value("#model").startswith(tiny_pipe.components.name)
    assert page.input_value("#width") == "32"  # the model's defaults fill the form

    generate(page, "a green triangle", seed=42)
    figure = page.locator("#gallery figure").first
    expect(figure.locator("img")).to_be_visible()
    params = figure.locator("pre.params")
    expect(params).to_contain_text("a green triangle")
    expect(params).to_contain_text("Steps: 2")
    expect(params).to_contain_text("Seed: 42")
    assert figure.locator("img").evaluate("img => img.naturalWidth") == 32

    figure.get_by_role("button", name="Send to img2img").click()
    expect(page.locator("#init-box")).to_be_visible()
    page.locator("#strength").fill("0.5")
    page.click("#generate")
    expect(page.locator("#gallery figure")).to_have_count(2)
    expect(page.locator("#gallery figure").first.locator("pre.params")).to_contain_text(
        "Denoising strength: 0.5")
    assert page.console_errors == []


def test_progress_bar_and_interrupt(browser, server, page, tiny_pipe):
    import time

    from playwright.sync_api import expect
    # at least 20 ms a step, so the 500-step run (about 10 s) is still going when the button is
    # clicked even on a busy machine; the interrupt ends it early
    slow = tiny_pipe.components.unet.register_forward_pre_hook(lambda m, a: time.sleep(0.02))
    try:
        page.goto(server.url + "/")
        expect(page.locator("#status")).to_have_text("ready")
        page.select_option("#sampler", "Euler")
        generate(page, "a slow one", steps=500)
        expect(page.locator("#progress-text")).to_contain_text("step ")
        assert float(page.eval_on_selector("#progress", "p => p.value")) > 0
        page.click("#interrupt")
        params = page.locator("#gallery figure pre.params").first
        expect(params).to_contain_text("(interrupted)")
        expect(page.locator("#status")).to_contain_text("interrupted")
    finally:
        slow.remove()


def test_page_with_api_key(browser, keyed_server, page):
    from playwright.sync_api import expect
    page.goto(keyed_server.url + "/")
    expect(page.locator("#status")).to_contain_text("API key needed")
    page.fill("#api-key", "pa55word")
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#status")).to_have_text("ready")
    generate(page, "a keyed circle")
    expect(page.locator("#gallery figure pre.params")).to_contain_text("a keyed circle")
    page.reload()  # the key is remembered
    assert page.input_value("#api-key") == "pa55word"
    expect(page.locator("#status")).to_have_text("ready")
