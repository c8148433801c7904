"""DNS over HTTPS against real peers: DohUpstream to dnsdist, and curl and kdig to doh_site.

The Twisted side of every test runs in a fresh subprocess of this very module
(``python -m tests.integration.test_doh_peers client|server SPEC``): a reactor cannot be
restarted inside one pytest process and the project does not use pytest-twisted. A "client"
run starts a reactor with task.react, sends its queries through DohUpstream, prints one JSON
line and exits; a "server" run serves doh_site over TLS on a free port of 127.0.0.1 (printed
as "PORT n"), forwarding to unbound with DnsUpstream, until its stdin closes. Each run has a
subprocess timeout on top of the queries' own, so no test can hang; peers come from the
fixtures in tests/conftest.py and are stopped after each test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.peers import (
    LOOPBACK,
    REPO_ROOT,
    Dnsdist,
    Unbound,
    curl,
    doh_query,
    free_port,
    kdig,
    make_tls_cert,
    require_binary,
)

RUN_TIMEOUT = 90.0  # seconds for one Twisted subprocess, whatever happens inside


def _h2_installed() -> bool:
    try:
        import h2  # noqa: F401
    except ImportError:
        return False
    return True


def require_h2() -> None:
    if not _h2_installed():
        pytest.fail(
            "the h2 package is not installed: install the gateway with its h2 extra "
            "(pip install -e '.[h2]'); .ci/run does this in CI.",
            pytrace=False,
        )


# --------------------------------------------------------------------------- the subprocesses


def _subprocess_argv(command: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "tests.integration.test_doh_peers", command, json.dumps(spec)]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


async def _client(reactor: Any, spec: dict[str, Any]) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    from gateway.protocols.dns.client import UpstreamError
    from gateway.protocols.dns.doh_client import DohUpstream
    from gateway.protocols.dns.wire import parse_query

    upstream = DohUpstream(
        reactor,
        spec["url"],
        method=spec.get("method", "POST"),
        ca_file=spec.get("ca_file"),
        verify=spec.get("verify", True),
        connections=spec.get("connections", 4),
        timeout=spec.get("timeout", 5.0),
        http2=spec.get("http2", True),
    )

    async def one(name: str, rdtype: str) -> dict[str, str]:
        data = dns.message.make_query(name, rdtype).to_wire()
        try:
            answer = await upstream.resolve(data, parse_query(data))
        except UpstreamError as exc:
            return {"error": str(exc)}
        return {"answer": base64.b64encode(answer).decode()}

    results: list[dict[str, str]] = []
    for _round in range(spec.get("rounds", 1)):
        batch = [Deferred.fromCoroutine(one(name, rdtype)) for name, rdtype in spec["queries"]]
        results += await gatherResults(batch)
    await upstream.close()
    report = {
        "results": results,
        "protocol": upstream.protocol,
        "connections_opened": upstream.connections_opened,
    }
    print(json.dumps(report), flush=True)


def _client_main(spec: dict[str, Any]) -> None:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    task.react(lambda reactor: Deferred.fromCoroutine(_client(reactor, spec)))


class _Forwarder:
    """What the gateway's DNS handler does, in short: forward, restore the ID, SERVFAIL on error."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream

    def answer(self, data: bytes, client: tuple[str, int], transport: str) -> Any:
        from twisted.internet.defer import Deferred

        from gateway.protocols.dns.wire import FORMERR, WireError, error_response, parse_query

        try:
            question = parse_query(data)
        except WireError as exc:
            return error_response(data, FORMERR, None) if exc.header_ok else None
        return Deferred.fromCoroutine(self._forward(data, question))

    async def _forward(self, data: bytes, question: Any) -> bytes:
        from gateway.protocols.dns.client import UpstreamError
        from gateway.protocols.dns.wire import SERVFAIL, error_response, with_id

        try:
            answer = await self.upstream.resolve(data, question)
        except UpstreamError:
            return error_response(data, SERVFAIL, question)
        return with_id(answer, question.id)


def _server_main(spec: dict[str, Any]) -> None:
    from twisted.internet import endpoints, reactor, stdio
    from twisted.internet.protocol import Protocol

    from gateway.protocols.dns.client import DnsUpstream
    from gateway.protocols.dns.doh_server import doh_site

    class StopOnEof(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    upstream = DnsUpstream(reactor, [(LOOPBACK, spec["unbound_port"])], timeout=2.0)
    site = doh_site(_Forwarder(upstream), reactor=reactor)
    quote = endpoints.quoteStringArgument
    description = (
        f"ssl:0:interface={LOOPBACK}:privateKey={quote(spec['key'])}:certKey={quote(spec['cert'])}"
    )
    endpoint = endpoints.serverFromString(reactor, description)

    def listening(port: Any) -> None:
        print(f"PORT {port.getHost().port}", flush=True)

    def failed(failure: Any) -> None:
        print(f"FAILED {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    endpoint.listen(site).addCallbacks(listening, failed)
    stdio.StandardIO(StopOnEof())
    reactor.run()


@dataclass
class ClientRun:
    results: list[dict[str, str]]
    protocol: str
    connections_opened: int
    # Most TCP connections to the server seen established at once, and how many distinct ones.
    most_at_once: int = 0
    distinct: int = 0

    def answers(self) -> list[dns.message.Message]:
        errors = [r["error"] for r in self.results if "error" in r]
        assert not errors, f"{len(errors)} queries failed, e.g. {errors[0]}"
        return [dns.message.from_wire(base64.b64decode(r["answer"])) for r in self.results]

    def errors(self) -> list[str]:
        assert all("error" in r for r in self.results), self.results
        return [r["error"] for r in self.results]


class _ConnectionWatch:
    """Samples `ss` for established TCP connections to one port while a client runs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.most_at_once = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._ss = require_binary("ss")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            result = subprocess.run(
                [self._ss, "-Htn", "state", "established", f"( dport = :{self.port} )"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            # Columns without a state: Recv-Q Send-Q Local Peer.
            local = {line.split()[2] for line in result.stdout.splitlines() if line.strip()}
            self.most_at_once = max(self.most_at_once, len(local))
            self.seen |= local
            self._stop.wait(0.005)


def run_client(watch_port: int | None = None, **spec: Any) -> ClientRun:
    """Run DohUpstream in a fresh subprocess with `spec` and return what it reported."""
    argv = _subprocess_argv("client", spec)
    watch = _ConnectionWatch(watch_port) if watch_port else contextlib.nullcontext()
    with watch:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the DoH client run took more than {RUN_TIMEOUT} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"the DoH client run failed ({proc.returncode}):\n{err[-3000:]}"
    run = ClientRun(**json.loads(out.strip().splitlines()[-1]))
    if isinstance(watch, _ConnectionWatch):
        run.most_at_once, run.distinct = watch.most_at_once, len(watch.seen)
    return run


@dataclass
class DohServer:
    port: int
    cert: Path

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/dns-query"


@contextlib.contextmanager
def doh_server(directory: Path, unbound: Unbound) -> Iterator[DohServer]:
    """doh_site over TLS in a subprocess, forwarding to `unbound`; stopped on exit."""
    cert, key = make_tls_cert(directory / "tls")
    spec = {"unbound_port": unbound.port, "cert": str(cert), "key": str(key)}
    stderr_path = directory / "doh-server.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            _subprocess_argv("server", spec),
            cwd=REPO_ROOT,
            env=_subprocess_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = _read_line(proc, timeout=30)
        if not line.startswith(b"PORT "):
            raise AssertionError(
                f"the DoH server did not start ({line!r}):\n{stderr_path.read_text()[-3000:]}"
            )
        yield DohServer(int(line.split()[1]), cert)
    finally:
        proc.stdin.close()  # the server stops when its stdin closes
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"no line from the DoH server within {timeout} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffered += chunk
    return buffered.split(b"\n", 1)[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def dnsdist(unbound: Unbound, dnsdist_factory: Any) -> Dnsdist:
    """dnsdist serving DoH on a free port, forwarding to the `unbound` fixture, no cache."""
    instance: Dnsdist = dnsdist_factory(upstreams=[unbound.port])
    return instance


@pytest.fixture
def our_doh(tmp_path: Path, unbound: Unbound) -> Iterator[DohServer]:
    with doh_server(tmp_path / "doh-server", unbound) as server:
        yield server


def a_records(message: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in message.answer for rdata in rrset if rrset.rdtype == 1]


# --------------------------------------------------------------------------- DohUpstream to dnsdist


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_doh_upstream_gets_answers_from_dnsdist(
    dnsdist: Dnsdist, unbound: Unbound, method: str, http2: bool
) -> None:
    if http2:
        require_h2()
    run = run_client(
        url=dnsdist.doh_url,
        method=method,
        ca_file=str(dnsdist.cert),
        http2=http2,
        queries=[["www.example.test", "A"], ["alias.example.test", "CNAME"]],
    )
    www, alias = run.answers()
    assert a_records(www) == ["192.0.2.10"]
    assert www.id == 0  # sent with ID 0 (RFC 8484 §4.1), passed on as it came
    assert alias.answer[0].rdtype == dns.rdatatype.CNAME
    assert run.protocol == ("h2" if http2 else "http/1.1")
    assert unbound.query_count("www.example.test", "A") == 1


def test_doh_upstream_passes_nxdomain_and_its_soa_on(dnsdist: Dnsdist) -> None:
    run = run_client(
        url=dnsdist.doh_url, ca_file=str(dnsdist.cert), queries=[["nope.example.test", "A"]]
    )
    [answer] = run.answers()
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_verification_without_the_ca_fails_naming_tls(dnsdist: Dnsdist) -> None:
    run = run_client(url=dnsdist.doh_url, queries=[["www.example.test", "A"]])
    [error] = run.errors()
    assert "TLS handshake failed" in error
    assert "certificate verify failed" in error


def test_verification_with_another_ca_fails(dnsdist: Dnsdist, tmp_path: Path) -> None:
    other_cert, _ = make_tls_cert(tmp_path / "other-ca")
    run = run_client(
        url=dnsdist.doh_url, ca_file=str(other_cert), queries=[["www.example.test", "A"]]
    )
    [error] = run.errors()
    assert "certificate" in error


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
def test_verify_false_needs_no_ca(dnsdist: Dnsdist, http2: bool) -> None:
    if http2:
        require_h2()
    run = run_client(
        url=dnsdist.doh_url, verify=False, http2=http2, queries=[["www.example.test", "A"]]
    )
    assert a_records(run.answers()[0]) == ["192.0.2.10"]


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
def test_two_connections_carry_200_concurrent_queries(
    dnsdist: Dnsdist, unbound: Unbound, http2: bool
) -> None:
    if http2:
        require_h2()
    names = [[f"n{i}.example.test", "A"] for i in range(199)] + [["www.example.test", "A"]]
    run = run_client(
        watch_port=dnsdist.doh_port,
        url=dnsdist.doh_url,
        ca_file=str(dnsdist.cert),
        connections=2,
        http2=http2,
        timeout=20.0,
        # HTTP/2: all 600 at once, which would fill six connections of 100 streams.
        queries=names * 3 if http2 else names,
        rounds=1 if http2 else 3,
    )
    answers = run.answers()
    assert len(answers) == 600
    assert sum(a.rcode() == dns.rcode.NXDOMAIN for a in answers) == 597
    assert run.protocol == ("h2" if http2 else "http/1.1")
    # What the client made, and what the kernel saw: never more than two, and kept alive.
    assert run.connections_opened <= 2
    assert 1 <= run.most_at_once <= 2
    assert run.distinct <= 2
    assert unbound.query_count() >= 600


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
def test_a_wrong_path_is_http_404(dnsdist: Dnsdist, http2: bool) -> None:
    if http2:
        require_h2()
    url = dnsdist.doh_url.replace("/dns-query", "/no-such-path")
    run = run_client(
        url=url, ca_file=str(dnsdist.cert), http2=http2, queries=[["www.example.test", "A"]]
    )
    assert run.errors() == [f"HTTP 404 from {url}"]


def test_a_refused_connection_is_an_upstream_error() -> None:
    port = free_port()
    run = run_client(
        url=f"https://{LOOPBACK}:{port}/dns-query", queries=[["www.example.test", "A"]]
    )
    [error] = run.errors()
    assert "refused the connection" in error


def test_a_server_that_never_answers_times_out() -> None:
    # The kernel completes the TCP handshake; nobody ever speaks TLS.
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        url = f"https://{LOOPBACK}:{silent.getsockname()[1]}/dns-query"
        started = time.monotonic()
        run = run_client(url=url, timeout=1.5, queries=[["www.example.test", "A"]] * 3)
    assert run.errors() == [f"no answer from {url} within 1.5s"] * 3
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- real clients to doh_site


@pytest.mark.parametrize("http_version", ["1.1", "2"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_curl_gets_answers_from_doh_site(
    our_doh: DohServer, method: str, http_version: str
) -> None:
    if http_version == "2":
        require_h2()
    query = dns.message.make_query("www.example.test", "A", id=0)
    response = doh_query(
        our_doh.url, query, cacert=our_doh.cert, method=method, http_version=http_version
    )
    assert response.status == 200
    assert response.headers["content-type"] == "application/dns-message"
    assert response.headers["cache-control"] == "max-age=300"
    answer = response.message()
    assert answer.id == 0
    assert a_records(answer) == ["192.0.2.10"]


def test_doh_site_speaks_http2_over_tls(our_doh: DohServer) -> None:
    require_h2()
    result = curl(
        "--http2", "--cacert", str(our_doh.cert), "--output", "/dev/null",
        "--write-out", "%{http_version} %{http_code}",
        f"{our_doh.url}?name=www.example.test",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 200"


def test_negative_answers_are_cached_for_the_soa_minimum(our_doh: DohServer) -> None:
    query = dns.message.make_query("nope.example.test", "A")
    response = doh_query(our_doh.url, query, cacert=our_doh.cert, http_version="1.1")
    assert response.message().rcode() == dns.rcode.NXDOMAIN
    # The fixture's SOA: TTL 3600, MINIMUM 300.
    assert response.headers["cache-control"] == "max-age=300"


def test_curl_resolves_names_through_doh_site(our_doh: DohServer, unbound: Unbound) -> None:
    # curl's own DoH resolver (POST, A and AAAA) finds loopback.example.test = 127.0.0.1,
    # then fetches from that address: our own site again, asking it in JSON.
    result = curl(
        "--doh-url", our_doh.url, "--cacert", str(our_doh.cert), "--insecure",
        f"https://loopback.example.test:{our_doh.port}/dns-query?name=www.example.test",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Answer"][0]["data"] == "192.0.2.10"
    assert unbound.query_count("loopback.example.test") >= 1


@pytest.mark.parametrize("get", [False, True], ids=["POST", "GET"])
def test_kdig_over_https(our_doh: DohServer, get: bool) -> None:
    require_h2()  # kdig speaks DoH over HTTP/2 only
    result = kdig(
        f"@{LOOPBACK}", "-p", str(our_doh.port),
        "+https-get" if get else "+https", f"+tls-ca={our_doh.cert}",
        "www.example.test", "A",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status: NOERROR" in result.stdout
    answer_lines = [line for line in result.stdout.splitlines() if "\tA\t" in line]
    assert answer_lines and answer_lines[0].split()[-1] == "192.0.2.10"


def test_kdig_sees_nxdomain(our_doh: DohServer) -> None:
    require_h2()
    result = kdig(
        f"@{LOOPBACK}", "-p", str(our_doh.port), "+https", f"+tls-ca={our_doh.cert}",
        "nope.example.test", "A",
    )  # fmt: skip
    assert "status: NXDOMAIN" in result.stdout, result.stdout + result.stderr


def test_json_api_with_curl(our_doh: DohServer) -> None:
    def fetch(query: str, *headers: str) -> tuple[int, dict[str, Any]]:
        result = curl(
            "--cacert", str(our_doh.cert), *headers, "--write-out", "\n%{http_code}",
            f"{our_doh.url}?{query}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        body, _, status = result.stdout.rpartition("\n")
        return int(status), json.loads(body)

    status, body = fetch("name=www.example.test&type=A")
    assert status == 200
    assert body["Status"] == 0 and body["RD"] is True and body["RA"] is True
    assert body["Question"] == [{"name": "www.example.test", "type": 1}]
    assert body["Answer"] == [
        {"name": "www.example.test", "type": 1, "TTL": 300, "data": "192.0.2.10"}
    ]
    status, body = fetch("name=alias.example.test&type=CNAME")
    assert body["Answer"][0]["data"] == "www.example.test."
    status, body = fetch("name=nope.example.test&type=28")
    assert body["Status"] == 3 and body["Authority"][0]["type"] == 6
    status, body = fetch("name=www.example.test", "-H", "accept: application/dns-json")
    assert body["Answer"][0]["data"] == "192.0.2.10"
    status, body = fetch("name=www.example.test&type=NOPE")
    assert status == 400 and "NOPE" in body["error"]


def test_http_errors_from_doh_site(our_doh: DohServer, tmp_path: Path) -> None:
    def status_of(*args: str) -> int:
        result = curl("--cacert", str(our_doh.cert), "--output", "/dev/null",
                      "--write-out", "%{http_code}", *args)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    query_file = tmp_path / "query.bin"
    query_file.write_bytes(dns.message.make_query("www.example.test", "A").to_wire())
    big_file = tmp_path / "big.bin"
    big_file.write_bytes(bytes(70000))
    post = ["--data-binary", f"@{query_file}"]
    message = ["-H", "content-type: application/dns-message"]
    assert status_of(*post, "-H", "content-type: text/plain", our_doh.url) == 415
    assert status_of(*post, *message, our_doh.url.replace("dns-query", "other")) == 404
    assert status_of("-X", "PUT", *post, *message, our_doh.url) == 405
    assert status_of(f"{our_doh.url}?dns=!!!") == 400
    assert status_of(our_doh.url) == 400
    big = ["--data-binary", f"@{big_file}", *message]
    assert status_of("--http1.1", *big, "-H", "Expect: 100-continue", our_doh.url) == 413
    assert status_of("--http1.1", *big, "-H", "Expect:", our_doh.url) == 413
    if _h2_installed():
        assert status_of("--http2", *big, our_doh.url) == 413


def test_doh_upstream_to_doh_site(our_doh: DohServer) -> None:
    run = run_client(
        url=our_doh.url,
        ca_file=str(our_doh.cert),
        queries=[["www.example.test", "A"], ["nope.example.test", "A"]] * 20,
    )
    answers = run.answers()
    assert [a_records(a) for a in answers[:2]] == [["192.0.2.10"], []]
    assert answers[1].rcode() == dns.rcode.NXDOMAIN
    assert run.protocol == ("h2" if _h2_installed() else "http/1.1")
    assert run.connections_opened == 1


def test_a_query_from_doh_site_reaches_unbound_with_the_rd_bit(
    our_doh: DohServer, unbound: Unbound
) -> None:
    query = dns.message.make_query("www.example.test", "A", id=4321)
    response = doh_query(our_doh.url, query, cacert=our_doh.cert, http_version="1.1")
    answer = response.message()
    assert answer.id == 4321  # the forwarder restored the client's ID
    assert answer.flags & dns.flags.RD
    assert unbound.query_count("www.example.test", "A") == 1


if __name__ == "__main__":
    _command, _spec = sys.argv[1], json.loads(sys.argv[2])
    {"client": _client_main, "server": _server_main}[_command](_spec)
