"""Sessions, CSRF and origin checks of the dashboard's queue actions (gateway.admin_auth)."""

from __future__ import annotations

import pytest

from gateway import admin_auth
from gateway.admin_auth import AdminSessions, Refused, check_origin


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_right_token_opens_a_session_and_a_wrong_one_does_not() -> None:
    sessions = AdminSessions(Clock())
    with pytest.raises(Refused) as refused:
        sessions.sign_in("guess", "s3cret", "192.0.2.1")
    assert (refused.value.status, refused.value.reason) == (403, "wrong token")
    session = sessions.sign_in("s3cret", "s3cret", "192.0.2.1")
    assert sessions.session(session, "s3cret") == session
    assert sessions.session("made-up", "s3cret") is None
    assert sessions.session(None, "s3cret") is None


def test_without_a_configured_token_nobody_signs_in() -> None:
    sessions = AdminSessions(Clock())
    with pytest.raises(Refused, match="admin_token_file"):
        sessions.sign_in("", "", "192.0.2.1")
    assert sessions.session("anything", "") is None


def test_a_new_token_signs_everyone_out() -> None:
    sessions = AdminSessions(Clock())
    session = sessions.sign_in("old", "old", "192.0.2.1")
    assert sessions.session(session, "new") is None


def test_sessions_end_when_idle_and_after_their_lifetime() -> None:
    clock = Clock()
    sessions = AdminSessions(clock)
    idle = sessions.sign_in("t", "t", "c")
    busy = sessions.sign_in("t", "t", "c")
    clock.now += admin_auth.IDLE - 1
    assert sessions.session(busy, "t") == busy
    clock.now += 2
    assert sessions.session(idle, "t") is None
    while clock.now + 600 < 1000.0 + admin_auth.LIFETIME:
        clock.now += 600
        assert sessions.session(busy, "t") == busy
    clock.now = 1000.0 + admin_auth.LIFETIME + 1
    assert sessions.session(busy, "t") is None


def test_sign_out_ends_the_session_and_the_oldest_goes_when_too_many() -> None:
    clock = Clock()
    sessions = AdminSessions(clock)
    first = sessions.sign_in("t", "t", "c")
    second = sessions.sign_in("t", "t", "c")
    sessions.sign_out(second)
    assert sessions.session(second, "t") is None
    for _ in range(admin_auth.MOST_SESSIONS):
        clock.now += 1
        sessions.sign_in("t", "t", "c")
    assert sessions.session(first, "t") is None


def test_too_many_wrong_tokens_from_one_address_make_it_wait() -> None:
    clock = Clock()
    sessions = AdminSessions(clock)
    for _ in range(admin_auth.FAILURES):
        with pytest.raises(Refused, match="wrong token"):
            sessions.sign_in("guess", "t", "192.0.2.1")
    with pytest.raises(Refused) as refused:
        sessions.sign_in("t", "t", "192.0.2.1")  # even the right one, for now
    assert refused.value.status == 429
    assert sessions.sign_in("t", "t", "192.0.2.2")  # other addresses are not held up
    clock.now += admin_auth.FAILURE_WINDOW + 1
    assert sessions.sign_in("t", "t", "192.0.2.1")


def test_the_csrf_value_belongs_to_its_session() -> None:
    sessions = AdminSessions(Clock())
    one = sessions.sign_in("t", "t", "c")
    two = sessions.sign_in("t", "t", "c")
    sessions.check_csrf(one, sessions.csrf(one))
    for wrong in ("", sessions.csrf(two), "0" * 64):
        with pytest.raises(Refused, match="CSRF"):
            sessions.check_csrf(one, wrong)
    # Another process (a restart) has another key: old forms are stale.
    assert AdminSessions(Clock()).csrf(one) != sessions.csrf(one)


@pytest.mark.parametrize(
    ("origin", "site", "ok"),
    [
        (None, None, True),  # curl, an old browser
        ("http://127.0.0.1:9100", "same-origin", True),
        ("HTTP://127.0.0.1:9100", None, True),
        (None, "none", True),  # typed in the address bar
        ("http://evil.test", None, False),
        ("null", None, False),
        ("https://127.0.0.1:9100", None, False),
        (None, "cross-site", False),
        (None, "same-site", False),
        ("http://127.0.0.1:9100", "cross-site", False),
    ],
)
def test_a_request_from_another_origin_is_refused(
    origin: str | None, site: str | None, ok: bool
) -> None:
    if ok:
        check_origin(origin, site, "127.0.0.1:9100", tls=False)
    else:
        with pytest.raises(Refused) as refused:
            check_origin(origin, site, "127.0.0.1:9100", tls=False)
        assert refused.value.status == 403
