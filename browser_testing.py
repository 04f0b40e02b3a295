"""The web page in a real browser, for the tests and make_screenshots.py:
Debian's headless `chromium`, driven through Debian's `chromedriver` by
selenium. Both paths are given, so selenium-manager never runs and nothing
is downloaded.

`web_chat` starts the server with a web port and yields both ports: the
one place that knows how the server is started. `open_chromium` opens one
browser with a profile of its own; `ChatPage` is chat.html in it, used as a
person would (type, press Enter, read what the page shows), and every wait
on it has a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import pytest

from conftest import HERE, TIMEOUT, Netcat, ServerProcess, launch, poll


def _import_selenium() -> None:
    """Import selenium with websocket-client as its `websocket`.

    selenium imports websocket-client by its module name, `websocket`, which
    in this directory is our codec (websocket.py): for the import, that name
    is websocket-client, found on the path without this directory; then it
    is ours again. selenium keeps what it took, and uses it only for BiDi."""
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
    spec = importlib.machinery.PathFinder.find_spec("websocket", elsewhere)
    if spec is None or spec.loader is None:
        return  # selenium's own import then says what is missing
    ours = sys.modules.pop("websocket", None)
    client = importlib.util.module_from_spec(spec)
    sys.modules["websocket"] = client
    try:
        spec.loader.exec_module(client)
        import selenium.webdriver  # noqa: F401
    finally:
        del sys.modules["websocket"]
        if ours is not None:
            sys.modules["websocket"] = ours


_import_selenium()

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM: Final = "/usr/bin/chromium"
CHROMEDRIVER: Final = "/usr/bin/chromedriver"
# Headless as root in a container: no sandbox (it needs user namespaces),
# no GPU, /tmp instead of a small /dev/shm, and none of the background
# traffic a fresh profile starts (updates, sync, first-run pages).
CHROMIUM_FLAGS: Final = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
DESKTOP: Final = (1000, 700)
PHONE: Final = (390, 780)  # CSS pixels of a common phone, portrait

# The page retries after 1 s, then 2 s, 4 s...: a server back within a
# second or two is reached by the second or third try.
RECONNECT_TIMEOUT: Final = 4 * TIMEOUT

# The startup log line of the web port: "listening for the web (HTTP and
# WebSocket) on HOST:PORT: the page at /".
WEB_LISTENING: Final = re.compile(r"listening for the web \([^)]*\) on \[?([^\]\s]*)\]?:(\d+)")


def require_chromium() -> None:
    """Skip a browser test where Chromium or its driver is missing, except
    in CI (.ci/run installs both), where it fails."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{' and '.join(missing)} missing", pytrace=False)
    pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")


__all__ = ["By", "NoAlertPresentException"]  # for the tests, which import no selenium

# --- The server ----------------------------------------------------------------------


@dataclass
class WebChat:
    """The server, its chat port and its web port."""

    process: ServerProcess
    web_port: int

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/"


@contextlib.contextmanager
def web_chat(*args: str, port: int = 0, web_port: int = 0) -> Iterator[WebChat]:
    """`chat.py PORT --web-port WEB_PORT ARGS...` on loopback (port 0: a
    free one, read from the startup log), killed when the block ends. A
    restart passes the ports the first server had."""
    with launch("--web-port", str(web_port), *args, port=port) as process:
        found: list[re.Match[str]] = []

        def logged() -> bool:
            line = WEB_LISTENING.search(process.log.text())
            if line is not None:
                found.append(line)
            return line is not None

        poll("the web port in the log", logged)
        yield WebChat(process, int(found[0][2]))


# --- The browser ---------------------------------------------------------------------


def open_chromium(profile: Path, size: tuple[int, int] = DESKTOP) -> WebDriver:
    """A headless Chromium with a fresh profile in `profile`, a viewport of
    `size` (set_viewport), the page's console kept for `console`."""
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    set_viewport(driver, size)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    return driver


def set_viewport(driver: WebDriver, size: tuple[int, int]) -> None:
    """Give pages `size` CSS pixels exactly, a phone's (twice the pixels)
    if narrower than 500. The window cannot: a headless one keeps some of
    its height for a toolbar it never draws, and is never narrower than
    500."""
    width, height = size
    phone = width < 500
    metrics = {"width": width, "height": height, "mobile": phone, "deviceScaleFactor": 1 + phone}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def wait_for_output(netcat: Netcat, data: bytes) -> None:
    """Wait until nc has printed `data`."""
    poll(f"nc to print {data!r}", lambda: data in netcat.output)


@dataclass(frozen=True, slots=True)
class Line:
    """One entry of the page's log: its text and its CSS classes."""

    text: str
    classes: frozenset[str]


class ChatPage:
    """chat.html in one browser, used through its controls."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def open(self, chat: WebChat) -> None:
        """Load the page from `chat`'s web port and wait until it is
        connected."""
        self.driver.get(chat.url)
        self.wait_for("the page to connect", lambda: self.status() == "Connected.")

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        WebDriverWait(self.driver, timeout).until(
            lambda _: check(), f"gave up waiting for {what}: {self.lines()}"
        )

    def resize(self, size: tuple[int, int]) -> None:
        set_viewport(self.driver, size)

    def script(self, source: str) -> Any:
        return self.driver.execute_script(source)

    # What a person does.

    def join(self, name: str) -> None:
        """Type `name` in the name field and press Enter."""
        field = self.driver.find_element(By.ID, "name")
        field.clear()
        field.send_keys(name + Keys.ENTER)

    def say(self, message: str) -> None:
        """Type `message` in the message field and press Enter."""
        self.driver.find_element(By.ID, "message").send_keys(message + Keys.ENTER)

    # What the page shows.

    def lines(self) -> list[Line]:
        rows = cast(
            list[list[str]],
            self.script(
                "return [...document.querySelectorAll('#log li')]"
                ".map((item) => [item.textContent, item.className]);"
            ),
        )
        return [Line(text, frozenset(classes.split())) for text, classes in rows]

    def texts(self) -> list[str]:
        return [line.text for line in self.lines()]

    def wait_for_line(self, text: str, timeout: float = TIMEOUT) -> Line:
        """The page's first line that reads `text`, once there is one."""
        self.wait_for(repr(text), lambda: text in self.texts(), timeout)
        return next(line for line in self.lines() if line.text == text)

    def text_of(self, element_id: str) -> str:
        return cast(
            str, self.script(f"return document.getElementById('{element_id}').textContent;")
        )

    def status(self) -> str:
        return self.text_of("status-text")

    def status_is_down(self) -> bool:
        """Whether the status bar shows its alarm (a dropped connection)."""
        return cast(
            bool,
            self.script("return document.getElementById('status').classList.contains('down');"),
        )

    def console(self) -> list[dict[str, Any]]:
        """The console messages since the last call (each read empties it)."""
        entries = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return cast(list[dict[str, Any]], entries)
