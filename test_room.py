"""Tests of room.py without sockets: the table of names and the turn's batch.

A `FakeHost` stands in for the reactor. Its `reply` is the reactor's one
rule (`Batch.reply` first, straight out if the batch says so), so every
feeding rule these tests rely on is the room's own code.
"""

from __future__ import annotations

from itertools import accumulate

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from chat_testing import FakeMember, make_room
from conftest import NAME_TAKEN
from room import NO_KEYS, Batch, LocalRoom


def set_name(room: LocalRoom, member: FakeMember, name: str) -> None:
    command = protocol.parse_line(b"USERNAME " + name.encode())
    assert isinstance(command, protocol.SetName), command
    room.set_name(member, command)


def delivered(room: LocalRoom, members: list[FakeMember]) -> dict[str, bytes]:
    """What the reactor's flush gives each member from the batch."""
    batch = room.batch
    shared = b"".join(batch.lines)
    offsets = list(accumulate(map(len, batch.lines), initial=0))
    special = batch.needs_own_copy()
    out = {}
    for member in members:
        data = b""
        if member in room.members and batch.lines:
            data = (
                batch.copy_for(member, memoryview(shared), offsets) if member in special else shared
            )
        out[member.label] = data
    return out


# --- The table of names ------------------------------------------------------


def test_a_free_name_is_taken_silently_and_shown_as_typed() -> None:
    """USERNAME: a valid, free name is set, no reply; RECEIVE shows it as typed."""
    room, host = make_room()
    alice = FakeMember("alice")
    set_name(room, alice, "Alice")
    assert alice.name == "Alice"
    assert alice.receive_prefix == b"RECEIVE Alice "
    assert list(room.members) == [alice]
    assert host.direct == {}


def test_a_held_name_in_any_spelling_is_refused() -> None:
    """USERNAME: held by another connection (NFKC + casefold) -> taken."""
    room, host = make_room()
    alice, other = FakeMember("alice"), FakeMember("other")
    set_name(room, alice, "teixe")
    for spelling in ("teixe", "TEIXE", "Ｔｅｉｘｅ"):
        set_name(room, other, spelling)
    assert host.direct[other] == (NAME_TAKEN + b"\n") * 3
    assert other.name is None
    assert list(room.members) == [alice]


def test_renaming_frees_the_old_name_at_once() -> None:
    """USERNAME again: the old name is free at once, the new one held."""
    room, host = make_room()
    alice, bob = FakeMember("alice"), FakeMember("bob")
    set_name(room, alice, "alice")
    set_name(room, alice, "alicia")
    set_name(room, bob, "alice")
    assert (alice.name, bob.name) == ("alicia", "alice")
    set_name(room, bob, "ALICIA")
    assert host.direct == {bob: NAME_TAKEN + b"\n"}
    assert bob.name == "alice"  # a refused USERNAME keeps the old name


def test_own_name_in_another_case_is_accepted() -> None:
    """USERNAME: setting the name it has (in any case) is fine."""
    room, host = make_room()
    alice = FakeMember("alice")
    set_name(room, alice, "alice")
    set_name(room, alice, "ALICE")
    assert alice.name == "ALICE"
    assert host.direct == {}
    assert list(room.members) == [alice]


def test_leaving_frees_the_name() -> None:
    """End of input or a reset: the connection's name is freed."""
    room, _ = make_room()
    alice, bob = FakeMember("alice"), FakeMember("bob")
    set_name(room, alice, "alice")
    room.leave(alice)
    assert alice.name is None and alice.keys == NO_KEYS
    assert list(room.members) == []
    set_name(room, bob, "alice")
    assert bob.name == "alice"
    room.leave(FakeMember("never named"))  # harmless


def test_dropping_a_name_leaves_the_member_without_one() -> None:
    """Cluster mode: a member whose name went elsewhere has no name."""
    room, _ = make_room()
    alice = FakeMember("alice")
    set_name(room, alice, "alice")
    room.drop_name(alice)
    room.drop_name(alice)
    assert alice.name is None
    assert alice.receive_prefix == b""
    assert list(room.members) == []


@pytest.mark.parametrize(
    ("typed", "distinct_forms"), [("alice", 1), ("u123", 2), ("Alice", 2), ("ＴＥＩＸＥ", 3)]
)
def test_equal_forms_of_a_name_share_one_string(typed: str, distinct_forms: int) -> None:
    """The table of names: a form equal to the name as typed, or to another form, is that
    string, not a copy (10,000 idle members each hold their forms)."""
    room, _ = make_room()
    member = FakeMember("m")
    set_name(room, member, typed)
    assert member.name == typed
    forms = [member.name, *member.keys]
    assert len({id(form) for form in forms}) == len(set(forms)) == distinct_forms


# --- The turn's batch ------------------------------------------------------


def test_a_reply_before_any_line_goes_straight_out() -> None:
    """Nothing to keep order with: the batch does not take the reply."""
    batch = Batch()
    member = FakeMember("m", name="m")
    assert not batch.reply(member, b"ERROR x\n")
    assert batch.replies == {}


def test_a_reply_to_a_member_keeps_its_place() -> None:
    """Delivery: a connection's answer comes between the lines processed
    before and after its command."""
    room, host = make_room()
    alice, bob = FakeMember("alice"), FakeMember("bob")
    set_name(room, alice, "alice")
    set_name(room, bob, "bob")
    room.publish(alice, b"RECEIVE alice 1\n")
    host.reply(bob, b"ERROR r\n")
    room.publish(alice, b"RECEIVE alice 2\n")
    assert host.direct == {}
    assert delivered(room, [alice, bob]) == {
        "alice": b"",
        "bob": b"RECEIVE alice 1\nERROR r\nRECEIVE alice 2\n",
    }


def test_a_reply_to_a_connection_without_a_name_goes_straight_out() -> None:
    """It gets no RECEIVE lines, so there is no order to keep."""
    room, host = make_room()
    alice, anonymous = FakeMember("alice"), FakeMember("anonymous")
    set_name(room, alice, "alice")
    room.publish(alice, b"RECEIVE alice 1\n")
    host.reply(anonymous, b"ERROR r\n")
    assert host.direct == {anonymous: b"ERROR r\n"}


def test_foreign_lines_reach_every_member() -> None:
    """Cluster mode: a line from another server goes to every member."""
    room, _ = make_room()
    alice, bob = FakeMember("alice"), FakeMember("bob")
    set_name(room, alice, "alice")
    set_name(room, bob, "bob")
    room.batch.add_foreign(b"RECEIVE carol hi\n")
    assert room.turn_size() == len(b"RECEIVE carol hi\n")
    assert delivered(room, [alice, bob]) == {
        "alice": b"RECEIVE carol hi\n",
        "bob": b"RECEIVE carol hi\n",
    }
    room.batch.clear()
    assert room.turn_size() == 0 and room.batch.needs_own_copy() == set()


# A turn's events, in processing order: ("send", who), ("reply", who) or
# ("join", who). Members 0-2 have names before the turn; 3-5 may join.
MEMBERS_BEFORE = 3
PEOPLE = 6
turn_events = st.lists(
    st.tuples(st.sampled_from(["send", "reply", "join"]), st.integers(0, PEOPLE - 1)),
    max_size=40,
)


def expected_streams(events: list[tuple[str, int]]) -> dict[str, bytes]:
    """What each person must receive from one turn, event by event: the
    plain reading of PROTOCOL.md's delivery guarantees."""
    named = set(range(MEMBERS_BEFORE))
    streams = {f"p{who}": b"" for who in range(PEOPLE)}
    for number, (kind, who) in enumerate(events):
        if kind == "join":
            named.add(who)
        elif kind == "send" and who in named:
            for member in named - {who}:
                streams[f"p{member}"] += b"RECEIVE p%d m%d\n" % (who, number)
        elif kind == "reply":
            streams[f"p{who}"] += b"ERROR r%d\n" % number
    return streams


@given(turn_events)
def test_every_member_sees_the_turn_in_processing_order(events: list[tuple[str, int]]) -> None:
    """Delivery guarantees: one global order, the sender never gets its own
    lines, a member joining mid-turn gets only what follows, and answers
    keep their place. Fed through the room's own rules (`set_name`,
    `publish`, `Host.reply` over `Batch.reply`)."""
    room, host = make_room()
    people = [FakeMember(f"p{who}") for who in range(PEOPLE)]
    for who in range(MEMBERS_BEFORE):
        set_name(room, people[who], f"p{who}")
    for number, (kind, who) in enumerate(events):
        person = people[who]
        if kind == "join" and person.name is None:
            set_name(room, person, f"p{who}")
        elif kind == "send" and person.name is not None:
            room.publish(person, person.receive_prefix + b"m%d\n" % number)
        elif kind == "reply":
            host.reply(person, b"ERROR r%d\n" % number)
    batch_part = delivered(room, people)
    got = {p.label: host.direct.get(p, b"") + batch_part[p.label] for p in people}
    assert got == expected_streams(events)


@pytest.mark.parametrize("size", [0, 1, 5])
def test_turn_size_counts_published_bytes(size: int) -> None:
    """The reactor stops a turn at BATCH_BYTES: the room counts them."""
    room, _ = make_room()
    alice = FakeMember("alice")
    set_name(room, alice, "alice")
    for _ in range(size):
        room.publish(alice, b"RECEIVE alice x\n")
    assert room.turn_size() == size * len(b"RECEIVE alice x\n")
