"""The minimal twisted.names forwarder bench/dns_forwarding.py compares the gateway with.

    python bench/_twisted_forwarder.py PORT UPSTREAM_PORT

UDP and TCP on 127.0.0.1:PORT, every query asked of 127.0.0.1:UPSTREAM_PORT
through ``client.Resolver``: what a Twisted user writes first, with no cache.
No logging is started, as in a plain script. It needs only Twisted, so it also
runs on PyPy 3.9.
"""

import os
import sys

# Python put this file's folder first on the path; a script here named like a package would
# hide it, so take the folder off before any import (and name scripts like dns_*.py, http_*.py).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

from twisted.internet import reactor  # noqa: E402
from twisted.names import client, dns, server  # noqa: E402


def main() -> None:
    port, upstream = int(sys.argv[1]), int(sys.argv[2])
    resolver = client.Resolver(servers=[("127.0.0.1", upstream)])
    factory = server.DNSServerFactory(clients=[resolver])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
