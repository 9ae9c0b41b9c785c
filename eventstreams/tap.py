"""The twistd plugin's options and the service tree it builds."""
from __future__ import annotations

import signal
import sys
from typing import Any, Callable, Optional

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from bridges.irc import IRCServer, irc_config as read_irc_config
from bridges.rcstream import config as rcstream_config, sessions as rcstream_sessions, web as rcstream_web

from .backends.base import Backend
from .config import Config, ConfigError, load
from .core import Core, api_site, head_budget, tune_gc
from .demo import SAMPLE_EVENTS, DemoFeed
from .feed import StreamFeed
from .hub import Hubs
from .httpchannel import guard
from .intake import Intake, intake_site
from .iplimit import SharedTable, capacity_for
from .logs import root_for
from .metrics import MetricsResource, Sample, collect
from .sse import Connections
from .validation import SchemaError
from .systemd import Notifier, Notify
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


def ignore_sighup(reactor: Any) -> None:
    """SIGHUP (`systemctl reload`) must not stop the daemon, its default action.
    Logs go to stdout (the journal under systemd), so there is nothing to
    reopen, and twistd rotates a --logfile on SIGUSR1; the configuration is
    read once, so a new one needs a restart."""
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
        log.info, "SIGHUP: nothing to reopen or reload (restart to apply a new configuration)"))


class Listener(Service):
    """An endpoint and its factory that bind once: makeService binds it (see
    listen_now; a port in use raises there and stops start-up), and the
    runner's own privilegedStartService is then a no-op. What
    StreamServerEndpointService does, on public API only (it needs its
    private _raiseSynchronously and _waitingForPort for this)."""

    def __init__(self, reactor: Any, endpoint: str, factory: Any) -> None:
        self.endpoint = serverFromString(reactor, endpoint)
        self.factory = factory
        self.description = endpoint
        self.port: Any = None  # the IListeningPort once bound
        self._listening: Optional[Deferred[Any]] = None
        self._result: Any = None  # the port or the Failure, once settled
        self._waiters: list[Deferred[Any]] = []

    def privilegedStartService(self) -> None:
        if self._listening is not None:
            return
        super().privilegedStartService()
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addBoth(self._settled)
        if isinstance(self._result, Failure):
            self._result.raiseException()

    def startService(self) -> None:
        super().startService()
        self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        if self.port is None:
            return succeed(None)
        return maybeDeferred(self.port.stopListening)

    def _settled(self, result: Any) -> None:
        self._result = result
        if not isinstance(result, Failure):
            self.port = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)  # (a Failure errbacks it)

    def bound(self) -> Deferred[Any]:
        """Fires with the listening port once bound, or fails as binding did."""
        if self._result is not None:
            return succeed(self._result) if not isinstance(self._result, Failure) else fail(self._result)
        waiter: Deferred[Any] = Deferred()
        self._waiters.append(waiter)
        return waiter


def listener(reactor: Any, endpoint: str, factory: Any) -> Listener:
    return Listener(reactor, endpoint, factory)


class Daemon(MultiService):
    """The service tree of build_service, with the parts that tests, the
    bridges and makeService reach (rcstream, workers and notify are set only
    when configured)."""

    listeners: dict[str, Listener]
    connections: Connections
    metric_sources: list[Callable[[], list[Sample]]]
    hubs: Hubs
    backend: Backend
    rcstream: rcstream_sessions.Bridge
    workers: Workers
    notify: Notify


# The key that configures each listener of build_service, for error messages.
LISTEN_KEYS = {
    "api": ("eventstreams", "listen"),
    "intake": ("intake", "listen"),
    "metrics": ("metrics", "listen"),
    "irc": ("irc", "listen"),
    "rcstream": ("rcstream", "listen"),
}


def listen_now(top: Daemon, config: Config) -> None:
    """Bind every listener before the runner starts its log, so that a port in
    use or an address that cannot be bound is one line naming its key."""
    for role, child in top.listeners.items():
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


def listener_line(top: Daemon) -> str:
    """`EventStreams http://127.0.0.1:8092/v2/ui · intake … · IRC … · metrics …`:
    every listener by role, with a URL to click or connect to."""
    roles = {"api": ("EventStreams", "/v2/ui"), "intake": ("intake", "/v1/events"),
             "metrics": ("metrics", "/metrics"), "irc": ("IRC", ""), "rcstream": ("RCStream", "/rcstream_status")}
    listeners = top.listeners
    parts = []
    for role, child in listeners.items():
        name, path = roles.get(role, (role, ""))
        parts.append(f"{name} {url(child, path, 'irc' if role == 'irc' else 'http')}")
        if role == "api" and hasattr(top, "rcstream") and "rcstream" not in listeners:
            parts.append(f"RCStream {url(child, '/rcstream_status', 'http')}")  # on the main listener
    return " · ".join(parts)


def url(child: Listener, path: str, scheme: str) -> str:
    address = child.port.getHost() if child.port is not None else None
    if address is None or not hasattr(address, "port"):  # unix: and the like: the endpoint says it best
        return child.description
    host = address.host
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    if child.description.split(":", 1)[0].lower() == "ssl":
        scheme += "s"
    return f"{scheme}://{host}:{address.port}{path}"


def build_service(config: Config, reactor: Any, notifier: Optional[Notifier] = None) -> Daemon:
    """Everything the daemon runs, as one MultiService; `notifier` tells
    systemd when it is ready (see eventstreams.systemd)."""
    top = Daemon()
    service = config.service
    table = None
    if service.workers > 1 and (service.max_connections or service.client_ip_connection_limit):
        table = SharedTable.create(service.workers, capacity_for(service.max_connections))
    core = Core(config, reactor, table)
    backend, connections, hubs = core.backend, core.connections, core.hubs

    listeners: dict[str, Listener] = {}
    listeners["api"] = listener(reactor, service.listen, core.site)

    bridges: list[IService] = []  # started after the log, stopped before it
    metric_sources: list[Callable[[], list[Sample]]] = [core.head_budget.samples]  # more samples for /metrics

    intake = None
    if config.intake.listen:
        try:
            intake = Intake(config, backend, reactor)
        except SchemaError as e:
            raise ConfigError(config.path, "intake", "schemas", str(e)) from None
        budget = head_budget(reactor, config.intake.head_timeout, service, "intake", public=False)
        site = guard(intake_site(intake.resource(), config.intake.max_body), budget, max_body=config.intake.max_body)
        listeners["intake"] = listener(reactor, config.intake.listen, site)
        metric_sources.append(budget.samples)

    irc_config = read_irc_config(config)  # None: no [irc] section, the bridge is off
    if irc_config is not None:
        irc = IRCServer(irc_config, reactor)
        listeners["irc"] = listener(reactor, irc_config.listen, irc.factory)
        bridges.append(irc)  # the keepalive timer; closes the clients on stop
        bridges.append(StreamFeed(backend, hubs, config.streams[irc_config.stream], irc.on_batch, reactor))
        metric_sources.append(irc.samples)

    rcstream = rcstream_config.parse(config)  # None: no [rcstream] section, the bridge is off
    if rcstream is not None:
        bridge = rcstream_sessions.Bridge(rcstream, reactor)
        if rcstream.listen:  # a listener of its own (required with workers)
            # public like the API: the same request-head budget and body limit
            budget = head_budget(reactor, service.head_timeout, service, "rcstream")
            site = api_site(rcstream_web.mount(Resource(), bridge, reactor, service.client_ip_header),
                            service, budget)
            listeners["rcstream"] = listener(reactor, rcstream.listen, site)
            metric_sources.append(budget.samples)
        else:
            site = listeners["api"].factory
            site.resource = rcstream_web.mount(site.resource, bridge, reactor,  # /socket.io/, /rcstream_status
                                               service.client_ip_header)
        bridges.append(bridge)  # the heartbeat timer; closes the sessions on stop
        bridges.append(StreamFeed(backend, hubs, config.streams[rcstream.stream], bridge.on_batch, reactor))
        metric_sources.append(bridge.samples)
        top.rcstream = bridge  # for tests

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
    for part in bridges:
        part.setServiceParent(top)
    if workers is not None:  # last: spawned once all is up, stopped before the rest
        workers.setServiceParent(top)
        top.workers = workers
    if notifier is not None:  # the very last: READY=1 once all is up, STOPPING=1 first
        top.notify = Notify(notifier, listeners.values(), reactor)
        top.notify.setServiceParent(top)

    top.listeners = listeners  # for tests and bridges
    top.connections = connections
    top.metric_sources = metric_sources
    top.hubs = hubs
    top.backend = backend
    return top


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    config = None
    try:
        config = load(options["config"], options["set"])
        root = root_for(config, options)  # [log]: twistd's log observer
        service = build_service(config, reactor, Notifier.from_environ())
        # Before the runner starts its log: a failure here is one line on stderr.
        listen_now(service, config)
        open_backend(service.backend, config)
        service.setServiceParent(root)
        reactor.callWhenRunning(ignore_sighup, reactor)  # after twistd set its handlers
        reactor.callWhenRunning(tune_gc)
        reactor.callWhenRunning(log.info, "{listeners}", listeners=listener_line(service))
        return root
    except ConfigError as e:
        if config is not None:
            e.blame(config.set_by)
        sys.stderr.write(f"eventstreams: {e}\n")
        raise SystemExit(1) from None
