"""Tiny traffic tools run inside lab namespaces (``python netprobe.py VERB ...``).

serve HOST            TCP echo on ports 22, 23 and 5000-5002, UDP echo on 53; runs until killed
tcp HOST PORT         connect (2 s timeout), send one line, print OK or FAIL
udp HOST PORT         send one datagram, wait 1 s for the echo, print OK or FAIL
session HOST PORT     connect, then for each line on stdin send it and print OK or TIMEOUT
"""

from __future__ import annotations

import select
import socket
import sys
import threading

TCP_PORTS = (22, 23, 5000, 5001, 5002)
UDP_PORT = 53


def _echo_tcp(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def _serve_tcp(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(16)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_echo_tcp, args=(conn,), daemon=True).start()


def _serve_udp(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as srv:
        srv.bind((host, port))
        while True:
            data, peer = srv.recvfrom(2048)
            srv.sendto(data, peer)


def serve(hosts: list[str]) -> None:
    """Echo servers on every host address given."""
    for host in hosts:
        for port in TCP_PORTS:
            threading.Thread(target=_serve_tcp, args=(host, port), daemon=True).start()
        threading.Thread(target=_serve_udp, args=(host, UDP_PORT), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()


def tcp(host: str, port: int) -> str:
    """One TCP exchange."""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"hello\n")
            return "OK" if conn.recv(64) == b"hello\n" else "FAIL"
    except OSError:
        return "FAIL"


def udp(host: str, port: int) -> str:
    """One UDP exchange."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(b"q", (host, port))
        try:
            return "OK" if sock.recvfrom(64)[0] == b"q" else "FAIL"
        except OSError:
            return "FAIL"


def session(host: str, port: int) -> None:
    """An established connection driven line by line from stdin."""
    with socket.create_connection((host, port), timeout=2) as conn:
        print("CONNECTED", flush=True)
        for line in sys.stdin:
            conn.sendall(line.encode())
            ready, _, _ = select.select([conn], [], [], 1.0)
            print("OK" if ready and conn.recv(4096) else "TIMEOUT", flush=True)


def main() -> None:
    """Dispatch on the verb."""
    verb, *args = sys.argv[1:]
    if verb == "serve":
        serve(args)
    elif verb == "tcp":
        print(tcp(args[0], int(args[1])), flush=True)
    elif verb == "udp":
        print(udp(args[0], int(args[1])), flush=True)
    elif verb == "session":
        session(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown verb {verb!r}")


if __name__ == "__main__":
    main()
