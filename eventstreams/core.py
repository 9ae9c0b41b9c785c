"""What every serving process builds: the log reader, hubs, connections and
the public site. The main process (eventstreams.tap) and each worker
process (eventstreams.workers) import it; neither imports the other's
start-up."""
from __future__ import annotations

import gc
import resource
from typing import Any, Optional

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.server import Site

from .backends.base import Backend
from .config import Config, ConfigError, ServiceConfig
from .httpchannel import ApiRequest, HeadBudget, guard
from .hub import Hubs
from .intake import WRITE_SHARE
from .iplimit import SharedTable, make_limits
from .logs import ApiSite
from .sse import Connections
from .web import Api

log = Logger()


class _Lifecycle(Service):
    """Starts and stops the parts that are not listeners."""

    def __init__(self, backend: Backend, connections: Connections, hubs: Hubs):
        self.backend, self.connections, self.hubs = backend, connections, hubs

    def startService(self) -> None:
        self.backend.start()
        self.connections.start()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        self.connections.stop()
        self.hubs.stop()
        return self.backend.stop()


def make_backend(config: Config, reactor: Any, writer: bool = True) -> Backend:
    if config.service.backend == "kafka":
        if "bootstrap.servers" not in config.kafka:
            raise ConfigError(config.path, "kafka", "bootstrap.servers", "required by backend = kafka")
        try:
            from .backends.kafka import KafkaBackend
        except ImportError:
            raise ConfigError(config.path, "eventstreams", "backend",
                              "kafka needs confluent-kafka: pip install 'eventstreams[kafka]'") from None
        backend = KafkaBackend(config.kafka, reactor, config.service.backend_timeout,
                               config.service.catchup_consumers,
                               write_timeout=config.intake.timeout * WRITE_SHARE)  # see intake.py
        error = backend.check_settings()
        if error:
            raise ConfigError(config.path, "kafka", None, error)
        return backend
    from .backends.embedded import EmbeddedBackend

    e = config.embedded
    # Worker processes only read the file: retention is the writer's job.
    return EmbeddedBackend(e.path, e.retention if writer else 0, e.partitions, reactor=reactor,
                           read_only=not writer)


def head_budget(reactor: Any, deadline: float, service: ServiceConfig, listener: str,
                public: bool = True) -> HeadBudget:
    """The request-head budget of one listener. Behind a proxy that names
    the client (client_ip_header) every connection comes from the proxy:
    only the total bound applies. The request rate per address is for the
    public listeners (the intake's producers are few and trusted)."""
    per_address = 0 if service.client_ip_header else service.max_pending_heads_per_ip
    rate = 0.0 if service.client_ip_header or not public else service.request_rate_per_ip
    return HeadBudget(reactor, deadline, pending_bound(service.max_pending_heads), per_address,
                      max_waiting=waiting_bound(), listener=listener,
                      request_rate=rate, request_burst=service.request_burst_per_ip)


def pending_bound(configured: int) -> int:
    """At most a quarter of the open-files limit may be connections still
    sending a head, so dripping clients never make accept() fail (EMFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    bound = max(1, soft // 4)
    if configured and configured <= bound:
        return configured
    log.info("max_pending_heads: {bound} (a quarter of the open-files limit {soft})", bound=bound, soft=soft)
    return bound


def waiting_bound() -> int:
    """Connections waiting for a head however young (a burst not read yet)
    may take half the open-files limit before the oldest is cut."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 0 if soft == resource.RLIM_INFINITY else max(1, soft // 2)


def api_site(resource: Any, service: ServiceConfig, budget: HeadBudget) -> Site:
    """The public site: HTTP/1.1 connections with a request-head budget
    (eventstreams.httpchannel), one channel object per connection (no
    HTTP/2 negotiation wrapper; streams are HTTP/1.1)."""
    # ApiSite: stream requests log their own access lines
    return guard(ApiSite(resource, requestFactory=ApiRequest), budget, max_body=service.max_body)


class Core:
    """What every serving process has: the log reader, hubs, connections and
    the public site (the main process and each worker build their own)."""

    def __init__(self, config: Config, reactor: Any, table: Optional[SharedTable] = None,
                 index: int = 0, writer: bool = True) -> None:
        service = config.service
        self.backend = make_backend(config, reactor, writer)
        self.connections = Connections(reactor, service.heartbeat)
        self.connections.delays.stream_of_topic = {
            topic: s.name for s in reversed(list(config.streams.values())) for topic in s.topics}
        self.hubs = Hubs(self.backend, service.ring_size, service.hub_linger, reactor, service.fan_out_interval,
                         service.ring_memory, service.max_stream_sets)
        limits = make_limits(self.connections, service.max_connections, service.client_ip_connection_limit,
                             table, index)
        self.api = Api(config, self.backend, self.hubs, self.connections, reactor, limits)
        self.head_budget = head_budget(reactor, service.head_timeout, service, "api")
        self.site = api_site(self.api.resource(), service, self.head_budget)
        self.lifecycle = _Lifecycle(self.backend, self.connections, self.hubs)


def tune_gc() -> None:
    """Each connection keeps dozens of long-lived objects: keep the start-up
    heap out of every collection and run the young-generation collection
    less often than Python's 700 (its cost showed at the allocation sites of
    every request), but not so rarely that one collection stalls every
    client: connections that come and go leave cycles (channel, transport,
    timers) for the collector. Under `bench abuse`'s connection churn, at
    20,000 a young collection took 20-55 ms and a middle one 177 ms; at
    10,000, 7-24 and 54-62 ms. (At 5,000 the pauses were shorter still, but
    `bench idle` took 11-13 KiB per client instead of 8.2.)"""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
