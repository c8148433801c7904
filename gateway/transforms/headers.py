"""Header editing for mail and articles, driven by route options.

Options: ``add_headers`` (a mapping of field name to value, placeholders
allowed) and ``remove_headers`` (a list of field names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.message import Article, Kind, MailMessage
from gateway.plugins import Option, transform


@transform(
    "headers",
    accepts=[Kind.MAIL, Kind.ARTICLE],
    options=[
        Option("add_headers", dict[str, str], help="field name to value, added to the header"),
        Option("remove_headers", str | list[str], help="field names removed from the header"),
    ],
)
def edit_headers(msg: MailMessage | Article, options: Mapping[str, Any]) -> MailMessage | Article:
    headers = msg.headers
    remove = options.get("remove_headers", ())
    for name in [remove] if isinstance(remove, str) else remove:
        headers = headers.remove(str(name))
    add = options.get("add_headers", {})
    if not isinstance(add, Mapping):
        raise ValueError("option add_headers must be a mapping of header name to value")
    for name, value in add.items():
        headers = headers.add(str(name), str(value))
    return msg.replace_headers(headers)
