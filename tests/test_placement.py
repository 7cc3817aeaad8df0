"""dvd.placement: how `dvd up` splits a CPU host between its vision and language servers.

The plan itself is pure and tested here on made-up CPU sets (1 to 16 CPUs, several
replicas); tests/test_up.py starts a real `dvd up` and reads its children's affinity,
priority and thread counts (`assert_placed_by_default`).
"""

from __future__ import annotations

import pytest

from dvd import placement
from dvd.placement import Placement, format_cpus, parse_cpus, plan, split_consecutive


def test_cpu_lists_round_trip() -> None:
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpus("") == set()
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpus(parse_cpus("4-7,1")) == "1,4-7"
    with pytest.raises(ValueError, match="'x' is not N or N-M"):
        parse_cpus("0,x")


def test_consecutive_shares() -> None:
    assert split_consecutive({0, 1, 2, 3, 4}, 2) == [{0, 1, 2}, {3, 4}]
    assert split_consecutive(set(), 3) == [set(), set(), set()]
    with pytest.raises(ValueError, match="cannot be split among 2"):
        split_consecutive({0}, 2)
    with pytest.raises(ValueError, match="among 0 vision servers"):
        split_consecutive({0, 1}, 0)


def test_two_cpus_vision_on_both_language_on_the_last_at_lower_priority() -> None:
    placed = plan(["vision"], {0, 1})
    assert placed.cpus == {"vision": {0, 1}, "language": {1}}
    assert placed.threads == {"vision": 2}
    assert placed.nice == {"language": placement.LANGUAGE_NICE}
    assert placed.env("vision") == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert placed.env("language") == {} and placed.env("gateway") == {}
    assert placed.describe() == [
        f"language: CPUs 1, nice +{placement.LANGUAGE_NICE}",
        "vision: CPUs 0-1, 2 threads",
    ]
    assert "vision servers on all of them" in placed.how


def test_replicas_split_every_cpu_and_the_language_server_takes_the_last_half() -> None:
    placed = plan(["vision-1", "vision-2"], set(range(16)))
    assert placed.cpus["vision-1"] == set(range(8))
    assert placed.cpus["vision-2"] == set(range(8, 16))
    assert placed.cpus["language"] == set(range(8, 16))
    assert placed.threads == {"vision-1": 8, "vision-2": 8}
    # an odd count: the language server's half is rounded down
    assert len(plan(["vision"], set(range(9))).cpus["language"]) == 4
    assert plan(["vision"], set(range(3))).cpus["language"] == {2}


def test_more_replicas_than_cpus_are_not_pinned() -> None:
    crowded = plan([f"vision-{i}" for i in range(3)], {0, 1})
    assert crowded.cpus == {} and set(crowded.threads.values()) == {1}
    assert crowded.nice == {}


def test_what_turns_the_default_off() -> None:
    assert plan(["vision"], {0, 1}, mode="off").cpus == {}
    assert plan(["vision"], {0, 1}, mode="off").nice == {}
    assert plan([], {0, 1}, coupled=True).cpus == {}
    assert plan(["vision"], set(range(8)), gpu_host=True).cpus == {}
    single = plan(["vision"], {3})
    assert single.cpus == {} and single.threads == {"vision": 1}
    with pytest.raises(ValueError, match="'sometimes' is not one of auto, off"):
        plan(["vision"], {0, 1}, mode="sometimes")


def test_cpu_lists_given_replace_the_split() -> None:
    mine = plan(["vision"], set(range(8)), vision_cpus={0, 1, 2})
    assert mine.cpus == {"vision": {0, 1, 2}} and mine.threads == {"vision": 3}
    assert mine.nice == {}  # lists of your own: your priorities too
    assert mine.how == "your CPU lists"
    # explicit lists win even where the default would not pin (off, GPU host)
    both = plan(["vision"], {0, 1}, mode="off", vision_cpus={0}, language_cpus={0, 1})
    assert both.cpus == {"vision": {0}, "language": {0, 1}}
    on_gpu = plan(["vision"], {0, 1}, gpu_host=True, language_cpus={1})
    assert on_gpu.cpus == {"language": {1}}
    # coupled: no vision server, so only the language server's list means anything
    assert plan([], {0, 1}, coupled=True, language_cpus={0}).cpus == {"language": {0}}
    with pytest.raises(ValueError, match="no vision server runs with --coupled"):
        plan([], {0, 1}, coupled=True, vision_cpus={0})


def test_an_unplaced_child_keeps_its_defaults() -> None:
    assert Placement().env("vision") == {} and Placement().describe() == []
