"""A minimal peer router for the ten-peer lab test (``python minipeer.py ...``).

It is tunneld's own protocol core (PeerSession) over a plain UDP socket, without the kernel
data path: enough to be one more site that handshakes with a real router and exchanges
packets through it. Run inside the peer's namespace:

    minipeer.py KEYFILE ROUTER_PUB ROUTER_ENDPOINT INNER_SRC TARGET COUNT

It pings TARGET (behind the router) COUNT times from INNER_SRC through the tunnel and
prints "OK <replies>" or "FAIL <reason>".
"""

from __future__ import annotations

import base64
import random
import select
import socket
import sys
import time

from vpnr.tunneld.keys import StaticKeys
from vpnr.tunneld.packets import internet_checksum, ipv4_checksum
from vpnr.tunneld.session import DataReceived, HandshakeCompleted, PeerSession


def echo_request(src: bytes, dst: bytes, seq: int) -> bytes:
    """An IPv4 ICMP echo request with correct checksums."""
    icmp = bytearray(b"\x08\x00\x00\x00" + (0x5650).to_bytes(2, "big") +
                     seq.to_bytes(2, "big") + b"minipeer" * 4)
    icmp[2:4] = internet_checksum(icmp).to_bytes(2, "big")
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, 64, 1
    header[2:4] = (20 + len(icmp)).to_bytes(2, "big")
    header[12:16], header[16:20] = src, dst
    header[10:12] = ipv4_checksum(header).to_bytes(2, "big")
    return bytes(header + icmp)


def main() -> None:
    """Handshake, ping, report."""
    keyfile, router_pub, endpoint, inner_src, target, count = sys.argv[1:]
    host, port = endpoint.rsplit(":", 1)
    router = (host, int(port))
    keys = StaticKeys.load_or_create(__import__("pathlib").Path(keyfile))
    peer_static = base64.b64decode(router_pub)
    session = PeerSession(static_private=keys.private, peer_static=peer_static,
                          is_known=lambda k: "ok" if k == peer_static else "unknown",
                          random_source=random.SystemRandom())
    src, dst = socket.inet_aton(inner_src), socket.inet_aton(target)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 51820))
    replies, established, deadline = 0, False, time.monotonic() + 15
    session.initiate(time.monotonic())
    seq = 0
    while time.monotonic() < deadline and replies < int(count):
        for datagram in session.datagrams_to_send():
            sock.sendto(datagram, router)
        ready, _, _ = select.select([sock], [], [], 0.05)
        now = time.monotonic()
        if ready:
            session.receive(sock.recv(65536), now)
        session.handle_timer(now) if (session.get_timer() or 1e18) <= now else None
        while (event := session.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                established = True
            elif isinstance(event, DataReceived):
                inner = event.inner
                if inner[9] == 1 and inner[20] == 0 and inner[12:16] == dst:
                    replies += 1
        if established and seq < replies + 1 and seq < int(count):
            seq += 1
            session.send(echo_request(src, dst, seq), now)
    print(f"OK {replies}" if replies >= int(count) else
          f"FAIL {replies} replies, established={established}", flush=True)


if __name__ == "__main__":
    main()
