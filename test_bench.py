"""bench.py runs end to end: a smoke test with tiny sizes, not a timing.

Every scenario runs against chat.py, and fanout, latency and conns against
Redis, NATS and a cluster too, each server started by bench.py itself
(--spawn); each run must report nothing lost and all its fields. No
timing is asserted anywhere: the machine is shared and noisy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bench
from conftest import HERE

# (target, scenario) -> bench.py's arguments. Some put the target options
# after the scenario, which bench.py accepts too.
TARGETS = {
    "chat": ["--spawn"],
    "redis": ["--spawn", "--redis"],
    "nats": ["--spawn", "--nats"],
    "cluster": ["--spawn", "--cluster", "2", "--reuse-port"],
    "chat-tls": ["--spawn", "--tls"],
    "redis-tls": ["--spawn", "--redis", "--tls"],
}
# What each target calls itself in the results.
DESCRIBED = {"cluster": "cluster of 2", "chat-tls": "chat (TLS)", "redis-tls": "redis (TLS)"}
SCENARIOS = {
    "fanout": ["fanout", "-n", "6", "-s", "2", "-m", "200"],
    "latency": ["latency", "-n", "4", "--rate", "200", "--duration", "0.5"],
    "conns": ["conns", "-n", "50"],
    "flood": ["flood", "--exchanges", "5", "--interval", "0.01"],
    # A small output limit, so that the non-readers are closed within the
    # second and the count of slow consumers is exercised.
    "hostile": ["hostile", "-k", "20", "--duration", "1", "--server-arg=--output-limit=65536"],
    # The load, small: numbered 1 KiB lines, paced, from a process of
    # their own; the pair must see every one of them, in order.
    "hostile-paced": [
        "hostile",
        "-k",
        "20",
        "--duration",
        "1",
        "--line-size",
        "1024",
        "--flood-rate",
        "1048576",
        "--server-arg=--output-limit=65536",
    ],
}
CASES = [
    *[("chat", scenario) for scenario in SCENARIOS],
    *[
        (target, scenario)
        for target in ("redis", "nats", "cluster", "chat-tls", "redis-tls")
        for scenario in ("fanout", "latency", "conns")
    ],
]
# Fields every run of a scenario must report (others may come and go).
FIELDS = {
    "fanout": {"target", "clients", "connections", "deliveries", "lost", "deliveries_per_s"},
    "latency": {
        "target",
        "deliveries",
        "lost",
        "order_ok",
        "p50_ms",
        "p99_ms",
        "p99_9_ms",
        "max_ms",
        "last_member_p50_ms",
        "last_member_p99_ms",
        "last_member_max_ms",
        "received_by_probe",
        "probe_p50_ms",
        "probe_p99_ms",
    },
    "conns": {"target", "connections", "connect_register_per_s", "broadcast_reached"},
    "flood": {"target", "round_trips", "round_trip_p50_ms", "round_trip_p99_ms"},
    "hostile": {
        "round_trips",
        "round_trip_p50_ms",
        "round_trip_p99_ms",
        "round_trip_max_ms",
        "pair_disconnected",
        "server_peak_rss_kib",
        "slow_consumers_closed",
        "slow_consumer_reasons",
        "goal_pair_never_disconnected",
        "goal_round_trip_p99_under_250_ms",
        "goal_peak_rss_under_budget_plus_64_mib",
    },
}
FIELDS["hostile-paced"] = FIELDS["hostile"] | {
    "flood_lines_missing_at_pair",
    "flood_lines_out_of_order_at_pair",
    "goal_pair_saw_the_flood_whole_and_in_order",
}


def require(target: str) -> None:
    """Skip a target whose server is not installed, except in CI (.ci/run
    sets CI), where a missing tool must fail rather than hide a target."""
    missing = None
    if target in ("redis", "cluster", "redis-tls") and shutil.which("redis-server") is None:
        missing = "redis-server"
    elif target == "nats" and bench.find_nats_server() is None:
        missing = "nats-server"
    elif target == "cluster" and importlib.util.find_spec("hiredis") is None:
        missing = "hiredis"
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{missing} is missing", pytrace=False)
    pytest.skip(f"{missing} is not installed")


def run_bench(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / "bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def last_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize(("target", "scenario"), CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_bench_scenario_runs_and_loses_nothing(target: str, scenario: str) -> None:
    """bench.py: each scenario runs at a tiny size against each target and loses nothing."""
    require(target)
    if target == "redis":  # target options after the scenario
        args = [*SCENARIOS[scenario], *TARGETS[target], "--timeout", "30"]
    else:
        args = [*TARGETS[target], "--timeout", "30", *SCENARIOS[scenario]]
    result = last_json(run_bench(*args))
    assert result["scenario"] == scenario.removesuffix("-paced")
    assert FIELDS[scenario] <= result.keys()
    assert result["target"] == DESCRIBED.get(target, target)
    if target in ("redis", "nats", "redis-tls"):
        # How its connections differ.
        assert target.removesuffix("-tls") in result["note"].lower()
    if scenario == "conns":
        assert result["broadcast_reached"] == 50
    elif scenario == "flood":
        assert result["round_trips"] == 5
    elif scenario.startswith("hostile"):
        assert result["pair_disconnected"] is False
        if scenario == "hostile-paced":
            assert result["flood_lines_per_s_at_pair"] > 0
            assert result["flood_lines_missing_at_pair"] == 0
            assert result["flood_lines_out_of_order_at_pair"] == 0
        # Each non-reader gets far more than 64 KiB within the second.
        assert result["slow_consumers_closed"] >= 1
        assert sum(result["slow_consumer_reasons"].values()) == result["slow_consumers_closed"]
    else:
        assert result["lost"] == 0
    if scenario == "fanout":
        assert result["probe_order_ok"] is True
    if scenario == "latency":
        assert result["order_ok"] is True
        assert result["deliveries"] == 4 * result["messages"]
        assert result["received_by_probe"] == result["messages"]
    # A run this short is too short for a CPU share.
    if "server_cpu_percent" in result and result.get("seconds", 2) < 1:
        assert result["server_cpu_percent"] is None


def test_no_server_is_one_clear_line() -> None:
    """bench.py: with no server at the port, one line on stderr and a failing status."""
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        done = run_bench("--port", str(port), "fanout", "-n", "2", "-s", "1", check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert f"cannot connect to chat at 127.0.0.1:{port}" in done.stderr


def test_help_names_the_default_target() -> None:
    """bench.py: --help names the default host and port."""
    out = run_bench("--help").stdout
    assert "127.0.0.1" in out
    assert "8080" in out


def test_server_arg_needs_spawn() -> None:
    """bench.py: --server-arg without --spawn is refused, saying so."""
    done = run_bench("--server-arg=--keepalive=5", "conns", check=False)
    assert done.returncode != 0
    assert "--spawn" in done.stderr


def test_server_args_before_and_after_the_scenario_add_up() -> None:
    """bench.py: target options count on either side of the scenario."""
    args = bench.parse_args(["--spawn", "--server-arg=a", "conns", "--server-arg=b", "--port", "9"])
    assert args.server_args == ["a", "b"]
    assert args.port == 9
    assert bench.parse_args(["--port", "9", "conns"]).port == 9
    assert bench.parse_args(["conns"]).port == 8080


def test_slow_consumers_are_counted_once_each_with_their_reason(tmp_path: Path) -> None:
    """The server's wording may change: any line saying "slow consumer" or
    "budget" counts, once per connection, and a start-up line about the
    budget (it names the listening address) does not."""
    log = tmp_path / "server.log"
    log.write_text(
        "INFO listening on 127.0.0.1:9000 (output budget 67108864 bytes)\n"
        "WARNING <fd 7 127.0.0.1:50001 'u3'> is a slow consumer: 2000000 bytes unsent\n"
        "INFO <fd 7 127.0.0.1:50001 'u3'> disconnected: slow consumer\n"
        "WARNING <fd 8 127.0.0.1:50002 'u4'> closed: over the output budget\n"
        "INFO <fd 8 127.0.0.1:50002 'u4'> disconnected: Slow Consumer\n"
        "INFO <fd 9 127.0.0.1:50003 'u5'> disconnected: client closed\n"
    )
    target = bench.Target("127.0.0.1", [9000], "chat", logs=[log])
    closed = bench.slow_consumers_closed(target)
    assert closed["slow_consumers_closed"] == 2
    assert closed["slow_consumer_reasons"] == {"output limit": 1, "output budget": 1}
