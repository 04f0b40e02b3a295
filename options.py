"""What each option of the command line accepts: one function per kind of
value, raising argparse.ArgumentTypeError with a plain reason. argparse
uses them, and so does the settings file (config.py reads them off the
parser), so a value is checked by one set of rules wherever it comes from.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Final, NoReturn

import flood
from door import MAX_KEEPALIVE

# Cluster mode: PROTOCOL.md, "a server that dies without cleaning up frees
# its names within 30 s". The holder renews its leases every third of this.
DEFAULT_LEASE_MS: Final = 30_000
MIN_LEASE_MS: Final = 300
DEFAULT_ROOM: Final = "chat"
# PROTOCOL.md: every request to Redis has a deadline (default 2 s). Under
# 0.05 s an ordinary hiccup would count as an outage.
DEFAULT_REDIS_TIMEOUT: Final = 2.0
MIN_REDIS_TIMEOUT: Final = 0.05
MAX_REDIS_TIMEOUT: Final = 60.0


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0 to 65535")
    return port


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number, `minimum` or more."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {number}")
        return number

    return parse


positive = at_least(1)
whole = at_least(0)  # 0 turns the limit off


def keepalive(text: str) -> int:
    seconds = whole(text)
    # Linux's bound on TCP_KEEPIDLE (about 9 hours).
    if seconds > MAX_KEEPALIVE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_KEEPALIVE}, not {seconds}")
    return seconds


def send_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if rate != 0 and not flood.MIN_RATE <= rate <= flood.MAX_RATE:  # NaN included
        raise argparse.ArgumentTypeError(
            f"must be 0 (no limit) or {flood.MIN_RATE:g} to {flood.MAX_RATE:g}, not {text}"
        )
    return rate


def send_burst(text: str) -> int:
    burst = positive(text)
    if burst > flood.MAX_BURST:
        raise argparse.ArgumentTypeError(f"must be at most {flood.MAX_BURST}, not {burst}")
    return burst


def lease_ms(text: str) -> int:
    lease = positive(text)
    # Renewed every third of it: much shorter, and renewing is all it does.
    if lease < MIN_LEASE_MS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LEASE_MS}, not {lease}")
    return lease


def redis_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not MIN_REDIS_TIMEOUT <= seconds <= MAX_REDIS_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be {MIN_REDIS_TIMEOUT:g} to {MAX_REDIS_TIMEOUT:g} seconds, not {text}"
        )
    return seconds


def room(text: str) -> str:
    if not text or not text.isprintable() or any(char.isspace() for char in text):
        raise argparse.ArgumentTypeError(f"invalid room {text!r}: printable, no spaces")
    return text


LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid level {text!r}: choose from {', '.join(LOG_LEVELS)}"
        )
    return level
