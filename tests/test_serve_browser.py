"""The web chat page in a real headless Chromium (the system package), driven by playwright.

Skipped, with the reason, where no `chromium` is installed. The screenshot is kept under pytest's
temporary directory; the test prints its path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'offload[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "no chromium on PATH: install it (apt-get install chromium) to run the browser test",
        allow_module_level=True,
    )

from tests.serve_helpers import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("serve-page"), "--experts-per-layer", "4")
    yield live
    live.stop()


@pytest.fixture
def page(server: LiveServer) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page()
        # Every request must go to the server: the page fetches nothing from elsewhere.
        elsewhere: list[str] = []
        tab.on(
            "request",
            lambda request: None if request.url.startswith(server.url) else elsewhere.append(request.url),
        )
        tab.goto(server.url + "/")
        yield tab
        browser.close()
        assert elsewhere == []


def test_the_page_streams_a_reply_with_speed_and_hit_rate(page, server: LiveServer, tmp_path) -> None:
    expect = sync_api.expect
    page.fill("#input", "Hello")
    page.keyboard.press("Enter")
    expect(page.locator(".turn.user")).to_have_text("Hello")
    stats = page.locator(".figures").last
    expect(stats).to_contain_text("tok/s", timeout=60_000)
    expect(stats).to_contain_text("hit rate")
    assert "–" not in stats.inner_text().split("hit rate")[1].split("·")[0]  # a number, not a dash
    assert page.locator(".turn.assistant").first.inner_text().strip()
    screenshot = tmp_path / "serve-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0

    # A second message continues the conversation: the server reuses the KV cache of the first.
    page.fill("#input", "And then?")
    page.keyboard.press("Enter")
    expect(page.locator(".figures")).to_have_count(2, timeout=60_000)  # the second answer's figures
    expect(page.locator(".figures").last).to_contain_text("tok/s")
    assert "reused 0 prompt" not in page.locator(".figures").last.inner_text()

    page.click("#new")
    expect(page.locator(".turn")).to_have_count(0)


def test_the_stop_button_ends_a_long_reply(page, server: LiveServer) -> None:
    expect = sync_api.expect
    before = server.health()["cancelled"]

    def greedy(route) -> None:
        # The page leaves the temperature to the profile; greedy makes this reply about 450 tokens long.
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "temperature": 0}))

    page.route("**/v1/chat/completions", greedy)
    page.fill("#input", "Write the help text of the AST class.")
    page.keyboard.press("Enter")
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator(".turn.assistant")).not_to_have_text("", timeout=60_000)
    page.click("#stop")
    expect(page.locator(".figures").last).to_have_text("(stopped)")
    expect(page.locator("#send")).to_be_enabled()
    page.fill("#input", "Hello")  # the engine is free again: the next message is answered
    page.keyboard.press("Enter")
    expect(page.locator(".figures")).to_have_count(2, timeout=60_000)
    expect(page.locator(".figures").last).to_contain_text("tok/s")
    assert server.health()["cancelled"] == before + 1
