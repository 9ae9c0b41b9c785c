"""The twistd plugin's options and the service tree it builds."""
from __future__ import annotations

import gc
import resource
import signal
import sys
from typing import Any, Callable, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from bridges.irc import IRCServer, irc_config as read_irc_config
from bridges.rcstream import config as rcstream_config, sessions as rcstream_sessions, web as rcstream_web

from .backends.base import Backend
from .config import Config, ConfigError, ServiceConfig, load
from .demo import SAMPLE_EVENTS, DemoFeed
from .feed import StreamFeed
from .httpchannel import ApiRequest, HeadBudget, guard
from .hub import Hubs
from .intake import WRITE_SHARE, Intake, intake_site
from .iplimit import SharedTable, capacity_for, make_limits
from .logs import ApiSite, root_for
from .metrics import MetricsResource, Sample, collect
from .sse import Connections
from .validation import SchemaError
from .systemd import Notifier, Notify
from .web import Api
from .workers import Workers, merge_samples

log = Logger()


class Options(usage.Options):
    synopsis = "[-c FILE] [--set SECTION.KEY=VALUE ...]"
    longdesc = (
        "Serve streams of JSON events over HTTP Server-Sent Events (EventStreams), "
        "from the embedded event log or Kafka. --set overrides one configuration key "
        "and may be repeated, e.g. --set eventstreams.listen=tcp:8093 or "
        "--set stream:mediawiki.recentchange.topics=a,b."
    )
    optParameters = [
        ["config", "c", "etc/streams.ini", "The configuration file (INI)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["set"] = []

    def opt_set(self, value: str) -> None:
        """Override a configuration key: SECTION.KEY=VALUE (repeatable)."""
        self["set"].append(value)


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


def ignore_sighup(reactor: Any) -> None:
    """SIGHUP (`systemctl reload`) must not stop the daemon, its default action.
    Logs go to stdout (the journal under systemd), so there is nothing to
    reopen, and twistd rotates a --logfile on SIGUSR1; the configuration is
    read once, so a new one needs a restart."""
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
        log.info, "SIGHUP: nothing to reopen or reload (restart to apply a new configuration)"))


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
    return EmbeddedBackend(e.path, e.retention if writer else 0, e.partitions, reactor=reactor)


class Listener(StreamServerEndpointService):
    """A listener that binds once: makeService binds it (see listen_now), and
    the runner's own privilegedStartService is then a no-op."""

    _raiseSynchronously = True  # a port in use stops start-up

    def __init__(self, reactor: Any, endpoint: str, factory: Any) -> None:
        super().__init__(serverFromString(reactor, endpoint), factory)
        self.description = endpoint
        self.port: Any = None  # the IListeningPort once bound

    def privilegedStartService(self) -> None:
        if self._waitingForPort is None:
            super().privilegedStartService()
            self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port


def listener(reactor: Any, endpoint: str, factory: Any) -> IService:
    return Listener(reactor, endpoint, factory)


# The key that configures each listener of build_service, for error messages.
LISTEN_KEYS = {
    "api": ("eventstreams", "listen"),
    "intake": ("intake", "listen"),
    "metrics": ("metrics", "listen"),
    "irc": ("irc", "listen"),
    "rcstream": ("rcstream", "listen"),
}


def listen_now(top: MultiService, config: Config) -> None:
    """Bind every listener before the runner starts its log, so that a port in
    use or an address that cannot be bound is one line naming its key."""
    for role, child in top.listeners.items():  # type: ignore[attr-defined]
        try:
            child.privilegedStartService()
        except Exception as e:
            error = getattr(e, "socketError", None) or e  # CannotListenError wraps the OSError
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            section, key = LISTEN_KEYS.get(role, (role, "listen"))
            raise config.error(section, key, f"cannot listen on {child.description}: {reason}") from None


def open_backend(backend: Backend, config: Config) -> None:
    """Open the embedded log's file once now: a path that cannot be used is
    one line naming [embedded] path, not a traceback at start."""
    check = getattr(backend, "check", None)
    if check is None:
        return
    from .backends.embedded import EmbeddedLogError

    try:
        check()
    except EmbeddedLogError as e:
        reason = str(e).removeprefix(f"embedded log {config.embedded.path!r}: ")
        raise config.error("embedded", "path", reason) from None


def listener_line(top: MultiService) -> str:
    """`EventStreams http://127.0.0.1:8092/v2/ui · intake … · IRC … · metrics …`:
    every listener by role, with a URL to click or connect to."""
    roles = {"api": ("EventStreams", "/v2/ui"), "intake": ("intake", "/v1/events"),
             "metrics": ("metrics", "/metrics"), "irc": ("IRC", ""), "rcstream": ("RCStream", "/rcstream_status")}
    listeners = top.listeners  # type: ignore[attr-defined]
    parts = []
    for role, child in listeners.items():
        name, path = roles.get(role, (role, ""))
        parts.append(f"{name} {url(child, path, 'irc' if role == 'irc' else 'http')}")
        if role == "api" and hasattr(top, "rcstream") and "rcstream" not in listeners:
            parts.append(f"RCStream {url(child, '/rcstream_status', 'http')}")  # on the main listener
    return " · ".join(parts)


def url(child: Listener, path: str, scheme: str) -> str:
    address = child.port.getHost() if child.port is not None else None
    if not hasattr(address, "port"):  # unix: and the like: the endpoint says it best
        return child.description
    host = address.host
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    if child.description.split(":", 1)[0].lower() == "ssl":
        scheme += "s"
    return f"{scheme}://{host}:{address.port}{path}"


def head_budget(reactor: Any, deadline: float, service: ServiceConfig) -> HeadBudget:
    """The request-head budget of one listener. Behind a proxy that names
    the client (client_ip_header) every connection comes from the proxy:
    only the total bound applies."""
    per_address = 0 if service.client_ip_header else service.max_pending_heads_per_ip
    return HeadBudget(reactor, deadline, pending_bound(service.max_pending_heads), per_address)


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


def api_site(resource: Any, service: ServiceConfig, reactor: Any) -> Site:
    """The public site: HTTP/1.1 connections with a request-head budget
    (eventstreams.httpchannel), one channel object per connection (no
    HTTP/2 negotiation wrapper; streams are HTTP/1.1)."""
    # ApiSite: stream requests log their own access lines
    return guard(ApiSite(resource, requestFactory=ApiRequest), head_budget(reactor, service.head_timeout, service),
                 max_body=service.max_body)


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
        self.site = api_site(self.api.resource(), service, reactor)
        self.lifecycle = _Lifecycle(self.backend, self.connections, self.hubs)


def build_service(config: Config, reactor: Any, notifier: Optional[Notifier] = None) -> MultiService:
    """Everything the daemon runs, as one MultiService; `notifier` tells
    systemd when it is ready (see eventstreams.systemd)."""
    top = MultiService()
    service = config.service
    table = None
    if service.workers > 1 and (service.max_connections or service.client_ip_connection_limit):
        table = SharedTable.create(service.workers, capacity_for(service.max_connections))
    core = Core(config, reactor, table)
    backend, connections, hubs = core.backend, core.connections, core.hubs

    listeners: dict[str, IService] = {}
    listeners["api"] = listener(reactor, service.listen, core.site)

    intake = None
    if config.intake.listen:
        try:
            intake = Intake(config, backend, reactor)
        except SchemaError as e:
            raise ConfigError(config.path, "intake", "schemas", str(e)) from None
        site = intake_site(intake.resource(), config.intake.max_body)
        site = guard(site, head_budget(reactor, config.intake.head_timeout, service), max_body=site.max_body)
        listeners["intake"] = listener(reactor, config.intake.listen, site)

    bridges: list[IService] = []  # started after the log, stopped before it
    metric_sources: list[Callable[[], list[Sample]]] = []  # more samples for /metrics

    irc_config = read_irc_config(config)  # None: no [irc] section, the bridge is off
    if irc_config is not None:
        irc = IRCServer(irc_config, reactor)
        listeners["irc"] = listener(reactor, irc_config.listen, irc.factory)
        bridges.append(irc)  # the keepalive timer; closes the clients on stop
        bridges.append(StreamFeed(backend, hubs, config.streams[irc_config.stream], irc.on_event, reactor,
                                  on_batch=irc.on_batch))
        metric_sources.append(irc.samples)

    rcstream = rcstream_config.parse(config)  # None: no [rcstream] section, the bridge is off
    if rcstream is not None:
        bridge = rcstream_sessions.Bridge(rcstream, reactor)
        if rcstream.listen:  # a listener of its own (required with workers)
            # public like the API: the same request-head budget and body limit
            site = api_site(rcstream_web.mount(Resource(), bridge, reactor, service.client_ip_header),
                            service, reactor)
            listeners["rcstream"] = listener(reactor, rcstream.listen, site)
        else:
            site = listeners["api"].factory  # type: ignore[attr-defined]
            site.resource = rcstream_web.mount(site.resource, bridge, reactor,  # /socket.io/, /rcstream_status
                                               service.client_ip_header)
        bridges.append(bridge)  # the heartbeat timer; closes the sessions on stop
        bridges.append(StreamFeed(backend, hubs, config.streams[rcstream.stream], bridge.on_event, reactor,
                                  on_batch=bridge.on_batch))
        metric_sources.append(bridge.samples)
        top.rcstream = bridge  # type: ignore[attr-defined]  # for tests

    workers = None
    if service.workers > 1:
        workers = Workers(config, reactor, listeners["api"], table)
        metric_sources.append(workers.samples)  # the workers' own, summed below
        if hasattr(backend, "watch_appends"):  # the embedded log: wake the workers' readers
            backend.watch_appends(workers.announce)

    if config.metrics.listen:
        resource = MetricsResource(
            lambda: merge_samples(
                collect(connections, hubs, intake.counts if intake else None, config.streams)
                + [sample for source in metric_sources for sample in source()]
            )
        )
        listeners["metrics"] = listener(reactor, config.metrics.listen, Site(resource))

    # Listeners first: a port in use fails start-up before any thread starts.
    for child in listeners.values():
        child.setServiceParent(top)
    core.lifecycle.setServiceParent(top)
    if intake is not None:  # after the log: it may read recent event ids back
        intake.setServiceParent(top)
    if config.demo.stream:
        stream = config.streams[config.demo.stream]
        try:
            open(config.demo.file or SAMPLE_EVENTS, "rb").close()
        except OSError as e:
            raise config.error("demo", "file", f"cannot read {e.filename!r}: {e.strerror}") from None
        DemoFeed(backend, stream, config.demo.rate, config.demo.file, reactor).setServiceParent(top)
    for child in bridges:
        child.setServiceParent(top)
    if workers is not None:  # last: spawned once all is up, stopped before the rest
        workers.setServiceParent(top)
        top.workers = workers  # type: ignore[attr-defined]
    if notifier is not None:  # the very last: READY=1 once all is up, STOPPING=1 first
        top.notify = Notify(notifier, listeners.values(), reactor)  # type: ignore[attr-defined]
        top.notify.setServiceParent(top)  # type: ignore[attr-defined]

    top.listeners = listeners  # type: ignore[attr-defined]  # for tests and bridges
    top.connections = connections  # type: ignore[attr-defined]
    top.metric_sources = metric_sources  # type: ignore[attr-defined]
    top.hubs = hubs  # type: ignore[attr-defined]
    top.backend = backend  # type: ignore[attr-defined]
    return top


def tune_gc() -> None:
    """Each connection keeps dozens of long-lived objects: keep the start-up
    heap out of every collection and run the young-generation collection
    less often (its cost showed at the allocation sites of every request)."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    config = None
    try:
        config = load(options["config"], options["set"])
        root = root_for(config, options)  # [log]: twistd's log observer
        service = build_service(config, reactor, Notifier.from_environ())
        # Before the runner starts its log: a failure here is one line on stderr.
        listen_now(service, config)
        open_backend(service.backend, config)  # type: ignore[attr-defined]
        service.setServiceParent(root)
        reactor.callWhenRunning(ignore_sighup, reactor)  # after twistd set its handlers
        reactor.callWhenRunning(tune_gc)
        reactor.callWhenRunning(log.info, "{listeners}", listeners=listener_line(service))
        return root
    except ConfigError as e:
        if config is not None:
            e.blame(config.set_by)
        sys.stderr.write(f"eventstreams: {e}\n")
        raise SystemExit(1)
