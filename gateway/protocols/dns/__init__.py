"""DNS for the gateway: a sans-io wire codec for the forwarding hot path and a packet cache.

``wire`` reads headers and questions without building message objects; ``cache`` stores whole
responses and ages their TTLs on the way out. Neither imports Twisted.
"""

from __future__ import annotations

from .cache import DnsCache
from .wire import Question, WireError, parse_query

__all__ = ["DnsCache", "Question", "WireError", "parse_query"]
