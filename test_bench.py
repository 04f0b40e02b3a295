"""bench.py runs end to end: a smoke test with tiny sizes, not a timing.

Each scenario starts chat.py itself (--spawn) and must report nothing lost.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import HERE

SCENARIOS = {
    "fanout": ["fanout", "-n", "6", "-s", "2", "-m", "200"],
    "latency": ["latency", "-n", "4", "--rate", "200", "--duration", "0.5"],
    "conns": ["conns", "-n", "50"],
    "flood": ["flood", "--exchanges", "5", "--interval", "0.01"],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_bench_scenario_runs_and_loses_nothing(scenario: str) -> None:
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--spawn", "--timeout", "30"]
        + SCENARIOS[scenario],
        capture_output=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout.decode().splitlines()[-1])
    assert result["scenario"] == scenario
    if scenario == "conns":
        assert result["broadcast_reached"] == 50
    elif scenario == "flood":
        assert result["round_trips"] == 5
    else:
        assert result["lost"] == 0
    if scenario == "fanout":
        assert result["probe_order_ok"] is True
