"""The file_to_mail transform in memory: the mail it makes of an upload, its templates,
and the uploads it refuses."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from gateway.message import FileMessage
from gateway.plugins import Reject
from gateway.ports import Reason
from gateway.transforms.file_mail import file_to_mail

OPTIONS = {"from": "Scanner <scanner@example.test>", "to": ["office@example.test"]}


def _upload(tmp_path: Path, data: bytes, name: str = "scans/Über 1.pdf") -> FileMessage:
    path = tmp_path / "upload"
    path.write_bytes(data)
    return FileMessage(
        name=name, size=len(data), path=str(path), listener="drop", client="192.0.2.7", user="scan"
    )


def test_the_file_is_attached_as_it_was_uploaded(tmp_path: Path) -> None:
    data = bytes(range(256)) * 100 + b"\r\n.\r\nend"
    mail = file_to_mail(_upload(tmp_path, data), OPTIONS)
    assert mail.sender == "scanner@example.test"
    assert mail.recipients == ("office@example.test",)
    assert mail.user == "scan" and mail.client == "192.0.2.7"
    parsed = email.message_from_bytes(mail.to_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "File scans/Über 1.pdf"
    assert parsed["Message-ID"].startswith(f"<{mail.id}.file@")
    body = parsed.get_body(("plain",))
    assert body is not None
    assert body.get_content() == (
        f"scans/Über 1.pdf: {len(data)} bytes, uploaded by scan from 192.0.2.7 (drop).\n"
    )
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "Über 1.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == data


def test_templates_name_the_uploads_fields(tmp_path: Path) -> None:
    # As the router hands them over: routes.yaml's {{file}} is {file} by now.
    options = {**OPTIONS, "subject": "{file}, {size} bytes", "body": "id {id}"}
    upload = _upload(tmp_path, b"x" * 10, "a/b.txt")
    parsed = email.message_from_bytes(
        file_to_mail(upload, options).to_bytes(), policy=email.policy.default
    )
    assert parsed["Subject"] == "b.txt, 10 bytes"
    with pytest.raises(ValueError, match="an upload's fields are"):
        file_to_mail(upload, {**OPTIONS, "subject": "{nope}"})


def test_files_over_max_size_are_refused(tmp_path: Path) -> None:
    upload = _upload(tmp_path, b"x" * 2048)
    with pytest.raises(Reject) as refused:
        file_to_mail(upload, {**OPTIONS, "max_size": "1k"})
    assert refused.value.reason is Reason.TOO_BIG
    file_to_mail(upload, {**OPTIONS, "max_size": "2k"})
