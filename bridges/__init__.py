"""The bridges: other protocols fed by the same hubs (IRC, RCStream).

Each declares its configuration section when imported
(eventstreams.config.declare_section); importing this package imports
them all, so a configuration naming their sections loads.
"""
from .irc import config as _irc  # noqa: F401  (declares [irc])
from .rcstream import config as _rcstream  # noqa: F401  (declares [rcstream])
