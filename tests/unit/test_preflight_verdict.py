"""The pre-flight verdict's arithmetic (launcher/train/preflight.py), on its pure functions: the tournament
rounds of node pairs, and a slow node among four named with what to do. Real ranks: tests/integration/ and
tests/cluster/test_preflight_slurm.py."""

from __future__ import annotations

from itertools import combinations

import pytest

from launcher.train.preflight import evaluate, rounds


@pytest.mark.parametrize("num_nodes", [2, 3, 4, 7, 8])
def test_rounds_meet_every_pair_once_without_a_node_twice_in_a_round(num_nodes):
    schedule = rounds(num_nodes)
    assert len(schedule) == num_nodes - 1 + num_nodes % 2
    for pairs in schedule:
        met = [node for pair in pairs for node in pair]
        assert len(met) == len(set(met))
    assert sorted(pair for pairs in schedule for pair in pairs) == list(combinations(range(num_nodes), 2))


def _facts(rank: int, host: str, pairs: dict, **versions) -> dict:
    return {
        "rank": rank,
        "host": host,
        "pairs": pairs,
        "versions": {"python": "3.11.7", "torch": "2.13.0", **versions},
        "shared_fs": {"ok": True, "token": "t", "error": None},
        "node_probe": None,
        "ram_free": 8 * 2**30,
        "disk_free": 100 * 2**30,
    }


def test_a_node_far_below_the_median_pair_is_named_with_what_to_do():
    gb = 1e9
    bw = {
        ("a", "b"): 10 * gb,
        ("a", "c"): 10 * gb,
        ("b", "c"): 10 * gb,
        ("a", "d"): 1 * gb,
        ("b", "d"): 1.2 * gb,
        ("c", "d"): 0.9 * gb,
    }
    facts = [
        _facts(r, h, {o: v for (x, o), v in bw.items() if x == h} | {x: v for (x, o), v in bw.items() if o == h})
        for r, h in enumerate("abcd")
    ]
    verdict = evaluate(facts, 5 * gb, 2**20, {"ram": 2**30, "disk": 2**30, "why_not": None}, 0.25, "t")
    assert verdict["status"] == "failed" and len(verdict["failures"]) == 1, verdict["failures"]
    assert verdict["failures"][0].startswith("node d:") and "exclude it" in verdict["failures"][0]
    assert verdict["slowest_pair"] == ["c", "d"]
    assert [row["ok"] for row in verdict["nodes"]] == [True, True, True, False]
    assert verdict["nodes"][3]["bus_bandwidth_GBps"] == 1.0  # its median pair
