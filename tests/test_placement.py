"""dvd.placement: how `dvd up` splits a CPU host between its vision and language servers.

The plan itself is pure and tested here on made-up CPU sets (1, 2, 8 and 16 CPUs, several
replicas); `test_up_places_its_children` starts a real `dvd up` and reads the children's
affinity and thread counts from /proc.
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


def test_two_cpus_give_one_to_each_tier() -> None:
    placed = plan(["vision"], {0, 1})
    assert placed.cpus == {"vision": {0}, "language": {1}}
    assert placed.threads == {"vision": 1}
    assert placed.env("vision") == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert placed.env("language") == {} and placed.env("gateway") == {}
    assert placed.describe() == ["language: CPUs 1", "vision: CPUs 0, 1 threads"]
    assert "default split of 2 CPUs" in placed.how


def test_replicas_split_the_vision_share() -> None:
    placed = plan(["vision-1", "vision-2"], set(range(16)))
    assert placed.cpus["vision-1"] == set(range(4))
    assert placed.cpus["vision-2"] == set(range(4, 8))
    assert placed.cpus["language"] == set(range(8, 16))
    assert placed.threads == {"vision-1": 4, "vision-2": 4}
    # an odd count: the language server gets the extra CPU (round half to even: 4.5 -> 4)
    odd = plan(["vision"], set(range(9)))
    assert (len(odd.cpus["vision"]), len(odd.cpus["language"])) == (4, 5)


def test_the_language_server_always_keeps_a_cpu() -> None:
    placed = plan(["vision-1", "vision-2"], {0, 1, 2})
    assert placed.cpus == {"vision-1": {0}, "vision-2": {1}, "language": {2}}
    crowded = plan([f"vision-{i}" for i in range(3)], {0, 1, 2})
    assert crowded.cpus == {} and set(crowded.threads.values()) == {1}


def test_what_turns_the_default_off() -> None:
    assert plan(["vision"], {0, 1}, mode="off").cpus == {}
    assert plan([], {0, 1}, coupled=True).cpus == {}
    assert plan(["vision"], set(range(8)), gpu_host=True).cpus == {}
    single = plan(["vision"], {3})
    assert single.cpus == {} and single.threads == {"vision": 1}
    with pytest.raises(ValueError, match="'sometimes' is not one of auto, off"):
        plan(["vision"], {0, 1}, mode="sometimes")


def test_cpu_lists_given_replace_the_split() -> None:
    mine = plan(["vision"], set(range(8)), vision_cpus={0, 1, 2})
    assert mine.cpus == {"vision": {0, 1, 2}} and mine.threads == {"vision": 3}
    assert mine.how == "your CPU lists"
    # explicit lists win even where the default would not pin (off, GPU host)
    both = plan(["vision"], {0, 1}, mode="off", vision_cpus={0}, language_cpus={0, 1})
    assert both.cpus == {"vision": {0}, "language": {0, 1}}


def test_an_unplaced_child_keeps_its_defaults() -> None:
    assert Placement().env("vision") == {} and Placement().describe() == []
    assert placement.available_cpus()  # this process may run somewhere
