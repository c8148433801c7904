"""The ``gateway`` command line itself: help, argument forms, ``passwd``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway.cli import build_parser, main
from gateway.users import read_users_file


def test_no_arguments_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: gateway") and "passwd" in out and "queue" in out


def test_help_has_no_markup() -> None:
    text = build_parser().format_help()
    assert "``" not in text and ":class:" not in text


def test_queue_json_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["queue", "--json", "list"]).json is True
    assert parser.parse_args(["queue", "list", "--json"]).json is True
    assert parser.parse_args(["queue", "list"]).json is False


def test_passwd_writes_a_hash_read_from_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["passwd", "-f", str(users), "--stdin", "alice"]) == 0
    assert "added alice" in capsys.readouterr().out
    assert read_users_file(users)["alice"].startswith("$argon2id$")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["passwd", "-f", str(users), "--stdin", "bob"]) == 1
    assert "empty password" in capsys.readouterr().err
    assert main(["passwd", "--print", "--stdin", "a b"]) == 1


def test_reload_without_a_running_gateway_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text("version: 1\nlisteners:\n  in: {protocol: smtp, listen: 'tcp:2525'}\n")
    assert main(["reload", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"error: no running gateway found: {tmp_path}/var/spool/gateway.status names none" in err
    # A status file left by a gateway that is gone (its pid is no process now).
    (tmp_path / "var" / "spool").mkdir(parents=True)
    (tmp_path / "var" / "spool" / "gateway.status").write_text('{"pid": 999999999}\n')
    assert main(["reload", "-c", str(config)]) == 1
    assert "(process 999999999 is gone)" in capsys.readouterr().err


def test_reload_of_a_file_that_does_not_check_signals_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text("version: 1\nlistener: {}\n")
    assert main(["reload", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'listener'; did you mean 'listeners'?" in err
    assert "the running gateway was not asked to reload; its routes stay" in err
