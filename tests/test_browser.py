"""The chat page in headless Chromium (Playwright, Debian's ``chromium`` by executable path) against
real ``botwire serve`` processes: tokens stream in, a reload resumes an answer from its offset with
nothing twice or missing, history survives a server restart, two tabs see each other's messages,
and a producer killed with SIGKILL leaves its partial answer marked incomplete.

Without Chromium or Playwright these tests are skipped, unless ``BOTWIRE_BROWSER_CI`` is set (CI):
then they fail. ``BOTWIRE_DEMO_SCREENSHOT=docs/demo.png`` saves the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from botwire_stream.server.model import FakeModel
from tests.http_serve import Serve, Serves, free_port
from tests.procs import ROOT

CHROMIUM = os.environ.get("BOTWIRE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PACE, TOKENS = 0.05, 80  # an answer takes about 4 s: long enough to reload or kill in the middle
BOUND = 30_000  # ms: every wait for the page is bounded

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None  # type: ignore[assignment]

if sync_playwright is None or not Path(CHROMIUM).exists():
    if os.environ.get("BOTWIRE_BROWSER_CI"):
        raise RuntimeError(f"the browser tests need playwright and chromium (at {CHROMIUM})")
    pytest.skip("playwright or chromium is missing", allow_module_level=True)

pytestmark = pytest.mark.slow


def expected(text: str) -> str:
    return "".join(FakeModel(pace=PACE, tokens=TOKENS).answer([{"role": "user", "content": text}]))


def paced(serves: Serves, url: str, *, port: int | None = None) -> Serve:
    """A ``botwire serve`` with the fake model paced at PACE."""
    return serves.chat(url, {"BOTWIRE_FAKE_PACE": str(PACE), "BOTWIRE_FAKE_TOKENS": str(TOKENS)}, port=port)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def serve(url: str, serves: Serves) -> Iterator[Serve]:
    s = paced(serves, url)
    try:
        yield s
    finally:
        s.stop()
        print("serve log:", s.log.read_text()[-3000:])


def open_page(browser_or_page: Any, base: str, namespace: str, session: str = "") -> Page:
    page: Page = browser_or_page.new_page() if hasattr(browser_or_page, "new_page") else browser_or_page
    page.set_default_timeout(BOUND)
    # shown by pytest when a test fails: what the page said
    page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: print(f"page error: {e}"))
    page.on("requestfailed", lambda r: print(f"request failed: {r.method} {r.url} {r.failure}"))
    page.on("response", lambda r: print(f"{r.status} {r.request.method} {r.url}") if r.status >= 400 else None)
    page.goto(f"{base}/?ns={namespace}" + (f"#{session}" if session else ""))
    page.wait_for_selector("#status:has-text('connected'), #new")
    return page


def send(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")  # keyboard send


def last_answer(page: Page) -> Any:
    return page.locator("#log li.assistant").last


def wait_done(page: Page, count: int = 1) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#log li.assistant:not(.streaming)').length >= n", arg=count, timeout=BOUND
    )


def streamed(page: Page) -> str:
    return str(last_answer(page).get_attribute("data-streamed") or "")


def test_tokens_stream_into_the_page(browser: Browser, serve: Serve, namespace: str, tmp_path: Path) -> None:
    page = open_page(browser, serve.base, namespace)
    send(page, "hello botwire")
    page.wait_for_selector("#log li.user:has-text('hello botwire')")
    want = expected("hello botwire")
    # the answer grows piece by piece while it streams (several distinct partial texts seen)
    seen: set[str] = set()
    for _ in range(400):
        text = page.evaluate("() => { const el = [...document.querySelectorAll('#log li.assistant')].pop(); return el ? [el.className, el.textContent] : null }")
        if text and "streaming" in text[0] and text[1]:
            assert want.startswith(text[1])
            seen.add(text[1])
        if text and "streaming" not in text[0]:
            break
        page.wait_for_timeout(20)
    assert len(seen) >= 3, seen
    wait_done(page)
    assert last_answer(page).text_content() == want
    assert page.locator("#log").get_attribute("aria-live") == "polite"
    # the conversation is listed (titled by its first message) and marked as the open one
    page.wait_for_selector("#conversations a[aria-current='page']:has-text('hello botwire')")
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot))
    if os.environ.get("BOTWIRE_DEMO_SCREENSHOT"):
        shutil.copy(shot, ROOT / os.environ["BOTWIRE_DEMO_SCREENSHOT"])


def test_reload_mid_answer_resumes_from_its_offset(browser: Browser, url: str, namespace: str, serves: Serves) -> None:
    # 0.1 s a token (8 s an answer): still mid-answer after the first quarter on a loaded machine
    serve = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0.1", "BOTWIRE_FAKE_TOKENS": str(TOKENS)})
    try:
        _reload_mid_answer(browser, serve, namespace)
    finally:
        serve.stop()
        print("serve log:", serve.log.read_text()[-3000:])


def _reload_mid_answer(browser: Browser, serve: Serve, namespace: str) -> None:
    page = open_page(browser, serve.base, namespace)
    send(page, "resume me")
    want = expected("resume me")
    page.wait_for_function(
        "n => { const el = [...document.querySelectorAll('#log li.assistant.streaming')].pop(); return el && (el.dataset.streamed || '').length > n }",
        arg=len(want) // 4,
    )
    before = streamed(page)
    assert len(before) < len(want), "the answer ended before the reload; make it longer"
    page.reload()
    page.wait_for_selector("#log li.assistant[data-closed='true']")
    el = last_answer(page)
    resumed = el.get_attribute("data-resumed-from")
    assert resumed not in (None, "-1"), "the reloaded page read the answer from the start"
    assert streamed(page) == want  # resumed text + the rest: no token twice, none missing
    wait_done(page)
    assert el.text_content() == want


def test_history_survives_a_server_restart(browser: Browser, url: str, namespace: str, serves: Serves) -> None:
    port = free_port()
    first = paced(serves, url, port=port)
    page = open_page(browser, first.base, namespace)
    send(page, "remember this")
    wait_done(page)
    first.stop()
    paced(serves, url, port=port)  # the restart, on the same address
    page.reload()
    page.wait_for_selector("#log li.user:has-text('remember this')")
    wait_done(page)
    assert last_answer(page).text_content() == expected("remember this")
    assert page.locator("#conversations a").count() == 1
    send(page, "and this")  # the restarted server answers too
    wait_done(page, 2)
    assert last_answer(page).text_content() == expected("and this")


def test_two_tabs_see_each_others_messages(browser: Browser, serve: Serve, namespace: str) -> None:
    context = browser.new_context()
    one = open_page(context, serve.base, namespace)
    send(one, "from tab one")
    one.wait_for_selector("#log li.user:has-text('from tab one')")
    session = one.evaluate("() => decodeURIComponent(location.hash.slice(1))")
    two = open_page(context, serve.base, namespace, session)
    two.wait_for_selector("#log li.user:has-text('from tab one')")
    wait_done(two)
    send(two, "from tab two")
    one.wait_for_selector("#log li.user:has-text('from tab two')")
    for page in (one, two):
        wait_done(page, 2)
        texts = page.locator("#log li").all_text_contents()
        assert texts == ["from tab one", expected("from tab one"), "from tab two", expected("from tab two")]
    context.close()


def test_killed_producer_leaves_a_partial_answer_marked_incomplete(browser: Browser, url: str, namespace: str, serves: Serves) -> None:
    producer = paced(serves, url)
    reader = paced(serves, url)
    try:
        session = httpx.post(f"{reader.base}/v1/chat/{namespace}", json={"user": "ada"}).json()["session"]
        page = open_page(browser, reader.base, namespace, session)
        r = httpx.post(f"{producer.base}/v1/chat/{namespace}/{session}/messages", json={"content": "die midway"})
        assert r.status_code == 202
        want = expected("die midway")
        page.wait_for_function(
            "n => { const el = [...document.querySelectorAll('#log li.assistant.streaming')].pop(); return el && (el.dataset.streamed || '').length > n }",
            arg=len(want) // 4,
        )
        producer.kill(signal.SIGKILL)
        killed = time.monotonic()
        page.wait_for_selector("#log li.assistant.incomplete", timeout=15_000)
        assert time.monotonic() - killed < 15  # lease 5 s + checks every 1.25 s + expiry's lag
        el = last_answer(page)
        partial = page.evaluate("el => el.firstChild.textContent", el.element_handle())
        assert partial and want.startswith(partial) and len(partial) < len(want)
        assert "incomplete" in (el.text_content() or "")
        assert el.get_attribute("data-closed") == "true"  # the reader was not left waiting
        stored = httpx.get(f"{reader.base}/v1/stream/chat/{namespace}/{session}").json()
        assert stored[-1]["content"] == partial and stored[-1]["meta"]["incomplete"] is True
        assert len(stored) == 2
    finally:
        producer.kill(signal.SIGKILL)
        reader.stop()


def test_a_question_whose_response_was_lost_is_sent_again_and_stored_once(browser: Browser, serve: Serve, namespace: str) -> None:
    """The POST reaches the server (the question is stored) but its response is lost: the page
    sends it again with the same Idempotency-Key and shows one question and one answer, no
    "Not sent" (it showed "Not sent", and sending again stored the question twice)."""
    page = open_page(browser, serve.base, namespace)
    keys: list[str | None] = []

    def lose_the_first_response(route: Any) -> None:
        keys.append(route.request.header_value("idempotency-key"))
        if len(keys) == 1:
            route.fetch()  # the server gets it and stores the question...
            route.abort("connectionreset")  # ...but the page gets no response
        else:
            route.continue_()

    page.route("**/messages", lose_the_first_response)
    send(page, "only once")
    wait_done(page)
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    assert page.locator("#error").text_content() == ""
    assert page.locator("#log li").all_text_contents() == ["only once", expected("only once")]
    session = page.evaluate("() => decodeURIComponent(location.hash.slice(1))")
    stored = httpx.get(f"{serve.base}/v1/stream/chat/{namespace}/{session}").json()
    assert [m["role"] for m in stored] == ["user", "assistant"]


def test_a_malformed_hash_falls_back_to_the_conversation_list(browser: Browser, serve: Serve, namespace: str) -> None:
    """``#%E0%A4%A`` is not valid percent-encoding: the page says so and works on (it threw
    URIError from route())."""
    page = browser.new_page()
    page.set_default_timeout(BOUND)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{serve.base}/?ns={namespace}#%E0%A4%A")
    page.wait_for_selector("#error:has-text('names no conversation')")
    send(page, "after a bad link")
    wait_done(page)
    assert last_answer(page).text_content() == expected("after a bad link")
    page.wait_for_selector("#conversations a[aria-current='page']:has-text('after a bad link')")
    page.evaluate("() => { location.hash = '%E0%A4%A' }")  # while a conversation is open: it stays
    page.wait_for_function("() => !location.hash")
    assert page.locator("#log li").count() == 2
    assert errors == []


def test_the_page_checks_names_and_messages_with_the_servers_limits(browser: Browser, serve: Serve, namespace: str) -> None:
    """The page had its own copies of the user-name pattern and the message limit: it now reads the
    server's (chatapi.page_limits, in the page served at ``/``), keeps the user name the server
    takes, and refuses a message one character too long without sending it (counted in
    characters as the server counts them: 32,000 emoji are not cut to 16,000 by ``maxlength``)."""
    from botwire_stream.server.chatapi import page_limits

    page = open_page(browser, serve.base, namespace)
    assert page.evaluate("() => LIMITS") == page_limits()
    limit = page_limits()["message_chars"]
    assert page.evaluate("() => document.getElementById('message').maxLength") == -1  # no UTF-16 cap
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    page.get_by_label("Message").fill("a" * (limit + 1))
    page.get_by_label("Message").press("Enter")
    page.wait_for_selector(f"#error:has-text('at most {limit} characters, not {limit + 1}')")
    assert posted == [] and page.locator("#log li").count() == 0
    # the server's longest user name, kept in localStorage: the page keeps it and lists its conversation
    user = "a" * 40
    assert httpx.post(f"{serve.base}/v1/chat/{namespace}", json={"user": user}).status_code == 201
    page.evaluate("u => localStorage.setItem('botwire.user', u)", user)
    page.reload()
    page.wait_for_selector("#conversations a")
    assert page.evaluate("() => user") == user
