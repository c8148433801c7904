"""``file_to_mail``: an uploaded file (FTP, TFTP) becomes a mail with the file attached.

Route options (``{group}`` is a named group of the route's ``name`` pattern,
filled in by the router; ``{{field}}`` is a field of the upload, filled in
here: ``name`` (the path as uploaded), ``file`` (its last part), ``size``,
``user``, ``client``, ``listener``, ``id``)::

    transforms: [file_to_mail]
    options:
      from: 'Scanner <scanner@example.test>'
      to: [office@example.test]
      subject: 'Scan {{file}} ({{size}} bytes)'     # the default: 'File {{name}}'
      body: 'Uploaded by {{user}} from {{client}}.'  # a default names the file and its size
      max_size: 20MiB                               # larger uploads are refused (552)

The attachment keeps the file's bytes exactly (base64), under its last name
part, with a type guessed from the name.  The mail is built when the upload
is stored, so the file is read into memory once: ``max_size`` (default 10
MiB) keeps that bounded, and an upload beyond it is refused at once rather
than accepted and bounced.
"""

from __future__ import annotations

import email.message
import email.policy
import email.utils
import mimetypes
from collections.abc import Mapping
from typing import Any

from gateway.config import Size
from gateway.message import FileMessage, Headers, Kind, MailMessage, local_hostname
from gateway.plugins import Option, Reject, transform
from gateway.ports import Reason
from gateway.transforms.http_mail import address_list, one_line, render, subject_field

# As the transform gets them: routes.yaml's {{name}} arrives as {name} (the router fills
# in the route's groups and turns {{ into {).
DEFAULT_SUBJECT = "File {name}"
DEFAULT_BODY = "{name}: {size} bytes, uploaded by {user} from {client} ({listener})."
DEFAULT_MAX = 10 * 1024 * 1024
_POLICY = email.policy.default.clone(linesep="\n", cte_type="7bit", max_line_length=78)


@transform(
    "file_to_mail",
    accepts=[Kind.FILE],
    produces=Kind.MAIL,
    options=[
        Option("from", str, required=True, help="the From: field, e.g. 'Scanner <s@example.test>'"),
        Option("to", str | list[str], required=True, help="recipient address(es)"),
        Option("sender", str, help="the envelope sender (default: the address in 'from')"),
        Option("subject", str, help="a template; default 'File {{name}}'"),
        Option("body", str, help="a template for the mail's text"),
        Option("max_size", str | int, help="the largest file mailed (default 10MiB)"),
        Option("message_id_domain", str, help="right side of the Message-ID (this host's name)"),
    ],
)
def file_to_mail(upload: FileMessage, options: Mapping[str, Any]) -> MailMessage:
    """Turn an uploaded file into a mail (see the module docstring)."""
    limit = Size.parse(str(options.get("max_size", DEFAULT_MAX)))
    if not upload.path:
        raise ValueError("file_to_mail takes uploaded files, not read requests")
    size = upload.size or 0
    if size > limit:
        raise Reject(
            f"{upload.name} is {size} bytes; files of more than {int(limit)} are not mailed",
            reason=Reason.TOO_BIG,
        )
    froms = address_list(options.get("from"), "from", required=True)
    if len(froms) != 1:
        raise ValueError("route option 'from' of file_to_mail must be one address")
    recipients_text = address_list(options.get("to"), "to", required=True)
    leaf = one_line(upload.name.replace("\\", "/").rpartition("/")[2]) or "upload"
    fields = {
        "name": upload.name,
        "file": leaf,
        "size": size,
        "user": upload.user or "(no user)",
        "client": upload.client or "unknown",
        "listener": upload.listener,
        "id": upload.id,
    }

    def lookup(path: str, what: str) -> Any:
        if path not in fields:
            raise ValueError(
                f"option {what} of file_to_mail names '{path}'; an upload's fields are"
                f" {', '.join(sorted(fields))}"
            )
        return fields[path]

    subject = one_line(
        render(str(options.get("subject") or DEFAULT_SUBJECT), lookup, "subject", "file_to_mail")
    )
    text = render(str(options.get("body") or DEFAULT_BODY), lookup, "body", "file_to_mail")
    if not text.endswith("\n"):
        text += "\n"
    with open(upload.path, "rb") as source:
        data = source.read(int(limit) + 1)
    if len(data) > limit:
        raise Reject(f"{upload.name} is larger than {int(limit)} bytes", reason=Reason.TOO_BIG)

    domain = str(options.get("message_id_domain") or local_hostname())
    msg = email.message.EmailMessage(policy=_POLICY)
    msg["Received"] = (
        f"from {upload.client or 'unknown'} by {domain} (gateway) with {upload.listener}"
        f" id {upload.id}; {email.utils.formatdate(upload.received, localtime=True)}"
    )
    msg["From"] = froms[0]
    msg["To"] = ", ".join(recipients_text)
    msg["Date"] = email.utils.formatdate(upload.received, localtime=True)
    msg["Message-ID"] = f"<{upload.id}.file@{domain}>"
    msg.set_content(text, charset="utf-8")
    kind = mimetypes.guess_type(leaf)[0] or "application/octet-stream"
    maintype, _, subtype = kind.partition("/")
    if maintype in ("multipart", "message"):
        maintype, subtype = "application", "octet-stream"
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=leaf)
    try:
        raw = msg.as_bytes()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"file_to_mail cannot build the mail: {exc}") from exc
    sender_option = options.get("sender")
    sender = (
        str(sender_option).strip()
        if sender_option is not None
        else email.utils.parseaddr(froms[0])[1]
    )
    recipients = [addr for _, addr in email.utils.getaddresses(recipients_text)]
    message = MailMessage.from_bytes(
        raw,
        sender=sender,
        recipients=recipients,
        id=upload.id,
        listener=upload.listener,
        client=upload.client,
        user=upload.user,
        received=upload.received,
    )
    # The Subject as bytes made here (see http_mail.subject_field), after To.
    header = list(message.headers.fields)
    after_to = next((i + 1 for i, (k, _) in enumerate(header) if k.lower() == "to"), len(header))
    header.insert(after_to, ("Subject", subject_field(subject)))
    return message.replace_headers(Headers(tuple(header)))
