"""Example plugin: put a tag such as "[team]" in front of the Subject, once.

Route options: ``tag`` (the text to add, placeholders allowed).  A message
whose Subject already carries the tag, as replies do, is left alone.
"""

from gateway.message import Kind
from gateway.plugins import Option, transform


@transform(
    "tag_subject",
    accepts=[Kind.MAIL, Kind.ARTICLE],
    options=[Option("tag", str, required=True, help="the text put in front of the Subject")],
)
def tag_subject(msg, options):
    tag = str(options.get("tag", "")).strip()
    if not tag:
        raise ValueError("the tag_subject transform needs a 'tag' option")
    subject = msg.headers.get("Subject") or ""
    if tag.lower() in subject.lower():
        return msg
    return msg.replace_headers(msg.headers.set("Subject", f"{tag} {subject}".rstrip()))
