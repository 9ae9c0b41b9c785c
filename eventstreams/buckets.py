"""A token bucket per key (a client address), for per-address rates:
`rate` tokens a second, at most `burst` saved (`rate` when not given, and
never under one). One dict of (tokens, when) pairs serves every address;
an address whose bucket is full again holds nothing a fresh one would not,
so prune() drops it."""
from __future__ import annotations

from typing import Optional


class Buckets:
    def __init__(self, rate: float, burst: Optional[float] = None):
        self.rate = rate  # 0: no limit
        self.burst = max(1.0, float(burst or rate))
        self.buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)

    def take(self, key: str, now: float) -> bool:
        if not self.rate:
            return True
        tokens, at = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1
        self.buckets[key] = (tokens - 1 if ok else tokens, now)
        return ok

    def give_back(self, key: str) -> None:
        """Return a token taken for something that turned out not to count."""
        entry = self.buckets.get(key)
        if entry is not None:
            self.buckets[key] = (min(self.burst, entry[0] + 1), entry[1])

    def wait(self, key: str, now: float) -> float:
        """Seconds until key has a token again."""
        if not self.rate or key not in self.buckets:
            return 0.0
        tokens, at = self.buckets[key]
        return max(0.0, (1 - tokens) / self.rate - (now - at))

    def prune(self, now: float) -> None:
        self.buckets = {k: (t, at) for k, (t, at) in self.buckets.items()
                        if t + (now - at) * self.rate < self.burst}
