"""streamtools: one async Producer/Consumer API over RabbitMQ, Kafka, NATS
JetStream, Redis Streams, HTTP and an in-process broker, picked by name so a
service can switch transport from an environment variable, with the same
delivery contract on every one.

Quick start (runs as is, on the embedded memory transport)::

    import asyncio, os, streamtools

    KIND = os.environ.get("QUEUE_TYPE", "memory")

    async def main():
        consumer = streamtools.CONSUMER_LOOPS[KIND]("greetings")

        @consumer()
        async def greet(msg):
            return f"hello, {msg['name']}"

        async with consumer, streamtools.PRODUCERS[KIND]("greetings") as producer:
            print(await producer.request({"name": "world"}))
        await consumer.delete_queues()  # leave nothing behind on a broker

    asyncio.run(main())

Only the standard library is imported here; each transport imports its client
(aio-pika, aiokafka, nats-py, redis, aiohttp) when it is used.

License: MIT (see LICENSE). Copyright (c) 2026 the streamtools developers.
"""

from __future__ import annotations

__version__ = "1.1.0"
__all__ = [
    "ASYNCIO",
    "AsyncIOConsumerLoop",
    "AsyncIOProducer",
    "BINARY",
    "BatchSendError",
    "CONSUMERS",
    "CONSUMER_LOOPS",
    "ConfigError",
    "ConnectionFailed",
    "Consumer",
    "ConsumerFactory",
    "ConsumerRunner",
    "DecodeError",
    "EncodeError",
    "HEADERS_TAGS",
    "HTTP",
    "HTTPConsumer",
    "HTTPConsumerLoop",
    "HTTPError",
    "HTTPProducer",
    "HandleMsgs",
    "HandlerFactory",
    "Hook",
    "JSON",
    "KAFKA",
    "KafkaConsumer",
    "KafkaConsumerLoop",
    "KafkaProducer",
    "MEMORY",
    "MemoryConsumer",
    "MemoryProducer",
    "Message",
    "Metrics",
    "MissingDependency",
    "NATS",
    "NATSConsumer",
    "NATSProducer",
    "PRODUCERS",
    "Producer",
    "RABBITMQ",
    "REDIS",
    "RMQIOConsumerLoop",
    "RMQIOProducer",
    "RabbitMQConsumer",
    "RabbitMQProducer",
    "RedisConsumer",
    "RedisProducer",
    "RemoteError",
    "RequestTimeout",
    "SSI",
    "SendError",
    "StreamtoolsError",
    "TEXT",
    "Tracing",
    "UnknownOption",
    "UnknownTransport",
    "Unroutable",
    "bench",
    "current_message",
    "decode",
    "enable_metrics",
    "enable_tracing",
    "encode",
    "main",
    "prepare_aiohttp_app",
    "register_transport",
    "use",
]

import abc
import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import contextvars
import copy
import dataclasses
import functools
import hashlib
import hmac
import importlib
import inspect
import itertools
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    ClassVar,
    Iterable,
    Iterator,
    Mapping,
    Self,
    Sequence,
    TypeVar,
    overload,
)

if TYPE_CHECKING:  # pragma: no cover - names for annotations only
    import ssl

    import aio_pika
    from aiohttp import web

#: The library's logger; silent unless the application configures logging.
log = logging.getLogger("streamtools")
log.addHandler(logging.NullHandler())

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


###############################################################################
# Constants and settings ######################################################
###############################################################################

#: Transport names, kept from the legacy project (``PRODUCERS[MEMORY]``...).
MEMORY = ASYNCIO = "AsyncIOHandler"
RABBITMQ = "RMQIOHandler"
HTTP = "HTTPHandler"
KAFKA = "KafkaHandler"
NATS = "NATSHandler"
REDIS = "RedisHandler"

#: Content types a body is encoded with.
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"
SSI = "application/ssi-agent-wire"

#: The legacy ``headers_tag`` values and the content type each one means.
HEADERS_TAGS = {"JSON": JSON, "SSI": SSI, "TEXT": TEXT, "BINARY": BINARY}

_DEFAULT_PREFETCH = 64
_DEFAULT_MAX_RETRIES = 3
_DEFAULT_MAX_BODY = 1024 * 1024


def _setting(name: str, default: str) -> str:
    """Read a setting from the environment when an object is built, not at
    import, so a service (or a test) can set it late."""
    return os.environ.get(name) or default


def _number(name: str, value: Any, kind: type = float, minimum: float = 0,
            maximum: float | None = None) -> Any:
    """Check a numeric option and say what to fix when it is wrong."""
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")
    return number


def _port(name: str, value: Any, minimum: int = 0) -> int:
    """A TCP port number (0 picks a free one where that makes sense)."""
    port: int = _number(name, value, int, minimum, 65535)
    return port


def _check_queue_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a queue name must be a non-empty string, got {name!r}")
    if len(name) > 255 or any(c.isspace() or ord(c) < 32 for c in name):
        raise ConfigError(f"queue name {name!r} must be at most 255 characters without spaces")
    return name


def _redact(url: str) -> str:
    """``url`` with its password replaced, for logs and error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


###############################################################################
# Errors ######################################################################
###############################################################################


class StreamtoolsError(Exception):
    """Base class of every error streamtools raises."""


class ConfigError(StreamtoolsError, ValueError):
    """Bad configuration or argument; the message says what to fix."""


class UnknownOption(ConfigError, TypeError):
    """A producer or consumer was given an option its transport does not take."""


class UnknownTransport(ConfigError, KeyError):
    """A transport name that no registry knows; the message lists valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingDependency(StreamtoolsError, ImportError):
    """A transport's client library is not installed; names the package."""


class EncodeError(StreamtoolsError, TypeError):
    """A message body that cannot be encoded with the chosen content type."""


class DecodeError(StreamtoolsError, ValueError):
    """Bytes that do not decode as their content type says."""


class ConnectionFailed(StreamtoolsError, ConnectionError):
    """The transport could not connect (host and port named, never a password)."""


class SendError(StreamtoolsError):
    """The transport did not take responsibility for a message."""


class BatchSendError(SendError):
    """Some messages of a ``send_many`` were not sent; ``failed`` maps their
    indices to the errors. The others were sent."""

    def __init__(self, message: str, failed: dict[int, BaseException]) -> None:
        super().__init__(message)
        self.failed = failed


class Unroutable(SendError):
    """The broker had no queue to route the message to."""


class HTTPError(SendError):
    """An HTTP consumer answered with a status that is not 2xx."""

    def __init__(self, status: int, body: str, url: str = "") -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status} from {url or 'the consumer'}: {body}")


class RequestTimeout(StreamtoolsError, TimeoutError):
    """No reply arrived within the timeout."""


class RemoteError(StreamtoolsError):
    """The consumer's handler failed on a request; carries its error text."""


###############################################################################
# Messages: encoding and the envelope #########################################
###############################################################################

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _c_json_encode() -> Callable[[Any], str] | None:
    """The C encoder, made once. ``json.dumps`` and ``JSONEncoder.encode``
    make it again on every call: half their time on a small message. Without
    the circular-reference check (no markers), a cycle ends in RecursionError."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (PyPy)
        return None
    iterencode = make(None, _json_encoder.default, json.encoder.encode_basestring, None, ":", ",",
                      False, False, False)
    join = "".join

    def encode(value: Any) -> str:
        return join(iterencode(value, 0))

    return encode


#: A JSON value as compact text: UTF-8 (not \u-escaped), no NaN or Infinity.
_json_encode: Callable[[Any], str] = _c_json_encode() or _json_encoder.encode
_JSON_CONTAINERS = frozenset({dict, list})


def _is_json_type(content_type: str) -> bool:
    main = content_type.split(";", 1)[0].strip().lower()
    return main == JSON or main.endswith("+json") or main == SSI


def _content_type(headers_tag: str | None, content_type: str | None) -> str | None:
    if content_type:
        return content_type
    if headers_tag is None:
        return None
    try:
        return HEADERS_TAGS[headers_tag.upper()]
    except (KeyError, AttributeError):
        raise ConfigError(f"headers_tag must be one of {sorted(HEADERS_TAGS)}, got {headers_tag!r}") from None


def encode(body: Any, content_type: str | None = None) -> tuple[bytes, str]:
    """Encode a message body; return ``(data, content_type)``.

    Without ``content_type``: ``bytes`` travel as ``application/octet-stream``,
    ``str`` as UTF-8 text, any other JSON value as ``application/json``. A
    JSON-like ``content_type`` JSON-encodes the body (``bytes``, and a ``str``
    that is valid JSON text, are taken as already encoded).

    :raises EncodeError: the body does not fit the content type.
    """
    if content_type is None:
        if type(body) in _JSON_CONTAINERS:  # the common case, first
            return _to_json(body), JSON
        if isinstance(body, (bytes, bytearray, memoryview)):
            return bytes(body), BINARY
        if isinstance(body, str):
            return body.encode(), TEXT
        return _to_json(body), JSON
    if _is_json_type(content_type):
        if isinstance(body, (bytes, bytearray, memoryview)):
            return bytes(body), content_type
        if isinstance(body, str) and _is_json_text(body):  # json.dumps(...) already: never encoded twice
            return body.encode(), content_type
        return _to_json(body), content_type
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body), content_type
    if isinstance(body, str):
        return body.encode(_charset(content_type)), content_type
    raise EncodeError(f"{content_type} carries str or bytes, got {type(body).__name__}")


def _to_json(body: Any) -> bytes:
    try:
        return _json_encode(body).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise EncodeError(
            f"cannot encode {type(body).__name__} as JSON ({exc}); send a JSON value, str or bytes") from exc


def _is_json_text(text: str) -> bool:
    try:
        _json_decode(text)
    except ValueError:
        return False
    return True


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


_json_decoder = json.JSONDecoder()
#: The decoder's (C) scanner: ``(value, end)`` of the JSON value at an index.
_json_scan: Callable[[str, int], tuple[Any, int]] = _json_decoder.scan_once  # type: ignore[attr-defined]


def _json_decode(data: str | bytes) -> Any:
    """``json.loads`` for text or UTF-8: the scanner straight away, without the
    whitespace matching around it (a third of the time on a small message);
    anything the scanner does not take exactly goes through the full decoder,
    for the same value or the same error."""
    text = data if isinstance(data, str) else data.decode()  # JSON on the wire is UTF-8 (RFC 8259)
    try:
        value, end = _json_scan(text, 0)
    except StopIteration:  # empty, or leading whitespace, or not JSON
        return _json_decoder.decode(text)
    if end == len(text):
        return value
    return _json_decoder.decode(text)  # trailing whitespace, or extra data


def _decoder(content_type: str) -> Callable[[bytes], Any]:
    decoder = _decoders.get(content_type)
    if decoder is None:
        main = content_type.split(";", 1)[0].strip().lower()
        if _is_json_type(main):
            decoder = _json_decode
        elif main.startswith("text/"):
            charset = _charset(content_type)
            decoder = lambda data: data.decode(charset)  # noqa: E731
        else:
            decoder = bytes
        if len(_decoders) < 256:  # content types come from the wire: keep the cache bounded
            _decoders[content_type] = decoder
    return decoder


_decoders: dict[str, Callable[[bytes], Any]] = {}


def decode(data: bytes, content_type: str | None) -> Any:
    """Decode bytes by content type, the inverse of :func:`encode`.

    :raises DecodeError: the bytes are not what the content type says.
    """
    try:
        # The cache looked up here first: a call less on every message received.
        return (_decoders.get(content_type) or _decoder(content_type or ""))(data)  # type: ignore[arg-type]
    except (ValueError, LookupError) as exc:  # JSONDecodeError, UnicodeDecodeError, bad charset
        raise DecodeError(f"body is not valid {content_type}: {exc}") from None


@dataclasses.dataclass(slots=True, kw_only=True, eq=False)
class Message:
    """The envelope of a message a handler is working on.

    Read it with :func:`current_message` inside a handler. ``body`` is the
    decoded body, ``data`` the bytes on the wire, ``attempt`` counts deliveries
    (1 the first time), ``redelivered`` tells whether the transport gave it
    before. ``correlation_id`` and ``reply_to`` are set on requests. ``raw``
    is the transport's own message object (aiormq ``DeliveredMessage``,
    aiohttp ``Request``, aiokafka ``ConsumerRecord``...), for what the
    envelope does not carry; settling it is streamtools' job.
    ``transport`` names the transport that carries it.
    """

    body: Any = None
    data: bytes = b""
    content_type: str = BINARY
    headers: dict[str, Any] = dataclasses.field(default_factory=dict)
    id: str = ""
    queue: str = ""
    correlation_id: str | None = None
    reply_to: str | None = None
    attempt: int = 1
    redelivered: bool = False
    raw: Any = None
    #: The registry name of the transport that carries it.
    transport: str = ""

    def __repr__(self) -> str:
        return f"<Message {self.id} queue={self.queue!r} attempt={self.attempt} {self.content_type}>"


_current: contextvars.ContextVar[Message] = contextvars.ContextVar("streamtools_message")


def current_message() -> Message:
    """The :class:`Message` whose handler is running.

    :raises LookupError: called outside a handler.
    """
    try:
        return _current.get()
    except LookupError:
        raise LookupError("current_message() is only available while a handler runs") from None


# Message ids: a random per-process prefix and a counter, unique and far
# cheaper than uuid4 on the hot path. A forked child draws a new prefix.
def _reset_ids() -> None:
    global _ids
    # The formatting runs in C (map over a count): half the cost of an f-string per id.
    _ids = map(f"{os.urandom(6).hex()}-%x".__mod__, itertools.count(1))


_ids: Iterator[str] = iter(())
_reset_ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_ids)


def _new_id() -> str:
    return next(_ids)


#: Header of a request: when (epoch milliseconds) its requester stops
#: waiting. A consumer drops a request found after that, unhandled.
_EXPIRES = "x-expires-at"


#: Header naming the headers whose values are not strings; they travel as
#: JSON text on transports whose headers are strings or bytes only.
_TYPED = "x-st-json"


def _flat_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """Headers as strings, for Kafka, NATS and Redis; :func:`_typed_headers` undoes it."""
    flat: dict[str, str] = {}
    typed = []
    for key, value in headers.items():
        if isinstance(value, str):
            flat[key] = value
        else:
            flat[key] = _json_encode(value)
            typed.append(key)
    if typed:
        flat[_TYPED] = ",".join(typed)
    return flat


def _typed_headers(flat: dict[str, Any]) -> dict[str, Any]:
    typed = flat.pop(_TYPED, None)
    if typed:
        for key in typed.split(","):
            try:
                flat[key] = _json_decode(flat[key])
            except (KeyError, ValueError):
                pass
    return flat


def _reply_payload(result: Any, error: str | None) -> tuple[bytes, str, dict[str, Any]]:
    """The wire form of a reply: the handler's return value, or its error."""
    headers: dict[str, Any] = {} if error is None else {"x-error": error}
    if _tracing is not None:  # the reply joins the handling's trace
        _tracing.inject(headers)
    if error is not None:
        return b"", TEXT, headers
    data, content_type = encode(result)
    return data, content_type, headers


def _reply_value(data: bytes, content_type: str, headers: Mapping[str, Any], queue: str) -> Any:
    """What ``request()`` returns for a reply, or the consumer's error."""
    error = headers.get("x-error")
    if error is not None:
        raise RemoteError(f"the consumer of {queue!r} failed: {error}")
    return decode(data, content_type)


###############################################################################
# Shared machinery: lazy imports, retries, flags ##############################
###############################################################################

_quiet = logging.NullHandler()


def _require(module: str, package: str, *loggers: str) -> Any:
    """Import a transport's client library, or say which package installs it.

    The client's loggers (``module`` and ``loggers``) get a ``NullHandler``:
    an application that configured no logging hears nothing from them, as
    from streamtools, instead of tracebacks through logging's last resort.
    """
    try:
        client = importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"this transport needs the {package} package: pip install {package}") from exc
    for name in (module.partition(".")[0], *loggers):
        logging.getLogger(name).addHandler(_quiet)  # idempotent: the same handler object
    return client


async def _resolve(host: str, port: int, what: str) -> None:
    """Fail at once on a host name that does not resolve: retrying a typo
    for the whole connect timeout only hides it."""
    try:
        await asyncio.get_running_loop().getaddrinfo(host, port)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise ConnectionFailed(f"{what}: host {host!r} does not resolve ({exc.strerror})") from None
        # EAI_AGAIN and the like may pass: let the connect retries see them.


def _backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter, so retrying clients do not march in step."""
    return min(cap, base * 2.0 ** (attempt - 1)) * (0.5 + random.random() / 2)


async def _retry(operation: Callable[[], Awaitable[Any]], *, what: str,
                 retry_on: tuple[type[BaseException], ...],
                 fatal: tuple[type[BaseException], ...] = (),
                 attempts: int | None = None, deadline: float | None = None,
                 base: float = 0.1, cap: float = 5.0, failed: BaseException | None = None) -> Any:
    """Run ``operation`` until it succeeds, retrying ``retry_on`` errors with
    backoff, at most ``attempts`` times or until the monotonic ``deadline``;
    then the last error propagates. ``fatal`` errors are never retried.
    ``failed`` is the error of a first attempt the caller made itself (a hot
    path spared this coroutine), counted as attempt 1."""
    attempt = 0
    while True:
        attempt += 1
        if failed is None:
            try:
                return await operation()
            except fatal:
                raise
            except retry_on as exc:
                failed = exc
        error, failed = failed, None
        delay = _backoff(attempt, base, cap)
        if attempts is not None and attempt >= attempts:
            raise error
        if deadline is not None:  # the last try comes at the deadline, not before it
            delay = min(delay, deadline - time.monotonic())
            if delay <= 0:
                raise error
        log.warning("%s failed (%s: %s); retry %d in %.2fs", what, type(error).__name__, error, attempt, delay)
        await asyncio.sleep(delay)


#: Every per-message flag some registered transport takes (see register_transport).
_known_flags: set[str] = set()


def _check_flags(flags: dict[str, Any], own: frozenset[str], what: str) -> dict[str, Any]:
    unknown = set(flags) - _known_flags - own
    if unknown:
        raise ConfigError(f"{what} got unknown flag(s) {sorted(unknown)}; it takes {sorted(own) or 'none'}")
    return {k: v for k, v in flags.items() if k in own}


###############################################################################
# Observability: hooks, metrics, tracing ######################################
###############################################################################


class Hook:
    """Code that runs around each send and each handling, on every transport.

    Subclass it and override what you need; register an instance with
    :func:`use` (every producer and consumer) or ``producer.use(hook)`` /
    ``consumer.use(hook)`` (that one). ``on_send`` runs before the message
    goes out, so it may add headers; ``on_handle`` runs before the handler,
    and an exception it raises fails that attempt as the handler's would.
    What ``on_send``/``on_handle`` return comes back as ``token``.

    Outcomes of a handling: ``"ok"``, ``"retried"`` (failed, tried again
    later), ``"dead_lettered"`` (failed for the last time), ``"failed"``
    (failed where the caller sees it: HTTP's 500), ``"expired"`` (a request
    whose requester stopped waiting, dropped unhandled).
    """

    def on_send(self, message: Message) -> Any:
        """Before ``message`` is sent (``message.queue`` says where)."""

    def on_sent(self, message: Message, token: Any, duration: float, error: BaseException | None) -> None:
        """After the transport took it (``error`` None) or did not."""

    def on_handle(self, message: Message) -> Any:
        """Before an attempt of the handler on ``message`` (``message.attempt``)."""

    def on_handled(self, message: Message, token: Any, outcome: str, duration: float,
                   error: BaseException | None) -> None:
        """After the attempt, with its outcome (``token`` is None if an
        ``on_handle`` raised before this hook's ran)."""

    def on_connection(self, transport: str, where: str, event: str) -> None:
        """A broker connection was ``"lost"`` or ``"restored"``."""


#: Hooks every producer and consumer runs (see :func:`use`).
_global_hooks: list[Hook] = []


def use(hook: Hook) -> Hook:
    """Run ``hook`` around every send and handling of every producer and
    consumer, on every transport; returns it.

    :raises ConfigError: ``hook`` is not a :class:`Hook`.
    """
    if not isinstance(hook, Hook):
        raise ConfigError(f"use() takes a streamtools.Hook, got {hook!r}")
    if hook not in _global_hooks:
        _global_hooks.append(hook)
    return hook


def _connection_event(transport: str, where: str, event: str) -> None:
    log.info("connection to %s at %s %s", transport, where,
             "lost; reconnecting" if event == "lost" else "restored; consumers resume")
    for hook in _global_hooks:
        try:
            hook.on_connection(transport, where, event)
        except Exception:
            log.exception("hook %r failed", hook)


# The hooks run inline, with no helper call per hook: with metrics on, each message passes here twice.

def _before_sending(hooks: list[Hook], message: Message) -> list[Any]:
    tokens = []
    for hook in hooks:
        try:
            tokens.append(hook.on_send(message))
        except Exception:
            log.exception("hook %r failed in on_send", hook)
            tokens.append(None)
    return tokens


def _after_sending(hooks: list[Hook], tokens: list[Any], message: Message, began: float,
                   error: BaseException | None) -> None:
    duration = time.perf_counter() - began
    for hook, token in zip(hooks, tokens):
        try:
            hook.on_sent(message, token, duration, error)
        except Exception:
            log.exception("hook %r failed in on_sent", hook)


def _after_handling(hooks: list[Hook], tokens: list[Any], message: Message, outcome: str, began: float,
                    error: BaseException | None) -> None:
    duration = time.perf_counter() - began
    known = len(tokens)
    for i, hook in enumerate(hooks):
        try:  # the token is None where on_handle raised, or after it
            hook.on_handled(message, tokens[i] if i < known else None, outcome, duration, error)
        except Exception:
            log.exception("hook %r failed in on_handled", hook)


def _handled_at_once(hooks: list[Hook], message: Message, outcome: str, error: BaseException | None) -> None:
    """A message settled without running the handler (expired, undecodable)."""
    tokens = [_safely(hook, "on_handle", message) for hook in hooks]
    _after_handling(hooks, tokens, message, outcome, time.perf_counter(), error)


def _safely(hook: Hook, method: str, *args: Any) -> Any:
    """A hook's failure is logged, never lost messages or a failed send."""
    try:
        return getattr(hook, method)(*args)
    except Exception:
        log.exception("hook %r failed in %s", hook, method)
        return None


#: The histograms' bucket bounds (prometheus_client's defaults), in seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _Counts:
    """What :class:`Metrics` counted for one queue and transport."""

    __slots__ = ("sent_ok", "sent_error", "in_flight", "failed", "retried", "dead_lettered", "handled",
                 "send_seconds", "handle_seconds")

    def __init__(self) -> None:
        self.sent_ok = self.sent_error = self.in_flight = self.failed = self.retried = self.dead_lettered = 0
        self.handled: dict[str, int] = {}
        #: A histogram: the sum of the observations, then a count per bucket (the last one: above all bounds).
        self.send_seconds: list[float] = [0.0] * (len(_BUCKETS) + 2)
        self.handle_seconds: list[float] = [0.0] * (len(_BUCKETS) + 2)


class Metrics(Hook):
    """Prometheus metrics of every send and handling (``prometheus_client``
    is imported when this is made). Turn it on with :func:`enable_metrics`
    or ``STREAMTOOLS_METRICS=1``; ``ConsumerRunner`` serves ``GET /metrics``.

    It is a collector: the hooks add to plain numbers under one lock, and a
    scrape turns them into samples. prometheus_client's own metric objects
    took a lock and several calls for each of the eight values a message
    touches, which cost 12% of RabbitMQ's throughput.
    """

    def __init__(self, registry: Any = None) -> None:
        prometheus = _require("prometheus_client", "prometheus-client")
        self._families = importlib.import_module("prometheus_client.core")
        self._bound = [*map(importlib.import_module("prometheus_client.utils").floatToGoString, _BUCKETS), "+Inf"]
        self.registry = registry
        self._counts: dict[tuple[str, str], _Counts] = {}
        self._reconnections: dict[str, int] = {}
        self._lock = threading.Lock()  # hooks may run on event loops of several threads
        (registry if registry is not None else prometheus.REGISTRY).register(self)

    def _of(self, message: Message) -> _Counts:
        counts = self._counts.get((message.queue, message.transport))
        if counts is None:
            counts = self._counts.setdefault((message.queue, message.transport), _Counts())
        return counts

    def on_send(self, message: Message) -> Any:
        return None

    def on_sent(self, message: Message, token: Any, duration: float, error: BaseException | None) -> None:
        counts = self._of(message)
        with self._lock:
            if error is None:
                counts.sent_ok += 1
                histogram = counts.send_seconds
                histogram[0] += duration
                histogram[1 + bisect.bisect_left(_BUCKETS, duration)] += 1
            else:
                counts.sent_error += 1

    def on_handle(self, message: Message) -> Any:
        counts = self._of(message)
        with self._lock:
            counts.in_flight += 1
        return True

    def on_handled(self, message: Message, token: Any, outcome: str, duration: float,
                   error: BaseException | None) -> None:
        counts = self._of(message)
        with self._lock:
            if token:
                counts.in_flight -= 1
            counts.handled[outcome] = counts.handled.get(outcome, 0) + 1
            histogram = counts.handle_seconds
            histogram[0] += duration
            histogram[1 + bisect.bisect_left(_BUCKETS, duration)] += 1
            if error is not None:
                counts.failed += 1
            if outcome == "retried":
                counts.retried += 1
            elif outcome == "dead_lettered":
                counts.dead_lettered += 1

    def on_connection(self, transport: str, where: str, event: str) -> None:
        if event == "restored":
            with self._lock:
                self._reconnections[transport] = self._reconnections.get(transport, 0) + 1

    def collect(self) -> Iterator[Any]:
        """The samples, for prometheus_client's registry (a scrape)."""
        families, labels = self._families, ["queue", "transport"]
        sent = families.CounterMetricFamily("streamtools_messages_sent", "Messages sent, by outcome (ok or error).",
                                            labels=[*labels, "outcome"])
        handled = families.CounterMetricFamily(
            "streamtools_messages_handled", "Handler attempts, by outcome (ok, retried, dead_lettered, failed, "
            "expired).", labels=[*labels, "outcome"])
        failed = families.CounterMetricFamily("streamtools_messages_failed", "Handler attempts that raised.",
                                              labels=labels)
        retried = families.CounterMetricFamily("streamtools_messages_retried", "Messages given another attempt.",
                                               labels=labels)
        dead_lettered = families.CounterMetricFamily("streamtools_messages_dead_lettered",
                                                     "Messages moved to the dead-letter queue.", labels=labels)
        reconnections = families.CounterMetricFamily("streamtools_reconnections", "Broker connections restored.",
                                                     labels=["transport"])
        send_seconds = families.HistogramMetricFamily(
            "streamtools_send_seconds", "Seconds until the transport took a message (confirm latency).", labels=labels)
        handle_seconds = families.HistogramMetricFamily("streamtools_handle_seconds",
                                                        "Seconds a handler attempt took.", labels=labels)
        in_flight = families.GaugeMetricFamily("streamtools_handlers_in_flight", "Handlers running now.",
                                               labels=labels)
        with self._lock:
            for (queue, transport), counts in self._counts.items():
                key = [queue, transport]
                sent.add_metric([*key, "ok"], counts.sent_ok)
                sent.add_metric([*key, "error"], counts.sent_error)
                for outcome, number in counts.handled.items():
                    handled.add_metric([*key, outcome], number)
                failed.add_metric(key, counts.failed)
                retried.add_metric(key, counts.retried)
                dead_lettered.add_metric(key, counts.dead_lettered)
                in_flight.add_metric(key, counts.in_flight)
                for family, histogram in ((send_seconds, counts.send_seconds),
                                          (handle_seconds, counts.handle_seconds)):
                    family.add_metric(key, list(zip(self._bound, itertools.accumulate(histogram[1:]))),
                                      histogram[0])
            for transport, number in self._reconnections.items():
                reconnections.add_metric([transport], number)
        yield from (sent, handled, failed, retried, dead_lettered, reconnections, send_seconds, handle_seconds,
                    in_flight)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        prometheus = _require("prometheus_client", "prometheus-client")
        registry = self.registry if self.registry is not None else prometheus.REGISTRY
        return prometheus.generate_latest(registry), prometheus.CONTENT_TYPE_LATEST


_metrics: Metrics | None = None


def enable_metrics(registry: Any = None) -> Metrics:
    """Count every send and handling in Prometheus metrics (names
    ``streamtools_messages_sent_total``, ``..._handled_total``, ``..._failed_total``,
    ``..._retried_total``, ``..._dead_lettered_total``, ``streamtools_reconnections_total``,
    ``streamtools_send_seconds``, ``streamtools_handle_seconds``,
    ``streamtools_handlers_in_flight``). Idempotent; returns the hook.

    :param registry: a ``prometheus_client.CollectorRegistry`` (default: the global one).
    :raises MissingDependency: ``prometheus_client`` is not installed.
    """
    global _metrics
    if _metrics is None:
        _metrics = Metrics(registry)
        use(_metrics)
    return _metrics


#: OpenTelemetry's ``messaging.system`` of each transport.
_MESSAGING_SYSTEMS = {MEMORY: "memory", RABBITMQ: "rabbitmq", HTTP: "http", KAFKA: "kafka", NATS: "nats",
                      REDIS: "redis"}


class Tracing(Hook):
    """OpenTelemetry spans: one per send (kind PRODUCER) and per handling
    (kind CONSUMER, the child of the send's span, across processes: the W3C
    ``traceparent`` travels in the message headers), named and attributed
    by the messaging conventions; exceptions are recorded on the span.
    Turned on by itself when the application imported OpenTelemetry and
    configured a tracer provider."""

    def __init__(self) -> None:
        self._trace = importlib.import_module("opentelemetry.trace")
        self._propagate = importlib.import_module("opentelemetry.propagate")
        self._context = importlib.import_module("opentelemetry.context")
        self._tracer = self._trace.get_tracer("streamtools", __version__)

    def _attributes(self, message: Message, transport: str, operation: str) -> dict[str, Any]:
        return {"messaging.system": _MESSAGING_SYSTEMS.get(transport, transport.lower()),
                "messaging.destination.name": message.queue, "messaging.operation.type": operation,
                "messaging.message.id": message.id}

    def on_send(self, message: Message) -> Any:
        span = self._tracer.start_span(f"send {message.queue}", kind=self._trace.SpanKind.PRODUCER,
                                       attributes=self._attributes(message, message.transport, "send"))
        self._propagate.inject(message.headers, context=self._trace.set_span_in_context(span))
        return span

    def on_sent(self, message: Message, token: Any, duration: float, error: BaseException | None) -> None:
        if error is not None:
            token.record_exception(error)
            token.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
        token.end()

    def on_handle(self, message: Message) -> Any:
        carrier = {k: v for k, v in message.headers.items() if isinstance(v, str)}
        parent = self._propagate.extract(carrier)
        span = self._tracer.start_span(f"process {message.queue}", context=parent, kind=self._trace.SpanKind.CONSUMER,
                                       attributes=self._attributes(message, message.transport, "process"))
        span.set_attribute("messaging.message.delivery_attempt", message.attempt)
        # Current while the handler runs: its own sends, and the reply, join this trace.
        return span, self._context.attach(self._trace.set_span_in_context(span))

    def on_handled(self, message: Message, token: Any, outcome: str, duration: float,
                   error: BaseException | None) -> None:
        if token is None:
            return
        span, attached = token
        span.set_attribute("streamtools.outcome", outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
        self._context.detach(attached)
        span.end()

    def inject(self, headers: dict[str, Any]) -> None:
        self._propagate.inject(headers)


_tracing: Tracing | None = None
_observed = False


def enable_tracing() -> Tracing:
    """Trace every send and handling with OpenTelemetry (the tracer provider
    the application configured). Done by itself when the first producer or
    consumer is made after the application configured one. Idempotent.

    :raises MissingDependency: ``opentelemetry-api`` is not installed.
    """
    global _tracing
    if _tracing is None:
        _require("opentelemetry.trace", "opentelemetry-api")
        _tracing = Tracing()
        use(_tracing)
    return _tracing


def _observe() -> None:
    """Once, when the first producer or consumer is made: metrics if
    ``STREAMTOOLS_METRICS=1``; tracing if the application imported
    OpenTelemetry and configured a tracer provider (nothing is imported otherwise)."""
    global _observed
    _observed = True
    if os.environ.get("STREAMTOOLS_METRICS") == "1":
        enable_metrics()
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None and _tracing is None:
        provider = trace.get_tracer_provider()
        if type(provider).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
            enable_tracing()


###############################################################################
# Base classes ################################################################
###############################################################################


class _Endpoint(abc.ABC):
    """What producers and consumers share: a queue name, the transport's
    facts, options checked once, and a connection made once however many
    callers ask for it at the same time.

    A transport declares its facts as class attributes (read by the
    registries, the CLI, the helpers and the tests) and takes its own options
    as keyword parameters of ``_setup``.
    """

    #: The registry name of the transport (set by :func:`register_transport`).
    transport: ClassVar[str] = ""
    #: The client library the transport imports, and the pip package with it.
    client: ClassVar[tuple[str, str] | None] = None
    #: True where a broker stores messages between producer and consumer
    #: (a message waits for a consumer; retries and dead letters apply).
    brokered: ClassVar[bool] = True
    #: True where messages never leave the process (the memory transport).
    in_process: ClassVar[bool] = False
    #: The option that takes the broker's address (the CLI's ``--url``).
    address_option: ClassVar[str | None] = None
    #: Whether ``Message.redelivered`` tells a message given before (Kafka cannot).
    tells_redelivery: ClassVar[bool] = True

    def __init__(self, queue_name: str = "", queues_labels: Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        if queues_labels is not None:  # legacy: {label: {"queue": wire_name, ...}}
            if not isinstance(queues_labels, Mapping):
                raise ConfigError(f"queues_labels must be a dict of {{label: {{'queue': name}}}}, "
                                  f"got {type(queues_labels).__name__}")
            label = queues_labels.get(queue_name)
            if isinstance(label, Mapping) and label.get("queue"):
                queue_name = label["queue"]
        self.queue_name = self._check_name(queue_name)
        self.agent_keys: dict[str, str] = {}
        self._hooks: list[Hook] = []
        if not _observed:
            _observe()
        self._ready = False
        self._init_lock: asyncio.Lock | None = None  # made in a_init: no event loop is needed before
        unknown = set(options) - self.option_names()
        if unknown:
            raise UnknownOption(f"{type(self).__name__} got unknown option(s) {sorted(unknown)}; "
                                f"it takes {sorted(self.option_names()) or 'none'}")
        self._setup(**options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.queue_name!r}>"

    def _check_name(self, queue_name: Any) -> str:
        return _check_queue_name(queue_name)

    def use(self, hook: Hook) -> Hook:
        """Run ``hook`` around this producer's sends or this consumer's handling."""
        if not isinstance(hook, Hook):
            raise ConfigError(f"use() takes a streamtools.Hook, got {hook!r}")
        self._hooks.append(hook)
        return hook

    def add_agent_uuid(self, **keys: str) -> None:
        """Legacy: take the agent's ids, by transport type (``RabbitMQ=...``,
        ``HTTP=...``). RabbitMQ suffixes its queue name with the first five
        characters of its id, as the legacy library did; call it before
        ``a_init()``."""
        self.agent_keys.update(keys)

    def _setup(self) -> None:
        """Take the transport's own options (keyword parameters with defaults).
        One that extends another's takes ``**options`` and passes them on."""

    @classmethod
    @functools.cache
    def option_names(cls) -> frozenset[str]:
        """The transport options this class takes (its ``_setup`` keywords)."""
        names: set[str] = set()
        for klass in cls.__mro__:
            setup = klass.__dict__.get("_setup")
            if setup is None:
                continue
            params = inspect.signature(setup).parameters.values()
            names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                         and p.name != "self")
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        return frozenset(names)

    @classmethod
    def _client(cls, module: str | None = None) -> Any:
        """The transport's client library (or one of its modules), imported now."""
        if cls.client is None:
            raise ConfigError(f"{cls.__name__} declares no client library")
        return _require(module or cls.client[0], cls.client[1])

    async def a_init(self) -> None:
        """Connect (and declare what the transport needs). Idempotent and
        safe to call concurrently; ``send`` and ``start`` call it."""
        if self._ready:
            return
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if not self._ready:
                await self._connect()
                self._ready = True

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Connect and declare the queue; raise ConnectionFailed otherwise."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Release what ``_connect`` took; bounded in time, never raises."""


_ReplyFuture = asyncio.Future[tuple[bytes, str, dict[str, Any]]]


class Producer(_Endpoint):
    """Sends messages to one queue. A transport writes its wire in
    ``_publish`` and, for request/reply, ``_reply_address``.

    :param queue_name: the queue (RabbitMQ), route (HTTP) or in-process queue.
    """

    #: Per-message flags ``send`` takes on this transport (others' are ignored).
    send_flags: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, queue_name: str = "", queues_labels: Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(queue_name, queues_labels, **options)
        self._replies: dict[str, _ReplyFuture] = {}
        self._replies_ready: asyncio.Future[str] | None = None
        self._closed = False

    def _message(self, msg: Any, headers_tag: str | None, header_tag: str | None,
                 content_type: str | None, headers: Mapping[str, Any] | None,
                 message_id: str | None) -> Message:
        if content_type is None and headers_tag is None and header_tag is None and type(msg) in _JSON_CONTAINERS:
            try:  # the common case, first, without encode()'s calls
                data, ctype = _json_encode(msg).encode(), JSON
            except (TypeError, ValueError, RecursionError):
                data, ctype = _to_json(msg), JSON  # raises the EncodeError
        else:
            data, ctype = encode(msg, _content_type(headers_tag or header_tag, content_type))
        return Message(body=msg, data=data, content_type=ctype, headers=dict(headers) if headers else {},
                       id=message_id or next(_ids), queue=self.queue_name)  # next(): _new_id() without its call

    async def _ensure_open(self) -> None:
        if self._closed:
            raise SendError(f"{self!r} is closed; create a new producer to send again")
        await self.a_init()

    async def send(self, msg: Any, *legacy: Any, headers_tag: str | None = None, header_tag: str | None = None,
                   content_type: str | None = None, headers: Mapping[str, Any] | None = None,
                   message_id: str | None = None, timeout: float | None = None,
                   **flags: Any) -> Any:
        """Send ``msg`` and return once the transport took responsibility for it.

        :param msg: any JSON value, ``str`` or ``bytes``.
        :param headers_tag: legacy content type name, ``"JSON"`` or ``"SSI"``
            (``header_tag``, as the legacy README spells it, works too).
        :param content_type: an explicit content type; wins over ``headers_tag``.
        :param headers: extra headers carried with the message.
        :param timeout: seconds to wait for the transport to accept it.
        :param legacy: the legacy positional ``method, endpoint, headers_tag``.
        :return: the reply on synchronous transports (HTTP), else ``None``.
        :raises SendError: the message was not accepted; nothing is dropped silently.
        """
        if legacy:
            if len(legacy) > 3:
                raise ConfigError("send() takes at most method, endpoint and headers_tag positionally")
            for name, value in zip(("method", "endpoint"), legacy):
                if value is not None:
                    flags.setdefault(name, value)
            headers_tag = headers_tag or (legacy[2] if len(legacy) == 3 else None)
        if flags:
            flags = _check_flags(flags, self.send_flags, f"{type(self).__name__}.send()")
        if timeout is not None:
            timeout = _number("timeout", timeout, float, 0.001)
        message = self._message(msg, headers_tag, header_tag, content_type, headers, message_id)
        if not self._ready:
            await self._ensure_open()
        if self._hooks or _global_hooks:
            return await self._observed(self._publish, message, timeout, flags)
        if flags:
            return await self._publish(message, timeout, **flags)
        return await self._publish(message, timeout)

    async def _observed(self, publish: Callable[..., Awaitable[Any]], message: Message, timeout: Any,
                        flags: dict[str, Any]) -> Any:
        """``publish`` with the hooks around it."""
        message.transport = self.transport
        hooks = [*_global_hooks, *self._hooks]
        tokens = _before_sending(hooks, message)
        began, error = time.perf_counter(), None
        try:
            return await publish(message, timeout, **flags)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _after_sending(hooks, tokens, message, began, error)

    async def request(self, msg: Any, timeout: float = 5.0, *, headers_tag: str | None = None,
                      header_tag: str | None = None, content_type: str | None = None,
                      headers: Mapping[str, Any] | None = None, **flags: Any) -> Any:
        """Send ``msg`` and return the handler's return value. The request
        expires with ``timeout``: a consumer that finds it later drops it.

        :raises RequestTimeout: no reply within ``timeout`` seconds.
        :raises RemoteError: the handler failed on every attempt.
        """
        if flags:
            flags = _check_flags(flags, self.send_flags, f"{type(self).__name__}.request()")
        timeout = _number("timeout", timeout, float, 0.001)
        message = self._message(msg, headers_tag, header_tag, content_type, headers, None)
        message.correlation_id = message.id
        message.headers[_EXPIRES] = int((time.time() + timeout) * 1000)
        if not self._ready:
            await self._ensure_open()
        if self._hooks or _global_hooks:
            return await self._observed(self._request, message, timeout, flags)
        return await self._request(message, timeout, **flags)

    async def send_many(self, messages: Iterable[Any], *, headers_tag: str | None = None,
                        content_type: str | None = None, headers: Mapping[str, Any] | None = None,
                        timeout: float | None = None, **flags: Any) -> list[Any]:
        """Send every message of ``messages``, pipelined, and return once each
        one is confirmed (the results of ``send``, in order). The keywords
        apply to each message. Every message is encoded before any is sent.

        :raises BatchSendError: some were not sent; its ``failed`` maps their
            indices to the errors, and every other message was sent.
        """
        if flags:
            flags = _check_flags(flags, self.send_flags, f"{type(self).__name__}.send_many()")
        if timeout is not None:
            timeout = _number("timeout", timeout, float, 0.001)
        batch = [self._message(body, headers_tag, None, content_type, headers, None) for body in messages]
        if not self._ready:
            await self._ensure_open()
        hooks = [*_global_hooks, *self._hooks]
        if hooks:
            for message in batch:
                message.transport = self.transport
            tokens = [_before_sending(hooks, message) for message in batch]
            began = time.perf_counter()
        results = await self._publish_many(batch, timeout, **flags)
        if hooks:
            for message, result, sent_tokens in zip(batch, results, tokens):
                _after_sending(hooks, sent_tokens, message, began, result if isinstance(result, BaseException) else None)
        failed = {i: result for i, result in enumerate(results) if isinstance(result, BaseException)}
        if failed:
            first = next(iter(failed.values()))
            raise BatchSendError(f"{len(failed)} of {len(batch)} messages to {self.queue_name!r} were not sent "
                                 f"(indices {sorted(failed)[:20]}{'...' if len(failed) > 20 else ''}): {first}",
                                 failed)
        return results

    async def _publish_many(self, batch: list[Message], timeout: float | None, **flags: Any) -> list[Any]:
        """Publish a batch; each result or exception in order. By default the
        sends run concurrently, so their confirms pipeline."""
        return await asyncio.gather(*(self._publish(m, timeout, **flags) for m in batch), return_exceptions=True)

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        """Publish with a reply address and wait for the reply the transport
        hands to ``_on_reply``. Synchronous transports override this."""
        future: _ReplyFuture = asyncio.get_running_loop().create_future()
        self._replies[message.id] = future
        try:
            async with asyncio.timeout(timeout):
                message.reply_to = await self._reply_address()
                await self._publish(message, timeout, **flags)
                data, ctype, headers = await future
        except TimeoutError:
            raise RequestTimeout(f"no reply from queue {self.queue_name!r} within {timeout}s") from None
        finally:
            self._replies.pop(message.id, None)
        return _reply_value(data, ctype, headers, self.queue_name)

    def _on_reply(self, correlation_id: str | None, data: bytes, content_type: str,
                  headers: dict[str, Any]) -> None:
        """Hand a reply to the request waiting for it; a late one is dropped."""
        future = self._replies.get(correlation_id or "")
        if future is not None and not future.done():
            future.set_result((data, content_type, headers))

    async def close(self) -> None:
        """Release connections. Idempotent; the producer cannot send afterwards."""
        self._closed = True
        if self._ready:
            self._ready = False
            await self._disconnect()

    async def __aenter__(self) -> Self:
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @abc.abstractmethod
    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> Any:
        """Hand ``message`` to the transport; return once it took
        responsibility (or the reply, on synchronous transports), else raise
        SendError. ``flags`` are this transport's ``send_flags``."""

    async def _reply_address(self) -> str:
        """Where replies to this producer's requests go: the address from the
        transport's ``_listen_for_replies()``, which runs once however many
        first requests come at the same time (and again after it failed)."""
        ready = self._replies_ready
        if ready is None or (ready.done() and not ready.cancelled() and ready.exception() is not None):
            ready = self._replies_ready = asyncio.ensure_future(self._listen_for_replies())
        return await asyncio.shield(ready)

    async def _listen_for_replies(self) -> str:
        """Start listening for replies (handing each to ``_on_reply``); return the address."""
        raise ConfigError(f"{type(self).__name__} does not support request()")


_Handler = Callable[[Any], Awaitable[Any]]


def _is_method_in_class_body(fn: Any) -> bool:
    """A plain function defined in a class body whose first parameter is
    ``self``: decorated there (legacy ``in_class``), it has no instance yet."""
    if not inspect.isfunction(fn) or "." not in fn.__qualname__:
        return False
    if fn.__qualname__.rsplit(".", 2)[-2] == "<locals>":
        return False
    params = list(inspect.signature(fn).parameters)
    return len(params) >= 2 and params[0] == "self"


class _BindsToInstance:
    """A handler decorated in its class body (legacy ``in_class``): when the
    class is instantiated, the consumer gets the method bound to that
    instance (the newest one wins). Until then ``start()`` says what is missing."""

    def __init__(self, consumer: Consumer, key: str, fn: Callable[..., Any]) -> None:
        self.consumer, self.key, self.fn = consumer, key, fn
        consumer._unbound[key] = fn

    def __set_name__(self, owner: type, name: str) -> None:
        init, binder = owner.__init__, self  # type: ignore[misc]

        @functools.wraps(init)
        def __init__(instance: Any, *args: Any, **kwargs: Any) -> None:
            init(instance, *args, **kwargs)
            binder.consumer._unbound.pop(binder.key, None)
            binder.consumer._add_handler(binder.key, getattr(instance, name))

        owner.__init__ = __init__  # type: ignore[misc]

    def __get__(self, instance: Any, owner: Any) -> Any:
        return self.fn if instance is None else self.fn.__get__(instance, owner)


def _consume_loop_when_called_bare(consumer: Consumer, fn: _F) -> _F:
    """Legacy: the decorator returned the consume loop, so services ran
    ``await handler()``. Called with a message, it is the handler itself."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def entry(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                return await consumer._consume_forever()
            return await fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                return consumer._consume_forever()
            return fn(*args, **kwargs)
    entry._streamtools_handler = fn  # type: ignore[attr-defined]
    return entry  # type: ignore[return-value]


def _as_handler(fn: Callable[..., Any], queue: str) -> _Handler:
    """Check that ``fn`` takes the message, and make it awaitable: a plain
    ``def`` runs in a worker thread so it cannot block the event loop."""
    if not callable(fn):
        raise ConfigError(f"a handler must be callable, got {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: trust them
        signature = None
    if signature is not None:
        try:
            signature.bind(None)
        except TypeError:
            raise ConfigError(f"handler {getattr(fn, '__qualname__', fn)!r} of queue {queue!r} must take the "
                              f"message as its one argument, like `async def handler(msg)`; "
                              f"its signature is {signature}") from None
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        return fn

    async def in_thread(body: Any) -> Any:
        result = await asyncio.to_thread(fn, body)  # contextvars (current_message) are copied
        return await result if inspect.isawaitable(result) else result

    return in_thread


class _Inbox:
    """Messages a pulling transport received, waiting for a consumer's worker
    tasks. One worker wakes at a time: it runs through the inbox without
    yielding while its handlers finish at once, and wakes the next worker
    before each message while more are waiting, so concurrency follows need
    instead of costing a task switch per message."""

    __slots__ = ("items", "idle", "waking")

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waking = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: Any) -> None:
        self.items.append(item)
        if not self.waking and self.idle:
            self.wake()

    def put_many(self, items: Iterable[Any]) -> None:
        self.items.extend(items)
        if not self.waking and self.idle:
            self.wake()

    def wake(self) -> None:
        """Wake one idle worker, unless one is waking already."""
        while not self.waking and self.idle:
            waiter = self.idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.waking += 1

    async def wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle.append(waiter)
        try:
            await waiter
        finally:
            if waiter.done() and not waiter.cancelled():
                self.waking -= 1
                if self.items:  # woken, then cancelled before running: pass the wake on
                    self.wake()
            elif waiter in self.idle:
                self.idle.remove(waiter)


class Consumer(_Endpoint):
    """Receives the messages of one queue and hands each to a handler.

    The delivery contract lives here, once, for every transport: a message is
    acknowledged only after its handler returned; a handler that raises gets
    it again after a backoff, up to ``max_retries`` times, and then it goes to
    the dead-letter queue ``<queue>.dead`` with the error in its headers; at
    most ``prefetch`` handlers run at once; ``stop()`` drains.

    A transport feeds each message it receives to ``_deliver`` and writes the
    hooks marked abstract below (its wire): ``_connect``/``_disconnect``,
    ``_start_intake``/``_stop_intake``, and settling a message: ``_ack``,
    ``_requeue`` (hand back unfinished), ``_dead_letter``, ``_reply``.
    ``_retry_later`` lets a broker hold a failed message during its backoff.

    :param queue_name: the queue to consume.
    :param prefetch: how many messages are handled at once.
    :param max_retries: retries after the first failed attempt.
    :param retry_backoff: first retry delay in seconds; doubles each retry.
    :param retry_backoff_max: the longest retry delay.
    :param drain_timeout: how long ``stop()`` waits for running handlers.
    """

    #: Flags the decorator takes on this transport (others' are ignored).
    handler_flags: ClassVar[frozenset[str]] = frozenset()
    #: False where ``_ack`` has nothing to do (the response is the ack; a
    #: message taken off an in-process queue is gone): the core skips the call.
    acks: ClassVar[bool] = True
    #: True where the consumer serves HTTP routes on a host and port.
    listens: ClassVar[bool] = False

    def __init__(self, queue_name: str = "", queues_labels: Mapping[str, Any] | None = None, *,
                 prefetch: int = _DEFAULT_PREFETCH, max_retries: int = _DEFAULT_MAX_RETRIES,
                 retry_backoff: float = 0.2, retry_backoff_max: float = 30.0, drain_timeout: float = 30.0,
                 **options: Any) -> None:
        self.prefetch = _number("prefetch", prefetch, int, 1)
        self.max_retries = _number("max_retries", max_retries, int, 0)
        self.retry_backoff = _number("retry_backoff", retry_backoff)
        self.retry_backoff_max = _number("retry_backoff_max", retry_backoff_max)
        self.drain_timeout = _number("drain_timeout", drain_timeout)
        super().__init__(queue_name, queues_labels, **options)
        self._handlers: dict[str, tuple[Callable[..., Any], _Handler]] = {}
        self._unbound: dict[str, Callable[..., Any]] = {}  # methods whose class has no instance yet
        self._active: set[asyncio.Task[Any]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._running = False
        self._stopping = False

    @overload
    def __call__(self, handler: _F, **flags: Any) -> _F: ...

    @overload
    def __call__(self, handler: None = None, **flags: Any) -> Callable[[_F], _F]: ...

    def __call__(self, handler: _F | str | None = None, override: bool = False,
                 **flags: Any) -> _F | Callable[[_F], _F]:
        """Register a handler: ``@consumer()`` (or ``@consumer``) above an
        ``async def handler(msg)``; a bound method works too, and a plain
        ``def`` runs in a worker thread. The handler's return value is the
        reply to a request.

        Legacy forms: ``@consumer("queue_name")`` (on HTTP with
        ``override=True``, the route it names is served instead), a method
        decorated in its class body (bound to the instance once its class is
        instantiated), and the decorated function called with no message,
        which consumes until cancelled.

        :raises ConfigError: the handler does not take one message argument.
        """
        if isinstance(handler, str):
            self._legacy_route(handler, override)
            handler = None
        flags = _check_flags(flags, self.handler_flags, f"{type(self).__name__} decorator")
        key = self._handler_key(flags)

        def register(fn: _F) -> _F:
            if _is_method_in_class_body(fn):
                return _BindsToInstance(self, key, fn)  # type: ignore[return-value]
            fn = getattr(fn, "_streamtools_handler", fn)
            entry = _consume_loop_when_called_bare(self, fn)
            self._add_handler(key, fn, entry)
            return entry

        return register(handler) if handler is not None else register

    def _add_handler(self, key: str, fn: Callable[..., Any], entry: Callable[..., Any] | None = None) -> None:
        """Register ``fn`` for ``key``; ``entry`` is what the decorator gave the user."""
        known = self._handlers.get(key)
        if known is not None:
            old = getattr(known[0], "_streamtools_handler", known[0])
            # The same function again is fine; a method bound again, to a newer instance, replaces the old one.
            if old != fn and getattr(old, "__func__", None) is not getattr(fn, "__func__", fn):
                where = f" for {key}" if key else ""
                raise ConfigError(f"queue {self.queue_name!r} already has a handler{where}: {old!r}")
        self._handlers[key] = (entry or fn, _as_handler(fn, self.queue_name))

    def _legacy_route(self, route: str, override: bool) -> None:
        """Legacy ``@consumer("name")``: the route was cosmetic unless the
        consumer had none or ``override=True`` (HTTP)."""
        if self.listens and (override or not self.queue_name):
            if self._ready:
                raise ConfigError(f"{self!r} is serving already: route {route!r} comes too late")
            self.queue_name = self._check_name(route)

    async def _consume_forever(self) -> None:
        """Legacy: the decorated function called with no message consumes
        until it is cancelled, then stops gracefully."""
        await self.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.stop()

    def _handler_key(self, flags: dict[str, Any]) -> str:
        return ""

    @property
    def dead_letter_queue(self) -> str:
        """``<queue>.dead``; a dead-letter queue's own failures stay in it, at its tail."""
        name = self.queue_name
        return name if name.endswith(".dead") else f"{name}.dead"

    @property
    def handlers(self) -> list[Callable[..., Any]]:
        """The registered handler functions."""
        return [fn for fn, _ in self._handlers.values()]

    async def start(self) -> None:
        """Start handing messages to the handler; returns once consuming."""
        if self._running:
            return
        if self._unbound:
            names = ", ".join(fn.__qualname__ for fn in self._unbound.values())
            raise ConfigError(f"handler {names} of queue {self.queue_name!r} is a method: create an instance "
                              "of its class before starting, and the consumer calls it on that instance")
        if not self._handlers:
            raise ConfigError(f"no handler for queue {self.queue_name!r}: decorate one with @consumer()")
        await self.a_init()
        self._stopping = False
        await self._start_intake()
        self._running = True
        log.info("consuming %r on %s", self.queue_name, self.transport)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking messages, wait up to ``timeout`` (default
        ``drain_timeout``) for running handlers, acknowledge what finished and
        close. What did not finish goes back to the queue, nothing is dropped."""
        if not self._ready:
            return
        self._stopping = True
        if self._running:
            await self._stop_intake()
        pending = set(self._active)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.drain_timeout if timeout is None else timeout)
            if late:
                log.warning("%d handler(s) of %r did not finish in time; their messages go back to the queue",
                            len(late), self.queue_name)
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
        self._running = False
        self._ready = False
        await self._disconnect()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def _deliver(self, message: Message, key: str = "", decoded: bool = False) -> None:
        """The delivery contract, for one message a transport received:
        within the concurrency bound, decode (unless ``decoded``), run the
        handler as ``current_message()``, then reply and acknowledge; on
        failure retry after a backoff, then dead-letter."""
        task = asyncio.current_task()
        assert task is not None
        await self._deliver_in(task, message, key, decoded)

    async def _deliver_in(self, task: asyncio.Task[Any], message: Message, key: str = "",
                          decoded: bool = False) -> None:
        """:meth:`_deliver` in ``task``, which a worker knows without asking."""
        active = self._active  # the messages in flight: their count is the prefetch bound
        if len(active) >= self.prefetch:
            await self._free_slot()
        active.add(task)
        message.transport = self.transport
        hooks = [*_global_hooks, *self._hooks] if _global_hooks or self._hooks else None
        settled = False
        try:
            headers = message.headers
            if _EXPIRES in headers and message.reply_to is not None:
                expires = headers[_EXPIRES]
                if isinstance(expires, int) and time.time() * 1000 > expires:
                    log.debug("dropping request %s of %r: its requester stopped waiting", message.id, self.queue_name)
                    settled = True
                    if hooks:
                        _handled_at_once(hooks, message, "expired", None)
                    await self._ack(message)
                    return
            if not decoded:
                try:
                    # decode() without its two calls: a tenth of the memory transport's time per message
                    content_type = message.content_type
                    try:
                        message.body = (_decoders.get(content_type) or _decoder(content_type))(message.data)
                    except (ValueError, LookupError) as exc:
                        raise DecodeError(f"body is not valid {content_type}: {exc}") from None
                except DecodeError as exc:  # no retry can fix a poison message
                    settled = True
                    # Dead-letter it as opaque bytes, so the dead-letter queue stays readable.
                    message.headers = {**headers, "x-original-content-type": message.content_type}
                    message.content_type = BINARY
                    if hooks:
                        _handled_at_once(hooks, message, "dead_lettered", exc)
                    await self._give_up(message, exc)
                    return
            handler = self._handlers[key][1]
            tokens: list[Any] = []
            began = 0.0
            while True:
                token = _current.set(message)
                try:
                    if hooks:
                        tokens = []
                        began = time.perf_counter()
                        for hook in hooks:  # a hook that raises fails the attempt, as the handler would
                            tokens.append(hook.on_handle(message))
                    result = await handler(message.body)
                except Exception as exc:
                    final = message.attempt > self.max_retries
                    if hooks:
                        outcome = "retried" if not final else "dead_lettered" if self.brokered else "failed"
                        _after_handling(hooks, tokens, message, outcome, began, exc)
                    if final:
                        settled = True
                        await self._give_up(message, exc)
                        return
                    delay = _backoff(message.attempt, self.retry_backoff, self.retry_backoff_max)
                    log.warning("handler of %r failed on message %s (attempt %d of %d), retrying in %.2fs: %r",
                                self.queue_name, message.id, message.attempt, self.max_retries + 1, delay, exc)
                    log.debug("the handler's traceback", exc_info=exc)
                    if await self._retry_later(message, delay):
                        settled = True  # the broker holds it for the backoff; the slot is free
                        return
                    await asyncio.sleep(delay)
                    message.attempt += 1
                    continue
                finally:
                    _current.reset(token)
                settled = True
                if message.reply_to is not None:
                    try:
                        await self._reply(message, result, None)
                    except Exception as exc:  # the requester may be gone; the work itself is done
                        log.warning("could not send the reply to message %s of %r: %r", message.id,
                                    self.queue_name, exc)
                if self.acks:
                    await self._ack(message)
                if hooks:  # after the reply: a tracing hook's span is current while it is sent
                    _after_handling(hooks, tokens, message, "ok", began, None)
                return
        except asyncio.CancelledError:
            if not settled:  # the drain timed out: hand the message back
                await self._requeue(message)
            raise
        finally:
            active.discard(task)
            if self._slot_waiters:
                waiter = self._slot_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    @property
    def ready(self) -> bool:
        """True while consuming with the broker connected (``GET /readyz``)."""
        return self._running and not self._stopping and self._connected()

    def _connected(self) -> bool:
        """Whether the broker connection is up, where the client tells."""
        return True

    def _start_workers(self, inbox: _Inbox, received: Callable[[Any], Message] | None = None) -> None:
        """Deliver what a pulling transport puts in ``inbox`` (turned into a
        Message by ``received``) with ``prefetch`` worker tasks: far cheaper
        than a task per message."""
        self._workers = [asyncio.create_task(self._work(inbox, received)) for _ in range(self.prefetch)]

    async def _work(self, inbox: _Inbox, received: Callable[[Any], Message] | None) -> None:
        items, deliver, me = inbox.items, self._deliver_in, asyncio.current_task()
        assert me is not None
        while not self._stopping:
            if not items:
                await inbox.wait()
                continue
            item = items.popleft()
            if items and not inbox.waking:
                inbox.wake()  # more are waiting: another worker takes them if this handler has to wait
            if received is None:
                await deliver(me, item)
                continue
            try:
                message = received(item)
            except Exception:  # unacknowledged, so the broker delivers it again; the worker goes on
                log.exception("could not read a message received on %r", self.queue_name)
                continue
            await deliver(me, message)

    async def _stop_workers(self) -> None:
        """Stop the workers waiting for messages; busy ones finish (the drain)."""
        idle = [worker for worker in self._workers if worker not in self._active]
        for worker in idle:  # waiting in inbox.wait(), which gives up nothing when cancelled
            worker.cancel()
        await asyncio.gather(*idle, return_exceptions=True)

    async def _free_slot(self) -> None:
        """Wait until fewer than ``prefetch`` messages are in flight (transports
        whose intake is not bounded by the broker, such as HTTP, get here)."""
        while len(self._active) >= self.prefetch:
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)

    async def _give_up(self, message: Message, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:1000]
        log.error("giving up on message %s of %r after %d attempt(s): %s",
                  message.id, self.queue_name, message.attempt, error)
        log.debug("the last error's traceback", exc_info=exc)
        headers = dict(message.headers)
        headers.pop(_EXPIRES, None)
        headers.update({"x-error": error, "x-error-type": type(exc).__qualname__,
                        "x-attempts": message.attempt, "x-original-queue": self.queue_name,
                        "x-failed-at": int(time.time() * 1000)})
        try:
            if self.dead_letter_queue == self.queue_name:
                # A dead letter that fails again goes back to the tail of its queue, after a pause:
                # nothing is lost, and a lone poison message does not spin.
                await asyncio.sleep(self.retry_backoff_max)
            await self._dead_letter(message, headers)
        except Exception:
            log.exception("could not dead-letter message %s of %r; it goes back to the queue",
                          message.id, self.queue_name)
            await self._requeue(message)
            return
        if message.reply_to is not None:
            try:
                await self._reply(message, None, error)
            except Exception:
                log.exception("could not send the error reply for message %s", message.id)
        await self._ack(message)

    @abc.abstractmethod
    async def _start_intake(self) -> None:
        """Start feeding received messages to ``_deliver``."""

    @abc.abstractmethod
    async def _stop_intake(self) -> None:
        """Stop receiving; messages already in ``_deliver`` finish."""

    @abc.abstractmethod
    async def _ack(self, message: Message) -> None:
        """The message is done: the transport forgets it."""

    @abc.abstractmethod
    async def _requeue(self, message: Message) -> None:
        """Hand an unfinished message back, for redelivery."""

    @abc.abstractmethod
    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        """Store the message in ``dead_letter_queue`` with ``headers``."""

    @abc.abstractmethod
    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        """Answer a request (``message.reply_to``) with the handler's result, or its error."""

    async def _retry_later(self, message: Message, delay: float) -> bool:
        """Have the broker hold a failed message for ``delay`` seconds and
        deliver it again with ``attempt + 1``; True if it did. By default the
        message is retried in process, holding its slot."""
        return False

    def _producer_options(self) -> dict[str, Any]:
        """Options a producer needs to reach this consumer (HTTP: its URL)."""
        return {}

    async def delete_queues(self) -> None:
        """Delete this consumer's queue and its dead-letter queue where a
        broker keeps them (what demo, bench and tests clean up with)."""


###############################################################################
# Transports: memory ##########################################################
###############################################################################


class _MemoryBroker:
    """Queues by name and pending replies, one broker per event loop."""

    def __init__(self) -> None:
        self.queues: dict[str, _Inbox] = {}
        #: Producers waiting for replies, by the reply address they gave.
        self.producers: weakref.WeakValueDictionary[int, Producer] = weakref.WeakValueDictionary()

    def queue(self, name: str) -> _Inbox:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Inbox()
        return queue


_memory_brokers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _MemoryBroker] = weakref.WeakKeyDictionary()


def _memory_broker() -> _MemoryBroker:
    loop = asyncio.get_running_loop()
    broker = _memory_brokers.get(loop)
    if broker is None:
        broker = _memory_brokers[loop] = _MemoryBroker()
    return broker


class MemoryProducer(Producer):
    """Sends to the in-process broker of the running event loop. A message
    sent before any consumer exists waits in its queue."""

    in_process = True

    async def _connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._broker = _memory_broker()
        self._queue = self._broker.queue(self.queue_name)

    async def _disconnect(self) -> None:
        """Nothing to release: the broker belongs to the event loop."""

    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> None:
        if self._loop is not asyncio.get_running_loop():  # reused under a new asyncio.run()
            await self._connect()
        # A tuple of strings and bytes, not the Message: the garbage collector untracks it, so a
        # backlog costs no full collections (a backlog of Messages cost 0.8 us a message in them).
        self._queue.put((message.data, message.content_type, message.headers or None, message.id,
                         message.correlation_id, message.reply_to))

    async def _reply_address(self) -> str:
        if self._loop is not asyncio.get_running_loop():
            await self._connect()
        self._broker.producers[id(self)] = self
        return str(id(self))


class MemoryConsumer(Consumer):
    """Consumes a queue of the in-process broker with ``prefetch`` workers."""

    in_process = True
    acks = False

    async def _connect(self) -> None:
        self._broker = _memory_broker()
        self._queue = self._broker.queue(self.queue_name)

    async def _disconnect(self) -> None:
        """Nothing to release: the broker belongs to the event loop."""

    async def _start_intake(self) -> None:
        self._start_workers(self._queue, self._received)

    def _received(self, item: tuple[Any, ...] | Message) -> Message:
        if type(item) is not tuple:  # handed back, or dead-lettered: a Message already
            return item  # type: ignore[return-value]
        data, content_type, headers, message_id, correlation_id, reply_to = item
        return Message(data=data, content_type=content_type, headers={} if headers is None else headers,
                       id=message_id, queue=self.queue_name, correlation_id=correlation_id, reply_to=reply_to)

    async def _stop_intake(self) -> None:
        await self._stop_workers()

    async def _ack(self, message: Message) -> None:
        """Nothing to do: a message taken off the queue is gone from it."""

    async def _requeue(self, message: Message) -> None:
        message.redelivered = True
        self._queue.put(message)

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        dead = Message(data=message.data, content_type=message.content_type, headers=headers, id=message.id,
                       queue=self.dead_letter_queue, correlation_id=message.correlation_id)
        self._broker.queue(self.dead_letter_queue).put(dead)

    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        producer = self._broker.producers.get(int(message.reply_to or 0))
        if producer is not None:
            producer._on_reply(message.correlation_id, *_reply_payload(result, error))

    async def delete_queues(self) -> None:
        """Forget this consumer's queue and its dead-letter queue."""
        for name in (self.queue_name, self.dead_letter_queue):
            _memory_broker().queues.pop(name, None)


###############################################################################
# Transports: RabbitMQ ########################################################
###############################################################################

_REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's direct reply-to pseudo-queue
#: The attempt a message retried through a delay queue comes back for.
_ATTEMPT = "x-st-attempt"
#: What RabbitMQ adds to a message it dead-letters (from a delay queue to its queue).
_DEATH_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                  "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")
#: Header naming the headers that were floats: AMQP tables would carry them as
#: 32-bit floats (pamqp), so they travel as exact decimal strings instead.
_FLOAT_HEADERS = "x-st-floats"


def _rmq_urls(url: str | Sequence[str] | None, host: str | None, port: int | str | None, user: str | None,
              password: str | None, vhost: str | None) -> list[str]:
    """The AMQP URLs of the brokers (several: the nodes of a cluster, tried in
    turn) from options, else ``RMQ_URL``, else ``RMQ_HOST``... ; a list, or
    comma-separated in a string."""
    urls = url or os.environ.get("RMQ_URL")
    if urls:
        items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls)]
        if not items or not all(isinstance(u, str) and u for u in items):
            raise ConfigError(f"url takes an amqp:// URL or a list of them, got {[_redact(str(u)) for u in items]}")
        for item in items:
            scheme = urllib.parse.urlsplit(item).scheme if "://" in item else ""
            if scheme not in ("amqp", "amqps"):
                raise ConfigError(f"a RabbitMQ URL starts with amqp:// or amqps://, got {_redact(item)!r}")
            try:
                urllib.parse.urlsplit(item).port
            except ValueError:
                raise ConfigError(f"bad port in RabbitMQ URL {_redact(item)!r}") from None
        return items
    hosts = [h.strip() for h in (host or _setting("RMQ_HOST", "localhost")).split(",") if h.strip()]
    user = user if user is not None else _setting("RMQ_USER", "guest")
    password = password if password is not None else _setting("RMQ_PASS", "guest")
    vhost = vhost if vhost is not None else _setting("RMQ_VHOST", "/")
    quote = urllib.parse.quote
    result = []
    for one in hosts or ["localhost"]:
        one_port = port
        if ":" in one and not one.startswith("["):  # RMQ_HOST=host:port, as the legacy library took it
            one, _, host_port = one.rpartition(":")
            one_port = one_port or host_port
        number = _port("RMQ_PORT", one_port or _setting("RMQ_PORT", "5672"), 1)
        result.append(f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{one}:{number}/"
                      f"{quote(vhost, safe='')}")
    return result


def _cause_text(text: str, url: str) -> str:
    """``text`` with the URL's password scrubbed."""
    password = urllib.parse.urlsplit(url).password or ""
    for secret in {password, urllib.parse.unquote(password)} - {""}:
        text = text.replace(secret, "***")
    return text


def _where(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"


def _vhost(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


class _SharedConnection:
    def __init__(self) -> None:
        self.connection: Any = None
        self.users = 0
        self.lock = asyncio.Lock()


# Two robust connections per broker list per event loop, one that publishes and
# one that consumes (as RabbitMQ advises: a memory or disk alarm blocks every
# connection that publishes, acknowledgements included), each shared by every
# producer and consumer of the process; each of them opens its own channel.
_rmq_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                            dict[tuple[str, str], _SharedConnection]] = weakref.WeakKeyDictionary()


class _BlockedReasons(logging.Filter):
    """Why RabbitMQ blocked a connection ("low on memory"): aiormq only logs it."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == "Connection %r was blocked by: %r" and len(args) == 2:
            self.reasons[args[0]] = str(args[1])
        elif record.msg == "Connection %r was unblocked" and args:
            self.reasons.pop(args[0], None)
        return True


_blocked = _BlockedReasons()
_CLOSE_TIMEOUT = 5.0

_Errors = tuple[type[BaseException], ...]


class _Nacked(Exception):
    """RabbitMQ refused a publish (``Basic.Nack``): retried on a fresh channel."""


def _cancelling() -> bool:
    """Whether the running task is being cancelled (not a client library
    ending its own operations with CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _closing(what: str, operation: Awaitable[Any]) -> None:
    """A shutdown step that talks to the broker. aio-pika waits for a lost
    connection to come back with no limit; a stop must not: by then the
    broker has taken back every unacknowledged message anyway."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await operation
    except Exception as exc:  # gone already, or the broker is unreachable
        log.debug("%s: %r", what, exc)


class _AMQPLink:
    """One producer's or consumer's link to RabbitMQ: settings, the shared
    robust connection, a channel with publisher confirms, queue declaration
    and a confirmed publish that survives reconnection."""

    def __init__(self, owner: _Endpoint, url: str | Sequence[str] | None, host: str | None, port: int | str | None,
                 user: str | None, password: str | None, vhost: str | None, queue_type: str,
                 connect_timeout: float, reconnect_interval: float, send_timeout: float, heartbeat: float) -> None:
        self.aio_pika = owner._client()
        aiormq = importlib.import_module("aiormq")  # aio-pika's own dependency
        self.errors, self.spec = aiormq.exceptions, aiormq.spec
        logging.getLogger("aiormq").addHandler(_quiet)
        logging.getLogger("aiormq.connection").addFilter(_blocked)  # idempotent: the same filter object
        # aiormq gives up on a silent link after (heartbeat + 1) * 3 seconds: the default 60
        # leaves a blackholed connection unnoticed for 3 minutes; 9 notices it within 30 s.
        beat = _number("heartbeat", heartbeat, int, 0)
        self.urls = [u if "heartbeat=" in u else f"{u}{'&' if '?' in u else '?'}heartbeat={beat}"
                     for u in _rmq_urls(url, host, port, user, password, vhost)]
        self.url = self.urls[0]
        self.key = ",".join(self.urls)  # the shared connection's
        if queue_type not in ("classic", "quorum"):
            raise ConfigError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
        self.queue_args = {"x-queue-type": queue_type} if queue_type == "quorum" else None
        self.connect_timeout = _number("connect_timeout", connect_timeout)
        self.reconnect_interval = _number("reconnect_interval", reconnect_interval)
        self.send_timeout = _number("send_timeout", send_timeout, float, 0.001)
        errors = self.errors
        #: Errors of a lost connection (retried), and errors no retry can fix.
        self.lost: _Errors = (OSError, errors.AMQPConnectionError, errors.ChannelInvalidStateError,
                              errors.ChannelClosed)
        self.refused: _Errors = (errors.AuthenticationError, errors.ProbableAuthenticationError,
                                 errors.ConnectionNotAllowed, errors.ProtocolSyntaxError)
        self.no_retry: _Errors = (TimeoutError, errors.DeliveryError, errors.ChannelAccessRefused,
                                  errors.ChannelPreconditionFailed)
        #: ``host:port`` of the brokers, for messages (never the credentials).
        self.where = ",".join(_where(u) for u in self.urls)
        #: "publish" or "consume": which of the process's two connections this link uses.
        self.role = "publish"
        self.connection: Any = None
        self.channel: Any = None
        self.prefetch = 0
        self.declared: set[str] = set()
        #: Run after the channel was replaced by a fresh one (a producer listening for replies re-listens).
        self.on_renew: Callable[[], Awaitable[None]] | None = None
        self._renewing: asyncio.Lock | None = None

    def sibling(self, role: str) -> _AMQPLink:
        """A link with the same settings, on the ``role`` connection."""
        other = copy.copy(self)
        other.role, other.connection, other.channel, other.declared = role, None, None, set()
        other.on_renew = other._renewing = None
        return other

    def cause(self, exc: BaseException) -> str:
        """An error's text for a message of ours, with every URL's password scrubbed."""
        text = f"{type(exc).__name__}: {exc}"
        for url in self.urls:
            text = _cause_text(text, url)
        return text

    # The shared connection.

    async def _acquire(self) -> Any:
        shared = _rmq_connections.setdefault(asyncio.get_running_loop(), {}).setdefault(
            (self.key, self.role), _SharedConnection())
        async with shared.lock:
            if shared.connection is None or shared.connection.is_closed:
                shared.connection = await self._connect()
            shared.users += 1
            return shared.connection

    async def _connect(self) -> Any:
        reachable = []
        for url in self.urls:  # a name that does not resolve is a typo: say so at once
            parts = urllib.parse.urlsplit(url)
            try:
                await _resolve(parts.hostname or "localhost", parts.port or 5672, f"RabbitMQ at {_where(url)}")
                reachable.append(url)
            except ConnectionFailed:
                if len(self.urls) == 1:
                    raise
                log.warning("RabbitMQ host %s does not resolve; trying the others", _where(url))
        if not reachable:
            raise ConnectionFailed(f"none of the RabbitMQ hosts {self.where} resolves")
        turn = itertools.cycle(reachable)

        async def connect() -> Any:  # the brokers in turn, one a try
            url = next(turn)
            self.url = url
            return await self.aio_pika.connect_robust(url, reconnect_interval=self.reconnect_interval,
                                                      timeout=min(10.0, self.connect_timeout or 10.0))

        try:
            connection = await _retry(
                connect, what=f"connecting to RabbitMQ at {self.where}", retry_on=self.lost + (TimeoutError,),
                fatal=self.refused, deadline=time.monotonic() + self.connect_timeout, base=0.25, cap=5.0)
        except self.refused as exc:
            user = urllib.parse.unquote(parts.username or "")
            if isinstance(exc, self.errors.ProtocolSyntaxError):  # the broker closed the handshake
                raise ConnectionFailed(f"RabbitMQ at {self.where} refused vhost {_vhost(self.url)!r} for user "
                                       f"{user!r}: it does not exist or the user may not use it; check "
                                       "RMQ_VHOST (or RMQ_URL)") from None
            raise ConnectionFailed(f"RabbitMQ at {self.where} refused user {user!r}: check "
                                   "RMQ_USER, RMQ_PASS and RMQ_VHOST (or RMQ_URL)") from None
        except self.lost + (TimeoutError,) as exc:
            raise ConnectionFailed(f"cannot connect to RabbitMQ at {self.where} within {self.connect_timeout}s: "
                                   f"{self.cause(exc)}") from None
        where = self.where

        def lost(_: Any, exc: BaseException | None) -> None:
            if isinstance(exc, Exception):
                _connection_event(RABBITMQ, where, "lost")
                if len(self.urls) > 1:
                    asyncio.ensure_future(self._fail_over(connection))

        connection.close_callbacks.add(lost)
        connection.reconnect_callbacks.add(lambda _: _connection_event(RABBITMQ, where, "restored"))
        return connection

    async def _fail_over(self, connection: Any) -> None:
        """While the robust connection is reconnecting, point it at the next
        broker before each of its attempts (aio-pika takes one URL): a
        cluster's live node takes over within a few reconnect intervals."""
        urls = self.urls
        index = urls.index(self.url) if self.url in urls else 0
        while not connection.connected.is_set() and not connection.close_called and not connection.is_closed:
            index = (index + 1) % len(urls)
            self.url = urls[index]
            connection.url = type(connection.url)(self.url)
            log.info("reconnecting to RabbitMQ at %s", _where(self.url))
            await asyncio.sleep(self.reconnect_interval)

    async def _release(self) -> None:
        shared = _rmq_connections.get(asyncio.get_running_loop(), {}).get((self.key, self.role))
        if shared is None:
            return
        async with shared.lock:
            shared.users -= 1
            if shared.users <= 0 and shared.connection is not None:
                connection, shared.connection = shared.connection, None
                await _closing(f"closing the connection to {self.where}", connection.close())

    # A channel on it.

    async def open(self, *queues: str, prefetch: int = 0) -> list[Any]:
        """Open a channel on the shared connection, set its QoS and declare
        durable ``queues``, within ``connect_timeout``: a broker that is down
        is an error, not a hang."""
        self.connection = await self._acquire()
        self.channel = None
        self.prefetch = prefetch
        self.declared = set()
        self._renewing = asyncio.Lock()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.connection.connected.wait()  # the shared connection may be reconnecting
                self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
                if prefetch:
                    await self.channel.set_qos(prefetch_count=prefetch)
                return [await self.declare(name) for name in queues]
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise ConnectionFailed(f"RabbitMQ at {self.where} did not open a channel and declare "
                                       f"{list(queues)} within {self.connect_timeout}s") from None
            if isinstance(exc, self.lost + (RuntimeError,)):  # aio-pika: "Connection was not opened"
                raise ConnectionFailed(f"lost the connection to RabbitMQ at {self.where} while opening a "
                                       f"channel: {self.cause(exc)}") from None
            raise

    async def declare(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            queue = await self.channel.declare_queue(name, durable=True,
                                                     arguments={**(self.queue_args or {}), **(arguments or {})} or None)
        except self.errors.ChannelPreconditionFailed as exc:
            if "'durable'" not in str(exc) and "'auto_delete'" not in str(exc):
                raise ConfigError(f"queue {name!r} exists on {self.where} with other settings (classic or "
                                  f"quorum?): use the same queue_type everywhere or delete the queue ({exc})") from None
            # Declared by the legacy library (not durable, auto-delete): use it as it is, so services
            # sharing the broker can upgrade one at a time.
            await self._reopen()  # the refused declaration closed the channel
            queue = await self.channel.declare_queue(name, passive=True)
            log.warning("queue %r on %s was declared by the legacy streamtools: it is not durable, so its "
                        "messages are lost if the broker restarts, and it may be auto-deleted. It is used as it "
                        "is; to migrate, once every service is upgraded, stop its consumers, let it empty, delete "
                        "it, and streamtools declares it durable", name, self.where)
        self.declared.add(name)
        return queue

    async def _reopen(self) -> None:
        fresh = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        if self.prefetch:
            await fresh.set_qos(prefetch_count=self.prefetch)
        old, self.channel = self.channel, fresh
        # Publishes still waiting for a confirm on the old channel fail with it and are retried.
        await _closing(f"closing a channel to {self.where}", old.close())

    async def renew(self, channel: Any) -> None:
        """Replace ``channel`` by a fresh one, unless another send did already.
        After a failover, RabbitMQ may nack every publish on a channel for as
        long as a quorum queue elects its leader, while a fresh one is acked."""
        assert self._renewing is not None
        async with self._renewing:
            if self.channel is not channel or self.connection is None:
                return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._reopen()
            except Exception as exc:  # the retry goes on on the old channel, or after a reconnection
                log.debug("could not open a fresh channel to %s: %r", self.where, exc)
                return
            if self.on_renew is not None:
                await self.on_renew()

    def blocked(self) -> str | None:
        """The reason RabbitMQ gave for blocking this link's connection, if it did."""
        transport = getattr(self.connection, "transport", None)
        connection = getattr(transport, "connection", None)
        return _blocked.reasons.get(connection) if connection is not None else None

    async def close(self) -> None:
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await _closing(f"closing a channel to {self.where}", channel.close())
        if self.connection is not None:
            self.connection = None
            await self._release()

    async def delete(self, *queues: str) -> None:
        """Delete ``queues`` on a channel of their own."""
        connection = await self._acquire()
        try:
            async with asyncio.timeout(self.connect_timeout):
                channel = await connection.channel()
                for name in queues:
                    await channel.queue_delete(name)
                await channel.close()
        finally:
            await self._release()

    # Publishing.

    def properties(self, message: Message, expiration: float | None = None) -> Any:
        # The AMQP properties built directly: an aio_pika.Message on the way costs about 10% of
        # a publish, for checks and conversions these values do not need.
        headers = message.headers
        if headers:
            floats = [key for key, value in headers.items() if type(value) is float]
            if floats:
                headers = {**headers, **{key: repr(headers[key]) for key in floats},
                           _FLOAT_HEADERS: ",".join(floats)}
        return self.spec.Basic.Properties(
            content_type=message.content_type, headers=headers or None, message_id=message.id,
            correlation_id=message.correlation_id, reply_to=message.reply_to, delivery_mode=2,
            expiration=None if expiration is None else str(int(expiration * 1000)))

    async def publish(self, message: Message, routing_key: str, timeout: float | None = None,
                      mandatory: bool = True, expiration: float | None = None) -> None:
        """Publish to ``routing_key`` and wait for the broker's confirm. A
        lost connection and a nack are retried until the send timeout: the
        message is either confirmed or an error is raised, never dropped."""
        timeout = self.send_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        errors = self.errors
        properties = self.properties(message, expiration)
        body = message.data
        nacked: list[str] = []  # the broker's refusals: what a send that times out says
        try:
            try:
                if self.connection.connected.is_set():  # the hot path, one await deep
                    channel = self.channel
                    await (await channel.get_underlay_channel()).basic_publish(
                        body, routing_key=routing_key, properties=properties, mandatory=mandatory, timeout=timeout)
                    return
            except errors.PublishError:
                raise
            except errors.DeliveryError as exc:
                nacked.append(self.cause(exc))
                log.warning("RabbitMQ at %s refused a message to %r (%s); retrying on a fresh channel",
                            self.where, routing_key, nacked[-1])
                await self.renew(channel)
            except self.no_retry:
                raise
            except self.lost as exc:
                log.warning("publishing to %r on %s failed (%r); retrying as the connection comes back",
                            routing_key, self.where, exc)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                # aiormq ends the publishes of a connection it closed (a dead link found by the
                # heartbeat) with CancelledError: that is a lost connection, not our cancellation.
                log.warning("publishing to %r on %s was cut with its connection; retrying as it comes back",
                            routing_key, self.where)
            await self._publish_reconnecting(body, properties, routing_key, mandatory, deadline, nacked)
        except errors.PublishError:
            raise Unroutable(f"RabbitMQ at {self.where} has no queue {routing_key!r} for the message") from None
        except TimeoutError:
            if nacked:
                raise SendError(f"RabbitMQ at {self.where} refused the message to {routing_key!r} on every try "
                                f"for {timeout}s: {nacked[-1]}") from None
            blocked = self.blocked()
            raise SendError(f"RabbitMQ at {self.where} did not confirm the message to {routing_key!r} within "
                            f"{timeout}s" + (f": it blocks publishing ({blocked})" if blocked else "")) from None
        except self.lost + (errors.AMQPError,) as exc:
            raise SendError(f"lost the connection to RabbitMQ at {self.where} while sending to "
                            f"{routing_key!r}: {self.cause(exc)}") from None

    async def _publish_reconnecting(self, body: bytes, properties: Any, routing_key: str, mandatory: bool,
                                    deadline: float, nacked: list[str]) -> None:
        errors = self.errors

        async def publish() -> None:
            # The robust channel waits for a reconnection with no limit: bound it.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                channel = self.channel
                try:
                    await (await channel.get_underlay_channel()).basic_publish(
                        body, routing_key=routing_key, properties=properties, mandatory=mandatory)
                except errors.PublishError:
                    raise
                except errors.DeliveryError as exc:
                    nacked.append(self.cause(exc))
                    await self.renew(channel)
                    raise _Nacked(nacked[-1]) from None
                except asyncio.CancelledError:
                    if _cancelling():
                        raise
                    raise ConnectionError("the connection was closed under the publish") from None

        try:
            await _retry(publish, what=f"publishing to {routing_key!r} on {self.where}",
                         retry_on=self.lost + (_Nacked,), fatal=self.no_retry, deadline=deadline, base=0.1, cap=2.0)
        except _Nacked:
            raise TimeoutError from None  # refused until the deadline


class _RabbitMQEndpoint(_Endpoint):
    """The connection options of both RabbitMQ sides.

    :param url: ``amqp://`` or ``amqps://`` URL, or a list of them (the nodes
        of a cluster: tried in turn on connecting and on every reconnection);
        else ``RMQ_URL`` (comma-separated), else built from ``host``/``port``/
        ``user``/``password``/``vhost`` (or ``RMQ_HOST`` (``host``,
        ``host:port``, comma-separated), ``RMQ_PORT``, ``RMQ_USER``,
        ``RMQ_PASS``, ``RMQ_VHOST``).
    :param queue_type: ``"classic"`` or ``"quorum"`` (replicated, for clusters).
    :param connect_timeout: how long the first connection is retried.
    :param reconnect_interval: pause between reconnection attempts.
    :param send_timeout: how long a send waits for a confirm, reconnecting.
    :param heartbeat: seconds between AMQP heartbeats (default 9: a dead link is
        noticed within 30 s); a ``heartbeat=`` in the URL wins.
    """

    client = ("aio_pika", "aio-pika")
    address_option = "url"

    def _setup(self, url: str | Sequence[str] | None = None, host: str | None = None, port: int | str | None = None,
               user: str | None = None, password: str | None = None, vhost: str | None = None,
               queue_type: str = "classic", connect_timeout: float = 30.0, reconnect_interval: float = 1.0,
               send_timeout: float = 30.0, heartbeat: float = 9) -> None:
        self._link = _AMQPLink(self, url, host, port, user, password, vhost, queue_type,
                               connect_timeout, reconnect_interval, send_timeout, heartbeat)

    @property
    def where(self) -> str:
        """``host:port`` of the broker, for messages (never the credentials)."""
        return self._link.where

    def add_agent_uuid(self, **keys: str) -> None:
        """Legacy: the queue name gets the first five characters of the
        ``RabbitMQ`` id as a suffix (``orders-1a2b3``)."""
        super().add_agent_uuid(**keys)
        key = keys.get("RabbitMQ")
        if key:
            if self._ready:
                raise ConfigError(f"add_agent_uuid() renames queue {self.queue_name!r}: call it before a_init()")
            self.queue_name = f"{self.queue_name}-{key[:5]}"

    async def _disconnect(self) -> None:
        await self._link.close()


class RabbitMQProducer(_RabbitMQEndpoint, Producer):
    """Sends persistent messages to a durable RabbitMQ queue, with publisher
    confirms and mandatory routing; ``send`` returns once the broker
    confirmed. Requests use direct reply-to and expire with their timeout.
    Options: see :class:`_RabbitMQEndpoint`."""

    async def _connect(self) -> None:
        self._replies_ready = None
        await self._link.open(self.queue_name)

    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> None:
        expiration = None
        if message.reply_to is not None and timeout is not None:
            expiration = timeout  # a request nobody answered in time costs no work later
        await self._link.publish(message, self.queue_name, timeout, expiration=expiration)

    async def _listen_for_replies(self) -> str:
        # Direct reply-to: consume the pseudo-queue on the publishing channel (again on a fresh one).
        try:
            queue = await self._link.channel.declare_queue(_REPLY_TO, passive=True)
            await queue.consume(self._on_amqp_reply, no_ack=True)
        except self._link.lost + (self._link.errors.AMQPError,) as exc:
            raise SendError(f"cannot listen for replies on RabbitMQ at {self.where}: "
                            f"{self._link.cause(exc)}") from None
        self._link.on_renew = self._relisten
        return _REPLY_TO

    async def _relisten(self) -> None:
        try:
            await self._listen_for_replies()
        except SendError as exc:  # requests sent from now on time out; their senders are told so
            log.warning("%s", exc)

    async def _on_amqp_reply(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._on_reply(incoming.correlation_id, incoming.body, incoming.content_type or "",
                       _amqp_headers(incoming))


_ACK, _SETTLED = True, False


class _Acks:
    """The acknowledgements of one channel's deliveries: the finished prefix
    in one ``multiple=True`` ack per turn of the event loop (one frame for
    many messages), and a message that finished behind one still running on
    its own, so the broker's prefetch window never waits for a slow handler."""

    __slots__ = ("channel", "pending", "settled", "flushing")

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.pending: collections.deque[int] = collections.deque()  # delivery tags in order
        self.settled: dict[int, bool] = {}  # _ACK: to acknowledge; _SETTLED: acknowledged or handed back
        self.flushing = False

    async def flush(self) -> None:
        pending, settled, last = self.pending, self.settled, 0
        while pending and pending[0] in settled:
            tag = pending.popleft()
            if settled.pop(tag):
                last = tag
        if last:  # every tag up to it is finished: this acknowledges them all
            await self.channel.basic_ack(last, multiple=True, wait=False)
        for tag in [tag for tag, ack in settled.items() if ack]:
            settled[tag] = _SETTLED
            await self.channel.basic_ack(tag, wait=False)


def _amqp_headers(incoming: Any) -> dict[str, Any]:
    headers = dict(incoming.headers or {})
    floats = headers.pop(_FLOAT_HEADERS, None)
    if floats:
        for key in str(floats).split(","):
            try:
                headers[key] = float(headers[key])
            except (KeyError, TypeError, ValueError):
                pass
    return headers


class RabbitMQConsumer(_RabbitMQEndpoint, Consumer):
    """Consumes a durable RabbitMQ queue with QoS ``prefetch``, acknowledging
    each message after its handler returned. Takes the connection options of
    :class:`RabbitMQProducer` and the delivery options of :class:`Consumer`.
    After a lost connection it resumes by itself.

    It consumes on the process's consuming connection and publishes (dead
    letters, replies, retries) on its publishing one, opened when first needed.
    A failed attempt waits out its backoff in the broker, in the delay queue
    ``<queue>.retry.<attempt>`` (declared when first needed), which hands it
    back to the queue when it expires: its prefetch slot is free meanwhile, and
    the attempt count travels in the ``x-st-attempt`` header."""

    async def _connect(self) -> None:
        self._consumer_tag: str | None = None
        self._acks: _Acks | None = None
        self._link.role = "consume"
        self._out = self._link.sibling("publish")
        self._out_lock = asyncio.Lock()
        self._queue, = await self._link.open(self.queue_name, prefetch=self.prefetch)

    async def _publisher(self) -> _AMQPLink:
        """The link to publish on, opened when first needed."""
        if self._out.channel is None:
            async with self._out_lock:
                if self._out.channel is None:
                    await self._out.open()
        return self._out

    async def _disconnect(self) -> None:
        await self._out.close()
        await self._link.close()

    async def _start_intake(self) -> None:
        # Consumed on aiormq's channel under aio-pika's robust one, which reopens it after a
        # reconnection (and then this consumes again): aio-pika's own consume costs a second
        # task and an IncomingMessage per delivery, about a fifth of the time per message.
        self._link.channel.reopen_callbacks.add(self._consume)
        await self._consume()

    async def _consume(self, *_: Any) -> None:
        underlay = await self._link.channel.get_underlay_channel()
        self._acks = _Acks(underlay)
        self._consumer_tag = (await underlay.basic_consume(self.queue_name, self._on_message)).consumer_tag

    def _connected(self) -> bool:
        connection = self._link.connection
        return connection is not None and connection.connected.is_set()

    async def _stop_intake(self) -> None:
        self._link.channel.reopen_callbacks.discard(self._consume)
        if self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None

            async def cancel() -> None:
                await (await self._link.channel.get_underlay_channel()).basic_cancel(tag)

            await _closing(f"cancelling the consumer of {self.queue_name!r}", cancel())

    async def _on_message(self, delivered: Any) -> None:
        # aiormq runs this in a task of its own per message; QoS bounds how many.
        acks = self._acks
        if acks is not None and delivered.channel is acks.channel:
            acks.pending.append(delivered.delivery.delivery_tag)
        if self._stopping:
            return  # left unacknowledged: the broker gets it back when the channel closes
        properties = delivered.header.properties
        attempt = 1
        if properties.headers:
            headers = _amqp_headers(properties)
            retried = headers.pop(_ATTEMPT, None)
            if isinstance(retried, int):  # back from a delay queue, which added its x-death record
                attempt = retried
                for key in _DEATH_HEADERS:
                    headers.pop(key, None)
            count = headers.get("x-delivery-count")  # quorum queues count redeliveries
            if isinstance(count, int):
                attempt += count
        else:
            headers = {}
        await self._deliver(Message(
            data=delivered.body, content_type=properties.content_type or "", headers=headers,
            id=properties.message_id or "", queue=self.queue_name, correlation_id=properties.correlation_id,
            reply_to=properties.reply_to, attempt=attempt, redelivered=bool(delivered.delivery.redelivered),
            raw=delivered))

    async def _ack(self, message: Message) -> None:
        delivered = message.raw
        acks = self._acks
        tag = delivered.delivery.delivery_tag
        try:
            if acks is None or delivered.channel is not acks.channel:  # from a channel gone since
                await delivered.channel.basic_ack(tag, wait=False)
                return
            acks.settled[tag] = _ACK
            if acks.flushing:
                return  # the first of this turn sends it
            acks.flushing = True
            try:
                await asyncio.sleep(0)  # the handlers finishing in this turn of the loop acknowledge together
            finally:
                acks.flushing = False
            await acks.flush()
        except Exception as exc:  # the channel went down: the broker redelivers it
            log.warning("could not acknowledge message %s of %r (%r); the broker will redeliver it",
                        message.id, self.queue_name, exc)

    async def _requeue(self, message: Message) -> None:
        delivered = message.raw
        try:
            await delivered.channel.basic_nack(delivered.delivery.delivery_tag, requeue=True, wait=False)
        except Exception as exc:
            log.debug("nack of %s: %r (the broker requeues it with the channel)", message.id, exc)
        acks = self._acks
        if acks is not None and delivered.channel is acks.channel:
            acks.settled[delivered.delivery.delivery_tag] = _SETTLED

    async def _retry_later(self, message: Message, delay: float) -> bool:
        name = f"{self.queue_name}.retry.{message.attempt}"
        headers = {**message.headers, _ATTEMPT: message.attempt + 1}
        headers.pop("x-delivery-count", None)
        again = Message(data=message.data, content_type=message.content_type, headers=headers, id=message.id,
                        correlation_id=message.correlation_id, reply_to=message.reply_to)
        try:
            out = await self._publisher()
            if name not in out.declared:
                # A queue per attempt: its messages all wait about as long, so one expiring at the head
                # never holds back a shorter wait behind it; a wait ends in the consumer's queue.
                arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.queue_name}
                if out.queue_args:  # quorum: dead-lettering is confirmed, never dropped
                    arguments.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
                await out.declare(name, arguments)
            await out.publish(again, name, expiration=delay)
        except Exception as exc:
            log.warning("could not hand message %s of %r to the broker for its retry (%r); it waits here",
                        message.id, self.queue_name, exc)
            return False
        await self._ack(message)
        return True

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        out = await self._publisher()
        if self.dead_letter_queue not in out.declared:  # declared when first needed
            await out.declare(self.dead_letter_queue)
        dead = Message(data=message.data, content_type=message.content_type, headers=headers, id=message.id,
                       correlation_id=message.correlation_id)
        await out.publish(dead, self.dead_letter_queue)

    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        data, content_type, headers = _reply_payload(result, error)
        reply = Message(data=data, content_type=content_type, headers=headers, id=_new_id(),
                        correlation_id=message.correlation_id)
        # Not mandatory: a requester that gave up has no reply queue any more.
        await (await self._publisher()).publish(reply, message.reply_to or "", mandatory=False)

    async def delete_queues(self) -> None:
        """Delete this consumer's queue, its dead-letter queue and its delay
        queues on the broker."""
        await self._link.delete(self.queue_name, self.dead_letter_queue,
                                *(f"{self.queue_name}.retry.{n}" for n in range(1, self.max_retries + 1)))


###############################################################################
# Transports: HTTP ############################################################
###############################################################################

_RETRY_STATUSES = frozenset({502, 503, 504})
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def _http_host_url(host: str | None, ssl_context: Any) -> str:
    host = host or _setting("HTTP_HOST", "localhost:9000")
    if "://" in host:
        return host.rstrip("/")
    return f"{'https' if ssl_context else 'http'}://{host}"


class _NoAnswer(SendError):
    """An HTTP request timed out (``request()`` says so as RequestTimeout)."""


class _RetryableStatus(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return text + ("..." if len(body) > limit else "")


class HTTPProducer(Producer):
    """Sends each message as an HTTP request and returns the response body.

    A non-2xx answer raises :class:`HTTPError`; connection errors and
    502/503/504 are retried with backoff, ``retries`` times. Every request
    carries ``X-Message-Id`` so a consumer can de-duplicate retries.

    :param host: ``host:port`` (or a base URL) of the consumer; else
        ``HTTP_HOST``, default ``localhost:9000``.
    :param endpoint: the full URL; default ``http://{host}/{queue_name}``.
    :param timeout: seconds for a whole request (``send(timeout=)`` per call).
    :param auth_token: sent as ``Authorization: Bearer``; else ``HTTP_AUTH_TOKEN``.
    :param ssl_context: for HTTPS with a private CA or client certificates.
    :param pool_size: connections kept open to the consumer.
    """

    client = ("aiohttp", "aiohttp")
    brokered = False
    send_flags = frozenset({"method", "endpoint"})

    def _check_name(self, queue_name: Any) -> str:
        # The route: "/orders" means "orders"; "" (legacy HTTPProducer()) posts to the host's root.
        return "" if queue_name in ("", "/") else _check_queue_name(
            queue_name.strip("/") if isinstance(queue_name, str) else queue_name)

    def _message(self, msg: Any, headers_tag: str | None, header_tag: str | None,
                 content_type: str | None, headers: Mapping[str, Any] | None,
                 message_id: str | None) -> Message:
        if (isinstance(msg, str) and not (headers_tag or header_tag or content_type)
                and msg.lstrip().startswith(("{", "[")) and _is_json_text(msg)):
            content_type = JSON  # legacy services sent json.dumps(obj): it goes as the JSON it is
        return super()._message(msg, headers_tag, header_tag, content_type, headers, message_id)

    def _setup(self, host: str | None = None, endpoint: str | None = None, retries: int = 3,
               retry_backoff: float = 0.1, timeout: float = 30.0, auth_token: str | None = None,
               ssl_context: ssl.SSLContext | None = None, pool_size: int = 100) -> None:
        self._client()
        self.endpoint = endpoint or f"{_http_host_url(host, ssl_context)}/{self.queue_name}"
        if urllib.parse.urlsplit(self.endpoint).scheme not in ("http", "https"):
            raise ConfigError(f"an HTTP endpoint starts with http:// or https://, got {_redact(self.endpoint)!r}")
        self.retries = _number("retries", retries, int, 0)
        self.retry_backoff = _number("retry_backoff", retry_backoff)
        self.timeout = _number("timeout", timeout, float, 0.001)
        self.pool_size = _number("pool_size", pool_size, int, 1)
        token = auth_token if auth_token is not None else os.environ.get("HTTP_AUTH_TOKEN")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl_context
        self._shown_endpoint = _redact(self.endpoint)  # for messages, computed once

    async def _connect(self) -> None:
        aiohttp = self._client()
        self._aiohttp = aiohttp
        self._default_timeout = aiohttp.ClientTimeout(total=self.timeout)  # made once, not per request
        self._retryable = (aiohttp.ClientConnectionError, _RetryableStatus)
        self._session = aiohttp.ClientSession(
            timeout=self._default_timeout,
            connector=aiohttp.TCPConnector(limit=self.pool_size, ssl=self._ssl if self._ssl else True))

    async def _disconnect(self) -> None:
        await self._session.close()

    def _shown(self, endpoint: str | None) -> str:
        """The URL a request goes to, fit for a message (no password)."""
        return _redact(endpoint) if endpoint else self._shown_endpoint

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        try:
            async with asyncio.timeout(timeout):  # retries included: the caller's deadline is the whole exchange
                return await self._publish(message, timeout, **flags)
        except (TimeoutError, _NoAnswer):
            raise RequestTimeout(f"no answer from {self._shown(flags.get('endpoint'))} within {timeout}s") from None

    async def _publish(self, message: Message, timeout: float | None, method: str = "POST",
                       endpoint: str | None = None, **flags: Any) -> Any:
        # The common case (a POST of a message without headers) builds one dict literal and calls no
        # helper: on this path each step measured about 1% of a request, far more than on its own.
        if method != "POST":
            method = method.upper()
        headers = {"X-Message-Id": message.id, "X-Attempt": "1"}
        if message.headers:  # the message's own first: the envelope's win
            headers = {**{k: v if isinstance(v, str) else str(v) for k, v in message.headers.items()
                          if k != _EXPIRES}, **headers}
        if self._auth:
            headers.update(self._auth)
        if message.correlation_id:
            headers["X-Correlation-Id"] = message.correlation_id
        if method in _BODYLESS:
            if not isinstance(message.body, (Mapping, type(None))):
                raise EncodeError(f"{method} sends the message as query parameters: pass a dict, "
                                  f"got {type(message.body).__name__}")
            params = {k: v if isinstance(v, str) else _json_encode(v) for k, v in (message.body or {}).items()}
            data = None
        else:
            headers["Content-Type"] = message.content_type
            params, data = None, message.data
        timeout = timeout or self.timeout
        client_timeout = self._default_timeout if timeout == self.timeout else \
            self._aiohttp.ClientTimeout(total=timeout)
        request = (method, endpoint or self.endpoint, data, params, headers, client_timeout)
        try:
            status, body, ctype = await self._exchange(*request)
        except TimeoutError:
            raise self._no_answer(method, endpoint, timeout) from None
        except self._retryable as exc:
            status, body, ctype = await self._retried(exc, request, endpoint, timeout)
        if not 200 <= status < 300:
            raise HTTPError(status, _excerpt(body), self._shown(endpoint))
        if status == 202 or not body:
            return None
        return decode(body, ctype)

    async def _exchange(self, method: str, url: str, data: bytes | None, params: dict[str, str] | None,
                        headers: dict[str, str], timeout: Any) -> tuple[int, bytes, str]:
        """One request: its status, body and content type; 502/503/504 raise _RetryableStatus."""
        # Awaited, not entered: the context manager's four coroutines cost 1% of a request.
        response = await self._session.request(method, url, data=data, params=params, headers=headers,
                                               timeout=timeout)
        try:
            body = await response.read()
        finally:
            response.release()
        if response.status in _RETRY_STATUSES:
            raise _RetryableStatus(response.status, body)
        return response.status, body, response.headers.get("Content-Type", "")

    async def _retried(self, failed: BaseException, request: tuple[Any, ...], endpoint: str | None,
                       timeout: float) -> tuple[int, bytes, str]:
        """The first try of ``request`` failed with ``failed``: retry it with
        backoff (the same message id, ``X-Attempt`` counting), or raise what
        tells the caller why not."""
        method, headers = request[0], request[4]
        shown = self._shown(endpoint)
        attempt = 1

        async def again() -> tuple[int, bytes, str]:
            nonlocal attempt
            attempt += 1
            headers["X-Attempt"] = str(attempt)
            return await self._exchange(*request)

        try:
            result: tuple[int, bytes, str] = await _retry(
                again, what=f"{method} {shown}", retry_on=self._retryable, fatal=(TimeoutError,),
                attempts=self.retries + 1, base=self.retry_backoff, cap=5.0, failed=failed)
        except TimeoutError:
            raise self._no_answer(method, endpoint, timeout) from None
        except _RetryableStatus as exc:
            raise HTTPError(exc.status, _excerpt(exc.body), shown) from None
        except self._aiohttp.ClientConnectionError as exc:
            raise SendError(f"cannot reach {shown} after {attempt} attempt(s): "
                            f"{type(exc).__name__}: {exc}") from None
        return result

    def _no_answer(self, method: str, endpoint: str | None, timeout: float) -> _NoAnswer:
        # Not retried: the consumer may have taken the message and still be working on it.
        return _NoAnswer(f"{method} {self._shown(endpoint)} got no answer within {timeout}s; "
                         "the consumer may still handle it")


def _json_error(status: int, error: str, **headers: str) -> web.Response:
    json_response: Callable[..., web.Response] = importlib.import_module("aiohttp.web").json_response
    response: web.Response = json_response({"error": error}, status=status, headers=headers or None)
    return response


async def _read_chunked(request: web.Request, limit: int) -> bytes | None:
    """The body of a request without a length, or ``None`` once it is larger than ``limit``."""
    data = bytearray()
    async for chunk in request.content.iter_any():  # count as it comes
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


#: The paths every streamtools server answers, before its consumers' routes.
_SYSTEM_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class _HTTPServer:
    """One aiohttp application on host:port, shared by every HTTP consumer
    (and runner) of the event loop that asks for that address, and stopped
    when the last one leaves. It serves ``GET /healthz``, dispatches
    ``/{queue}`` to the consumer serving it now, and answers JSON 404s."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, shutdown_timeout: float,
                 app: web.Application | None = None) -> None:
        self._web = _require("aiohttp.web", "aiohttp")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.app = self._web.Application() if app is None else app
        #: Whether consumers' requests skip the application (not a service's own: its middlewares apply).
        self._direct = app is None
        self._app_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] | None = None
        self.app.router.add_get("/healthz", self._health)
        self.app.router.add_get("/readyz", self._readiness)
        self.app.router.add_get("/metrics", self._metrics)
        #: Consumers whose readiness ``/readyz`` reports, beside the routes' (a runner's).
        self.watched: list[Consumer] = []
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        #: The consumer serving each route.
        self.routes: dict[str, HTTPConsumer] = {}
        self._runner = self._web.AppRunner(self.app, access_log=None, shutdown_timeout=shutdown_timeout)
        self._users = 0

    @classmethod
    async def acquire(cls, host: str, port: int, ssl_context: ssl.SSLContext | None,
                      shutdown_timeout: float, app: web.Application | None = None) -> _HTTPServer:
        lock = _http_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:  # consumers starting at once on one address share one server, not race for it
            return await cls._acquire(host, port, ssl_context, shutdown_timeout, app)

    @classmethod
    async def _acquire(cls, host: str, port: int, ssl_context: ssl.SSLContext | None,
                       shutdown_timeout: float, app: web.Application | None) -> _HTTPServer:
        servers = _http_servers.setdefault(asyncio.get_running_loop(), {})
        server = servers.get((host, port))
        if server is not None and app is not None and server.app is not app:
            raise ConfigError(f"{host}:{port} is already served by another application")
        if server is None:
            server = cls(host, port, ssl_context, shutdown_timeout, app)
            await server._start()
            servers[(host, port)] = server
            if port == 0:  # later consumers of port 0 share it too, and those of its real port
                servers[(host, server.port)] = server
        elif server.ssl_context is not ssl_context and ssl_context is not None:
            raise ConfigError(f"{host}:{port} is already served with other TLS settings")
        server._users += 1
        return server

    async def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            servers = _http_servers.get(asyncio.get_running_loop(), {})
            for key in [key for key, server in servers.items() if server is self]:
                del servers[key]
            await self._runner.cleanup()  # aiohttp drains in-flight requests

    async def _start(self) -> None:
        await self._runner.setup()
        server = self._runner.server
        if self._direct and server is not None:  # each connection reads it when it opens
            self._app_handler, server.request_handler = server.request_handler, self._handle
        site = self._web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConnectionFailed(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._runner.addresses[0][1]
        log.info("serving HTTP on %s:%d", self.host, self.port)

    async def _health(self, request: web.Request) -> web.Response:
        response: web.Response = self._web.json_response({"status": "ok"})
        return response

    async def _readiness(self, request: web.Request) -> web.Response:
        consumers = {*self.watched, *self.routes.values()}
        waiting = sorted(c.queue_name for c in consumers if not c.ready)
        body = {"status": "waiting", "not_ready": waiting} if waiting else {"status": "ready"}
        response: web.Response = self._web.json_response(body, status=503 if waiting else 200)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        if _metrics is None:
            return _json_error(404, "metrics are off: call streamtools.enable_metrics() or set STREAMTOOLS_METRICS=1")
        data, content_type = _metrics.exposition()
        response: web.Response = self._web.Response(body=data, headers={"Content-Type": content_type})
        return response

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The server's handler, in front of the application's: a request for
        a consumer goes straight to it, without the router's resolution, match
        info and middleware chain (about 5% of a request's time). The
        application takes the rest: its routes, 404s, ``Expect:
        100-continue`` and legacy handlers, which take the request and may
        read its match info."""
        path = request.path
        consumer = self.routes.get(path[1:])
        if (consumer is None or path in _SYSTEM_PATHS or request.method in consumer._takes_request
                or "Expect" in request.headers):
            assert self._app_handler is not None
            return await self._app_handler(request)
        return await consumer._serve(request)  # type: ignore[arg-type]  # a web.Request: the app made it

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        consumer = self.routes.get(request.match_info["tail"])
        if consumer is None:
            return _json_error(404, f"no route {request.path!r}")
        return await consumer._serve(request)

    def url(self, path: str) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}/{path}"


def _takes_request(fn: Callable[..., Any]) -> bool:
    """Legacy HTTP handlers take the aiohttp ``Request``: their first
    parameter is annotated ``web.Request`` or named ``request``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params:
        return False
    annotation = params[0].annotation
    if isinstance(annotation, str):  # postponed annotations
        return annotation.rpartition(".")[2] in ("Request", "BaseRequest")
    if annotation is not inspect.Parameter.empty:
        return getattr(annotation, "__name__", "") in ("Request", "BaseRequest") and \
            getattr(annotation, "__module__", "").startswith("aiohttp")
    return params[0].name == "request"


_http_servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], _HTTPServer]] = \
    weakref.WeakKeyDictionary()
_http_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_RESPONSE: Any = "streamtools.response"  # where a request's response waits, on the aiohttp Request


class HTTPConsumer(Consumer):
    """Serves ``/{queue_name}``: a POST body is decoded by content type, a
    GET's query parameters arrive as a dict of strings. The handler's return
    value answers 200, ``None`` answers 202; bad input gets a JSON 4xx and
    never reaches the handler; a handler error answers 500. HTTP is
    synchronous: the caller sees failures, retries are the producer's.
    Consumers on the same host and port share one server.

    :param host: address to listen on (default ``0.0.0.0``).
    :param port: port (default ``HTTP_PORT``, else 9000; 0 picks a free one).
    :param max_body: largest body accepted, in bytes (413 above).
    :param auth_token: require ``Authorization: Bearer <token>``; else ``HTTP_AUTH_TOKEN``.
    :param ssl_context: serve HTTPS.

    ``max_retries`` and the backoff options are accepted, so transport-agnostic
    code can pass them, and unused: the producer retries.
    """

    client = ("aiohttp", "aiohttp")
    brokered = False
    handler_flags = frozenset({"method"})
    listens = True
    acks = False

    def _check_name(self, queue_name: Any) -> str:
        # The route: "/orders" (legacy) means "orders"; "" or "/" is the root.
        return "" if queue_name in ("", "/") else _check_queue_name(
            queue_name.strip("/") if isinstance(queue_name, str) else queue_name)

    def _setup(self, host: str | None = None, port: int | None = None, max_body: int = _DEFAULT_MAX_BODY,
               auth_token: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self._client()
        if any(c in self.queue_name for c in "/?#{}%"):
            raise ConfigError(f"an HTTP queue name is one path segment without / ? # {{ }} %, "
                              f"got {self.queue_name!r}")
        self.max_retries = 0  # the caller retries: a 500 tells it the handler failed
        self.host = host or "0.0.0.0"
        self.port = _port("port", _setting("HTTP_PORT", "9000") if port is None else port)
        self.max_body = _number("max_body", max_body, int, 0)
        token = auth_token if auth_token is not None else os.environ.get("HTTP_AUTH_TOKEN")
        self._auth = f"Bearer {token}".encode() if token else None
        self.ssl_context = ssl_context
        self._server: _HTTPServer | None = None
        self._mounted = False
        self._takes_request: set[str] = set()  # methods whose handler takes the aiohttp Request

    def _add_handler(self, key: str, fn: Callable[..., Any], entry: Callable[..., Any] | None = None) -> None:
        super()._add_handler(key, fn, entry)
        if _takes_request(fn):
            self._takes_request.add(key)
        else:
            self._takes_request.discard(key)

    def _handler_key(self, flags: dict[str, Any]) -> str:
        method = str(flags.get("method", "POST")).upper()
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ConfigError(f"method must be GET, POST, PUT, PATCH or DELETE, got {flags['method']!r}")
        return method

    def mount(self, app: web.Application) -> None:
        """Serve this consumer's route on an existing aiohttp ``Application``
        (its owner runs it; ``start()`` then opens no port of its own)."""
        app.router.add_route("*", f"/{self.queue_name}", self._serve)
        self._mounted = True

    @property
    def url(self) -> str:
        """The URL a producer posts to, once serving."""
        if self._server is None:
            raise ConfigError(f"HTTP consumer {self.queue_name!r} is not serving on a port of its own")
        return self._server.url(self.queue_name)

    def _producer_options(self) -> dict[str, Any]:
        return {"endpoint": self.url, "ssl_context": self.ssl_context}

    async def _connect(self) -> None:
        global _RESPONSE
        self._web = self._client("aiohttp.web")
        if isinstance(_RESPONSE, str) and hasattr(self._web, "RequestKey"):  # aiohttp >= 3.12 wants typed keys
            _RESPONSE = self._web.RequestKey(_RESPONSE, self._web.StreamResponse)

    async def _disconnect(self) -> None:
        """Nothing to release: the route left the server in ``_stop_intake``."""

    async def _start_intake(self) -> None:
        if self._mounted:
            return
        server = await _HTTPServer.acquire(self.host, self.port, self.ssl_context, self.drain_timeout)
        known = server.routes.get(self.queue_name)
        if known is not None and known is not self:
            await server.release()
            raise ConfigError(f"{self.host}:{self.port} already serves /{self.queue_name} for {known!r}")
        server.routes[self.queue_name] = self
        self._server = server

    async def _stop_intake(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.routes.pop(self.queue_name, None)
            await server.release()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if self._auth is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), self._auth):
            return _json_error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        method = request.method
        if method not in self._handlers:
            return _json_error(405, f"{method} is not allowed on /{self.queue_name}",
                               Allow=", ".join(sorted(self._handlers)))
        if not self._ready:  # mounted on a user's application without start()
            await self.a_init()
        headers = request.headers
        body: Any
        if method in self._takes_request:  # legacy: the handler reads the request itself
            data, ctype, body = b"", headers.get("Content-Type", ""), request
        elif method in _BODYLESS and not request.body_exists:
            data, ctype, body = b"", "", dict(request.query)
        else:  # a legacy producer's GET carries its JSON message as the body
            length = request.content_length
            if length is None:
                raw = await _read_chunked(request, self.max_body)
            else:
                raw = await request.content.read() if length <= self.max_body else None
            if raw is None:
                return _json_error(413, f"body larger than {self.max_body} bytes")
            data, ctype = raw, headers.get("Content-Type", "")
            try:
                body = decode(data, ctype)
            except DecodeError as exc:
                return _json_error(400, str(exc))
        attempt = headers.get("X-Attempt", "1")
        message = Message(body=body, data=data, content_type=ctype, headers=dict(headers),
                          id=headers.get("X-Message-Id") or next(_ids), queue=self.queue_name,
                          correlation_id=headers.get("X-Correlation-Id"), reply_to="",
                          attempt=1 if attempt == "1" or not attempt.isdigit() else int(attempt), raw=request)
        task = asyncio.current_task()
        assert task is not None
        await self._deliver_in(task, message, method, decoded=True)
        response: web.StreamResponse = request[_RESPONSE]
        return response

    # Settling a message is writing its response.

    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        web = self._web
        if error is not None:
            response = _json_error(500, "the handler failed; see the consumer's log", **{"X-Message-Id": message.id})
        elif isinstance(result, web.StreamResponse):  # legacy handlers answer with their own response
            response = result
        elif result is None:
            response = web.Response(status=202)
        else:
            try:
                if type(result) in _JSON_CONTAINERS:  # the common case, without encode()'s calls
                    data, ctype = _to_json(result), JSON
                else:
                    data, ctype = encode(result)
            except EncodeError as exc:  # the work is done; the caller learns its answer is lost
                log.error("the handler of %r returned what cannot be sent for message %s: %s",
                          self.queue_name, message.id, exc)
                response = _json_error(500, "the handler's return value cannot be encoded; see the consumer's log",
                                       **{"X-Message-Id": message.id})
            else:
                response = web.Response(body=data, headers={"Content-Type": ctype})
        message.raw[_RESPONSE] = response

    async def _ack(self, message: Message) -> None:
        """Nothing more: the response is the acknowledgement."""

    async def _requeue(self, message: Message) -> None:
        """Nothing to hand back: the caller sees its request fail and may retry."""

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        """No dead-letter queue: the caller gets the 500 and keeps its message."""


###############################################################################
# Transports: Kafka ###########################################################
###############################################################################

# The envelope travels in record headers (bytes), beside the message's own headers.
_K_TYPE, _K_ID, _K_CORRELATION, _K_REPLY_TO = "content-type", "message-id", "correlation-id", "reply-to"

#: Topics known to exist, per bootstrap servers, so each is created once per process.
_kafka_topics: dict[str, set[str]] = {}
#: Clusters that refused the idempotent producer, so it is tried once per process.
_kafka_no_idempotence: set[str] = set()


def _kafka_servers(servers: str | Sequence[str] | None) -> list[str]:
    """``host:port`` bootstrap servers from the option, else ``KAFKA_BOOTSTRAP_SERVERS``,
    else the legacy ``KAFKA_HOST``, else ``localhost:9092``; a comma-separated list."""
    raw = servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_HOST") or "localhost:9092"
    items = [item.strip() for item in (raw.split(",") if isinstance(raw, str) else raw) if item.strip()]
    if not items:
        raise ConfigError("bootstrap_servers names no Kafka server: give host:port[,host:port...]")
    for item in items:
        host, colon, port = item.rpartition(":")
        if not colon or not host or "/" in item:
            raise ConfigError(f"a Kafka bootstrap server is host:port, got {item!r}")
        _port(f"the port of Kafka bootstrap server {item!r}", port, 1)
    return items


_content_type_bytes: dict[str, bytes] = {}


def _kafka_headers(message: Message) -> list[tuple[str, bytes]]:
    content_type = _content_type_bytes.get(message.content_type)
    if content_type is None:
        content_type = message.content_type.encode()
        if len(_content_type_bytes) < 256:
            _content_type_bytes[message.content_type] = content_type
    headers = [(_K_TYPE, content_type), (_K_ID, message.id.encode())]
    if message.correlation_id:
        headers.append((_K_CORRELATION, message.correlation_id.encode()))
    if message.reply_to:
        headers.append((_K_REPLY_TO, message.reply_to.encode()))
    if message.headers:
        headers.extend((key, value.encode()) for key, value in _flat_headers(message.headers).items())
    return headers


def _kafka_envelope(record: Any) -> tuple[dict[str, Any], str, str, str | None, str | None]:
    """(headers, content type, id, correlation id, reply-to) of a record."""
    headers: dict[str, Any] = {}
    content_type, message_id, correlation_id, reply_to = BINARY, "", None, None
    for key, value in record.headers or ():  # one pass: this runs for every record
        if key == _K_TYPE:
            content_type = value.decode()
        elif key == _K_ID:
            message_id = value.decode()
        elif key == _K_CORRELATION:
            correlation_id = value.decode()
        elif key == _K_REPLY_TO:
            reply_to = value.decode()
        else:
            headers[key] = value.decode("utf-8", "replace")
    if _TYPED in headers:
        headers = _typed_headers(headers)
    return (headers, content_type, message_id or f"{record.topic}-{record.partition}-{record.offset}",
            correlation_id, reply_to)


class _KafkaEndpoint(_Endpoint):
    """The settings and the producing side both Kafka classes share.

    :param bootstrap_servers: ``host:port`` or a list (comma-separated in a
        string); else ``KAFKA_BOOTSTRAP_SERVERS``, else ``KAFKA_HOST``.
    :param connect_timeout: how long connecting is retried, then ``ConnectionFailed``.
    :param send_timeout: how long a send waits for the broker's acknowledgement.
    :param partitions: partitions of the topics it creates (a topic per queue).
    :param replication_factor: replicas of the topics it creates (default:
        as many brokers as the cluster has, at most 3).
    :param max_request_size: the largest record the producer sends, in bytes.
    :param security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``;
        with ``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``,
        ``sasl_plain_password`` (never shown in logs or errors), as aiokafka takes them.
    """

    client = ("aiokafka", "aiokafka")
    address_option = "bootstrap_servers"

    def _setup(self, *, bootstrap_servers: str | Sequence[str] | None = None, connect_timeout: float = 30.0,
               send_timeout: float = 30.0, partitions: int = 4, replication_factor: int | None = None,
               max_request_size: int = 1048576, security_protocol: str = "PLAINTEXT",
               ssl_context: ssl.SSLContext | None = None, sasl_mechanism: str | None = None,
               sasl_plain_username: str | None = None, sasl_plain_password: str | None = None) -> None:
        self._aiokafka = self._client()
        self._errors = self._client("aiokafka.errors")
        self.bootstrap_servers = _kafka_servers(bootstrap_servers)
        #: The bootstrap servers, for messages (Kafka puts no credentials in them).
        self.where = ",".join(self.bootstrap_servers)
        self.connect_timeout = _number("connect_timeout", connect_timeout)
        self.send_timeout = _number("send_timeout", send_timeout, float, 0.001)
        self.partitions = _number("partitions", partitions, int, 1)
        self.replication_factor = None if replication_factor is None else _number(
            "replication_factor", replication_factor, int, 1)
        self.max_request_size = _number("max_request_size", max_request_size, int, 1)
        security = {"security_protocol": security_protocol, "ssl_context": ssl_context,
                    "sasl_mechanism": sasl_mechanism, "sasl_plain_username": sasl_plain_username,
                    "sasl_plain_password": sasl_plain_password}
        self._client_options = {"bootstrap_servers": self.bootstrap_servers,
                                **{k: v for k, v in security.items() if v is not None}}
        self._producer: Any = None
        self._producer_lock: asyncio.Lock | None = None

    async def _start(self, client: Any, what: str, refusals: tuple[type[BaseException], ...] = ()) -> None:
        """Start an aiokafka client, retrying an unreachable cluster until
        ``connect_timeout``; then ``ConnectionFailed`` naming the servers.
        ``refusals`` pass through, for the caller to handle."""
        for server in self.bootstrap_servers:
            host, _, port = server.rpartition(":")
            await _resolve(host.strip("[]"), int(port), f"Kafka bootstrap server {server}")
        errors = self._errors
        try:
            await _retry(client.start, what=f"starting the Kafka {what} at {self.where}",
                         retry_on=(errors.KafkaConnectionError,), deadline=time.monotonic() + self.connect_timeout,
                         base=0.25, cap=5.0)
        except errors.KafkaError as exc:
            stop = getattr(client, "stop", None) or client.close  # the admin client closes instead
            await _closing(f"stopping a Kafka client of {self.where}", stop())
            if isinstance(exc, refusals):
                raise
            raise ConnectionFailed(f"cannot connect to Kafka at {self.where} within {self.connect_timeout}s: "
                                   f"{type(exc).__name__}: {exc}") from None

    async def _ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        known = _kafka_topics.setdefault(self.where, set())
        if topic in known:
            return
        admin_module = self._client("aiokafka.admin")
        admin = admin_module.AIOKafkaAdminClient(**self._client_options)
        await self._start(admin, "admin client")
        try:
            replicas = self.replication_factor or min(3, len((await admin.describe_cluster())["brokers"]) or 1)
            new = admin_module.NewTopic(topic, num_partitions=partitions or self.partitions,
                                        replication_factor=replicas)
            response = await admin.create_topics([new])
            for _, code, *rest in response.topic_errors:
                if code not in (0, 36):  # 36: it exists already
                    raise SendError(f"Kafka at {self.where} refused to create topic {topic!r}: "
                                    f"error {code} {rest[0] if rest else ''}")
        finally:
            await _closing(f"closing a Kafka admin client of {self.where}", admin.close())
        known.add(topic)

    async def _open_producer(self) -> Any:
        """A started producer with ``acks="all"``, idempotent where the broker
        supports it (Tansu, for one, refuses ``InitProducerId``)."""
        options = {**self._client_options, "acks": "all", "max_request_size": self.max_request_size,
                   "request_timeout_ms": int(self.send_timeout * 1000)}
        errors = self._errors
        if self.where not in _kafka_no_idempotence:
            producer = self._aiokafka.AIOKafkaProducer(enable_idempotence=True, **options)
            try:
                await self._start(producer, "producer",
                                  refusals=(errors.UnknownError, errors.UnsupportedVersionError))
                return producer
            except errors.KafkaError as exc:
                log.info("Kafka at %s refused the idempotent producer (%s); producing with acks=all only",
                         self.where, type(exc).__name__)
                _kafka_no_idempotence.add(self.where)
        producer = self._aiokafka.AIOKafkaProducer(**options)
        await self._start(producer, "producer")
        return producer

    async def _produce(self, topic: str, message: Message, key: Any = None, timeout: float | None = None) -> None:
        """Send one record and wait for the broker's acknowledgement."""
        if timeout is None:  # aiokafka bounds it by request_timeout_ms, which is send_timeout
            await self._acked(topic, message, await self._enqueue(topic, message, key))
            return
        try:
            async with asyncio.timeout(timeout):
                await self._acked(topic, message, await self._enqueue(topic, message, key))
        except TimeoutError:
            raise SendError(f"Kafka at {self.where} did not acknowledge the record to {topic!r} "
                            f"within {timeout}s") from None

    async def _ensure_producer(self) -> Any:
        if self._producer is None:
            if self._producer_lock is None:
                self._producer_lock = asyncio.Lock()
            async with self._producer_lock:
                if self._producer is None:
                    self._producer = await self._open_producer()
        return self._producer

    async def _enqueue(self, topic: str, message: Message, key: Any = None) -> Any:
        """Hand a record to the producer's batch; return the future of its acknowledgement."""
        producer = self._producer or await self._ensure_producer()
        if isinstance(key, str):
            key = key.encode()
        try:
            return await producer.send(topic, message.data, key=key, headers=_kafka_headers(message))
        except self._errors.KafkaError as exc:
            raise self._send_error(topic, message, exc) from None

    async def _acked(self, topic: str, message: Message, acked: Any) -> None:
        try:
            await acked
        except self._errors.KafkaError as exc:
            raise self._send_error(topic, message, exc) from None

    def _send_error(self, topic: str, message: Message, exc: BaseException) -> SendError:
        if isinstance(exc, self._errors.MessageSizeTooLargeError):
            return SendError(f"the record of {len(message.data)} bytes to {topic!r} is over the size limit "
                             f"(max_request_size={self.max_request_size}, or the broker's message.max.bytes)")
        if isinstance(exc, self._errors.KafkaTimeoutError):
            return SendError(f"Kafka at {self.where} did not acknowledge the record to {topic!r} "
                             f"within {self.send_timeout}s")
        return SendError(f"Kafka at {self.where} did not take the record to {topic!r}: {type(exc).__name__}: {exc}")

    async def _stop_producer(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _closing(f"stopping a Kafka producer of {self.where}", producer.stop())


class KafkaProducer(_KafkaEndpoint, Producer):
    """Sends records to the topic named after the queue (created with
    ``partitions`` if missing); ``send`` returns once the broker acknowledged
    the record with ``acks="all"``. ``send(key=...)`` keeps records of one key
    in order, in one partition. Requests get their replies on a reply topic of
    the producer's own, deleted on ``close()``. Options: see :class:`_KafkaEndpoint`."""

    send_flags = frozenset({"key"})
    tells_redelivery = False

    async def _connect(self) -> None:
        self._replies_ready = None
        self._reply_consumer: Any = None
        self._reply_pump: asyncio.Task[None] | None = None
        await self._ensure_topic(self.queue_name)
        self._producer = await self._open_producer()

    async def _disconnect(self) -> None:
        if self._reply_pump is not None:
            self._reply_pump.cancel()
        if self._reply_consumer is not None:
            await _closing("stopping the Kafka reply consumer", self._reply_consumer.stop())
            if self._replies_ready is not None and not self._replies_ready.cancelled() \
                    and self._replies_ready.exception() is None:
                await self._delete_topic(self._replies_ready.result())
        await self._stop_producer()

    async def _delete_topic(self, topic: str) -> None:
        admin = self._client("aiokafka.admin").AIOKafkaAdminClient(**self._client_options)
        try:
            await self._start(admin, "admin client")
            await _closing(f"deleting topic {topic!r}", admin.delete_topics([topic]))
        except ConnectionFailed as exc:
            log.debug("could not delete topic %r: %s", topic, exc)
        finally:
            await _closing("closing a Kafka admin client", admin.close())
        _kafka_topics.get(self.where, set()).discard(topic)

    async def _publish(self, message: Message, timeout: float | None, key: Any = None, **flags: Any) -> None:
        await self._produce(self.queue_name, message, key, timeout)

    async def _publish_many(self, batch: list[Message], timeout: float | None, key: Any = None,
                            **flags: Any) -> list[Any]:
        # Every record into the producer's batches first, then wait for the acknowledgements together.
        topic, acks = self.queue_name, []
        send, errors = (await self._ensure_producer()).send, self._errors
        if isinstance(key, str):
            key = key.encode()
        for message in batch:  # straight to aiokafka: one coroutine level less per record
            try:
                acks.append(await send(topic, message.data, key=key, headers=_kafka_headers(message)))
            except errors.KafkaError as exc:
                acks.append(self._send_error(topic, message, exc))

        # Waited for in order rather than gathered: a partition's records are acknowledged at once,
        # so most futures are done by the time their turn comes, and none costs a callback.
        results: list[Any] = []
        try:
            async with asyncio.timeout(timeout):
                for message, ack in zip(batch, acks):
                    if not isinstance(ack, BaseException):
                        if not ack.done():
                            await asyncio.wait((ack,))
                        error = SendError(f"sending to {topic!r} was cancelled") if ack.cancelled() \
                            else ack.exception()
                        ack = self._send_error(topic, message, error) \
                            if isinstance(error, errors.KafkaError) else error
                    results.append(ack)
        except TimeoutError:
            raise SendError(f"Kafka at {self.where} did not acknowledge {len(batch)} records to {topic!r} "
                            f"within {timeout}s") from None
        return results

    async def _listen_for_replies(self) -> str:
        topic = f"streamtools.reply.{_new_id()}"
        await self._ensure_topic(topic, partitions=1)
        consumer = self._aiokafka.AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                                   **self._client_options)
        await self._start(consumer, "reply consumer")
        consumer.assign([self._aiokafka.TopicPartition(topic, 0)])
        self._reply_consumer = consumer
        self._reply_pump = asyncio.create_task(self._pump_replies(consumer))
        return topic

    async def _pump_replies(self, consumer: Any) -> None:
        async for record in consumer:
            headers, content_type, _, correlation_id, _ = _kafka_envelope(record)
            self._on_reply(correlation_id, record.value or b"", content_type, headers)


class _Offsets:
    """One partition's records in flight: offsets may be committed up to the
    first record whose handler has not finished (the finished prefix)."""

    __slots__ = ("pending", "finished", "commit")

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.finished: set[int] = set()
        self.commit: int | None = None  # the next offset to read, once committed

    def done(self, offset: int) -> None:
        pending, finished = self.pending, self.finished
        if pending and pending[0] == offset and not finished:  # in order, the common case
            pending.popleft()
            self.commit = offset + 1
            return
        finished.add(offset)
        while pending and pending[0] in finished:
            first = pending.popleft()
            finished.discard(first)
            self.commit = first + 1


class KafkaConsumer(_KafkaEndpoint, Consumer):
    """Consumes the queue's topic as one consumer group (every consumer of a
    queue shares its messages), with up to ``prefetch`` records in flight
    across partitions. Offsets are committed only for records whose handler
    returned: each partition's finished prefix, every ``commit_interval``
    seconds, on rebalance and on ``stop()``. A consumer killed at any moment
    leaves its uncommitted records to the group.

    :param group: the consumer group (default: the queue name).
    :param session_timeout: seconds without heartbeats before the group gives
        this member's partitions to the others.
    :param commit_interval: seconds between commits of finished records.
    :param fetch_max_wait: seconds the broker may hold a fetch while it has
        nothing new (Kafka's default 0.5; Tansu holds it that long even when
        records arrive meanwhile, which delayed them by as much).
    Takes the options of :class:`KafkaProducer` too.
    """

    tells_redelivery = False

    def _setup(self, *, group: str | None = None, session_timeout: float = 10.0, commit_interval: float = 0.2,
               fetch_max_wait: float = 0.05, **options: Any) -> None:
        super()._setup(**options)
        self.fetch_max_wait = _number("fetch_max_wait", fetch_max_wait, float, 0.001)
        self.group = group or self.queue_name
        self.session_timeout = _number("session_timeout", session_timeout, float, 0.1)
        self.commit_interval = _number("commit_interval", commit_interval, float, 0.001)

    async def _connect(self) -> None:
        self._partitions: dict[int, _Offsets] = {}
        self._joined = asyncio.Event()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        await self._ensure_topic(self.queue_name)
        session_ms = int(self.session_timeout * 1000)
        self._consumer = self._aiokafka.AIOKafkaConsumer(
            group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, session_ms // 3),
            max_poll_records=self.prefetch, fetch_max_wait_ms=int(self.fetch_max_wait * 1000),
            **self._client_options)
        self._consumer.subscribe([self.queue_name], listener=self._rebalance_listener())
        await self._start(self._consumer, f"consumer of group {self.group!r}")

    def _rebalance_listener(self) -> Any:
        consumer = self

        class Listener(self._client("aiokafka.abc").ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await consumer._commit()  # what finished; the rest goes to the partition's new owner
                for tp in revoked:
                    consumer._partitions.pop(tp.partition, None)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                for tp in assigned:
                    consumer._partitions.setdefault(tp.partition, _Offsets())
                consumer._joined.set()

        return Listener()

    async def _start_intake(self) -> None:
        self._inbox = _Inbox()
        self._start_workers(self._inbox, self._received)
        self._tasks = [asyncio.create_task(self._fetch()), asyncio.create_task(self._commit_every())]
        # start() returns once the group gave this member its partitions (maybe none): a message
        # sent next is consumed at once, not after the join (about 0.3 s on Tansu).
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._joined.wait()
        except TimeoutError:
            log.warning("consumer of %r has not joined group %r on %s within %ss; it goes on joining",
                        self.queue_name, self.group, self.where, self.connect_timeout)

    def _received(self, record: Any) -> Message:
        headers, content_type, message_id, correlation_id, reply_to = _kafka_envelope(record)
        return Message(data=record.value or b"", content_type=content_type, headers=headers, id=message_id,
                       queue=self.queue_name, correlation_id=correlation_id, reply_to=reply_to, raw=record)

    async def _fetch(self) -> None:
        consumer, errors = self._consumer, self._errors
        low_water = max(1, self.prefetch // 4)  # fetch in batches, not a record per finished handler
        while not self._stopping:
            room = self.prefetch - self._in_flight
            if room < low_water:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=room)
            except errors.KafkaError as exc:
                log.warning("fetching from %r on %s failed (%r); retrying", self.queue_name, self.where, exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                self._partitions.setdefault(tp.partition, _Offsets()).pending.extend(r.offset for r in records)
                self._inbox.put_many(records)
                self._in_flight += len(records)

    async def _commit_every(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            await self._commit()

    async def _commit(self) -> None:
        """Commit each partition's finished prefix that moved since the last commit."""
        due = {p: o.commit for p, o in self._partitions.items() if o.commit is not None}
        if not due:
            return
        tps = {self._aiokafka.TopicPartition(self.queue_name, p): offset for p, offset in due.items()}
        try:
            await self._consumer.commit(tps)
        except self._errors.KafkaError as exc:  # a rebalance: the partitions' new owners redeliver
            log.warning("committing offsets of %r on %s failed (%r); uncommitted records are delivered again",
                        self.queue_name, self.where, exc)
            return
        for partition, offset in due.items():
            offsets = self._partitions.get(partition)
            if offsets is not None and offsets.commit == offset:
                offsets.commit = None

    def _settled(self, message: Message, done: bool) -> None:
        self._in_flight -= 1
        self._room.set()
        if done:
            offsets = self._partitions.get(message.raw.partition)
            if offsets is not None:  # else revoked: its new owner has the record again
                offsets.done(message.raw.offset)

    async def _stop_intake(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Records fetched but not started stay uncommitted: the group delivers them again.
        await self._stop_workers()

    async def _disconnect(self) -> None:
        await self._commit()
        await _closing(f"leaving group {self.group!r}", self._consumer.stop())
        await self._stop_producer()

    async def _ack(self, message: Message) -> None:
        self._settled(message, True)

    async def _requeue(self, message: Message) -> None:
        # Left uncommitted: the group delivers it again after this consumer is gone.
        self._settled(message, False)

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        await self._ensure_topic(self.dead_letter_queue)
        await self._produce(self.dead_letter_queue, Message(
            data=message.data, content_type=message.content_type, headers=headers, id=message.id,
            correlation_id=message.correlation_id))

    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        data, content_type, headers = _reply_payload(result, error)
        await self._produce(message.reply_to or "", Message(
            data=data, content_type=content_type, headers=headers, id=_new_id(),
            correlation_id=message.correlation_id))

    async def delete_queues(self) -> None:
        """Delete the queue's topic and its dead-letter topic."""
        admin = self._client("aiokafka.admin").AIOKafkaAdminClient(**self._client_options)
        try:
            await self._start(admin, "admin client")
            await _closing(f"deleting the topics of {self.queue_name!r}",
                           admin.delete_topics([self.queue_name, self.dead_letter_queue]))
        finally:
            await _closing("closing a Kafka admin client", admin.close())
        for topic in (self.queue_name, self.dead_letter_queue):
            _kafka_topics.get(self.where, set()).discard(topic)


###############################################################################
# Transports: NATS JetStream ##################################################
###############################################################################

# The envelope travels in NATS headers (strings); Nats-Msg-Id makes JetStream drop a resent duplicate.
_N_TYPE, _N_ID, _N_CORRELATION, _N_REPLY_TO = "Content-Type", "Nats-Msg-Id", "X-Correlation-Id", "X-Reply-To"
_N_ENVELOPE = frozenset({_N_TYPE, _N_ID, _N_CORRELATION, _N_REPLY_TO})

#: Streams known to exist, per server list, so each is created once per process.
_nats_streams: dict[str, set[str]] = {}


def _nats_servers(servers: str | Sequence[str] | None) -> list[str]:
    """Server URLs from the option, else ``NATS_URL`` (comma-separated), else localhost."""
    raw = servers or os.environ.get("NATS_URL") or "nats://localhost:4222"
    items = [item.strip() for item in (raw.split(",") if isinstance(raw, str) else raw) if item.strip()]
    if not items:
        raise ConfigError("servers names no NATS server: give nats://host:port[,nats://host:port...]")
    for item in items:
        parts = urllib.parse.urlsplit(item if "://" in item else f"nats://{item}")
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ConfigError(f"a NATS server is nats://host:port (or tls://), got {_redact(item)!r}")
        try:
            parts.port
        except ValueError:
            raise ConfigError(f"bad port in NATS server {_redact(item)!r}") from None
    return [item if "://" in item else f"nats://{item}" for item in items]


def _nats_name(queue: str) -> str:
    """A JetStream stream or consumer name for a queue: letters, digits, - and
    _ only; a short hash keeps apart queues that differ in other characters."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in queue)
    if name != queue:
        name = f"{name}-{hashlib.sha1(queue.encode()).hexdigest()[:8]}"
    return name


def _nats_subject(queue: str) -> str:
    subject = f"streamtools.{queue}"
    if any(not token or token in ("*", ">") for token in subject.split(".")) or any(c in queue for c in "*>"):
        raise ConfigError(f"queue {queue!r} does not make a NATS subject: no empty parts (..), no * or >")
    return subject


def _nats_headers(message: Message) -> dict[str, str]:
    headers = _flat_headers(message.headers) if message.headers else {}
    headers[_N_TYPE] = message.content_type
    headers[_N_ID] = message.id
    if message.correlation_id:
        headers[_N_CORRELATION] = message.correlation_id
    if message.reply_to:
        headers[_N_REPLY_TO] = message.reply_to
    return headers


def _nats_envelope(raw: dict[str, str] | None) -> tuple[dict[str, Any], str, str, str | None, str | None]:
    """(headers, content type, id, correlation id, reply-to) of a NATS message's headers."""
    headers: dict[str, Any] = {}
    content_type, message_id, correlation_id, reply_to = BINARY, "", None, None
    for key, value in (raw or {}).items():  # one pass: this runs for every message
        if key == _N_TYPE:
            content_type = value
        elif key == _N_ID:
            message_id = value
        elif key == _N_CORRELATION:
            correlation_id = value
        elif key == _N_REPLY_TO:
            reply_to = value
        else:
            headers[key] = value
    if _TYPED in headers:
        headers = _typed_headers(headers)
    return headers, content_type, message_id, correlation_id, reply_to


def _nats_delivered(msg: Any) -> int:
    """The delivery count from a JetStream message's ack subject: cheaper than
    nats-py's full ``metadata`` (timestamps and all), which only this needs."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4])
    return int(msg.metadata.num_delivered or 1)  # the newer form, with domain and account hash


class _NATSEndpoint(_Endpoint):
    """The settings and the connection both NATS classes share.

    :param servers: server URLs (a list, or comma-separated); else ``NATS_URL``.
        nats-py fails over between them and reconnects by itself.
    :param user: with ``password``; or ``token``; never shown in logs or errors.
    :param tls: an ``ssl.SSLContext`` (or use ``tls://`` URLs).
    :param connect_timeout: how long the first connection is retried.
    :param send_timeout: how long a send waits for JetStream's PubAck, through an outage.
    """

    client = ("nats", "nats-py")
    address_option = "servers"

    def _setup(self, *, servers: str | Sequence[str] | None = None, user: str | None = None,
               password: str | None = None, token: str | None = None, tls: ssl.SSLContext | None = None,
               connect_timeout: float = 30.0, send_timeout: float = 30.0) -> None:
        self._nats = self._client()
        self._nats_errors = self._client("nats.errors")
        self._js_errors = self._client("nats.js.errors")
        self.servers = _nats_servers(servers)
        #: ``host:port`` of each server, for messages (never credentials).
        self.where = ",".join(f"{p.hostname}:{p.port or 4222}" for p in map(urllib.parse.urlsplit, self.servers))
        self.connect_timeout = _number("connect_timeout", connect_timeout)
        self.send_timeout = _number("send_timeout", send_timeout, float, 0.001)
        credentials = {"user": user, "password": password, "token": token, "tls": tls}
        self._credentials = {k: v for k, v in credentials.items() if v is not None}
        self.subject = _nats_subject(self.queue_name)
        self.stream = _nats_name(self.queue_name)

    async def _open(self) -> None:
        for parts in map(urllib.parse.urlsplit, self.servers):
            await _resolve(parts.hostname or "localhost", parts.port or 4222, f"NATS at {self.where}")
        where = self.where

        async def disconnected() -> None:
            _connection_event(NATS, where, "lost")

        async def reconnected() -> None:
            _connection_event(NATS, where, "restored")

        async def error(exc: Exception) -> None:
            log.debug("NATS at %s: %r", where, exc)

        async def connect() -> Any:
            return await self._nats.connect(
                self.servers, connect_timeout=min(5.0, max(0.5, self.connect_timeout)), max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, allow_reconnect=True, disconnected_cb=disconnected,
                reconnected_cb=reconnected, error_cb=error, name="streamtools", **self._credentials)

        errors = self._nats_errors
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._nc = await _retry(connect, what=f"connecting to NATS at {where}",
                                        retry_on=(OSError, errors.NoServersError, errors.TimeoutError),
                                        fatal=(errors.AuthorizationError,), base=0.25, cap=5.0)
        except errors.AuthorizationError:
            raise ConnectionFailed(f"NATS at {where} refused the credentials: check user/password or token") from None
        except (TimeoutError, OSError, errors.Error) as exc:
            raise ConnectionFailed(f"cannot connect to NATS at {where} within {self.connect_timeout}s: "
                                   f"{type(exc).__name__}") from None
        self._js = self._nc.jetstream()

    async def _ensure_stream(self, stream: str, subject: str) -> None:
        known = _nats_streams.setdefault(self.where, set())
        if stream in known:
            return
        try:
            await self._js.add_stream(name=stream, subjects=[subject], retention="workqueue", storage="file")
        except self._js_errors.BadRequestError as exc:  # it exists with other settings
            info = await self._js.stream_info(stream)
            if subject not in (info.config.subjects or []):
                raise ConfigError(f"JetStream stream {stream!r} on {self.where} exists without subject "
                                  f"{subject!r}: delete it or use another queue name ({exc})") from None
        known.add(stream)

    async def _close_connection(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            self._nc = None
            await _closing(f"closing the connection to NATS at {self.where}", nc.close())

    async def _disconnect(self) -> None:
        await self._close_connection()

    async def _js_publish(self, subject: str, message: Message, timeout: float | None = None) -> None:
        """Publish to JetStream and wait for its PubAck, retrying through an
        outage until the send timeout (a resend carries the same Nats-Msg-Id,
        so the server drops it if the first one had arrived)."""
        timeout = self.send_timeout if timeout is None else timeout
        headers = _nats_headers(message)
        errors, js_errors = self._nats_errors, self._js_errors

        async def publish() -> None:
            await self._js.publish(subject, message.data, timeout=min(5.0, timeout), headers=headers)

        try:
            async with asyncio.timeout(timeout):
                await _retry(publish, what=f"publishing to {subject!r} on NATS at {self.where}",
                             retry_on=(errors.TimeoutError, errors.ConnectionClosedError, errors.NoRespondersError,
                                       js_errors.NoStreamResponseError, errors.ConnectionReconnectingError),
                             base=0.1, cap=2.0)
        except TimeoutError:
            raise SendError(f"NATS at {self.where} did not acknowledge the message to {subject!r} "
                            f"within {timeout}s") from None
        except (errors.Error, js_errors.Error) as exc:
            raise SendError(f"NATS at {self.where} refused the message to {subject!r}: "
                            f"{type(exc).__name__}: {exc}") from None


class NATSProducer(_NATSEndpoint, Producer):
    """Publishes to the queue's JetStream stream (work-queue retention, file
    storage, created if missing); ``send`` returns once JetStream acknowledged
    the message (PubAck). Requests use a core NATS inbox of the producer's own
    for the replies. Options: see :class:`_NATSEndpoint`."""

    async def _connect(self) -> None:
        self._replies_ready = None
        await self._open()
        await self._ensure_stream(self.stream, self.subject)

    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> None:
        await self._js_publish(self.subject, message, timeout)

    async def _publish_many(self, batch: list[Message], timeout: float | None, **flags: Any) -> list[Any]:
        # Pipelined: every message out at once, then the PubAcks together; one that failed is
        # sent again on its own, with the retries of send (its Nats-Msg-Id drops a duplicate).
        js, subject = self._js, self.subject
        acks = []
        for message in batch:
            try:
                acks.append(await js.publish_async(subject, message.data, headers=_nats_headers(message)))
            except (self._nats_errors.Error, self._js_errors.Error) as exc:
                acks.append(exc)
        outcomes = await asyncio.gather(*(a for a in acks if not isinstance(a, BaseException)),
                                        return_exceptions=True)
        pending = iter(outcomes)
        results: list[Any] = []
        for message, ack in zip(batch, acks):
            outcome = ack if isinstance(ack, BaseException) else next(pending)
            if isinstance(outcome, BaseException):
                try:
                    await self._js_publish(subject, message, timeout)
                    outcome = None
                except SendError as exc:
                    outcome = exc
            results.append(outcome if isinstance(outcome, BaseException) else None)
        return results

    async def _listen_for_replies(self) -> str:
        inbox: str = self._nc.new_inbox()

        async def on_reply(msg: Any) -> None:
            headers, content_type, _, correlation_id, _ = _nats_envelope(msg.headers)
            self._on_reply(correlation_id, msg.data, content_type, headers)

        await self._nc.subscribe(inbox, cb=on_reply)
        return inbox


class NATSConsumer(_NATSEndpoint, Consumer):
    """Consumes the queue's stream through one durable pull consumer named
    after the queue, shared by every consumer process of the queue. Up to
    ``prefetch`` messages are in flight (the pull batch and the server's
    max_ack_pending). A failed attempt is handed back to the server with its
    backoff as delay (``nak``), so it holds no slot; the attempt number is the
    server's delivery count, so it survives a crash. Handlers that run long
    keep their message with in-progress acks.

    :param ack_wait: seconds the server waits for an ack before redelivering
        (after a crash, say). Takes the options of :class:`NATSProducer` too.
    """

    def _setup(self, *, ack_wait: float = 30.0, **options: Any) -> None:
        super()._setup(**options)
        self.ack_wait = _number("ack_wait", ack_wait, float, 0.1)

    async def _connect(self) -> None:
        self._in_flight = 0
        self._room = asyncio.Event()
        self._handling: dict[int, tuple[Any, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        await self._open()
        try:
            await self._ensure_stream(self.stream, self.subject)
            api = self._client("nats.js.api")
            # The pull batch bounds the messages in flight here; the server's max_ack_pending also
            # counts messages waiting out a retry delay, so it gets room for them beyond prefetch.
            config = api.ConsumerConfig(durable_name=self.stream, ack_policy=api.AckPolicy.EXPLICIT,
                                        ack_wait=self.ack_wait, max_ack_pending=self.prefetch * 10,
                                        max_deliver=-1, filter_subject=self.subject)
            self._sub = await self._js.pull_subscribe(self.subject, durable=self.stream, stream=self.stream,
                                                      config=config)
        except BaseException:
            await self._close_connection()
            raise

    async def _start_intake(self) -> None:
        self._inbox = _Inbox()
        self._start_workers(self._inbox, self._received)
        self._tasks = [asyncio.create_task(self._fetch()), asyncio.create_task(self._keep_in_progress())]

    def _connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    def _received(self, msg: Any) -> Message:
        headers, content_type, message_id, correlation_id, reply_to = _nats_envelope(msg.headers)
        delivered = _nats_delivered(msg)
        self._handling[id(msg)] = (msg, time.monotonic())
        return Message(data=msg.data, content_type=content_type, headers=headers, id=message_id,
                       queue=self.queue_name, correlation_id=correlation_id, reply_to=reply_to,
                       attempt=delivered, redelivered=delivered > 1, raw=msg)

    async def _fetch(self) -> None:
        errors = self._nats_errors
        low_water = max(1, self.prefetch // 4)
        while not self._stopping:
            room = self.prefetch - self._in_flight
            if room < low_water:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await self._sub.fetch(batch=room, timeout=1.0)
            except errors.TimeoutError:
                continue
            except (errors.Error, self._js_errors.Error, OSError) as exc:
                log.warning("fetching from %r on NATS at %s failed (%r); retrying", self.queue_name, self.where, exc)
                await asyncio.sleep(0.5)
                continue
            self._in_flight += len(msgs)
            self._inbox.put_many(msgs)

    async def _keep_in_progress(self) -> None:
        """Tell the server that long-running handlers still work on their
        messages, so it does not redeliver them to another consumer meanwhile."""
        interval = self.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for msg, started in list(self._handling.values()):
                if now - started >= interval:
                    await _closing("in-progress ack", msg.in_progress())

    def _settled(self, message: Message) -> None:
        self._handling.pop(id(message.raw), None)
        self._in_flight -= 1
        self._room.set()

    async def _settle(self, message: Message, how: Callable[[], Awaitable[Any]], what: str) -> None:
        self._settled(message)
        try:
            await how()
        except Exception as exc:  # the server redelivers it after ack_wait
            log.warning("could not %s message %s of %r (%r); the server will deliver it again",
                        what, message.id, self.queue_name, exc)

    async def _stop_intake(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_workers()
        for msg in list(self._inbox.items):  # fetched, never started: back to the server now
            await _closing("nak", msg.nak())
        self._inbox.items.clear()

    async def _ack(self, message: Message) -> None:
        self._settled(message)
        try:
            await message.raw.ack()
        except Exception as exc:  # the server redelivers it after ack_wait
            log.warning("could not acknowledge message %s of %r (%r); the server will deliver it again",
                        message.id, self.queue_name, exc)

    async def _requeue(self, message: Message) -> None:
        await self._settle(message, message.raw.nak, "hand back")

    async def _retry_later(self, message: Message, delay: float) -> bool:
        await self._settle(message, functools.partial(message.raw.nak, delay=delay), "hand back")
        return True

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        subject = _nats_subject(self.dead_letter_queue)
        await self._ensure_stream(_nats_name(self.dead_letter_queue), subject)
        await self._js_publish(subject, Message(data=message.data, content_type=message.content_type,
                                                headers=headers, id=f"{message.id}.dead",
                                                correlation_id=message.correlation_id))

    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        data, content_type, headers = _reply_payload(result, error)
        reply = Message(data=data, content_type=content_type, headers=headers, id=_new_id(),
                        correlation_id=message.correlation_id)
        await self._nc.publish(message.reply_to or "", data, headers=_nats_headers(reply))

    async def delete_queues(self) -> None:
        """Delete the queue's stream and its dead-letter stream."""
        await self._open()
        try:
            for queue in (self.queue_name, self.dead_letter_queue):
                try:
                    await self._js.delete_stream(_nats_name(queue))
                except self._js_errors.NotFoundError:
                    pass
                _nats_streams.get(self.where, set()).discard(_nats_name(queue))
        finally:
            await self._close_connection()


###############################################################################
# Transports: Redis Streams ###################################################
###############################################################################

# An entry's fields: the body, and the envelope beside it (headers as JSON, so types survive).
_R_DATA, _R_TYPE, _R_ID, _R_HEADERS = b"data", b"content-type", b"id", b"headers"
_R_CORRELATION, _R_REPLY_TO = b"correlation-id", b"reply-to"
_REPLY_TTL = 60  # seconds a requester's reply stream outlives its last reply


def _redis_url(url: str | None) -> str:
    url = url or os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"a Redis URL starts with redis://, rediss:// (TLS) or unix://, got {_redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"bad port in Redis URL {_redact(url)!r}") from None
    return url


def _redis_fields(message: Message) -> dict[bytes, Any]:
    fields: dict[bytes, Any] = {_R_DATA: message.data, _R_TYPE: message.content_type, _R_ID: message.id}
    if message.headers:
        fields[_R_HEADERS] = _json_encode(message.headers)
    if message.correlation_id:
        fields[_R_CORRELATION] = message.correlation_id
    if message.reply_to:
        fields[_R_REPLY_TO] = message.reply_to
    return fields


def _redis_text(fields: dict[bytes, Any], key: bytes) -> str | None:
    value = fields.get(key)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _RedisEndpoint(_Endpoint):
    """The settings and the connection both Redis classes share.

    :param url: ``redis://`` or ``rediss://`` (TLS) URL with the database,
        and credentials if any (never shown); else ``REDIS_URL``.
    :param connect_timeout: how long the first connection is retried.
    :param send_timeout: how long a send retries through an outage.
    :param maxlen: trim the stream to about this many entries on each send
        (approximate, as Redis trims whole nodes); entries beyond it are lost.
    """

    client = ("redis", "redis")
    address_option = "url"

    def _setup(self, *, url: str | None = None, connect_timeout: float = 30.0, send_timeout: float = 30.0,
               maxlen: int | None = None) -> None:
        self._redis = self._client("redis.asyncio")
        self._redis_errors = self._client("redis.exceptions")
        self.url = _redis_url(url)
        parts = urllib.parse.urlsplit(self.url)
        #: ``host:port`` of the server, for messages (never the credentials).
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self.connect_timeout = _number("connect_timeout", connect_timeout)
        self.send_timeout = _number("send_timeout", send_timeout, float, 0.001)
        self.maxlen = None if maxlen is None else _number("maxlen", maxlen, int, 1)
        self.key = f"streamtools:{self.queue_name}"
        errors = self._redis_errors
        self._lost = (errors.ConnectionError, errors.TimeoutError, OSError)

    async def _open(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "unix":
            await _resolve(parts.hostname or "localhost", parts.port or 6379, f"Redis at {self.where}")
        self._r = self._redis.Redis.from_url(self.url, socket_connect_timeout=min(5.0, max(0.5, self.connect_timeout)),
                                             health_check_interval=15)
        errors = self._redis_errors
        try:
            await _retry(self._r.ping, what=f"connecting to Redis at {self.where}", retry_on=self._lost,
                         fatal=(errors.AuthenticationError, errors.ResponseError),
                         deadline=time.monotonic() + self.connect_timeout, base=0.25, cap=5.0)
        except (errors.AuthenticationError, errors.ResponseError) as exc:
            await self._close_connection()
            raise ConnectionFailed(f"Redis at {self.where} refused the connection: {type(exc).__name__} "
                                   "(check the user and password in the URL, or REDIS_URL)") from None
        except self._lost as exc:
            await self._close_connection()
            raise ConnectionFailed(f"cannot connect to Redis at {self.where} within {self.connect_timeout}s: "
                                   f"{type(exc).__name__}") from None

    async def _close_connection(self) -> None:
        r = getattr(self, "_r", None)
        if r is not None:
            self._r = None
            await _closing(f"closing the connection to Redis at {self.where}", r.aclose())

    async def _disconnect(self) -> None:
        await self._close_connection()

    async def _redo(self, what: str, operation: Callable[[], Awaitable[_T]], timeout: float | None = None) -> _T:
        """Run a Redis command, retrying a lost connection until ``timeout``
        (the send timeout), then ``SendError``: it never hangs or drops silently."""
        timeout = self.send_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                result: _T = await _retry(operation, what=f"{what} on Redis at {self.where}", retry_on=self._lost,
                                          base=0.1, cap=2.0)
                return result
        except TimeoutError:
            raise SendError(f"Redis at {self.where} did not take {what} within {timeout}s") from None
        except self._redis_errors.RedisError as exc:
            raise SendError(f"Redis at {self.where} refused {what}: {type(exc).__name__}: {exc}") from None

    async def _add(self, key: str, message: Message, timeout: float | None = None, maxlen: int | None = None) -> None:
        fields = _redis_fields(message)
        await self._redo(f"the message to {key!r}",
                         lambda: self._r.xadd(key, fields, maxlen=maxlen, approximate=True), timeout)


class RedisProducer(_RedisEndpoint, Producer):
    """Adds each message to the queue's stream (XADD); ``send`` returns once
    Redis accepted it. How durable that is depends on the server: see the
    README. Requests get replies on a stream of the requester's own, which
    expires when unused. Options: see :class:`_RedisEndpoint`."""

    async def _connect(self) -> None:
        self._replies_ready = None
        self._reply_pump: asyncio.Task[None] | None = None
        await self._open()

    async def _disconnect(self) -> None:
        if self._reply_pump is not None:
            pump, self._reply_pump = self._reply_pump, None  # the pump loops while it is set
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            if self._replies_ready is not None and self._replies_ready.done() \
                    and self._replies_ready.exception() is None:
                await _closing("deleting the reply stream", self._r.delete(self._replies_ready.result()))
        await self._close_connection()

    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> None:
        await self._add(self.key, message, timeout, self.maxlen)

    async def _publish_many(self, batch: list[Message], timeout: float | None, **flags: Any) -> list[Any]:
        # One pipeline, one round trip; on a lost connection the whole batch is sent again.
        async def add_all() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for message in batch:
                pipe.xadd(self.key, _redis_fields(message), maxlen=self.maxlen, approximate=True)
            result: list[Any] = await pipe.execute(raise_on_error=False)
            return result

        try:
            outcomes = await self._redo(f"{len(batch)} messages to {self.key!r}", add_all, timeout)
        except SendError as exc:
            return [exc] * len(batch)
        return [SendError(f"Redis refused the message: {o}") if isinstance(o, Exception) else None for o in outcomes]

    async def _listen_for_replies(self) -> str:
        key = f"streamtools:reply:{_new_id()}"
        self._reply_pump = asyncio.create_task(self._pump_replies(key))
        return key

    async def _pump_replies(self, key: str) -> None:
        last = "0-0"
        await asyncio.sleep(0)  # _reply_pump is set by now
        while self._reply_pump is not None:
            try:
                found = await self._r.xread({key: last}, block=1000, count=100)
            except self._lost as exc:
                log.warning("reading replies from Redis at %s failed (%r); retrying", self.where, exc)
                await asyncio.sleep(0.5)
                continue
            for _, entries in found or ():
                for entry_id, fields in entries:
                    last = entry_id
                    headers = _json_decode(fields[_R_HEADERS]) if _R_HEADERS in fields else {}
                    self._on_reply(_redis_text(fields, _R_CORRELATION), fields.get(_R_DATA, b""),
                                   _redis_text(fields, _R_TYPE) or BINARY, headers)


class RedisConsumer(_RedisEndpoint, Consumer):
    """Consumes the queue's stream as a member of one consumer group named
    after the queue. Entries are acknowledged (XACK, and deleted: the stream
    is a work queue) only after their handler returned. Entries a member left
    pending longer than ``claim_idle`` (it crashed) are claimed by the live
    members (XAUTOCLAIM); a member restarted under the same ``consumer_name``
    first takes back its own pending entries. A failed attempt stays pending
    and is claimed again after its backoff, so it holds no slot; its attempt
    number is the entry's delivery count, which survives a crash.

    :param claim_idle: seconds an entry may stay pending before another member takes it.
    :param consumer_name: this member's name in the group (default: host, process
        and a random part); give a stable one to resume own pending entries on restart.
    Takes the options of :class:`RedisProducer` too.
    """

    def _setup(self, *, claim_idle: float = 30.0, consumer_name: str | None = None, **options: Any) -> None:
        super()._setup(**options)
        self.claim_idle = _number("claim_idle", claim_idle, float, 0.01)
        self.group = self.queue_name
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{_new_id()}"

    async def _connect(self) -> None:
        self._in_flight = 0
        self._room = asyncio.Event()
        self._acks: list[Any] = []
        self._acked = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._retries: set[asyncio.TimerHandle] = set()
        await self._open()
        try:
            await self._r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except self._redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                await self._close_connection()
                raise ConfigError(f"cannot create consumer group {self.group!r} on {self.key!r}: {exc}") from None

    async def _start_intake(self) -> None:
        self._inbox = _Inbox()
        self._start_workers(self._inbox, None)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._flush_acks())]

    def _received(self, entry_id: bytes, fields: dict[bytes, Any], delivered: int) -> Message:
        headers = _json_decode(fields[_R_HEADERS]) if _R_HEADERS in fields else {}
        return Message(data=fields.get(_R_DATA, b""), content_type=_redis_text(fields, _R_TYPE) or BINARY,
                       headers=headers, id=_redis_text(fields, _R_ID) or entry_id.decode(), queue=self.queue_name,
                       correlation_id=_redis_text(fields, _R_CORRELATION), reply_to=_redis_text(fields, _R_REPLY_TO),
                       attempt=delivered, redelivered=delivered > 1, raw=entry_id)

    def _take(self, entries: list[Any], delivered: int | dict[bytes, int]) -> None:
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile (acknowledged by another member)
                continue
            count = delivered if isinstance(delivered, int) else delivered.get(entry_id, 2)
            self._in_flight += 1
            self._inbox.put(self._received(entry_id, fields, count))

    async def _counts(self, entries: list[Any]) -> dict[bytes, int]:
        """Delivery counts of claimed entries, from the group's pending list."""
        counts = {}
        for entry_id, _ in entries:
            pending = await self._r.xpending_range(self.key, self.group, entry_id, entry_id, 1)
            if pending:
                counts[entry_id] = pending[0]["times_delivered"]
        return counts

    async def _read(self) -> None:
        low_water = max(1, self.prefetch // 4)
        own = "0"  # first this member's own pending entries (a restart under the same name), then new ones
        next_claim = time.monotonic()
        while not self._stopping:
            room = self.prefetch - self._in_flight
            if room < low_water:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                if time.monotonic() >= next_claim:  # entries of members that died
                    next_claim = time.monotonic() + min(self.claim_idle / 2, 5.0)
                    _, claimed, *_ = await self._r.xautoclaim(self.key, self.group, self.consumer_name,
                                                              int(self.claim_idle * 1000), "0-0", count=room)
                    if claimed:
                        self._take(claimed, await self._counts(claimed))
                        continue
                found = await self._r.xreadgroup(self.group, self.consumer_name, {self.key: own},
                                                 count=room, block=None if own == "0" else 500)
            except self._lost as exc:
                log.warning("reading %r from Redis at %s failed (%r); retrying", self.queue_name, self.where, exc)
                await asyncio.sleep(0.5)
                continue
            except self._redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._r.xgroup_create(self.key, self.group, id="0", mkstream=True)  # the stream was deleted
                continue
            entries = found[0][1] if found else []
            if own == "0":
                if not entries:
                    own = ">"
                    continue
                self._take(entries, await self._counts(entries))
            else:
                self._take(entries, 1)

    async def _flush_acks(self) -> None:
        """Acknowledge finished entries in batches: XACK and XDEL, one round trip."""
        # Loops on a flag: redis-py turns a cancellation inside a command into a ConnectionError.
        while not self._stopping:
            await self._acked.wait()
            self._acked.clear()
            await self._flush()

    async def _flush(self) -> None:
        ids, self._acks = self._acks, []
        if not ids:
            return
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.xack(self.key, self.group, *ids)
            pipe.xdel(self.key, *ids)
            await pipe.execute()
        except self._lost as exc:  # unacknowledged: claimed again after claim_idle, handled twice at worst
            log.warning("acknowledging %d entries of %r on Redis at %s failed (%r); they will be delivered again",
                        len(ids), self.queue_name, self.where, exc)

    def _settled(self) -> None:
        self._in_flight -= 1
        self._room.set()

    async def _stop_intake(self) -> None:
        self._acked.set()  # wakes the ack flusher, which sees _stopping
        self._room.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._retries:
            handle.cancel()
        await self._stop_workers()
        self._inbox.items.clear()  # read, not started: pending, so claimed again (or re-read on restart)

    async def _disconnect(self) -> None:
        await self._flush()
        await self._close_connection()

    async def _ack(self, message: Message) -> None:
        self._settled()
        self._acks.append(message.raw)
        self._acked.set()

    async def _requeue(self, message: Message) -> None:
        self._settled()  # left pending: another member claims it after claim_idle

    async def _retry_later(self, message: Message, delay: float) -> bool:
        self._settled()

        def due() -> None:
            self._retries.discard(handle)
            if not self._stopping:
                asyncio.ensure_future(self._reclaim(message))

        handle = asyncio.get_running_loop().call_later(delay, due)
        self._retries.add(handle)
        return True

    async def _reclaim(self, message: Message) -> None:
        try:
            claimed = await self._r.xclaim(self.key, self.group, self.consumer_name, 0, [message.raw])
        except self._lost as exc:
            log.warning("could not take back entry %s of %r (%r); another member claims it after claim_idle",
                        message.id, self.queue_name, exc)
            return
        self._take(claimed, message.attempt + 1)

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        await self._add(f"streamtools:{self.dead_letter_queue}", Message(
            data=message.data, content_type=message.content_type, headers=headers, id=message.id,
            correlation_id=message.correlation_id))

    async def _reply(self, message: Message, result: Any, error: str | None) -> None:
        data, content_type, headers = _reply_payload(result, error)
        reply = Message(data=data, content_type=content_type, headers=headers, id=_new_id(),
                        correlation_id=message.correlation_id)
        key, fields = message.reply_to or "", _redis_fields(reply)

        async def send() -> Any:
            pipe = self._r.pipeline(transaction=False)
            pipe.xadd(key, fields, maxlen=1000, approximate=True)
            pipe.expire(key, _REPLY_TTL)  # a requester that went away leaves nothing behind for long
            return await pipe.execute()

        await self._redo(f"the reply to {key!r}", send)

    async def delete_queues(self) -> None:
        """Delete the queue's stream (with its group) and its dead-letter stream."""
        await self._open()
        try:
            await self._r.delete(self.key, f"streamtools:{self.dead_letter_queue}")
        finally:
            await self._close_connection()


###############################################################################
# Registries ##################################################################
###############################################################################


class _Registry(Mapping[str, type[_T]]):
    """Transport classes by name: case-insensitive, with aliases. Read-only:
    :func:`register_transport` adds to it."""

    def __init__(self) -> None:
        self._classes: dict[str, type[_T]] = {}
        self.aliases: dict[str, str] = {}

    def canonical(self, name: Any) -> str:
        """The registered name for ``name`` or one of its aliases.

        :raises UnknownTransport: no transport has that name; lists the valid ones.
        """
        if isinstance(name, str):
            if name in self._classes:
                return name
            found = self.aliases.get(name.lower())
            if found is not None:
                return found
        own = {key.lower() for key in self._classes}
        valid = sorted(self._classes) + sorted(alias for alias in self.aliases if alias not in own)
        raise UnknownTransport(f"unknown transport {name!r}; choose one of: {', '.join(valid)}")

    def __getitem__(self, name: Any) -> type[_T]:
        return self._classes[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        try:
            self.canonical(name)
        except UnknownTransport:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v.__name__}' for k, v in self._classes.items())}}}"

    def _add(self, name: str, cls: type[_T], aliases: Iterable[str]) -> None:
        self._classes[name] = cls
        for alias in (name, *aliases):
            self.aliases[alias.lower()] = name


#: Producer classes by transport name (``PRODUCERS[RABBITMQ]``, ``PRODUCERS["rabbitmq"]``).
PRODUCERS: _Registry[Producer] = _Registry()
#: Consumer classes by transport name; ``CONSUMERS`` is the same object.
CONSUMER_LOOPS: _Registry[Consumer] = _Registry()
CONSUMERS = CONSUMER_LOOPS


def register_transport(name: str, producer_cls: type[Producer], consumer_cls: type[Consumer],
                       aliases: Iterable[str] = ()) -> None:
    """Make a transport available in :data:`PRODUCERS` and :data:`CONSUMER_LOOPS`
    under ``name`` and ``aliases`` (case-insensitive); the classes' ``transport``
    becomes ``name``. Re-registering a name replaces it.

    :raises ConfigError: the classes are not a Producer and a Consumer.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a transport name must be a non-empty string, got {name!r}")
    if not (isinstance(producer_cls, type) and issubclass(producer_cls, Producer)):
        raise ConfigError(f"producer_cls must subclass streamtools.Producer, got {producer_cls!r}")
    if not (isinstance(consumer_cls, type) and issubclass(consumer_cls, Consumer)):
        raise ConfigError(f"consumer_cls must subclass streamtools.Consumer, got {consumer_cls!r}")
    aliases = tuple(aliases)
    producer_cls.transport = consumer_cls.transport = name
    PRODUCERS._add(name, producer_cls, aliases)
    CONSUMER_LOOPS._add(name, consumer_cls, aliases)
    # Every transport ignores the others' flags, so agnostic code can pass them.
    _known_flags.update(producer_cls.send_flags, consumer_cls.handler_flags)


register_transport(MEMORY, MemoryProducer, MemoryConsumer, aliases=("memory", "asyncio", "inproc"))
register_transport(RABBITMQ, RabbitMQProducer, RabbitMQConsumer, aliases=("rabbitmq", "rmq", "amqp"))
register_transport(HTTP, HTTPProducer, HTTPConsumer, aliases=("http", "posthandler"))
register_transport(KAFKA, KafkaProducer, KafkaConsumer, aliases=("kafka",))
register_transport(NATS, NATSProducer, NATSConsumer, aliases=("nats", "jetstream"))
register_transport(REDIS, RedisProducer, RedisConsumer, aliases=("redis", "redis-streams"))

# The legacy library's class names.
AsyncIOProducer, AsyncIOConsumerLoop = MemoryProducer, MemoryConsumer
RMQIOProducer, RMQIOConsumerLoop = RabbitMQProducer, RabbitMQConsumer
HTTPConsumerLoop = HTTPConsumer
KafkaConsumerLoop = KafkaConsumer

#: The legacy package's modules: each is this module under that name.
_LEGACY_MODULES = ("constants", "consumers", "factories", "libs", "producers", "queues")


def _register_legacy_modules(name: str) -> None:
    """Make ``from streamtools.constants import HTTP`` (and the other legacy
    submodules) import this one module, as six registers ``six.moves``."""
    module = sys.modules.get(name)
    if module is not None:
        for legacy in _LEGACY_MODULES:
            sys.modules.setdefault(f"{name}.{legacy}", module)


def __getattr__(name: str) -> Any:  # PEP 562: streamtools.constants.HTTP after `import streamtools`
    if name in _LEGACY_MODULES:
        return sys.modules[__name__]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_legacy_modules(__name__)


###############################################################################
# Helpers: HandleMsgs, HandlerFactory, ConsumerFactory, ConsumerRunner ########
###############################################################################


class HandleMsgs:
    """A consumer/producer pair for one queue of a legacy config dict::

        {"queue_1": {"name": "queue_1", "consumer_loop": RABBITMQ, "producer": RABBITMQ}}

    Either side may be left out; the two may use different transports.
    ``.consumer`` and ``.producer`` are the pair; calling the object is the
    consumer's decorator and ``send`` is the producer's.

    :raises ConfigError: the config is missing the queue or names an unknown transport.
    """

    def __init__(self, queue_name: str, msg_queues: Mapping[str, Any],
                 queues_labels: Mapping[str, Any] | None = None,
                 consumer_loops_dict: Mapping[str, Any] | None = None,
                 producers_dict: Mapping[str, Any] | None = None, *,
                 consumer_options: Mapping[str, Any] | None = None,
                 producer_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(msg_queues, Mapping):
            raise ConfigError(f"the queue config must be a dict of queues, got {type(msg_queues).__name__}")
        if queue_name not in msg_queues:
            raise ConfigError(f"queue {queue_name!r} is not in the config; it has {sorted(msg_queues)}")
        config = msg_queues[queue_name]
        if not isinstance(config, Mapping):
            raise ConfigError(f"config of {queue_name!r} must be a dict with 'name', 'consumer_loop' and "
                              f"'producer', got {config!r}")
        unknown = set(config) - {"name", "consumer_loop", "producer"}
        if unknown:
            raise ConfigError(f"config of {queue_name!r} has unknown key(s) {sorted(unknown)}; "
                              "it takes 'name', 'consumer_loop' and 'producer'")
        label = (queues_labels or {}).get(queue_name)
        self.queue_name = (label.get("queue") if isinstance(label, Mapping) else None) or config.get("name") \
            or queue_name
        #: Legacy: the config and its labels ``{label: {"queue": name}}``.
        self.msg_queues = msg_queues
        self.queues_labels = queues_labels or {queue_name: {"queue": self.queue_name}}
        if not config.get("consumer_loop") and not config.get("producer"):
            raise ConfigError(f"config of {queue_name!r} names neither a 'consumer_loop' nor a 'producer'")
        consumer_cls = self._lookup(consumer_loops_dict or CONSUMER_LOOPS, config, queue_name, "consumer_loop")
        producer_cls = self._lookup(producers_dict or PRODUCERS, config, queue_name, "producer")
        self.consumer: Consumer | None = \
            consumer_cls(self.queue_name, **(consumer_options or {})) if consumer_cls else None
        self.producer: Producer | None = \
            producer_cls(self.queue_name, **(producer_options or {})) if producer_cls else None

    @staticmethod
    def _lookup(registry: Mapping[str, Any], config: Mapping[str, Any], queue_name: str, key: str) -> Any:
        if not config.get(key):
            return None
        try:
            return registry[config[key]]
        except UnknownTransport as exc:
            raise ConfigError(f"{queue_name}.{key}: {exc}") from None
        except KeyError:  # a legacy service's own dict of classes
            raise ConfigError(f"{queue_name}.{key}: unknown transport {config[key]!r}; "
                              f"choose one of: {', '.join(sorted(registry))}") from None

    @property
    def consumer_loop(self) -> Consumer | None:
        """Legacy name of :attr:`consumer`."""
        return self.consumer

    @property
    def handles(self) -> tuple[Consumer | None, Producer | None]:
        """Legacy: the ``(consumer_loop, producer)`` pair."""
        return self.consumer, self.producer

    @property
    def types(self) -> tuple[str | None, str | None]:
        """Legacy: the transport names of the consumer and the producer."""
        return (self.consumer.transport if self.consumer else None,
                self.producer.transport if self.producer else None)

    @property
    def shared_queue(self) -> Any:
        """Legacy: what the pair shares: the port of an HTTP consumer, else the queue name."""
        if self.consumer is not None and self.consumer.listens:
            return self.consumer.port  # type: ignore[attr-defined]
        return self.queue_name

    def add_agent_uuid(self, **keys: str) -> None:
        """Legacy: pass the agent's ids to both sides (see :meth:`Producer.add_agent_uuid`)."""
        for side in self.handles:
            if side is not None:
                side.add_agent_uuid(**keys)

    def __repr__(self) -> str:
        return f"<HandleMsgs {self.queue_name!r} consumer={self.consumer!r} producer={self.producer!r}>"

    def _need(self, side: str) -> Any:
        obj = getattr(self, side)
        if obj is None:
            raise ConfigError(f"queue {self.queue_name!r} has no {side} in its config")
        return obj

    def __call__(self, *args: Any, **flags: Any) -> Any:
        """The consumer's decorator."""
        return self._need("consumer")(*args, **flags)

    async def send(self, msg: Any, **flags: Any) -> Any:
        """The producer's ``send``."""
        return await self._need("producer").send(msg, **flags)

    async def request(self, msg: Any, timeout: float = 5.0, **flags: Any) -> Any:
        """The producer's ``request``."""
        return await self._need("producer").request(msg, timeout, **flags)

    async def a_init(self) -> None:
        """Connect both sides."""
        for side in (self.consumer, self.producer):
            if side is not None:
                await side.a_init()

    async def close(self) -> None:
        """Stop the consumer and close the producer."""
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.close()


class HandlerFactory:
    """:class:`HandleMsgs` for every queue of a legacy config dict;
    ``factory["queue_1"]`` is one of them, ``.handlers`` all of them."""

    def __init__(self, msg_queues: Mapping[str, Any], consumer_options: Mapping[str, Any] | None = None,
                 producer_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(msg_queues, Mapping) or not msg_queues:
            raise ConfigError('HandlerFactory takes a non-empty dict like {"queue_1": {"name": "queue_1", '
                              f'"consumer_loop": "RMQIOHandler", "producer": "RMQIOHandler"}}}}, got {msg_queues!r}')
        #: Legacy: the config as given.
        self.configs = msg_queues
        self.handlers = {key: HandleMsgs(key, msg_queues, consumer_options=consumer_options,
                                         producer_options=producer_options) for key in msg_queues}
        #: Legacy: ``{label: {"queue": name, "uuid": "", "handler": HandleMsgs}}``.
        self.queues_labels = {key: {"queue": h.queue_name, "uuid": "", "handler": h}
                              for key, h in self.handlers.items()}
        self._web_app: web.Application | None = None

    @property
    def web_app(self) -> web.Application:
        """Legacy: an aiohttp ``Application`` for this factory's HTTP routes
        (see :func:`prepare_aiohttp_app`); made, and aiohttp imported, when first used."""
        if self._web_app is None:
            self._web_app = _require("aiohttp.web", "aiohttp").Application()
        return self._web_app

    def __getitem__(self, queue: str) -> HandleMsgs:
        return self.handlers[queue]

    @property
    def consumers(self) -> list[Consumer]:
        """The consumers of every queue that has one."""
        return [h.consumer for h in self.handlers.values() if h.consumer is not None]

    async def a_init(self) -> None:
        """Connect every pair."""
        for handle in self.handlers.values():
            await handle.a_init()

    async def close(self) -> None:
        """Stop every consumer and close every producer."""
        for handle in self.handlers.values():
            await handle.close()


def _unserved(fn: _F) -> _F:
    """Legacy ``supports_http=False``: the route is not served; calling the
    function passes ``{}`` as the message."""
    @functools.wraps(fn)
    def without_message(*args: Any, **kwargs: Any) -> Any:
        return fn({}, *args, **kwargs)

    return without_message  # type: ignore[return-value]


class ConsumerFactory:
    """Creates one consumer per route of a given transport, Flask style::

        consumers = ConsumerFactory(HTTP, port=9000)

        @consumers.route("queue_1")
        async def handler(msg): ...

    :param queue_type: a transport name of :data:`CONSUMER_LOOPS`.
    :param port: the port HTTP consumers are served on.
    :param host: the address HTTP consumers listen on.
    :param supports_http: legacy: ``False`` on an HTTP factory leaves routes
        unserved (the decorated function is called with ``{}`` instead).
    :param in_class: legacy, accepted: handlers decorated in a class body are
        bound to the instance of their class whatever it says.
    :param options: passed to every consumer (``prefetch``, ``url``...).
    """

    def __init__(self, queue_type: str, port: int = 9000, host: str | None = None, supports_http: bool = True,
                 in_class: bool = False, **options: Any) -> None:
        self.queue_type = queue_type
        self.supports_http = supports_http
        self.in_class = in_class
        self.consumer_class: type[Consumer] = CONSUMER_LOOPS[queue_type]
        self.port = port
        self.host = host
        self.options = dict(options)
        if self.consumer_class.listens:
            self.options.update(port=port, host=host)
        #: The consumers created, in route order.
        self.instances: list[Consumer] = []
        #: The handler functions registered, in route order.
        self.handlers: list[Callable[..., Any]] = []
        self._by_queue: dict[str, Consumer] = {}

    def route(self, queue_name: str, **flags: Any) -> Callable[[_F], _F]:
        """Decorator: handle ``queue_name`` with the decorated function."""
        if self.consumer_class.listens and not self.supports_http:
            return _unserved
        consumer = self._by_queue.get(queue_name)
        if consumer is None:
            consumer = self.consumer_class(queue_name, **self.options)
            self._by_queue[queue_name] = consumer
            self.instances.append(consumer)
        decorate = consumer(**flags)

        def register(fn: _F) -> _F:
            result: _F = decorate(fn)
            self.handlers.append(fn)
            return result

        return register

    def register(self, fn: _F) -> _F:
        """Legacy: list a handler in :attr:`handlers` (routed ones already are)."""
        if fn not in self.handlers and getattr(fn, "__wrapped__", None) not in self.handlers:
            self.handlers.append(fn)
        return fn

    def mount(self, app: web.Application) -> None:
        """Serve every HTTP route on an existing aiohttp ``Application``."""
        http = [c for c in self.instances if isinstance(c, HTTPConsumer)]
        if len(http) < len(self.instances):
            raise ConfigError(f"only HTTP consumers can be mounted, these are {self.consumer_class.transport}")
        for consumer in http:
            consumer.mount(app)

    def runner(self, **options: Any) -> ConsumerRunner:
        """A :class:`ConsumerRunner` serving these consumers."""
        return ConsumerRunner(consumers=self.instances, port=self.port, host=self.host, **options)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (see :meth:`ConsumerRunner.run`)."""
        self.runner().run()


@contextlib.asynccontextmanager
async def _signals_set(event: asyncio.Event) -> AsyncIterator[None]:
    """SIGINT and SIGTERM set ``event`` while inside; the handlers are removed after."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        try:
            loop.add_signal_handler(sig, event.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        yield
    finally:
        for sig in signals:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass


class _LazyWebApp:
    """``ConsumerRunner.WEBAPP``: the legacy shared aiohttp ``Application`` a
    service adds its own routes to before ``run()``; made (and aiohttp
    imported) when first used."""

    app: Any = None

    def __get__(self, obj: Any, owner: Any) -> web.Application:
        if _LazyWebApp.app is None:
            _LazyWebApp.app = _require("aiohttp.web", "aiohttp").Application()
        app: web.Application = _LazyWebApp.app
        return app


def _service_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop a legacy service set up with ``asyncio.get_event_loop()``
    and ran ``a_init()`` in, if any: its connections live there. CPython keeps
    it on the event loop policy; where that cannot be read, None."""
    local = getattr(asyncio.get_event_loop_policy(), "_local", None)
    loop = getattr(local, "_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_closed() and not loop.is_running():
        return loop
    return None


class ConsumerRunner:
    """Runs a set of consumers: every HTTP route on one aiohttp application on
    ``host:port`` (a port is bound only when there are HTTP consumers or
    routes added to :attr:`webapp`), every RabbitMQ consumer on one shared
    connection.

    ``run()`` blocks until SIGINT or SIGTERM, then stops gracefully. For
    embedding and tests: ``await runner.start()`` / ``await runner.stop()`` or
    ``async with runner:``.

    :param consumers: the consumers (``ConsumerFactory.instances``).
    :param handlers: legacy: handlers to register, by position, on consumers
        that have none yet.
    :param port: HTTP port (default: the consumers' port, else 9000; 0 picks one).
    :param host: HTTP address (default: the consumers' host, else ``0.0.0.0``).
    :param ssl_context: serve the HTTP routes over HTTPS.
    """

    #: Legacy: an aiohttp ``Application`` (shared, as the legacy one was) that a
    #: service may add its own routes to before ``run()``; they are served on
    #: the runner's host and port beside the consumers' routes.
    WEBAPP = _LazyWebApp()

    def __init__(self, consumers: Sequence[Consumer] = (), handlers: Sequence[Callable[..., Any]] = (),
                 port: int | None = None, host: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.consumers = list(consumers)
        if not self.consumers:
            raise ConfigError("ConsumerRunner needs consumers=[...] (for example ConsumerFactory(...).instances)")
        for consumer in self.consumers:
            if not isinstance(consumer, Consumer):
                raise ConfigError(f"consumers must be streamtools consumers, got {consumer!r}")
        handlers = list(handlers)
        bare = [c for c in self.consumers if not c._handlers]
        if bare:
            if len(handlers) != len(self.consumers):
                raise ConfigError(f"consumer(s) {[c.queue_name for c in bare]} have no handler: decorate one, "
                                  "or pass handlers=[...] with one handler per consumer, in the same order")
            for consumer, handler in zip(self.consumers, handlers):
                if not consumer._handlers:
                    consumer()(handler)
        listening: list[Any] = [c for c in self.consumers if c.listens]
        self.host = host or next((c.host for c in listening), "0.0.0.0")
        self.port = port if port is not None else next((c.port for c in listening), 9000)
        self.ssl_context = ssl_context or next((c.ssl_context for c in listening if c.ssl_context), None)
        self._health_port = port is not None  # serve /healthz, /readyz, /metrics there, HTTP consumers or not
        self._server: _HTTPServer | None = None
        self._started = False

    @property
    def webapp(self) -> web.Application:
        """Legacy: :attr:`WEBAPP`."""
        return self.WEBAPP

    async def app(self) -> None:
        """Legacy: start serving and return (the service then runs its loop)."""
        await self.start()

    async def start(self) -> None:
        """Connect every consumer and start serving."""
        if self._started:
            return
        own = _LazyWebApp.app
        own = own if own is not None and len(own.router.routes()) > 0 else None  # a legacy service's routes
        if own is not None or self._health_port:
            drain = max((c.drain_timeout for c in self.consumers), default=30.0)
            self._server = await _HTTPServer.acquire(self.host, self.port, self.ssl_context, drain, app=own)
            self.port = self._server.port
            if own is not None:
                _LazyWebApp.app = None  # served (and frozen) now: the next runner gets a fresh one
        for consumer in self.consumers:  # listening consumers share one server on the runner's address
            if consumer.listens:
                consumer.host, consumer.port = self.host, self.port  # type: ignore[attr-defined]
                consumer.ssl_context = self.ssl_context  # type: ignore[attr-defined]
        started: list[Consumer] = []
        try:
            for consumer in self.consumers:  # one by one: the first creates the shared server
                if consumer.listens:
                    await consumer.start()
                    started.append(consumer)
                    self.port = consumer.port = consumer._server.port  # type: ignore[attr-defined]
            others = [c for c in self.consumers if not c.listens]
            results = await asyncio.gather(*(c.start() for c in others), return_exceptions=True)
            started += [c for c, result in zip(others, results) if result is None]
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            await asyncio.gather(*(c.stop() for c in started), return_exceptions=True)
            await self._release_server()
            raise
        server = self._server or next((c._server for c in self.consumers if c.listens), None)  # type: ignore
        if server is not None:
            server.watched.extend(self.consumers)
        self._started = True

    async def _release_server(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.watched = [c for c in server.watched if c not in self.consumers]
            await server.release()

    async def stop(self) -> None:
        """Stop gracefully: finish in-flight work, then close connections."""
        if not self._started:
            return
        self._started = False
        results = await asyncio.gather(*(c.stop() for c in self.consumers), return_exceptions=True)
        for consumer, result in zip(self.consumers, results):
            if isinstance(result, BaseException):
                log.error("stopping %r failed: %r", consumer, result)
        await self._release_server()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def serve(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop gracefully."""
        stop = asyncio.Event()
        async with _signals_set(stop), self:
            where = f" on {self.host}:{self.port}" if any(c.listens for c in self.consumers) else ""
            log.info("serving %d consumer(s)%s; SIGINT or SIGTERM stops", len(self.consumers), where)
            await stop.wait()
            log.info("stopping")

    def run(self) -> None:
        """Block serving until SIGINT or SIGTERM; then stop gracefully and
        return. A legacy service that connected its producers and consumers
        in ``asyncio.get_event_loop()`` is served in that same loop."""
        loop = _service_loop()
        try:
            if loop is None:
                asyncio.run(self.serve())
            else:
                loop.run_until_complete(self.serve())
        except KeyboardInterrupt:  # where signal handlers are unavailable
            pass


async def prepare_aiohttp_app(app: web.Application | None = None, routes: Any = None, port: int | None = None,
                              handler_group: HandlerFactory | None = None, classes: Sequence[Any] = (),
                              host: str | None = None) -> web.TCPSite | None:
    """Legacy: add ``routes`` to an aiohttp ``app`` and return a ``TCPSite``
    on ``host:port``, set up but not started (``await site.start()``). With
    ``handler_group`` (a :class:`HandlerFactory`), its HTTP consumers are
    mounted on its ``web_app`` on their port instead. ``None`` when there is
    nothing to serve. ``classes`` is accepted: methods decorated in a class
    body bind to their instance by themselves.
    """
    aiohttp_web = _require("aiohttp.web", "aiohttp")
    if handler_group is not None:
        http = [c for c in handler_group.consumers if isinstance(c, HTTPConsumer)]
        if not http:
            return None
        app = handler_group.web_app
        for consumer in http:
            consumer.mount(app)
        port = port or http[0].port
    elif app is None or routes is None or not port:
        return None
    else:
        app.add_routes(routes)
    runner = aiohttp_web.AppRunner(app)
    await runner.setup()
    site: web.TCPSite = aiohttp_web.TCPSite(runner, host, port)
    return site


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def bench(kind: str = MEMORY, n: int = 10000, size: int = 100, concurrency: int = 50,
                progress: Callable[[int, int], None] | None = None, timeout: float | None = None,
                **options: Any) -> dict[str, Any]:
    """Measure a transport end to end (send, handler, acknowledgement):
    ``concurrency`` senders each send a message of ``size`` payload bytes and
    wait until it was handled before sending the next, so latency is that of
    one message with ``concurrency`` in flight, not of a backlog.

    The run uses a queue of its own and deletes it at the end.

    :param timeout: seconds for the whole run (default: 30 plus 10 ms a message).
    :return: ``msgs_per_sec``, ``p50_ms`` and ``p99_ms`` among others.
    :raises StreamtoolsError: messages were missing when the timeout ran out.
    """
    queue = f"streamtools-bench-{_new_id()}"
    consumer_cls, producer_cls = CONSUMER_LOOPS[kind], PRODUCERS[kind]
    place: dict[str, Any] = {"host": "127.0.0.1", "port": 0} if consumer_cls.listens else {}
    consumer = consumer_cls(queue, prefetch=max(64, concurrency), **place, **options)
    waiting: dict[int, asyncio.Future[None]] = {}
    latencies: list[float] = []
    handled = 0
    clock = time.perf_counter

    @consumer()
    async def handle(msg: Any) -> None:
        nonlocal handled
        handled += 1
        future = waiting.pop(msg["seq"], None)
        if future is not None and not future.done():
            future.set_result(None)

    payload = "x" * size
    loop = asyncio.get_running_loop()

    async def sender(producer: Producer, first: int) -> None:
        for seq in range(first, n, concurrency):
            future = waiting[seq] = loop.create_future()
            began = clock()
            await producer.send({"seq": seq, "payload": payload})
            await future
            latencies.append(clock() - began)

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            if progress:
                progress(len(latencies), handled)

    timeout = 30 + n / 100 if timeout is None else _number("timeout", timeout, float, 0.001)
    producer: Producer | None = None
    try:
        await consumer.start()
        producer = producer_cls(queue, **consumer._producer_options(), **options)
        await producer.a_init()
        started = clock()
        reporter = asyncio.create_task(report())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(sender(producer, i) for i in range(min(concurrency, n))))
        except TimeoutError:
            raise StreamtoolsError(f"bench on {consumer_cls.transport} timed out after {timeout}s: "
                                   f"{n - handled} of {n} messages were not handled") from None
        finally:
            reporter.cancel()
        elapsed = clock() - started
        if progress:
            progress(len(latencies), handled)
    finally:
        if producer is not None:
            await producer.close()
        await consumer.stop(timeout=1)
        await consumer.delete_queues()
    latencies.sort()
    return {"transport": consumer_cls.transport, "n": n, "size": size, "concurrency": concurrency,
            "seconds": round(elapsed, 4), "msgs_per_sec": round(n / elapsed, 1),
            "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
            "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3)}


###############################################################################
# Command line ################################################################
###############################################################################


def _body_from_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _printable(message: Message) -> dict[str, Any]:
    body = message.body
    line: dict[str, Any] = {"id": message.id, "queue": message.queue, "content_type": message.content_type,
                            "attempt": message.attempt, "headers": message.headers}
    if isinstance(body, bytes):
        line["body_base64"] = base64.b64encode(body).decode()
    else:
        line["body"] = body
    return line


#: CLI options passed to a transport that takes them (its ``_setup`` says).
_CLI_OPTIONS = ("endpoint", "host", "port", "connect_timeout")


def _transport_options(args: argparse.Namespace, cls: type[Producer] | type[Consumer]) -> dict[str, Any]:
    takes = cls.option_names()
    options = {name: getattr(args, name) for name in _CLI_OPTIONS
               if name in takes and getattr(args, name, None) is not None}
    if getattr(args, "url", None) and cls.address_option:  # --url is the broker's address
        options[cls.address_option] = args.url
    return options


async def _cli_send(args: argparse.Namespace) -> int:
    cls = PRODUCERS[args.transport]
    async with cls(args.queue, **_transport_options(args, cls)) as producer:
        body = _body_from_text(args.message)
        if args.request:
            reply = await producer.request(body, timeout=args.timeout)
        else:
            reply = await producer.send(body, timeout=args.timeout)
    if reply is not None or args.request:
        print(json.dumps(reply) if not isinstance(reply, bytes) else base64.b64encode(reply).decode())
    return 0


async def _cli_listen(args: argparse.Namespace) -> int:
    cls = CONSUMER_LOOPS[args.transport]
    consumer = cls(args.queue, **_transport_options(args, cls))
    seen = 0
    done = asyncio.Event()

    @consumer()
    async def show(body: Any) -> None:
        nonlocal seen
        print(json.dumps(_printable(current_message()), default=str), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    async with consumer, _signals_set(done):
        print(f"listening on {args.queue!r} ({consumer.transport}); Ctrl-C stops", file=sys.stderr, flush=True)
        await done.wait()
    return 0


def _load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected MODULE:ATTR, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] and exc.name != module_name:
            raise  # the module exists but imports something missing: show that
        raise ConfigError(f"no module {module_name!r} (looked in {os.getcwd()} and sys.path)") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no {attr!r}") from None
    return obj


def _runner_for(obj: Any, port: int | None, host: str | None) -> ConsumerRunner:
    if isinstance(obj, ConsumerRunner):
        if port is not None:
            obj.port = port
        if host:
            obj.host = host
        return obj
    if isinstance(obj, ConsumerFactory):
        return ConsumerRunner(consumers=obj.instances, port=obj.port if port is None else port,
                              host=host or obj.host)
    if isinstance(obj, HandlerFactory):
        return ConsumerRunner(consumers=obj.consumers, port=port, host=host)
    if isinstance(obj, Consumer):
        return ConsumerRunner(consumers=[obj], port=port, host=host)
    raise ConfigError(f"{obj!r} is not a ConsumerFactory, ConsumerRunner, HandlerFactory or Consumer")


async def _cli_bench(args: argparse.Namespace) -> int:
    def progress(sent: int, received: int) -> None:
        print(f"\rsent {sent}/{args.n}, handled {received}/{args.n}", end="", file=sys.stderr, flush=True)

    options = _transport_options(args, CONSUMER_LOOPS[args.transport])
    options.pop("port", None)
    options.pop("host", None)
    result = await bench(args.transport, args.n, args.size, args.concurrency, progress, args.timeout, **options)
    print(file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['transport']}: {result['n']} messages of {result['size']} bytes, "
              f"concurrency {result['concurrency']}: {result['msgs_per_sec']:,.0f} msg/s, "
              f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    return 0


async def _cli_demo(args: argparse.Namespace) -> int:
    """Two services: ``orders`` asks ``pricing`` for prices (request/reply)
    and announces each order on ``notifications``."""
    kind = args.transport
    cls = CONSUMER_LOOPS[kind]
    place: dict[str, Any] = {"host": "127.0.0.1", "port": 0} if cls.listens else {}
    options = {**place, **_transport_options(args, cls)}
    pricing, orders, notifications = (cls(f"streamtools-demo.{name}", **options)
                                      for name in ("pricing", "orders", "notifications"))
    prices = {"apple": 0.5, "pear": 0.75, "plum": 0.25}
    to: dict[str, Producer] = {}
    announced: list[Any] = []
    done = asyncio.Event()

    @pricing()
    async def price(item: dict[str, Any]) -> dict[str, Any]:
        return {"item": item["item"], "unit_price": prices[item["item"]]}

    @orders()
    async def take_order(order: dict[str, Any]) -> dict[str, Any]:
        quote = await to["pricing"].request({"item": order["item"]}, timeout=10)
        total = round(quote["unit_price"] * order["quantity"], 2)
        await to["notifications"].send({"order": order["id"], "total": total})
        return {"order": order["id"], "total": total}

    @notifications()
    async def notify(note: dict[str, Any]) -> None:
        print(f"notifications: order {note['order']} confirmed, total {note['total']:.2f}")
        announced.append(note)
        if len(announced) == 3:
            done.set()

    runner = ConsumerRunner(consumers=[pricing, orders, notifications], **place)
    try:
        await _demo(runner, kind, to, done, _transport_options(args, PRODUCERS[kind]))
    finally:
        for consumer in runner.consumers:  # leave nothing behind on a broker
            await consumer.delete_queues()
    print("demo finished: 3 orders priced and announced")
    return 0


async def _demo(runner: ConsumerRunner, kind: str, to: dict[str, Producer], done: asyncio.Event,
                options: dict[str, Any]) -> None:
    async with runner:
        for consumer in runner.consumers:
            to[consumer.queue_name.rpartition(".")[2]] = PRODUCERS[kind](
                consumer.queue_name, **{**options, **consumer._producer_options()})
        try:
            print(f"demo on the {kind} transport: orders -> pricing (request/reply) -> notifications")
            for number, (item, quantity) in enumerate([("apple", 4), ("pear", 2), ("plum", 10)], 1):
                order = {"id": number, "item": item, "quantity": quantity}
                print(f"orders: placing {order}")
                print(f"orders: reply {await to['orders'].request(order, timeout=10)}")
            await asyncio.wait_for(done.wait(), 10)
        finally:
            for producer in to.values():
                await producer.close()


def _cli_port(text: str) -> int:
    try:
        return _port("port", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    kinds = ", ".join(sorted(set(PRODUCERS.aliases) - {name.lower() for name in PRODUCERS}))
    parser = argparse.ArgumentParser(prog="streamtools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"streamtools {__version__}")
    # -v and -q work before and after the subcommand: SUPPRESS keeps a subcommand's
    # default from overwriting what was given before it.
    for target, default in ((parser, False), (None, argparse.SUPPRESS)):
        logs = argparse.ArgumentParser(add_help=False) if target is None else target
        logs.add_argument("-v", "--verbose", action="store_true", default=default, help="log at DEBUG")
        logs.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings only")
        if target is None:
            common = logs
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], **kwargs)
        sub.set_defaults(parser=sub)
        return sub

    def transport_first(sub: argparse.ArgumentParser, *slots: str) -> None:
        # `send rabbitmq QUEUE MSG` and `send --transport rabbitmq QUEUE MSG` both work.
        sub.add_argument("words", nargs="+", metavar="ARG", help=f"[KIND] {' '.join(slots)}")
        sub.add_argument("--transport", metavar="KIND", help=f"instead of KIND: {kinds}")
        sub.set_defaults(word_names=slots)

    def broker_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--url", help="the broker's address: RabbitMQ URL (default from RMQ_URL / RMQ_HOST...), "
                                       "Kafka bootstrap servers (KAFKA_BOOTSTRAP_SERVERS)")
        sub.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                         help="how long to try connecting to a broker (default 30)")

    send = command("send", help="send one message", usage="%(prog)s [options] [KIND] QUEUE MESSAGE",
                   description="Send MESSAGE (JSON, else text) to QUEUE.")
    transport_first(send, "QUEUE", "MESSAGE")
    send.add_argument("--request", action="store_true", help="wait for the reply and print it")
    send.add_argument("--timeout", type=float, default=10.0)
    send.add_argument("--endpoint", help="HTTP URL to send to (default http://$HTTP_HOST/QUEUE)")
    broker_options(send)
    send.set_defaults(run=_cli_send)

    listen = command("listen", help="print each message received as a JSON line",
                     usage="%(prog)s [options] [KIND] QUEUE")
    transport_first(listen, "QUEUE")
    listen.add_argument("--count", type=int, default=0, help="exit after this many messages")
    listen.add_argument("--host", help="HTTP: address to listen on")
    listen.add_argument("--port", type=_cli_port, help="HTTP: port to listen on")
    broker_options(listen)
    listen.set_defaults(run=_cli_listen)

    run = command("run", help="serve the consumers of MODULE:ATTR until SIGINT/SIGTERM")
    run.add_argument("target", metavar="MODULE:ATTR",
                     help="a ConsumerFactory, ConsumerRunner, HandlerFactory or Consumer")
    run.add_argument("--host")
    run.add_argument("--port", type=_cli_port)
    run.set_defaults(run=None)

    bench_cmd = command("bench", help="end-to-end throughput and latency")
    bench_cmd.add_argument("--transport", default="memory", metavar="KIND", help=f"one of: {kinds}")
    bench_cmd.add_argument("-n", type=int, default=20000, help="messages (default 20000)")
    bench_cmd.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    bench_cmd.add_argument("--concurrency", type=int, default=50,
                           help="messages in flight: senders that each wait for their message (default 50)")
    bench_cmd.add_argument("--timeout", type=float, help="seconds for the whole run (default 30 + n/100)")
    bench_cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    broker_options(bench_cmd)
    bench_cmd.set_defaults(run=_cli_bench)

    demo = command("demo", help="two services talking, on the memory transport by default")
    demo.add_argument("--transport", default="memory", metavar="KIND", help=f"one of: {kinds} (default memory)")
    broker_options(demo)
    demo.set_defaults(run=_cli_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``streamtools`` command; returns the exit status."""
    # User code loaded by `run` imports streamtools: give it this module, not a second copy.
    sys.modules.setdefault("streamtools", sys.modules[__name__])
    _register_legacy_modules("streamtools")
    args = _build_parser().parse_args(argv)
    sub: argparse.ArgumentParser = args.parser
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if hasattr(args, "words"):
        words = list(args.words)
        if args.transport is None and len(words) == len(args.word_names) + 1:
            args.transport = words.pop(0)
        if args.transport is None or len(words) != len(args.word_names):
            sub.error(f"takes KIND {' '.join(args.word_names)} (or --transport KIND "
                      f"{' '.join(args.word_names)}), got {len(args.words)} argument(s)")
        for name, word in zip(args.word_names, words):
            setattr(args, name.lower(), word)
    if hasattr(args, "transport") and args.transport not in PRODUCERS:
        sub.error(f"unknown transport {args.transport!r}; choose one of: {', '.join(sorted(PRODUCERS.aliases))}")
    for flag, name in (("-n", "n"), ("--concurrency", "concurrency"), ("--size", "size")):
        if getattr(args, name, 1) < (0 if name == "size" else 1):
            sub.error(f"{flag} must be at least {0 if name == 'size' else 1}")
    if args.command in ("send", "listen") and PRODUCERS[args.transport].in_process:
        sub.error("the memory transport lives inside one process, so a message sent from (or listened "
                  "for in) this command reaches no other program; use a broker or http, or try "
                  "`streamtools demo`")
    try:
        if args.command == "run":
            _runner_for(_load(args.target), args.port, args.host).run()
            return 0
        return int(asyncio.run(args.run(args)))
    except StreamtoolsError as exc:
        print(f"streamtools: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
