"""A transform that raises Reject refuses the message for good: a PERMANENT verdict with the
codes it carries; any other exception stays a TEMPORARY failure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from gateway.config import parse
from gateway.message import Kind, MailMessage
from gateway.plugins import Reject, Transforms, load_transforms, transform
from gateway.ports import Reason, Status
from gateway.routing import Router, TransformFailed
from gateway.service import GatewayService, Runtime
from tests.support.deferreds import run

CONFIG = r"""
version: 1
listeners:
  in: {protocol: smtp, listen: "tcp:2525"}
destinations:
  box: {protocol: maildir, path: box}
routes:
  - name: strict
    from: in
    match: {rcpt: '@strict\.test$'}
    transforms: [gatekeeper]
    to: box
  - name: plain
    from: in
    match: {rcpt: '@plain\.test$'}
    transforms: [gatekeeper]
    options: {codes: plain}
    to: box
"""


@transform("gatekeeper", accepts=[Kind.MAIL])
def gatekeeper(msg: MailMessage, options: Mapping[str, Any]) -> MailMessage:
    if b"crash" in msg.body:
        raise RuntimeError("the plugin broke")
    if b"spam" in msg.body:
        if options.get("codes") == "plain":
            raise Reject("no spam here")
        raise Reject("no spam, thanks", reason=Reason.BAD_MESSAGE)
    return msg


def registry() -> Transforms:
    t = load_transforms(entry_points=False)
    t.add(gatekeeper.__gateway_transform__)  # type: ignore[attr-defined]
    return t


def message(rcpt: str, body: bytes) -> MailMessage:
    return MailMessage.from_bytes(
        b"Subject: x\n\n" + body, sender="a@x.test", recipients=[rcpt], listener="in"
    )


def test_a_reject_is_a_policy_refusal_unless_it_says_why() -> None:
    reject = Reject("go away")
    assert str(reject) == "go away" and reject.detail == "go away"
    assert reject.reason is Reason.POLICY
    custom = Reject("nope", reason=Reason.UNAUTHENTICATED)
    assert custom.reason is Reason.UNAUTHENTICATED and custom.detail == "nope"


def test_the_router_says_which_failures_are_rejections() -> None:
    router = Router(parse(CONFIG, base=Path("/tmp")), registry())
    with pytest.raises(TransformFailed) as info:
        run(router.route(message("x@strict.test", b"spam")))
    assert info.value.rejected is not None
    assert info.value.rejected.detail == "no spam, thanks"
    assert info.value.route == "strict" and info.value.transform == "gatekeeper"
    with pytest.raises(TransformFailed) as info:
        run(router.route(message("x@strict.test", b"crash")))
    assert info.value.rejected is None
    assert "RuntimeError: the plugin broke" in str(info.value)


@pytest.fixture
def service(tmp_path: Path) -> GatewayService:
    gw = GatewayService(tmp_path / "routes.yaml", Clock())
    gw.runtime = Runtime(parse(CONFIG, base=tmp_path), registry(), {})
    return gw


def test_a_reject_is_a_permanent_verdict_with_its_reason(service: GatewayService) -> None:
    verdict = run(service.submit(message("x@strict.test", b"spam")))
    assert verdict.status is Status.PERMANENT
    assert verdict.detail == "no spam, thanks"
    assert verdict.reason is Reason.BAD_MESSAGE
    assert service.routed[("strict", "rejected")] == 1
    verdict = run(service.submit(message("x@plain.test", b"spam")))
    assert (verdict.status, verdict.reason) == (Status.PERMANENT, Reason.POLICY)


def test_any_other_transform_error_stays_temporary(service: GatewayService) -> None:
    verdict = run(service.submit(message("x@strict.test", b"crash")))
    assert verdict.status is Status.TEMPORARY
    assert verdict.reason is Reason.FAILED
    assert "the plugin broke" in verdict.detail
    assert service.routed[("strict", "failed")] == 1
