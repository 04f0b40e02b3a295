"""The web page (chat.html) in a real browser: two headless Chromium pages
and a netcat user in one room, markup shown as text, ERROR lines beside
what they answer, a server that stops and comes back, and a page that loads
nothing from elsewhere and breaks none of its CSP. Two browsers serve the
whole file; each test starts its own server and loads the page afresh."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# selenium only through browser_testing, which imports it first (see there).
from browser_testing import (
    DESKTOP,
    PHONE,
    RECONNECT_TIMEOUT,
    By,
    ChatPage,
    Line,
    NoAlertPresentException,
    WebChat,
    open_chromium,
    require_chromium,
    wait_for_output,
    web_chat,
)
from conftest import NAME_TAKEN, Netcat, receive, send_line, username

XSS = "<img src=x onerror=alert(1)>"
MINE = frozenset({"mine"})  # the CSS classes of a person's own line
OTHERS: frozenset[str] = frozenset()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChatPage, ChatPage]]:
    """Two browsers, each with a profile of its own, for the whole module."""
    require_chromium()
    first = open_chromium(tmp_path_factory.mktemp("first-profile"))
    try:
        second = open_chromium(tmp_path_factory.mktemp("second-profile"))
        try:
            yield ChatPage(first), ChatPage(second)
        finally:
            second.quit()
    finally:
        first.quit()


@pytest.fixture
def chat() -> Iterator[WebChat]:
    """The server with a web port."""
    with web_chat() as running:
        yield running


@pytest.fixture
def netcat(chat: WebChat) -> Iterator[Netcat]:
    """`nc` connected to the chat port."""
    typed = Netcat(chat.port)
    yield typed
    typed.kill()


def no_alert(page: ChatPage) -> bool:
    try:
        page.driver.switch_to.alert.dismiss()
    except NoAlertPresentException:
        return True
    return False


def test_two_pages_and_netcat_chat_in_one_room_both_ways(
    pages: tuple[ChatPage, ChatPage], chat: WebChat, netcat: Netcat
) -> None:
    """Browser: two pages and nc in one room, both ways; a page marks its own lines as its."""
    alice, bob = pages
    alice.open(chat)
    bob.open(chat)
    netcat.type(username("carol"))
    netcat.sync()
    # Each page says something as soon as it has joined: its line reaching
    # nc proves the page is in the room before the next one speaks.
    alice.join("alice")
    alice.say("hello from a browser")
    wait_for_output(netcat, receive("alice", "hello from a browser"))
    bob.join("bob")
    bob.say("hi both")
    wait_for_output(netcat, receive("bob", "hi both"))
    assert alice.wait_for_line("bob: hi both").classes == frozenset()

    netcat.type(send_line("hello from a terminal"))
    for page in (alice, bob):
        assert page.wait_for_line("carol: hello from a terminal").classes == frozenset()
    alice.say("and back")
    wait_for_output(netcat, receive("alice", "and back"))
    assert bob.wait_for_line("alice: and back").classes == frozenset()

    # A person's own lines are marked as theirs and shown once (the server
    # never echoes them), in the order the room had them.
    assert alice.lines()[-4:] == [
        Line("alice: hello from a browser", MINE),
        Line("bob: hi both", OTHERS),
        Line("carol: hello from a terminal", OTHERS),
        Line("alice: and back", MINE),
    ]
    assert bob.lines()[-3:] == [
        Line("bob: hi both", MINE),
        Line("carol: hello from a terminal", OTHERS),
        Line("alice: and back", OTHERS),
    ]
    # nc got the pages' lines once each, and none of its own.
    assert netcat.sync() == [
        receive("alice", "hello from a browser").rstrip(),
        receive("bob", "hi both").rstrip(),
        receive("alice", "and back").rstrip(),
    ]


def test_markup_in_a_message_shows_as_text(
    pages: tuple[ChatPage, ChatPage], chat: WebChat, netcat: Netcat
) -> None:
    """Browser: `<img src=x onerror=alert(1)>` shows as those characters: no img, no alert."""
    alice, _ = pages
    alice.open(chat)
    netcat.type(username("mallory"))
    netcat.sync()
    alice.join("alice")
    alice.say(XSS)
    wait_for_output(netcat, receive("alice", XSS))
    netcat.type(send_line(XSS))
    alice.wait_for_line(f"mallory: {XSS}")

    assert alice.texts()[-2:] == [f"alice: {XSS}", f"mallory: {XSS}"]
    assert no_alert(alice)
    assert alice.driver.find_elements(By.TAG_NAME, "img") == []
    # The spans the page made hold text only: no element inside them.
    assert alice.script("return document.querySelectorAll('#log li span *').length;") == 0


def test_error_lines_show_beside_what_they_answer(
    pages: tuple[ChatPage, ChatPage], chat: WebChat, netcat: Netcat
) -> None:
    """Browser: a SEND before a name, a bad name and a taken one: each ERROR beside its field."""
    alice, _ = pages
    alice.open(chat)
    netcat.type(username("carol"))
    netcat.sync()  # carol holds her name before the page asks for it

    alice.say("too early")
    alice.wait_for("the send error", lambda: alice.text_of("send-error") != "")
    assert alice.text_of("send-error") == "You must set a username first."
    assert alice.lines()[-1].classes == frozenset({"mine", "failed"})
    assert alice.text_of("name-error") == ""

    alice.join("two words")
    alice.wait_for("the name error", lambda: alice.text_of("name-error") != "")
    assert alice.text_of("name-error") == "Username contains empty spaces."

    alice.join("Carol")
    alice.wait_for("the taken name", lambda: alice.text_of("name-error") == NAME_TAKEN.decode()[6:])

    alice.join("alice")
    alice.say("now it works")
    wait_for_output(netcat, receive("alice", "now it works"))
    assert alice.text_of("name-error") == ""
    assert alice.text_of("send-error") == ""
    assert alice.lines()[-1].classes == frozenset({"mine"})
    # The ERROR lines went beside their fields, not into the room's lines.
    assert not any("sername" in text for text in alice.texts())


def test_the_page_notices_a_stop_and_reconnects_when_the_server_is_back(
    pages: tuple[ChatPage, ChatPage], chat: WebChat, netcat: Netcat
) -> None:
    """Browser: a stop shows a notice; the page reconnects to the restarted server, as itself."""
    alice, _ = pages
    alice.open(chat)
    netcat.type(username("carol"))
    netcat.sync()
    alice.join("alice")
    alice.say("before")
    wait_for_output(netcat, receive("alice", "before"))
    assert not alice.status_is_down()

    chat.process.finish()
    netcat.kill()
    alice.wait_for("the notice of the stop", alice.status_is_down)
    assert alice.status().startswith("Disconnected.")
    reconnect = alice.driver.find_element(By.ID, "reconnect")
    assert reconnect.is_displayed()
    assert reconnect.accessible_name == "Reconnect now"
    alice.wait_for_line("Connection lost: what the room says meanwhile is not shown.")

    with web_chat(port=chat.port, web_port=chat.web_port) as again:
        alice.wait_for_line("Connected again.", RECONNECT_TIMEOUT)
        assert alice.status() == "Connected."
        assert not alice.status_is_down()
        assert not alice.driver.find_element(By.ID, "reconnect").is_displayed()
        back = Netcat(again.port)
        try:
            back.type(username("carol"))
            back.sync()
            alice.say("after")
            wait_for_output(back, receive("alice", "after"))  # the name is alice's again
            back.type(username("alice"))
            assert back.sync() == [receive("alice", "after").rstrip(), NAME_TAKEN]
        finally:
            back.kill()


def test_the_page_loads_nothing_from_elsewhere_and_breaks_no_csp(
    pages: tuple[ChatPage, ChatPage], chat: WebChat, netcat: Netcat
) -> None:
    """Browser: everything the page loads is from its origin; no CSP violation, no console error."""
    alice, _ = pages
    alice.console()  # what earlier tests left
    alice.open(chat)
    netcat.type(username("carol"))
    netcat.sync()
    alice.join("alice")
    alice.say("hello")
    wait_for_output(netcat, receive("alice", "hello"))
    netcat.type(send_line("hi"))
    alice.wait_for_line("carol: hi")

    origin = chat.url.rstrip("/")
    loaded = alice.script(
        "return performance.getEntries().map((entry) => entry.name)"
        ".filter((name) => name.includes('://'));"
    )
    assert loaded and all(name.startswith(origin + "/") for name in loaded), loaded
    console = alice.console()
    assert [entry for entry in console if entry["level"] in ("SEVERE", "WARNING")] == []
    assert not any("Content Security Policy" in entry["message"] for entry in console)


def test_the_page_fits_a_phone_and_names_its_controls(
    pages: tuple[ChatPage, ChatPage], chat: WebChat
) -> None:
    """Browser: at a phone's width nothing runs off the side; each control has a name."""
    _, bob = pages
    bob.resize(PHONE)
    try:
        bob.open(chat)
        bob.join("bob")
        bob.say("a line long enough to need more than one row on a phone's narrow screen")
        bob.wait_for_line(
            "bob: a line long enough to need more than one row on a phone's narrow screen"
        )
        assert bob.script("return document.documentElement.scrollWidth;") <= PHONE[0]
        # Long lines wrap: the room's lines do not scroll sideways either.
        assert bob.script(
            "const log = document.getElementById('log');return log.scrollWidth <= log.clientWidth;"
        )
        for control in ("name", "message"):
            box = bob.script(
                f"return document.getElementById({control!r}).closest('form')"
                ".getBoundingClientRect().toJSON();"
            )
            assert box["left"] >= 0 and box["right"] <= PHONE[0], (control, box)
        names = {
            element.get_attribute("id") or element.text: element.accessible_name
            for element in bob.driver.find_elements(By.CSS_SELECTOR, "input, button")
            if element.is_displayed()
        }
        assert names == {
            "name": "Name",
            "Join": "Join",
            "message": "Message",
            "Send": "Send",
        }
        log = bob.driver.find_element(By.ID, "log")
        assert log.accessible_name == "Messages in the room"
    finally:
        bob.resize(DESKTOP)
