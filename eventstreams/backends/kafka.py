"""The Kafka engine: confluent-kafka (librdkafka) with assign() only, no groups.

Ids carry all client state, so no offsets are committed. Every call that
can block runs in a thread: metadata and offset lookups in a small pool
sharing one handle, catch-up reads on a bounded pool of consumers (requests
beyond it wait their turn), and each hub's tail on a consumer of its own
whose thread hands batches to the reactor with callFromThread.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Optional, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTP
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .base import BackendUnavailable, Record, TopicPartition

log = Logger()

CONSUMER_DEFAULTS = {
    "group.id": "eventstreams",  # never joined: assign() only
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
    "enable.partition.eof": "false",
    "fetch.queue.backoff.ms": "10",  # the default stalls fetches for ~1 s
    # A position below the log start continues at the oldest record (the hub
    # notices the jump and tells the client), never silently at the end.
    "auto.offset.reset": "earliest",
}
CATCHUP_DEFAULTS = {"queued.max.messages.kbytes": "2048"}  # bounds memory per pooled consumer
POLL_BATCH = 1000
POLL_TIMEOUT = 0.2
REPEAT = 60.0  # seconds before the same librdkafka line is logged again
RETRY_PAUSE = 0.1  # seconds between tries of a transient failure
PARTITIONS_TTL = 10.0  # seconds a topic's partition list is reused
# librdkafka keys that only a producer or only a consumer understands
PRODUCER_ONLY = {"acks", "linger.ms", "compression.type", "enable.idempotence", "batch.num.messages"}
CONSUMER_ONLY = {"fetch.queue.backoff.ms", "queued.max.messages.kbytes", "fetch.wait.max.ms",
                 "fetch.min.bytes", "fetch.max.bytes", "max.partition.fetch.bytes", "group.id",
                 "enable.auto.commit", "enable.auto.offset.store", "enable.partition.eof",
                 "auto.offset.reset", "isolation.level"}


def consume_ready(consumer: Consumer, limit: int, timeout: float) -> list:
    """Up to `limit` messages, waiting at most `timeout` for the first and
    then taking only what is already fetched: consume(limit, timeout) alone
    waits for all `limit` or the whole timeout, which at a few events a
    second is the latency of every event."""
    messages = consumer.consume(limit, 0)
    if not messages:
        messages = consumer.consume(1, timeout)
        if messages and limit > 1:
            messages += consumer.consume(limit - 1, 0)
    return messages


class LibrdkafkaLog(logging.Logger):
    """librdkafka's log lines into twisted.logger, each distinct line at most
    once a minute (a broker that is down is otherwise reported 20 times a second)."""

    def __init__(self, reactor: Any):
        super().__init__("librdkafka")
        self.reactor = reactor
        self._seen: dict[str, float] = {}

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        text = msg % args if args else str(msg)
        key = re.sub(r"\(after \d+ms[^)]*\)", "", text)
        now = time.monotonic()
        if now - self._seen.get(key, -REPEAT) < REPEAT:
            return
        self._seen[key] = now
        if len(self._seen) > 1000:
            self._seen.clear()
        emit = log.warn if level >= logging.WARNING else log.info
        self.reactor.callFromThread(emit, "librdkafka: {text}", text=text)


def to_record(message: Any) -> Record:
    kind, timestamp = message.timestamp()
    return Record(
        message.topic(),
        message.partition(),
        message.offset(),
        timestamp if kind != 0 and timestamp >= 0 else int(time.time() * 1000),
        message.key(),
        message.value(),
    )


def _message(e: BaseException) -> str:
    arg = e.args[0] if e.args else e
    return arg.str() if isinstance(arg, KafkaError) else str(arg)


TRANSIENT = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
}


# Delivery errors of records that never left the producer.
NOT_SENT = {KafkaError._PURGE_QUEUE, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_PARTITION, KafkaError._QUEUE_FULL, KafkaError.MSG_SIZE_TOO_LARGE}


def _transient(error: Any) -> bool:
    return isinstance(error, KafkaError) and (error.retriable() or error.code() in TRANSIENT)


def _unavailable(e: BaseException) -> BackendUnavailable:
    return BackendUnavailable(_message(e))


class KafkaTail:
    """One consumer and thread following partitions for a hub."""

    def __init__(self, backend: "KafkaBackend", positions: dict[TopicPartition, int],
                 on_records: Callable[[list[Record]], None]):
        self.backend = backend
        self.on_records = on_records
        self.positions = dict(positions)
        self._stopped = threading.Event()
        self._consumer = Consumer(backend.consumer_settings())
        self._consumer.assign([KafkaTP(t, p, o) for (t, p), o in positions.items()])
        self._reported: Optional[str] = None  # (set before the thread that reads it starts)
        self._thread = threading.Thread(target=self._run, name="kafka-tail", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No callback after this returns; the thread closes its consumer."""
        self._stopped.set()
        self.backend._tails.discard(self)

    def _run(self) -> None:
        consumer = self._consumer
        reactor = self.backend.reactor
        try:
            while not self._stopped.is_set():
                try:
                    messages = consume_ready(consumer, POLL_BATCH, POLL_TIMEOUT)
                except KafkaException as e:
                    self._report(str(e))
                    time.sleep(POLL_TIMEOUT)
                    continue
                records = []
                for m in messages:
                    error = m.error()
                    if error is None:
                        records.append(to_record(m))
                    elif error.code() != KafkaError._PARTITION_EOF:
                        self._report(error.str())
                if records:
                    self._reported = None
                    reactor.callFromThread(self._deliver, records)
        finally:
            consumer.close()

    def _deliver(self, records: list[Record]) -> None:
        if self._stopped.is_set():
            return
        for r in records:
            self.positions[r.tp] = r.offset + 1
        try:
            self.on_records(records)
        except Exception:
            log.failure("a tail's receiver failed")

    def _report(self, text: str) -> None:
        if text != self._reported:  # once per distinct problem, not per poll
            self._reported = text
            self.backend.reactor.callFromThread(log.warn, "kafka tail: {error}", error=text)


class KafkaBackend:
    def __init__(
        self,
        settings: dict[str, str],
        reactor: Any,
        timeout: float = 10.0,
        catchup_consumers: int = 8,
        write_timeout: Optional[float] = None,
    ):
        self.settings = dict(settings)
        # Ours, not librdkafka's: the name ids use for this cluster's offsets.
        self.cluster: Optional[str] = self.settings.pop("cluster_name", None) or None
        self.write_timeout = write_timeout  # seconds a produced record may wait for its delivery
        self.reactor = reactor
        self.timeout = timeout
        self.catchup_consumers = catchup_consumers
        self._pool = ThreadPool(2, 4 + catchup_consumers, name="kafka")
        self._catchup = DeferredSemaphore(catchup_consumers)
        # Idle catch-up consumers, taken on pool threads and given back on the
        # reactor thread: every access holds _idle_lock (never for long).
        self._idle: list[tuple[dict[TopicPartition, int], Consumer]] = []
        self._idle_lock = threading.Lock()
        self._meta: Optional[Consumer] = None
        self._producer: Optional[Producer] = None
        self._producer_thread: Optional[threading.Thread] = None
        self._running = False
        self._missing: set[str] = set()
        self._tails: set[KafkaTail] = set()
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._librdkafka_log = LibrdkafkaLog(reactor)

    # -- settings ---------------------------------------------------------------

    def consumer_settings(self, catchup: bool = False) -> dict[str, Any]:
        settings: dict[str, Any] = {k: v for k, v in self.settings.items() if k not in PRODUCER_ONLY}
        for key, value in {**CONSUMER_DEFAULTS, **(CATCHUP_DEFAULTS if catchup else {})}.items():
            settings.setdefault(key, value)
        settings["logger"] = self._librdkafka_log
        return settings

    def producer_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {k: v for k, v in self.settings.items() if k not in CONSUMER_ONLY}
        # librdkafka's own retries never duplicate (the intake's meta.id
        # window covers a producer's retries); a record not delivered within
        # the intake's timeout is dropped and reported, never sent later.
        settings.setdefault("enable.idempotence", "true")
        if self.write_timeout is not None:
            settings.setdefault("message.timeout.ms", str(max(1, int(self.write_timeout * 1000))))
        settings["logger"] = self._librdkafka_log
        return settings

    def check_settings(self) -> Optional[str]:
        """librdkafka's complaint about the settings, if any (it connects lazily,
        so building a handle does not touch the network)."""
        try:
            Consumer(self.consumer_settings()).close()
            Producer(self.producer_settings())
        except (KafkaException, ValueError, TypeError) as e:
            return _message(e)
        return None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._meta = Consumer(self.consumer_settings())
        self._pool.start()
        self._running = True

    def stop(self) -> Deferred[None]:
        self._running = False
        for tail in list(self._tails):
            tail.stop()
        self._tails.clear()
        with self._idle_lock:
            idle, self._idle = self._idle, []

        def close() -> None:
            for _, consumer in idle:
                consumer.close()
            if self._producer is not None:
                self._producer.flush(self.timeout)
            if self._meta is not None:
                self._meta.close()

        d = self._run(close)
        d.addBoth(lambda _: self.reactor.callInThread(self._pool.stop))
        return d

    def _run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def _blocking(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run f in a thread; Kafka errors and timeouts become BackendUnavailable."""
        if not self._running:
            return fail(BackendUnavailable("the Kafka engine is stopped"))

        def call() -> Any:
            # Errors that pass (a leader moving, a topic just created, a broker
            # restarting) are retried until the timeout; then the client gets a 503.
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    return f(*args)
                except KafkaException as e:
                    error = e.args[0] if e.args else None
                    if not (_transient(error) and time.monotonic() < deadline):
                        raise _unavailable(e) from None
                time.sleep(RETRY_PAUSE)

        return self._run(call)

    # -- metadata -------------------------------------------------------------------

    def identity(self) -> Deferred[str]:
        """`[kafka] cluster_name`, else the cluster id from metadata (looked up once)."""
        if self.cluster is not None:
            return succeed(self.cluster)

        def lookup() -> str:
            cluster_id = self._meta.list_topics(timeout=self.timeout).cluster_id  # type: ignore[union-attr]
            if not cluster_id:
                raise BackendUnavailable("the Kafka metadata names no cluster id")
            return cluster_id

        def found(cluster_id: str) -> str:
            if self.cluster is None:
                self.cluster = cluster_id
                log.info("kafka cluster id {cluster}", cluster=cluster_id)
            return self.cluster

        return self._blocking(lookup).addCallback(found)

    def partitions(self, topic: str) -> Deferred[list[int]]:
        """Partitions from metadata, cached briefly so connection storms do
        not become metadata storms (a topic created later shows up soon)."""
        cached = self._partitions.get(topic)
        if cached is not None and cached[0] > self.reactor.seconds():
            return succeed(cached[1])

        def lookup() -> list[int]:
            metadata = self._meta.list_topics(topic, timeout=self.timeout)  # type: ignore[union-attr]
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                if found is not None and found.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BackendUnavailable(found.error.str())
                return []
            return sorted(found.partitions)

        def report(partitions: list[int]) -> list[int]:
            if not partitions and topic not in self._missing:
                self._missing.add(topic)
                log.warn("kafka topic {topic} does not exist; serving the other topics", topic=topic)
            elif partitions:
                self._missing.discard(topic)
            self._partitions[topic] = (self.reactor.seconds() + PARTITIONS_TTL, partitions)
            return partitions

        return self._blocking(lookup).addCallback(report)

    def watermarks(self, tp: TopicPartition) -> Deferred[tuple[int, int]]:
        return self._blocking(
            self._meta.get_watermark_offsets, KafkaTP(*tp), self.timeout  # type: ignore[union-attr]
        ).addCallback(tuple)

    def offsets_for_time(self, tps: Sequence[TopicPartition], timestamp: int) -> Deferred[dict[TopicPartition, int]]:
        def lookup() -> dict[TopicPartition, int]:
            found = self._meta.offsets_for_times(  # type: ignore[union-attr]
                [KafkaTP(t, p, timestamp) for t, p in tps], timeout=self.timeout
            )
            result = {}
            for ktp in found:
                if ktp.error is not None:  # never guess "the end" from a failed lookup
                    raise KafkaException(ktp.error)
                tp = (ktp.topic, ktp.partition)
                if ktp.offset < 0:  # no record at or after the time: the end
                    ktp.offset = self._meta.get_watermark_offsets(KafkaTP(*tp), self.timeout)[1]  # type: ignore[union-attr]
                result[tp] = ktp.offset
            return result

        return self._blocking(lookup)

    # -- reading ----------------------------------------------------------------------

    def read(self, positions: dict[TopicPartition, int], max_records: int) -> Deferred[list[Record]]:
        """A batch from a pooled catch-up consumer (at most catchup_consumers at once)."""
        return self._catchup.run(self._blocking, self._read_sync, dict(positions), max_records)

    def _take_consumer(self, positions: dict[TopicPartition, int]) -> Consumer:
        """(On a pool thread.)"""
        reused: Optional[Consumer] = None
        with self._idle_lock:
            for i, (where, consumer) in enumerate(self._idle):
                if where == positions:  # continues exactly where it stopped: no re-fetch
                    del self._idle[i]
                    return consumer
            if self._idle:
                _, reused = self._idle.pop(0)
        consumer = reused if reused is not None else Consumer(self.consumer_settings(catchup=True))
        consumer.assign([KafkaTP(t, p, o) for (t, p), o in positions.items()])
        return consumer

    def _read_sync(self, positions: dict[TopicPartition, int], max_records: int) -> list[Record]:
        consumer = self._take_consumer(positions)
        records: list[Record] = []
        try:
            deadline = time.monotonic() + self.timeout
            ends: Optional[dict[TopicPartition, int]] = None
            while not records and time.monotonic() < deadline:
                for m in consume_ready(consumer, max_records, POLL_TIMEOUT):
                    error = m.error()
                    if error is None:
                        records.append(to_record(m))
                    elif error.fatal():
                        raise KafkaException(error)
                    elif error.code() != KafkaError._PARTITION_EOF:
                        self._librdkafka_log.log(logging.WARNING, "catch-up read: %s", error.str())
                if records:
                    break
                if ends is None:  # nothing yet: are we simply at the end?
                    ends = {tp: consumer.get_watermark_offsets(KafkaTP(*tp), self.timeout)[1] for tp in positions}
                    if all(positions[tp] >= end for tp, end in ends.items()):
                        break
            after = dict(positions)
            for r in records:
                after[r.tp] = r.offset + 1
            records.sort(key=lambda r: (r.timestamp, r.topic, r.partition, r.offset))
        except BaseException:
            consumer.close()
            raise
        self.reactor.callFromThread(self._return_consumer, after, consumer)
        return records

    def _return_consumer(self, positions: dict[TopicPartition, int], consumer: Consumer) -> None:
        with self._idle_lock:
            if self._running and len(self._idle) < self.catchup_consumers:
                self._idle.append((positions, consumer))
                return
        self.reactor.callInThread(consumer.close)

    def tail(self, positions: dict[TopicPartition, int], on_records: Callable[[list[Record]], None]) -> KafkaTail:
        if not self._running:
            raise BackendUnavailable("the Kafka engine is stopped")
        tail = KafkaTail(self, positions, on_records)
        self._tails.add(tail)
        return tail

    # -- writing ----------------------------------------------------------------------

    def append(self, topic: str, values: Sequence[tuple[Optional[bytes], bytes]],
               timestamp: Optional[int] = None) -> Deferred[list[Record]]:
        if not self._running:
            return fail(BackendUnavailable("the Kafka engine is stopped"))
        producer = self._ensure_producer()
        results: list[Deferred] = []
        for key, value in values:
            d: Deferred = Deferred()
            results.append(d)

            def delivered(error: Any, message: Any, d: Deferred = d) -> None:
                if error is not None:
                    failed = BackendUnavailable(error.str())
                    failed.maybe_stored = error.code() not in NOT_SENT
                    self.reactor.callFromThread(d.errback, failed)
                else:
                    self.reactor.callFromThread(d.callback, to_record(message))

            kwargs: dict[str, Any] = {"timestamp": timestamp} if timestamp is not None else {}
            try:
                producer.produce(topic, value, key, on_delivery=delivered, **kwargs)
            except (KafkaException, BufferError) as e:
                d.errback(_unavailable(e))
        return gatherResults(results, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.producer_settings())
            self._producer_thread = threading.Thread(target=self._serve_producer, name="kafka-producer", daemon=True)
            self._producer_thread.start()
        return self._producer

    def _serve_producer(self) -> None:
        while self._running:
            self._producer.poll(0.1)  # type: ignore[union-attr]  # runs delivery callbacks
