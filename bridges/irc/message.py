"""One IRC message: parsed from a line, formatted back into one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Message:
    command: str
    params: tuple[str, ...] = ()
    source: Optional[str] = None
    trailing: bool = False  # always send the last parameter after ':'

    @classmethod
    def parse(cls, line: str) -> Optional["Message"]:
        """A client line (without CRLF); None for an empty line. IRCv3 tags
        are ignored, the command is upper-cased."""
        if line.startswith("@"):
            _, _, line = line.partition(" ")
        line = line.lstrip(" ")
        source = None
        if line.startswith(":"):
            source, _, line = line[1:].partition(" ")
        trailing = None
        head, sep, rest = line.partition(" :")
        if sep:
            line, trailing = head, rest
        elif line.startswith(":"):
            line, trailing = "", line[1:]
        words = line.split()
        if not words:
            return None
        params = words[1:] + ([trailing] if trailing is not None else [])
        return cls(words[0].upper(), tuple(params), source)

    def __str__(self) -> str:
        """The wire form without CRLF; the last parameter is trailing when it
        needs to be (empty, has a space, or starts with ':')."""
        parts = [f":{self.source}"] if self.source else []
        parts.append(str(self.command))
        for i, param in enumerate(self.params):
            last = i == len(self.params) - 1
            if last and (self.trailing or not param or " " in param or param.startswith(":")):
                parts.append(":" + param)
            else:
                parts.append(param)
        return " ".join(parts)
