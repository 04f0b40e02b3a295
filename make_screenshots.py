"""Make the README's pictures of the web page: docs/web-page.png (a desktop
browser, 1000x700) and docs/web-page-phone.png (a phone's width), of a real
chat in progress. The server runs with a web port, two headless Chromium
pages and an nc user chat in its room, and each page is shot as its person
sees it. Needs what test_browser.py needs (chromium, chromium-driver, nc,
selenium): `python3 make_screenshots.py`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Final

from browser_testing import DESKTOP, PHONE, ChatPage, open_chromium, wait_for_output, web_chat
from conftest import HERE, Netcat, receive, send_line, username

PICTURES: Final = HERE / "docs"


def main() -> int:
    PICTURES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as profiles, web_chat() as chat:
        desktop = ChatPage(open_chromium(Path(profiles, "desktop"), DESKTOP))
        phone = ChatPage(open_chromium(Path(profiles, "phone"), PHONE))
        terminal = Netcat(chat.port)
        try:
            terminal.type(username("teixe"))
            terminal.sync()
            for page, name in ((desktop, "mia"), (phone, "sam")):
                page.open(chat)
                page.join(name)
                page.say(f"hi, {name} here, from a browser")
                wait_for_output(terminal, receive(name, f"hi, {name} here, from a browser"))
            terminal.type(send_line("welcome both! I am on nc in a terminal"))
            desktop.wait_for_line("teixe: welcome both! I am on nc in a terminal")
            desktop.say("the same room? nice")
            wait_for_output(terminal, receive("mia", "the same room? nice"))
            phone.say("and this page fits a phone")
            wait_for_output(terminal, receive("sam", "and this page fits a phone"))
            terminal.type(send_line("markup stays text: <b>not bold</b>"))
            for page in (desktop, phone):
                page.wait_for_line("teixe: markup stays text: <b>not bold</b>")
            desktop.driver.save_screenshot(str(PICTURES / "web-page.png"))
            phone.driver.save_screenshot(str(PICTURES / "web-page-phone.png"))
        finally:
            terminal.kill()
            desktop.driver.quit()
            phone.driver.quit()
    print(f"wrote {PICTURES / 'web-page.png'} and {PICTURES / 'web-page-phone.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
