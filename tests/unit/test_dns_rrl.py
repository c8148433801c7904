"""Response rate limiting on UDP (BIND's rate-limit): per client network and answer, with slip."""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from twisted.internet.task import Clock

from gateway.config import ConfigError, Rate, parse
from gateway.protocols.dns.config import RateLimitConfig
from gateway.protocols.dns.rrl import ResponseRateLimiter
from gateway.protocols.dns.server import DnsUdpProtocol


def response(name: str = "www.example.test.", rcode: int = dns.rcode.NOERROR) -> bytes:
    query = dns.message.make_query(name, "A")
    answer = dns.message.make_response(query)
    answer.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR:
        answer.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
    return answer.to_wire()


def limiter(clock: Clock, **settings: object) -> ResponseRateLimiter:
    settings.setdefault("responses", Rate.parse("5/s"))
    return ResponseRateLimiter(RateLimitConfig(**settings), clock.seconds)  # type: ignore[arg-type]


def outcomes(rrl: ResponseRateLimiter, data: bytes, host: str, count: int) -> list[str]:
    found = []
    for _ in range(count):
        out = rrl.check(data, host)
        if out is None:
            found.append("dropped")
        elif out == data:
            found.append("sent")
        else:
            assert dns.message.from_wire(out).flags & dns.flags.TC
            assert not dns.message.from_wire(out).answer
            found.append("slipped")
    return found


def test_the_same_answer_is_held_to_the_rate_and_every_second_one_over_it_slips() -> None:
    clock = Clock()
    rrl = limiter(clock)
    data = response()
    assert outcomes(rrl, data, "192.0.2.7", 9) == ["sent"] * 5 + ["dropped", "slipped"] * 2
    assert (rrl.dropped, rrl.slipped) == (2, 2)
    clock.advance(1.0)  # five more a second later
    assert outcomes(rrl, data, "192.0.2.7", 6).count("sent") == 5


def test_other_answers_and_other_networks_are_not_held_back() -> None:
    clock = Clock()
    rrl = limiter(clock, slip=0)
    data = response()
    assert outcomes(rrl, data, "192.0.2.7", 7).count("sent") == 5
    assert outcomes(rrl, data, "192.0.2.99", 1) == ["dropped"]  # the same /24
    assert outcomes(rrl, data, "198.51.100.7", 1) == ["sent"]  # another network
    assert outcomes(rrl, response("other.example.test."), "192.0.2.7", 1) == ["sent"]
    # The name's case does not make another answer.
    assert outcomes(rrl, response("WWW.example.TEST."), "192.0.2.7", 1) == ["dropped"]
    v6 = limiter(clock, slip=0)
    assert outcomes(v6, data, "2001:db8:0:1::1", 5).count("sent") == 5
    assert outcomes(v6, data, "2001:db8:0:2::1", 1) == ["dropped"]  # same /56
    assert outcomes(v6, data, "2001:db8:1::1", 1) == ["sent"]


def test_errors_count_together_so_random_names_do_not_dodge_the_limit() -> None:
    clock = Clock()
    rrl = limiter(clock, errors=Rate.parse("3/s"), slip=0)
    names = [f"r{n}.example.test." for n in range(6)]
    got = [rrl.check(response(n, dns.rcode.NXDOMAIN), "192.0.2.7") for n in names]
    assert sum(out is not None for out in got) == 3


def test_slip_one_truncates_every_limited_answer() -> None:
    rrl = limiter(Clock(), slip=1)
    assert outcomes(rrl, response(), "192.0.2.7", 8) == ["sent"] * 5 + ["slipped"] * 3


def test_the_udp_protocol_applies_the_limiter() -> None:
    sent: list[bytes] = []
    protocol = DnsUdpProtocol(handler=None)  # type: ignore[arg-type]
    protocol._sendto = lambda data, addr: sent.append(data)
    protocol.limiter = limiter(Clock(), slip=0)
    for _ in range(8):
        protocol._send(response(), ("192.0.2.7", 5353))
    assert len(sent) == 5


def test_config(tmp_path: Path) -> None:
    def listener(settings: str) -> object:
        config = parse(
            "version: 1\nlisteners:\n"
            f"  d: {{protocol: dns, listen: 'udp:5353', rate_limit: {settings}}}\n"
            "destinations: {}\nroutes: []\n",
            base=tmp_path,
        )
        return config.listeners["d"].rate_limit  # type: ignore[attr-defined]

    rrl = listener("{responses: 10/s, slip: 3, ipv4_prefix: 32}")
    assert rrl == RateLimitConfig(responses=Rate.parse("10/s"), slip=3, ipv4_prefix=32)
    with pytest.raises(ConfigError, match="'slip' must be 0 to 10"):
        listener("{responses: 10/s, slip: 11}")
    with pytest.raises(ConfigError, match="responses"):
        listener("{slip: 1}")
