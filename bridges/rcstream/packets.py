"""Wire formats, as pure functions: Socket.IO 0.9 packets and their polling
payloads, and Engine.IO 3/4 packets and payloads (Socket.IO v4/v5 inside).

Every parser raises PacketError on bad input; nothing here does I/O.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Optional

BOUNDARY = "\ufffd"  # Socket.IO 0.9 payload framing: \ufffd<len>\ufffd<packet>
EIO4_SEPARATOR = "\x1e"  # Engine.IO 4 polling payloads: packets joined by RS


MAX_DEPTH = 32  # JSON nesting of a client's packet ([rcstream] max_json_depth)


class PacketError(ValueError):
    """A packet or payload that cannot be parsed (in `namespace`, when known)."""

    def __init__(self, message: str, namespace: str = "/"):
        super().__init__(message)
        self.namespace = namespace


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads of a client's text, nested at most max_depth deep: checked
    first (the decoder recurses, and would raise RecursionError), in time
    linear in the text's length."""
    if text.count("[") + text.count("{") > max_depth:
        depth = 0
        for token in _JSON_TOKEN.finditer(text):
            bracket = token.group()
            if bracket in "[{":
                depth += 1
                if depth > max_depth:
                    raise PacketError(f"JSON nested deeper than {max_depth}")
            elif bracket in "]}":
                depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise PacketError("not JSON") from None


def utf16_len(text: str) -> int:
    """The length JavaScript gives a string (UTF-16 code units)."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _take_utf16(text: str, start: int, units: int) -> int:
    """The index after `units` UTF-16 code units of text from start."""
    i = start
    while units > 0:
        if i >= len(text):
            raise PacketError("payload shorter than its declared length")
        units -= 2 if ord(text[i]) > 0xFFFF else 1
        i += 1
    if units < 0:
        raise PacketError("declared length splits a character")
    return i


def ascii_json(value: Any) -> str:
    """Compact JSON with every non-ASCII character escaped (\\uXXXX);
    ValueError for NaN and infinities, which are not JSON."""
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


# -- Socket.IO 0.9 -----------------------------------------------------------


class Sio09Type(IntEnum):
    """Socket.IO 0.9 packet types; str() is the wire digit."""

    DISCONNECT = 0
    CONNECT = 1
    HEARTBEAT = 2
    MESSAGE = 3
    JSON = 4
    EVENT = 5
    ACK = 6
    ERROR = 7
    NOOP = 8

    def __str__(self) -> str:
        return str(self.value)


# error packet reasons and advice of Socket.IO 0.9 (`7:::reason+advice`)
REASON_TRANSPORT_NOT_SUPPORTED = 0
REASON_CLIENT_NOT_HANDSHAKEN = 1
REASON_UNAUTHORIZED = 2
ADVICE_RECONNECT = 0

_PACKET = re.compile(r"([0-9]):([0-9]*\+?):([^:]*)(?::([\s\S]*))?\Z")


@dataclass(frozen=True)
class Packet:
    """One Socket.IO 0.9 packet: `type:id:endpoint[:data]`."""

    type: Sio09Type
    id: str = ""  # "N" or "N+" (the client wants the ack's data)
    endpoint: str = ""
    data: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Packet":
        match = _PACKET.match(text)
        if not match:
            raise PacketError(f"not a Socket.IO 0.9 packet: {text[:80]!r}")
        try:
            kind = Sio09Type(int(match.group(1)))
        except ValueError:
            raise PacketError(f"unknown packet type {match.group(1)}") from None
        return cls(kind, match.group(2), match.group(3), match.group(4))

    def __str__(self) -> str:
        parts = [str(self.type), self.id, self.endpoint]
        if self.data is not None:
            parts.append(self.data)
        return ":".join(parts)

    @property
    def namespace(self) -> str:
        """The endpoint without a query string."""
        return self.endpoint.split("?", 1)[0]

    def event(self, max_depth: int = MAX_DEPTH) -> tuple[str, list]:
        """(name, args) of an EVENT packet."""
        try:
            value = loads(self.data or "", max_depth)
        except PacketError as e:
            raise PacketError(f"event data: {e}") from None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise PacketError("event data needs a name")
        args = value.get("args", [])
        if not isinstance(args, list):
            raise PacketError("event args must be a list")
        return value["name"], args


def event_packet(endpoint: str, name: str, args_json: str) -> str:
    """`5::/rc:{"name":…,"args":…}` with args already encoded as JSON."""
    return f'5::{endpoint}:{{"name":{ascii_json(name)},"args":{args_json}}}'


def ack_packet(endpoint: str, packet_id: str, args: list) -> str:
    ack = packet_id.rstrip("+")
    data = f"{ack}+{ascii_json(args)}" if packet_id.endswith("+") else ack
    return str(Packet(Sio09Type.ACK, "", endpoint, data))


def error_packet(endpoint: str = "", reason: Optional[int] = None, advice: Optional[int] = None) -> str:
    data = "" if reason is None else str(reason) + ("" if advice is None else f"+{advice}")
    return str(Packet(Sio09Type.ERROR, "", endpoint, data))


def encode_payload(packets: list[str]) -> str:
    """A polling body: one packet as is, several framed."""
    if len(packets) == 1:
        return packets[0]
    return "".join(f"{BOUNDARY}{utf16_len(p)}{BOUNDARY}{p}" for p in packets)


def decode_payload(text: str) -> list[str]:
    """The packets of a polling body (lengths in UTF-16 units, as JS counts)."""
    if not text.startswith(BOUNDARY):
        return [text] if text else []
    packets, i = [], 0
    while i < len(text):
        if text[i] != BOUNDARY:
            raise PacketError("framing: expected \\ufffd")
        end = text.find(BOUNDARY, i + 1)
        digits = text[i + 1 : end] if end > 0 else ""
        if not digits.isdigit() or not digits.isascii() or len(digits) > 9:
            raise PacketError(f"framing: bad length {digits[:12]!r}")
        start = end + 1
        i = _take_utf16(text, start, int(digits))
        packets.append(text[start:i])
    return packets


def jsonp_body(index: str, packets: list[str]) -> str:
    r"""`io.j[N]("…");` of a jsonp-polling response, framed as Socket.IO 0.9
    framed it (lengths of the packets before escaping; the framing character
    stays literal). Escapes are the ones every client reads back as one
    character each: JS, JSON, and Python's unicode_escape, which
    socketIO-client applies to each framed part before checking its length
    (so no `\/`: `<` is `\u003c`, and a `</script>` in a change stays harmless)."""

    def escape(p: str) -> str:
        return ascii_json(p)[1:-1].replace("<", "\\u003c")

    if len(packets) == 1:
        body = escape(packets[0])
    else:
        body = "".join(f"{BOUNDARY}{utf16_len(p)}{BOUNDARY}{escape(p)}" for p in packets)
    return f'io.j[{index}]("{body}");'


def jsonp_post_data(value: str) -> str:
    """The payload of a jsonp-polling POST's `d` field (a JSON string, or raw)."""
    if value.startswith('"'):
        try:
            decoded = json.loads(value)
        except ValueError:
            raise PacketError("d is not a JSON string") from None
        if not isinstance(decoded, str):
            raise PacketError("d is not a JSON string")
        return decoded
    return value


# -- Engine.IO 3/4 with Socket.IO v4/v5 packets -------------------------------


class EioType(IntEnum):
    """Engine.IO packet types."""

    OPEN = 0
    CLOSE = 1
    PING = 2
    PONG = 3
    MESSAGE = 4
    UPGRADE = 5
    NOOP = 6

    def __str__(self) -> str:
        return str(self.value)


class SioType(IntEnum):
    """Socket.IO (v4/v5) packet types, inside an Engine.IO message."""

    CONNECT = 0
    DISCONNECT = 1
    EVENT = 2
    ACK = 3
    CONNECT_ERROR = 4
    BINARY_EVENT = 5
    BINARY_ACK = 6

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class SioPacket:
    """A Socket.IO v4/v5 packet: `<type>[/nsp,][id][json]`."""

    type: SioType
    namespace: str = "/"
    id: Optional[int] = None
    data: Any = None

    @classmethod
    def parse(cls, text: str, max_depth: int = MAX_DEPTH) -> "SioPacket":
        if not text or not text[0].isdigit():
            raise PacketError(f"not a Socket.IO packet: {text[:80]!r}")
        try:
            kind = SioType(int(text[0]))
        except ValueError:
            raise PacketError(f"unknown Socket.IO packet type {text[0]}") from None
        if kind in (SioType.BINARY_EVENT, SioType.BINARY_ACK):
            raise PacketError("binary packets are not supported")
        rest, namespace = text[1:], "/"
        if rest.startswith("/"):
            end = rest.find(",")
            namespace, rest = (rest, "") if end < 0 else (rest[:end], rest[end + 1 :])
            namespace = namespace.split("?", 1)[0]
        digits = re.match(r"[0-9]*", rest).group(0)  # type: ignore[union-attr]
        if len(digits) > 15:
            raise PacketError("ack id too long")
        packet_id = int(digits) if digits else None
        rest = rest[len(digits) :]
        data = None
        if rest:
            try:
                data = loads(rest, max_depth)
            except PacketError as e:
                raise PacketError(f"packet data: {e}", namespace) from None
        return cls(kind, namespace, packet_id, data)

    def __str__(self) -> str:
        text = str(self.type)
        if self.namespace != "/":
            text += self.namespace
            if self.id is not None or self.data is not None:
                text += ","
        if self.id is not None:
            text += str(self.id)
        if self.data is not None:
            text += ascii_json(self.data)
        return text

    def event(self) -> tuple[str, list]:
        if not isinstance(self.data, list) or not self.data or not isinstance(self.data[0], str):
            raise PacketError("event data must be [name, ...args]")
        return self.data[0], self.data[1:]


def eio_event(namespace: str, name: str, args_json: str) -> str:
    """An Engine.IO message carrying a Socket.IO event: `42/rc,["change",…]`."""
    prefix = f"{EioType.MESSAGE}{SioType.EVENT}" + ("" if namespace == "/" else f"{namespace},")
    inner = args_json[1:-1]
    return f"{prefix}[{ascii_json(name)}{',' if inner else ''}{inner}]"


def encode_eio4_payload(packets: list[str]) -> str:
    return EIO4_SEPARATOR.join(packets)


def decode_eio4_payload(text: str) -> list[str]:
    return [p for p in text.split(EIO4_SEPARATOR)] if text else []


def encode_eio3_payload(packets: list[str]) -> str:
    """Engine.IO 3 text framing: `<len>:<packet>` repeated (len in UTF-16 units)."""
    return "".join(f"{utf16_len(p)}:{p}" for p in packets)


def decode_eio3_payload(text: str) -> list[str]:
    packets, i = [], 0
    while i < len(text):
        colon = text.find(":", i)
        digits = text[i:colon] if colon > 0 else ""
        if not digits.isdigit() or not digits.isascii() or len(digits) > 9:
            raise PacketError(f"framing: bad length {digits[:12]!r}")
        start = colon + 1
        i = _take_utf16(text, start, int(digits))
        packets.append(text[start:i])
    return packets


def encode_eio3_binary_payload(packets: list[str]) -> bytes:
    """Engine.IO 3 binary framing, for clients that do not ask for b64:
    `\x00` (a string packet), the length of its UTF-8 bytes as one byte per
    decimal digit, `\xff`, the packet's bytes; repeated."""
    out = bytearray()
    for packet in packets:
        data = packet.encode("utf-8")
        out += b"\x00" + bytes(int(d) for d in str(len(data))) + b"\xff" + data
    return bytes(out)


def decode_eio3_binary_payload(data: bytes) -> list[Optional[str]]:
    """The packets of an Engine.IO 3 binary payload (what python-engineio
    3.x and XHR2 browsers POST); a binary packet (`\x01`) is None, as this
    server takes none."""
    packets: list[Optional[str]] = []
    i = 0
    while i < len(data):
        kind = data[i]
        if kind > 1:
            raise PacketError("framing: expected \\x00 or \\x01")
        end = data.find(b"\xff", i + 1, i + 12)
        digits = data[i + 1 : end] if end > 0 else b""
        if not digits or len(digits) > 9 or any(d > 9 for d in digits):
            raise PacketError("framing: bad length")
        size = int("".join(str(d) for d in digits))
        start, i = end + 1, end + 1 + size
        if i > len(data):
            raise PacketError("payload shorter than its declared length")
        if kind == 1:
            packets.append(None)
            continue
        try:
            packets.append(data[start:i].decode("utf-8"))
        except UnicodeDecodeError:
            raise PacketError("packet is not UTF-8") from None
    return packets


# -- the protocol generations --------------------------------------------------


class Generation:
    """One generation of the protocol, as a session speaks it: how a
    polling body frames packets (encode/decode), how a change event goes
    out, and the packet that says nothing. One instance each (SIO09, EIO3,
    EIO4); sessions and the fan-out's caches key on it."""

    name = ""

    def encode(self, packets: list[str]) -> str:
        raise NotImplementedError

    def decode(self, body: str) -> list[str]:
        raise NotImplementedError

    def event(self, namespace: str, name: str, args_json: str) -> str:
        """An event packet (`args_json`: the JSON array of its arguments)."""
        raise NotImplementedError

    def noop(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Sio09(Generation):
    """Socket.IO 0.9: `5::/rc:{…}` events, `\ufffd<len>\ufffd` framing."""

    name = "Socket.IO 0.9"

    def encode(self, packets: list[str]) -> str:
        return encode_payload(packets)

    def decode(self, body: str) -> list[str]:
        return decode_payload(body)

    def event(self, namespace: str, name: str, args_json: str) -> str:
        return event_packet(namespace, name, args_json)

    def noop(self) -> str:
        return str(Packet(Sio09Type.NOOP))


class Eio3(Generation):
    """Engine.IO 3 carrying Socket.IO v4 packets: `<len>:<packet>` framing."""

    name = "Engine.IO 3"
    version = 3

    def encode(self, packets: list[str]) -> str:
        return encode_eio3_payload(packets)

    def decode(self, body: str) -> list[str]:
        return decode_eio3_payload(body)

    def event(self, namespace: str, name: str, args_json: str) -> str:
        return eio_event(namespace, name, args_json)

    def noop(self) -> str:
        return str(EioType.NOOP)


class Eio4(Eio3):
    """Engine.IO 4 carrying Socket.IO v5 packets: packets joined by \\x1e."""

    name = "Engine.IO 4"
    version = 4

    def encode(self, packets: list[str]) -> str:
        return encode_eio4_payload(packets)

    def decode(self, body: str) -> list[str]:
        return decode_eio4_payload(body)


SIO09, EIO3, EIO4 = Sio09(), Eio3(), Eio4()
EIO: dict[int, Eio3] = {3: EIO3, 4: EIO4}  # by the EIO query parameter
