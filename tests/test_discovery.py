"""dvd.discovery and dvd.routing: members follow DNS, calls follow load and affinity.

Names resolve through a real DNS server on loopback (benchmarks/dns_server.py) whose records
the test changes, the way a headless Service's records change as pods come and go.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from benchmarks.dns_server import DnsServer
from dvd.discovery import (
    DnsServerResolver,
    Members,
    SystemResolver,
    Target,
    parse_target,
    parse_targets,
)
from dvd.routing import LeastLoaded, bounded_affinity, rendezvous_order


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def test_targets_parse_addresses_names_and_the_dns_scheme() -> None:
    assert parse_target("127.0.0.1:50051") == Target("127.0.0.1", 50051)
    assert parse_target("dns:///vision.default.svc:50051") == Target("vision.default.svc", 50051)
    assert parse_target(" vision:1 ") == Target("vision", 1)
    assert parse_target("[::1]:50051") == Target("::1", 50051)
    assert str(Target("::1", 5)) == "[::1]:5"
    assert Target("127.0.0.2", 1).is_address and not Target("vision", 1).is_address
    for bad in ("vision", "vision:", ":50051", "vision:http", "vision:70000", "dns:///x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_target(bad)
    with pytest.raises(ValueError, match="no server"):
        parse_targets(["", " "])


def test_the_system_resolver_reads_hosts_and_numbers() -> None:
    assert asyncio.run(SystemResolver().resolve("127.0.0.3")) == ["127.0.0.3"]
    assert "127.0.0.1" in asyncio.run(SystemResolver().resolve("localhost"))


def test_a_dns_server_resolver_asks_that_server(dns_server: DnsServer) -> None:
    resolver = DnsServerResolver(dns_server.address)
    dns_server.set("vision.test", ["127.0.0.2", "127.0.0.3"])
    assert sorted(asyncio.run(resolver.resolve("vision.test"))) == ["127.0.0.2", "127.0.0.3"]
    dns_server.set("vision.test", [])
    with pytest.raises(OSError, match=r"vision\.test"):
        asyncio.run(resolver.resolve("vision.test"))
    with pytest.raises(ValueError, match="IP address"):
        DnsServerResolver("dns.example:53")


class Member:
    def __init__(self, address: str, name: str = "") -> None:
        self.address = address
        self.name = name
        self.calls = 0
        self.closed = False


async def _close(member: Member) -> None:
    member.closed = True


def _members(dns_server: DnsServer, *targets: str, period_s: float = 60.0) -> Members[Member]:
    return Members(
        parse_targets(targets),
        DnsServerResolver(dns_server.address),
        Member,
        lambda m: m.calls > 0,
        _close,
        period_s,
        "test pool",
    )


def test_members_follow_the_name_and_drain_before_leaving(dns_server: DnsServer) -> None:
    async def scenario() -> None:
        dns_server.set("vision.test", ["127.0.0.2", "127.0.0.3"])
        members = _members(dns_server, "dns:///vision.test:7000", "127.0.0.9:7001")
        await members.start()
        assert list(members.active) == ["127.0.0.2:7000", "127.0.0.3:7000", "127.0.0.9:7001"]
        # each member knows the name it was dialled by: what its TLS certificate must carry
        names = {address: member.name for address, member in members.active.items()}
        assert names == {
            "127.0.0.2:7000": "vision.test",
            "127.0.0.3:7000": "vision.test",
            "127.0.0.9:7001": "127.0.0.9",
        }
        leaving = members.active["127.0.0.2:7000"]
        leaving.calls = 1  # a call still on it
        dns_server.set("vision.test", ["127.0.0.3", "127.0.0.4"])
        await members.refresh()
        assert list(members.active) == ["127.0.0.3:7000", "127.0.0.9:7001", "127.0.0.4:7000"]
        assert members.draining == {"127.0.0.2:7000": leaving} and not leaving.closed
        leaving.calls = 0
        await members.refresh()
        assert not members.draining and leaving.closed
        # resolution fails: the last members stay
        dns_server.set("vision.test", [])
        await members.refresh()
        assert len(members.active) == 3
        await members.stop()
        assert not members.active

    asyncio.run(scenario())


def test_members_re_resolve_on_their_own_and_when_asked(dns_server: DnsServer) -> None:
    async def scenario() -> None:
        dns_server.set("lang.test", ["127.0.0.2"])
        members = _members(dns_server, "lang.test:7000", period_s=0.2)
        await members.start()
        dns_server.set("lang.test", ["127.0.0.2", "127.0.0.3"])
        for _ in range(50):
            if len(members.active) == 2:
                break
            await asyncio.sleep(0.05)
        assert list(members.active) == ["127.0.0.2:7000", "127.0.0.3:7000"]
        await members.stop()
        # refresh_soon wakes the loop long before its period
        slow = _members(dns_server, "lang.test:7000", period_s=60)
        await slow.start()
        dns_server.set("lang.test", ["127.0.0.4"])
        slow.refresh_soon()
        for _ in range(50):
            if list(slow.active) == ["127.0.0.4:7000"]:
                break
            await asyncio.sleep(0.05)
        assert list(slow.active) == ["127.0.0.4:7000"]
        await slow.stop()

    asyncio.run(scenario())


def test_least_loaded_spreads_ties_and_prefers_the_idle() -> None:
    members = [Member(f"m{i}") for i in range(3)]
    policy = LeastLoaded()
    picks = Counter(policy.pick(members, lambda m: m.calls).address for _ in range(30))
    assert picks == {"m0": 10, "m1": 10, "m2": 10}
    members[0].calls, members[1].calls = 3, 1
    assert policy.pick(members, lambda m: m.calls).address == "m2"


def test_rendezvous_keeps_keys_where_they_were_when_members_change() -> None:
    keys = [f"image-{i}".encode() for i in range(400)]
    three = ["a:1", "b:1", "c:1"]
    before = {k: three[rendezvous_order(k, three)[0]] for k in keys}
    assert set(Counter(before.values())) == set(three)
    assert all(90 < n < 180 for n in Counter(before.values()).values())
    four = [*three, "d:1"]
    after = {k: four[rendezvous_order(k, four)[0]] for k in keys}
    moved = [k for k in keys if after[k] != before[k]]
    assert all(after[k] == "d:1" for k in moved)  # only keys the newcomer wins move


def test_bounded_affinity_follows_the_key_until_its_member_is_too_far_ahead() -> None:
    members = [Member("a:1"), Member("b:1"), Member("c:1")]

    def pick(slack: int = 4) -> Member:
        return bounded_affinity(
            members, b"hot image", lambda m: m.address, lambda m: m.calls, slack
        )

    home = pick()
    others = [m for m in members if m is not home]
    assert pick() is home
    home.calls = 3  # three ahead of the idle ones: still its key's member
    assert pick() is home
    home.calls = 4  # four ahead: the key goes to its next member in rendezvous order
    runner_up = pick()
    assert runner_up in others
    runner_up.calls = 4
    assert pick() not in (home, runner_up)
    others[0].calls = others[1].calls = 2  # the least loaded now carry 2: home is 2 ahead
    assert pick() is home
    with pytest.raises(ValueError, match="slack"):
        pick(slack=0)
