"""host.py's one helper: watching for writing only while bytes remain."""

from __future__ import annotations

from host import watch_writes_while


class Link:
    """Something with a socket whose watch the helper changes."""

    def __init__(self) -> None:
        self.wants_write = False
        self.rewatched: list[bool] = []

    def rewatch(self) -> None:
        self.rewatched.append(self.wants_write)


def test_writing_is_watched_while_and_only_while_bytes_remain() -> None:
    """watch_writes_while: the selector is asked again only when what is
    left changes between nothing and something, with the new state set."""
    link = Link()
    for unsent in (False, True, True, True, False, False, True):
        watch_writes_while(link, unsent, Link.rewatch)
    assert link.rewatched == [True, False, True]
    assert link.wants_write
