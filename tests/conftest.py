"""Fixtures that start real peer programs for a test and stop them afterwards.

No fixture here touches a Twisted reactor: unit tests build their own
MemoryReactorClock, integration tests talk to real processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Dnsdist, GatewayProcess, SmtpSink, Unbound
from tests.peers_files import Sshd, Vsftpd
from tests.peers_web import Nginx


def _file_system(path: Path) -> str:
    """The type of the file system ``path`` is on, from /proc/self/mounts ("" if unknown)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


@pytest.fixture
def disk_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a folder under /var/tmp when tmp_path is on tmpfs: there, writes to a
    file that was open before it was made immutable still go through, so tests of an
    unwritable spool need a disk file system (ext4, xfs, btrfs)."""
    if _file_system(tmp_path) != "tmpfs":
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="gateway-test-", dir="/var/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    """An smtp-sink on a free port of 127.0.0.1 that accepts everything."""
    with SmtpSink(tmp_path / "smtp-sink").start() as sink:
        yield sink


SmtpSinkFactory = Callable[..., SmtpSink]


@pytest.fixture
def smtp_sink_factory(tmp_path: Path) -> Iterator[SmtpSinkFactory]:
    """Start more sinks, each with SmtpSink's options, e.g. soft_reject=["rcpt"].

    Every sink gets its own folder and port and is stopped after the test.
    """
    sinks: list[SmtpSink] = []

    def start(**options: Any) -> SmtpSink:
        sink = SmtpSink(tmp_path / f"smtp-sink-{len(sinks) + 1}", **options)
        sinks.append(sink)
        return sink.start()

    yield start
    errors = []
    for sink in reversed(sinks):
        try:
            sink.stop()
        except Exception as exc:  # stop the others regardless
            errors.append(exc)
    if errors:
        raise errors[0]


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Make GatewayProcess objects (not started) that are stopped after the test.

    Call it with a config text to have it written to tmp_path/gateway.yaml,
    or with config_path=; other keywords go to GatewayProcess.
    """
    processes: list[GatewayProcess] = []

    def make(
        config: str | None = None,
        *,
        config_path: Path | None = None,
        argv: Sequence[str] | None = None,
        **options: Any,
    ) -> GatewayProcess:
        if config_path is None:
            config_path = tmp_path / "gateway.yaml"
            if config is not None:
                config_path.write_text(config)
        process = GatewayProcess(config_path, argv=argv, **options)
        processes.append(process)
        return process

    yield make
    for process in reversed(processes):
        process.stop()


# The `unbound` fixture's data. 192.0.2.0/24 is this machine's own range:
# answers in it are data only, never connect to them; loopback.example.test
# is the name to resolve and then connect to.
UNBOUND_RECORDS: tuple[str, ...] = (
    "www.example.test. 300 IN A 192.0.2.10",
    "loopback.example.test. 300 IN A 127.0.0.1",
    "alias.example.test. 300 IN CNAME www.example.test.",
    # 100 A records: TC=1 over UDP (even with EDNS 1232), whole over TCP.
    *(f"big.example.test. 300 IN A 192.0.2.{i}" for i in range(1, 101)),
)


@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[Unbound]:
    """unbound on a free port of 127.0.0.1 serving example.test (UNBOUND_RECORDS).

    whoami.test TXT is "unbound-1"; names outside example.test are REFUSED.
    """
    with Unbound(tmp_path / "unbound", records=UNBOUND_RECORDS, whoami="unbound-1") as server:
        yield server


UnboundFactory = Callable[..., Unbound]


@pytest.fixture
def unbound_factory(tmp_path: Path) -> Iterator[UnboundFactory]:
    """Start more unbound instances, each with Unbound's options (records=, zones=, ...).

    The n-th gets folder tmp_path/unbound-{n+1} and, unless whoami= is given,
    whoami "unbound-{n+1}", so it differs from the `unbound` fixture's
    "unbound-1". Every instance is stopped after the test.
    """
    servers: list[Unbound] = []

    def start(**options: Any) -> Unbound:
        name = f"unbound-{len(servers) + 2}"
        options.setdefault("whoami", name)
        server = Unbound(tmp_path / name, **options)
        servers.append(server)
        return server.start()

    yield start
    _stop_all(servers)


DnsdistFactory = Callable[..., Dnsdist]


@pytest.fixture
def dnsdist_factory(tmp_path: Path) -> Iterator[DnsdistFactory]:
    """Start dnsdist instances: upstreams=[unbound.port, ...] and Dnsdist's other options.

    Each gets its own folder, ports and certificate and is stopped after the test.
    """
    instances: list[Dnsdist] = []

    def start(**options: Any) -> Dnsdist:
        instance = Dnsdist(tmp_path / f"dnsdist-{len(instances) + 1}", **options)
        instances.append(instance)
        return instance.start()

    yield start
    _stop_all(instances)


def _stop_all(peers: Sequence[Unbound | Dnsdist]) -> None:
    """Stop every peer, newest first, even if one fails; then raise the first error."""
    errors = []
    for peer in reversed(peers):
        try:
            peer.stop()
        except Exception as exc:  # stop the others regardless
            errors.append(exc)
    if errors:
        raise errors[0]


NginxFactory = Callable[..., Nginx]


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Start nginx instances with Nginx's options; each is stopped after the test."""
    started: list[Nginx] = []

    def start(**options: Any) -> Nginx:
        server = Nginx(tmp_path / f"nginx-{len(started) + 1}", **options)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def nginx(nginx_factory: NginxFactory) -> Nginx:
    """One nginx origin server (see tests/peers_web.py for what it serves)."""
    return nginx_factory()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd on a free port of 127.0.0.1 serving SFTP to its test user (see
    tests/peers_files.py); its chroot is removed after the test."""
    with Sshd(tmp_path / "sshd") as server:
        yield server.start()


@pytest.fixture
def vsftpd(tmp_path: Path) -> Iterator[Vsftpd]:
    """A vsftpd on a free port of 127.0.0.1 for its test user (see tests/peers_files.py)."""
    with Vsftpd(tmp_path / "vsftpd") as server:
        yield server.start()
