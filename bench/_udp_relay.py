"""The floor for any Twisted DNS forwarder: a UDP relay that does nothing but move datagrams.

    python bench/_udp_relay.py PORT UPSTREAM_PORT

Each query from a client on 127.0.0.1:PORT goes as it is to 127.0.0.1:UPSTREAM_PORT, and the
answer with the same ID back to that client. No parsing, no checks, no random IDs: it is not a
DNS forwarder, only what the reactor, two sockets and four system calls a query cost, which
bench/dns_forwarding.py sets beside the gateway.
"""

import os
import sys

# Python put this file's folder first on the path; a script here named like a package would
# hide it, so take the folder off before any import (and name scripts like dns_*.py, http_*.py).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol  # noqa: E402


class Upstream(DatagramProtocol):
    def __init__(self, clients):
        self.clients = clients
        self.front = None

    def datagramReceived(self, data, addr):
        client = self.clients.pop(data[:2], None)
        if client is not None:
            self.front.sendto(data, client)


class Front(DatagramProtocol):
    def __init__(self, clients, upstream):
        self.clients = clients
        self.upstream = upstream
        self.out = None

    def datagramReceived(self, data, addr):
        self.clients[data[:2]] = addr
        self.out.sendto(data, self.upstream)


def main():
    port, upstream = int(sys.argv[1]), int(sys.argv[2])
    clients = {}
    back = Upstream(clients)
    front = Front(clients, ("127.0.0.1", upstream))
    back_port = reactor.listenUDP(0, back, interface="127.0.0.1")
    front_port = reactor.listenUDP(port, front, interface="127.0.0.1")
    # The sockets themselves, as the gateway does: Port.write checks addresses per datagram.
    back.front, front.out = front_port.socket, back_port.socket
    # bench/dns_forwarding.py waits for a TCP listener on the port before it probes over UDP.
    reactor.listenTCP(port, Factory.forProtocol(Protocol), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
