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
