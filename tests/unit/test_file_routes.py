"""Routes of the file listeners (TFTP, FTP): the ``size`` and ``name`` keys, the route a
request takes before its size is known, the FTP listener's settings and the checks of
file routes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, SizeRange, parse
from gateway.message import FileMessage
from gateway.protocols._files import match_file, select_route
from gateway.service import load_checked
from gateway.users import hash_password

HASH = hash_password("pw")


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("<10k", [0, 10239], [10240]),
        ("<=10k", [10240], [10241]),
        (">1MB", [1_000_001], [1_000_000]),
        (">= 512", [512, 10**12], [511]),
        ("1k-2k", [1024, 2048], [1023, 2049]),
    ],
)
def test_size_ranges(text: str, inside: list[int], outside: list[int]) -> None:
    sizes = SizeRange.parse(text)
    assert all(n in sizes for n in inside)
    assert not any(n in sizes for n in outside)
    assert None not in sizes


@pytest.mark.parametrize("text", ["10k", "<", "<x", "2k-1k", "k-2k", ""])
def test_bad_size_ranges_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected sizes|is empty"):
        SizeRange.parse(text)


def _config(tmp_path: Path, listener: str, routes: str) -> str:
    return f"""
version: 1
listeners:
{listener}
destinations:
  inbox: {{protocol: folder, path: "{tmp_path}/in", uploads: true}}
  big: {{protocol: folder, path: "{tmp_path}/big", uploads: true}}
  pub: {{protocol: folder, path: "{tmp_path}/pub"}}
routes:
{routes}
"""


FTP = f"""  drop:
    protocol: ftp
    listen: tcp:2121
    users: {{scan: '{HASH}'}}"""


def test_uploads_route_by_size_and_reads_skip_routes_with_a_size(tmp_path: Path) -> None:
    config = parse(
        _config(
            tmp_path,
            FTP,
            """  - {name: small, from: drop, match: {name: '\\.pdf$', size: '<1MiB'}, to: inbox}
  - {name: large, from: drop, match: {name: '^(?P<dir>[a-z]+)/.*\\.pdf$'}, to: big}
  - {name: alice, from: drop, match: {user: [alice]}, to: pub}
  - {name: reads, from: drop, to: pub}""",
        )
    )
    routes = config.routes
    small, large = routes[0].match, routes[1].match
    groups: dict[str, str] = {}
    message = FileMessage(name="scans/a.pdf", size=10, path="x", listener="drop")
    assert match_file(small, message, None, groups, True)
    big = FileMessage(name="scans/a.pdf", size=2 * 1024 * 1024, path="x", listener="drop")
    assert not match_file(small, big, None, groups, True)
    assert match_file(large, big, None, groups, True) and groups == {"dir": "scans"}
    # Before the size is known an upload may take the first route; a read skips it.
    assert select_route(routes, "scans/a.pdf", "127.0.0.1", "scan", reading=False) is routes[0]
    assert select_route(routes, "scans/a.pdf", "127.0.0.1", "scan", reading=True) is routes[1]
    assert select_route(routes, "x.txt", "127.0.0.1", "alice", reading=True) is routes[2]
    assert select_route(routes, "x.txt", "127.0.0.1", "scan", reading=True) is routes[3]


@pytest.mark.parametrize(
    ("listener", "problem"),
    [
        ("  drop: {protocol: ftp, listen: tcp:2121}", "needs 'users' or 'users_file'"),
        (
            f"  drop: {{protocol: ftp, listen: tcp:2121, users: {{a: '{HASH}'}},"
            " passive_ports: 100-200}",
            "must go up from 1024",
        ),
        (
            f"  drop: {{protocol: ftp, listen: tcp:2121, users: {{a: '{HASH}'}},"
            " passive_ports: 30000}",
            "expected a port range",
        ),
        (
            f"  drop: {{protocol: ftp, listen: tcp:2121, users: {{a: '{HASH}'}},"
            " passive_address: '::1'}",
            "'passive_address' is the IPv4 address",
        ),
        ("  drop: {protocol: ftp, listen: tcp:2121, users: {a: clear}}", "not an Argon2 hash"),
        (
            f"  drop: {{protocol: ftp, listen: 'udp:2121', users: {{a: '{HASH}'}}}}",
            "FTP listens on TCP",
        ),
    ],
)
def test_ftp_listener_settings_are_checked(tmp_path: Path, listener: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse(_config(tmp_path, listener, "  - {name: r, from: drop, to: inbox}"))


def test_file_routes_name_destinations_that_serve_or_take_files(tmp_path: Path) -> None:
    text = _config(tmp_path, FTP, "  - {name: r, from: drop, to: relay}").replace(
        "destinations:\n",
        "destinations:\n  relay: {protocol: smtp, connect: 'tcp:127.0.0.1:25'}\n",
    )
    with pytest.raises(ConfigError, match="neither serves nor takes files"):
        parse(text)
    # With file_to_mail in between, mail goes to the relay; mail cannot go through it.
    options = "options: {from: a@example.test, to: b@example.test}"
    mailed = tmp_path / "mailed.yaml"
    mailed.write_text(
        text.replace("to: relay}", f"to: relay, transforms: [file_to_mail], {options}}}")
    )
    load_checked(mailed)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        mailed.read_text()
        .replace("listeners:\n", "listeners:\n  mail: {protocol: smtp, listen: 'tcp:2525'}\n")
        .replace("from: drop", "from: mail")
    )
    with pytest.raises(ConfigError, match="takes file messages but gets mail"):
        load_checked(wrong)
    with pytest.raises(ConfigError, match="no 'continue'"):
        parse(_config(tmp_path, FTP, "  - {name: r, from: drop, to: inbox, continue: true}"))


def _sftp(tmp_path: Path, **settings: str) -> str:
    fields = {"url": "sftp://backup@127.0.0.1:2222/incoming/", "key": "id", "known_hosts": "kh"}
    fields.update(settings)
    inline = ", ".join(f"{k}: '{v}'" for k, v in fields.items())
    return _config(tmp_path, FTP, "  - {name: r, from: drop, to: backups}").replace(
        "destinations:\n", f"destinations:\n  backups: {{protocol: sftp, {inline}}}\n"
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"url": "ftp://backup@127.0.0.1/x/"}, "must be sftp://user@host"),
        ({"url": "sftp://127.0.0.1/x/"}, "expected a URL such as sftp://backup@host"),
        ({"url": "sftp://a:secret@127.0.0.1/x/"}, "holds a password: give it in its own"),
        ({"url": "sftp://a@127.0.0.1/x/?q=1"}, "no query or fragment"),
        ({"url": "sftp://a@127.0.0.1:99999/x/"}, "'url'"),
        ({"key": "missing"}, "cannot read the key"),
        ({"key": "id.pub"}, "is a public key"),
        ({"key": "kh"}, "not a private key"),
        ({"known_hosts": "missing"}, "cannot read known_hosts"),
    ],
)
def test_sftp_destination_settings_are_checked(
    tmp_path: Path, settings: dict[str, str], problem: str
) -> None:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")],
                   check=True)  # fmt: skip
    (tmp_path / "kh").write_text("127.0.0.1 ssh-ed25519 AAAA\n")
    text = _sftp(tmp_path, **settings)
    with pytest.raises(ConfigError, match=problem):
        parse(text, str(tmp_path / "routes.yaml"))
    parse(_sftp(tmp_path), str(tmp_path / "routes.yaml"))  # the same without the fault loads
