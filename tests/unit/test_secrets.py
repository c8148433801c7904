"""Secrets out of routes.yaml: KEY_file and ${ENV_VAR} for every secret (passwords, HMAC
keys), and a warning for one written inline in a file others may read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import ConfigError, load
from gateway.service import load_checked

NEWS = (
    "version: 1\nlisteners:\n  in: {protocol: smtp, listen: 'tcp:2525'}\n"
    "destinations:\n  news:\n    protocol: nntp\n    connect: tcp:127.0.0.1:119\n"
    "    user: gw\n{secret}"
    "routes:\n  - {from: in, match: {rcpt: x}, transforms: [mail_to_news],"
    " options: {newsgroups: a.b}, to: news}\n"
)


def news(secret: str) -> str:
    return NEWS.replace("{secret}", secret)


def hooks(secret: str) -> str:
    return HOOKS.replace("{secret}", secret)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_password_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "news.pass").write_text("s3cret\n")
    config = load(write(tmp_path, news("    password_file: news.pass\n")))
    assert config.destinations["news"].password == "s3cret"  # type: ignore[attr-defined]
    monkeypatch.setenv("NEWS_PASS", "from-env")
    config = load(write(tmp_path, news("    password: ${NEWS_PASS}\n")))
    assert config.destinations["news"].password == "from-env"  # type: ignore[attr-defined]
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("    password_file: nothere\n", ":9:20: destination 'news': 'password_file': cannot read"),
        ("    password: ${NO_SUCH_VARIABLE_X}\n",
         ":9:15: destination 'news': 'password': the environment variable NO_SUCH_VARIABLE_X is not set"),
        ("    password: a\n    password_file: b\n",
         ":10:5: destination 'news': give 'password' or 'password_file', not both"),
    ],
)  # fmt: skip
def test_a_secret_that_cannot_be_had_is_an_error_at_its_line(
    tmp_path: Path, secret: str, problem: str
) -> None:
    os.environ.pop("NO_SUCH_VARIABLE_X", None)
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, news(secret)))
    assert any(problem in str(p) for p in caught.value.problems), caught.value.problems


def test_an_inline_secret_in_a_file_others_may_read_is_warned_about(tmp_path: Path) -> None:
    text = news("    password: plain\n")
    assert load(write(tmp_path, text, 0o600)).warnings == ()
    [warning] = load(write(tmp_path, text, 0o644)).warnings
    assert str(warning).endswith(
        ":9:15: destination 'news': 'password': a secret written in a file others may read;"
        " keep it in a file of its own (KEY_file: path) or in the environment (${NAME}), or"
        " make this file readable by its owner only"
    )


HOOKS = (
    "version: 1\nlisteners:\n  web: {protocol: http, listen: 'tcp:8080'}\n"
    "destinations:\n  box: {protocol: maildir, path: m}\n"
    "routes:\n  - from: web\n    transforms: [http_to_mail]\n    to: box\n"
    "    options:\n      from: a@b.test\n      to: c@d.test\n{secret}"
)


def test_a_transform_option_that_is_a_secret_takes_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hook.key").write_text("k3y\n")
    config, _ = load_checked(write(tmp_path, hooks("      secret_file: hook.key\n")))
    assert config.routes[0].options["secret"] == "k3y"
    assert "secret_file" not in config.routes[0].options
    monkeypatch.setenv("HOOK_KEY", "env-key")
    config, _ = load_checked(write(tmp_path, hooks("      secret: ${HOOK_KEY}\n")))
    assert config.routes[0].options["secret"] == "env-key"
    with pytest.raises(ConfigError, match="option 'secret_file': cannot read"):
        load_checked(write(tmp_path, hooks("      secret_file: none.key\n")))
    config, _ = load_checked(write(tmp_path, hooks("      secret: k\n"), 0o644))
    assert any("option 'secret': a secret written in a file" in str(w) for w in config.warnings)


def test_the_schema_knows_the_file_forms_of_secrets() -> None:
    from gateway.config import json_schema
    from gateway.plugins import load_transforms

    options = {
        option.name: (spec.name, option.schema())
        for spec in load_transforms(entry_points=False).specs()
        for option in spec.options or ()
    }
    schema = json_schema(options)
    text = str(schema)
    assert "'password_file'" in text
    route = schema["properties"]["routes"]
    items = route["anyOf"][-1]["items"] if "anyOf" in route else route["items"]
    props = items["properties"]["options"]["properties"]
    assert "secret_file" in props and "secret" not in props["secret"]


def test_the_admin_token_comes_from_a_file_and_inline_it_is_warned_about(tmp_path: Path) -> None:
    base = "version: 1\nadmin: tcp:9100:interface=127.0.0.1\n"
    (tmp_path / "admin.token").write_text("long-random-token\n")
    assert load(write(tmp_path, base + "admin_token_file: admin.token\n")).admin_token == (
        "long-random-token"
    )
    inline = load(write(tmp_path, base + "admin_token: long-random-token\n", mode=0o644))
    assert inline.admin_token == "long-random-token"
    assert any("admin_token" in str(w) for w in inline.warnings), inline.warnings
    with pytest.raises(ConfigError, match=r":3:19: top level: 'admin_token_file': cannot read"):
        load(write(tmp_path, base + "admin_token_file: missing.token\n"))
