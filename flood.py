"""Flood control without I/O (PROTOCOL.md, "Flood control (v3)"): the token
bucket of --send-rate and --send-burst, as arithmetic on one number.

A bucket of `burst` tokens, refilled at `rate` per second, is kept as the
time its next token is due (the "virtual scheduling" form of the token
bucket, GCRA): a SEND may go when that time has come, and taking a token
moves it one interval on, from no earlier than where a full bucket's would
be. So a connection's whole state is one float, and a connection that never
took a token holds the shared `FULL`. The reactor throttles a connection
that has none until the time `take` refused it for; nothing here keeps
state or raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

# The bucket of a connection that has taken nothing yet: full.
FULL: Final = float("-inf")
# Bounds of --send-rate (besides 0, no limit). Below one SEND per 1,000 s a
# room is not a chat, and the interval of a rate near 0 would overflow the
# clock; over 100,000 a second, no server processes them anyway, and the
# interval must stay well above SLACK.
MIN_RATE: Final = 0.001
MAX_RATE: Final = 100_000.0
# Of --send-burst: ten seconds of MAX_RATE, its default.
MAX_BURST: Final = 1_000_000
# A token due within this of now is due now: a microsecond, so that float
# rounding of 1/rate, added up over the clock's large values (seconds since
# boot), never holds back a token that N per second has made ready (at 3 a
# second, the third after 1 s), nor lets one go early by any measure.
SLACK: Final = 1e-6


@dataclass(frozen=True, slots=True)
class SendRate:
    """--send-rate and --send-burst as the bucket uses them: seconds per
    token, and how far behind now a full bucket's next token lies, which
    is how many tokens beyond the one due it holds (burst - 1)."""

    interval: float
    allowance: float


def send_rate(rate: float, burst: int | None = None) -> SendRate | None:
    """The bucket's terms for `rate` SENDs a second and a burst of `burst`
    (None: the default, `default_burst`); None when `rate` is 0 (off)."""
    if rate <= 0:
        return None
    interval = 1.0 / rate
    tokens = default_burst(rate) if burst is None else burst
    return SendRate(interval, (tokens - 1) * interval + SLACK)


def default_burst(rate: float) -> int:
    """--send-burst's default: ten seconds' worth, 10 x N rounded up, at least 1."""
    return max(1, math.ceil(10 * rate))


def take(next_token: float, now: float, terms: SendRate) -> float | None:
    """A bucket whose next token is due at `next_token`, after one is taken
    at `now`; None if it has none (the next one is due at `next_token`)."""
    if now < next_token:
        return None
    # A bucket left alone refills to `burst` tokens and no more.
    return max(next_token, now - terms.allowance) + terms.interval
