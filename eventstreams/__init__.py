"""EventStreams: streams of JSON events over Server-Sent Events, IRC and Socket.IO."""

__version__ = "0.1.0"
