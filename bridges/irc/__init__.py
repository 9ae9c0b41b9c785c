"""The IRC bridge: a read-only irc.wikimedia.org-style server fed by a stream."""
from .config import IRCConfig, irc_config
from .server import IRCServer

__all__ = ["IRCConfig", "IRCServer", "irc_config"]
