"""From a recentchange event to the channel and the coloured line that
irc.wikimedia.org shows for it (MediaWiki's IRC colourful RC feed format).

Pure functions, no Twisted: `format_event(event)` returns `(channel, line)`
or None when the event has no IRC line.
"""
from __future__ import annotations

import html.entities
import re
from typing import Any, Optional

MAX_LINE = 510  # characters of one bot line (an IRC line is 512 bytes with CRLF)

TYPES = ("edit", "new", "log")

# Channels that do not follow "#<host without .org>", keyed by `wiki`.
LEGACY_CHANNELS = {
    "advisorywiki": "#advisory.wikipedia",
    "donatewiki": "#donate.wikimedia.org",
    "foundationwiki": "#wikimediafoundation.org",
    "loginwiki": "#login.wikipedia",
    "mediawikiwiki": "#mediawiki.wikipedia",
    "qualitywiki": "#quality.wikipedia",
    "testwikidatawiki": "#testwikidata.wikipedia",
    "votewiki": "#vote.wikipedia",
    "wikidatawiki": "#wikidata.wikipedia",
    "wikimania2005wiki": "#wikimania.wikimedia",
    **{f"wikimania{year}wiki": f"#wikimania{year}.wikipedia" for year in range(2010, 2015)},
    "wikimaniateamwiki": "#wikimaniateam.wikipedia",
}

# The Special namespace as named by a wiki's content language (MediaWiki's
# languages/messages/Messages*.php, NS_SPECIAL), keyed by language code, the
# first label of the wiki's host. Languages not listed (and project hosts such
# as commons or www.wikidata) use the canonical "Special".
SPECIAL_NAMESPACE = {
    "af": "Spesiaal",
    "als": "Spezial",
    "an": "Especial",
    "ar": "خاص",
    "arz": "خاص",
    "ast": "Especial",
    "az": "Xüsusi",
    "bar": "Spezial",
    "bg": "Специални",
    "bn": "বিশেষ",
    "br": "Dibar",
    "bs": "Posebno",
    "ca": "Especial",
    "cs": "Speciální",
    "cy": "Arbennig",
    "da": "Speciel",
    "de": "Spezial",
    "dsb": "Specialne",
    "el": "Ειδικό",
    "eo": "Specialaĵo",
    "es": "Especial",
    "et": "Eri",
    "eu": "Berezi",
    "fa": "ویژه",
    "fi": "Toiminnot",
    "fo": "Serstakt",
    "fr": "Spécial",
    "frp": "Spècial",
    "fur": "Speciâl",
    "ga": "Speisialta",
    "gl": "Especial",
    "gsw": "Spezial",
    "he": "מיוחד",
    "hi": "विशेष",
    "hr": "Posebno",
    "hsb": "Specialnje",
    "hu": "Speciális",
    "hy": "Սպասարկող",
    "ia": "Special",
    "id": "Istimewa",
    "io": "Specala",
    "is": "Kerfissíða",
    "it": "Speciale",
    "ja": "特別",
    "jv": "Mirunggan",
    "ka": "სპეციალური",
    "kk": "Арнайы",
    "ko": "특수",
    "ksh": "Extra",
    "ku": "Taybet",
    "la": "Specialis",
    "lb": "Spezial",
    "li": "Speciaal",
    "lmo": "Special",
    "lt": "Specialus",
    "mk": "Специјална",
    "mr": "विशेष",
    "ms": "Khas",
    "nap": "Speciàle",
    "nds": "Spezial",
    "nl": "Speciaal",
    "nn": "Spesial",
    "no": "Spesial",
    "nb": "Spesial",
    "oc": "Especial",
    "pl": "Specjalna",
    "pms": "Special",
    "pt": "Especial",
    "ro": "Special",
    "ru": "Служебная",
    "sh": "Posebno",
    "sk": "Špeciálne",
    "sl": "Posebno",
    "sq": "Speciale",
    "sr": "Посебно",
    "sv": "Special",
    "sw": "Maalum",
    "ta": "சிறப்பு",
    "te": "ప్రత్యేక",
    "th": "พิเศษ",
    "tr": "Özel",
    "tt": "Махсус",
    "uk": "Спеціальна",
    "ur": "خاص",
    "uz": "Maxsus",
    "vec": "Speciale",
    "vi": "Đặc biệt",
    "wa": "Sipeciås",
    "yi": "באַזונדער",
    "zh": "Special",
}

_REFERENCE = re.compile(r"&(?:#[xX]([0-9A-Fa-f]+)|#([0-9]+)|([A-Za-z][A-Za-z0-9]*));")


def _codepoint(value: int) -> Optional[str]:
    if value in (0x09, 0x0A, 0x0D) or 0x20 <= value <= 0xD7FF or 0xE000 <= value <= 0xFFFD or 0x10000 <= value <= 0x10FFFF:
        return chr(value)
    return None


def _decode_reference(match: re.Match) -> str:
    hexadecimal, decimal, name = match.groups()
    if name is not None:
        return html.entities.html5.get(name + ";", match.group(0))
    value = int(hexadecimal, 16) if hexadecimal is not None else int(decimal)
    return _codepoint(value) or match.group(0)


def cleanup(value: Any) -> str:
    """Text for IRC: character references decoded (only complete ones, with
    their `;`), newlines turned into spaces, carriage returns dropped."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\n", " ").replace("\r", "")
    return _REFERENCE.sub(_decode_reference, text)


def host(event: dict) -> Optional[str]:
    meta = event.get("meta")
    name = event.get("server_name") or (meta.get("domain") if isinstance(meta, dict) else None)
    return name if isinstance(name, str) and name else None


def channel(event: dict) -> Optional[str]:
    """`#` + host without `.org`, or the legacy name of the wiki."""
    legacy = LEGACY_CHANNELS.get(event.get("wiki"))  # type: ignore[arg-type]
    if legacy is not None:
        return legacy
    name = host(event)
    if name is None:
        return None
    name = name.lower()
    if name.endswith(".org"):
        name = name[: -len(".org")]
    if not name or any(c in name for c in " ,:\x07\x00\r\n"):
        return None
    return "#" + name


def special_namespace(event: dict) -> str:
    name = host(event) or ""
    return SPECIAL_NAMESPACE.get(name.split(".", 1)[0].lower(), "Special")


def _field(event: dict, key: str, sub: str) -> Any:
    value = event.get(key)
    return value.get(sub) if isinstance(value, dict) else None


def flags(event: dict) -> str:
    if event.get("type") == "log":
        return cleanup(event.get("log_action"))
    text = ""
    if "patrolled" in event and not event["patrolled"]:
        text += "!"
    if event.get("type") == "new":
        text += "N"
    if event.get("minor"):
        text += "M"
    if event.get("bot"):
        text += "B"
    return text


def url(event: dict) -> str:
    if event.get("type") == "log":
        return ""
    if isinstance(event.get("notify_url"), str):
        return event["notify_url"]
    new = _field(event, "revision", "new")
    server = event.get("server_url")
    if new is None or not isinstance(server, str):
        return ""
    base = f"{server}{event.get('server_script_path') or ''}/index.php"
    if event.get("type") == "new":
        link = f"{base}?oldid={new}"
    else:
        link = f"{base}?diff={new}&oldid={_field(event, 'revision', 'old') or 0}"
    if "patrolled" in event:
        link += f"&rcid={event.get('id')}"
    return link


def size_diff(event: dict) -> str:
    if event.get("type") == "log":
        return ""
    new, old = _field(event, "length", "new"), _field(event, "length", "old")
    if not isinstance(new, int):
        return ""
    diff = new - (old if isinstance(old, int) else 0)
    if diff >= 0:
        return f"(+{diff})"
    if diff >= -500:
        return f"({diff})"
    return f"(\x02{diff}\x02)"


def title_and_comment(event: dict) -> tuple[str, str]:
    title = cleanup(event.get("title"))
    if event.get("type") != "log":
        return title, cleanup(event.get("comment"))
    comment = cleanup(event.get("log_action_comment"))
    if title:
        comment = comment.replace(f"[[{title}]]", f"[[\x0302{title}\x0310]]")
    return f"{special_namespace(event)}:Log/{cleanup(event.get('log_type'))}", comment


def line(event: dict) -> str:
    """The coloured line (no channel), cut at MAX_LINE characters."""
    title, comment = title_and_comment(event)
    text = (
        f"\x0314[[\x0307{title}\x0314]]\x034 {flags(event)}\x0310 \x0302{url(event)}\x03 "
        f"\x035*\x03 \x0303{cleanup(event.get('user'))}\x03 \x035*\x03 {size_diff(event)} "
        f"\x0310{comment}\x03"
    )
    return text[:MAX_LINE]


def wanted(event: Any) -> bool:
    """Only edits, page creations and log entries; never canary events."""
    if not isinstance(event, dict) or event.get("type") not in TYPES:
        return False
    meta = event.get("meta")
    return not (isinstance(meta, dict) and meta.get("domain") == "canary")


def format_event(event: Any) -> Optional[tuple[str, str]]:
    """(channel, line) for an event, or None when it has no IRC line."""
    if not wanted(event):
        return None
    name = channel(event)
    if name is None:
        return None
    return name, line(event)
