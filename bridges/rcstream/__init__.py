"""RCStream bridge: recent changes over Socket.IO 0.9 (the retired
stream.wikimedia.org/rc protocol) and today's Engine.IO 3/4, namespace `/rc`.

- config.py: the `[rcstream]` section as a frozen dataclass;
- packets.py: wire formats (Socket.IO 0.9 packets and payload framing,
  Engine.IO 3/4 packets and payloads), pure functions, and the protocol
  generations (SIO09, EIO3, EIO4: a session's framing and event encoding);
- sessions.py: sessions, subscriptions, bounded queues, the event fan-out;
- web.py: the twisted.web resources (handshakes, polling, WebSocket).
"""
