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
    "BrokerEndpoint",
    "BrokeredConsumer",
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
    "HTTPRemoteError",
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
    "Outbox",
    "OutboxProducer",
    "OutboxRelay",
    "POSTGRES",
    "PRODUCERS",
    "PostgresConsumer",
    "PostgresProducer",
    "Producer",
    "PullingConsumer",
    "PumpedReplies",
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
    "SQS",
    "SQSConsumer",
    "SQSProducer",
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
import math
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
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    NamedTuple,
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
SQS = "SQSHandler"
POSTGRES = "PostgresHandler"

#: Content types a body is encoded with. Text is UTF-8, and ``text/*`` without a charset
#: decodes as UTF-8; plain ``text/plain`` is what other clients (FastStream) match exactly.
JSON = "application/json"
TEXT = "text/plain"
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


class _Address(NamedTuple):
    """Where a broker is: its URLs (or ``host:port``), and ``where``, the
    ``host:port`` list for messages (never a credential)."""

    urls: list[str]
    where: str
    hosts: list[tuple[str, int]]


def _addresses(given: str | Sequence[str] | None, env: Sequence[str], default: str, what: str,
               schemes: Sequence[str], port: int | Mapping[str, int], bare: bool = False) -> _Address:
    """The addresses of a broker: the option, else the first of the ``env``
    variables that is set, else ``default``; a list, or comma-separated in a
    string. Each must have one of ``schemes`` (``bare``: may be ``host:port``
    alone, which gets the first scheme) and a valid port (default ``port``, or
    ``port[scheme]``).

    :raises ConfigError: naming what is wrong, with any password redacted.
    """
    raw = given or next((os.environ[name] for name in env if os.environ.get(name)), None) or default
    items = [item.strip() if isinstance(item, str) else item for item in (raw.split(",") if isinstance(raw, str)
                                                                             else raw)]
    if not items or not all(isinstance(item, str) and item for item in items):
        shown = [_redact(item) if isinstance(item, str) else item for item in items]
        raise ConfigError(f"{what} takes {schemes[0]}://host:port or a list of them, got {shown!r}")
    urls, hosts = [], []
    for item in items:
        url = f"{schemes[0]}://{item}" if bare and "://" not in item else item
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in schemes or "://" not in url or not (parts.hostname or parts.scheme == "unix") \
                or (bare and parts.path):
            others = ", ".join(f"{s}://" for s in schemes[1:])
            raise ConfigError(f"a {what} address is {'host:port or ' if bare else ''}{schemes[0]}://host:port"
                              f"{f' (or {others})' if others else ''}, got {_redact(item)!r}")
        try:
            number = parts.port or (port.get(parts.scheme, 0) if isinstance(port, Mapping) else port)
        except ValueError:
            raise ConfigError(f"bad port in {what} address {_redact(item)!r}") from None
        urls.append(url)
        hosts.append((parts.path, 0) if parts.scheme == "unix" else (parts.hostname or "", number))
    where = ",".join(host if not number else f"{host}:{number}" for host, number in hosts)
    return _Address(urls, where, [(host, number) for host, number in hosts if number])


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


class HTTPRemoteError(HTTPError, RemoteError):
    """An HTTP consumer's handler failed (status 500): the :class:`RemoteError`
    every transport raises for that, and an :class:`HTTPError`."""

    def __init__(self, error: str, body: str, url: str = "") -> None:
        super().__init__(500, body, url)
        self.error = error
        self.args = (f"the consumer at {url or 'the endpoint'} failed: {error}",)

    def __str__(self) -> str:
        return str(self.args[0])


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


class _Unreadable(Exception):
    """A received message whose envelope cannot be read; ``message`` holds
    what could be (its body untouched), for the dead-letter queue."""

    def __init__(self, message: Message, reason: str) -> None:
        super().__init__(reason)
        self.message = message


class _Envelope:
    """How a message's envelope travels in key/value headers (Kafka, NATS,
    Redis, HTTP, SQS): its content type, id, correlation id and
    reply-to under the transport's names (matched without regard to case, as
    other clients spell them), beside the message's own headers, whose values
    keep their types: a value that is not a string travels as JSON text, named
    in ``x-st-json`` (or, with ``nested``, all of them as one JSON object under
    that key, as Redis has always carried them).
    """

    __slots__ = ("names", "nested", "_slots")

    def __init__(self, content_type: str, message_id: str, correlation_id: str, reply_to: str,
                 nested: str | None = None) -> None:
        self.names = (content_type, message_id, correlation_id, reply_to)
        self.nested = nested
        # Every key of the envelope, in the transport's spelling and in lower case, to its slot.
        keys = (*self.names, _TYPED, *((nested,) if nested else ()))
        self._slots = {name: slot for slot, name in enumerate(keys)}
        self._slots.update({name.lower(): slot for name, slot in list(self._slots.items())})

    def pairs(self, message: Message) -> dict[str, str]:
        """The envelope and the headers of ``message`` as strings."""
        headers = message.headers
        if not headers:
            pairs = {}
        elif self.nested:
            pairs = {self.nested: _json_encode(headers)}
        else:
            pairs, typed = {}, []
            for key, value in headers.items():
                if isinstance(value, str):
                    pairs[key] = value
                else:
                    pairs[key] = _json_encode(value)
                    typed.append(key)
            if typed:
                pairs[_TYPED] = ",".join(typed)
        content_type, message_id, correlation_id, reply_to = self.names
        pairs[content_type] = message.content_type
        pairs[message_id] = message.id
        if message.correlation_id:
            pairs[correlation_id] = message.correlation_id
        if message.reply_to:
            pairs[reply_to] = message.reply_to
        return pairs

    def read(self, pairs: Iterable[tuple[str, str | bytes]]) -> tuple[dict[str, Any], str, str, str | None, str | None]:
        """``(headers, content type, id, correlation id, reply-to)`` of a
        received message's key/value headers (bytes are UTF-8; an invalid byte
        is replaced rather than the message refused).

        :raises ValueError: the ``nested`` headers are not a JSON object.
        """
        envelope: list[Any] = [BINARY, "", None, None, None, None]
        headers: dict[str, Any] = {}
        slots = self._slots
        for key, value in pairs:  # one pass, one lookup for each key spelled as the transport does
            if type(value) is bytes:
                value = value.decode("utf-8", "replace")
            slot = slots.get(key)
            if slot is None and not key.islower():
                slot = slots.get(key.lower())
            if slot is None:
                headers[key] = value
            else:
                envelope[slot] = value
        if envelope[5] is not None:
            nested = _json_decode(envelope[5])
            if type(nested) is not dict:
                raise ValueError(f"its {self.nested} field is not a JSON object")
            headers = nested if not headers else {**headers, **nested}
        if envelope[4]:
            for key in envelope[4].split(","):
                if key in headers:
                    with contextlib.suppress(ValueError):
                        headers[key] = _json_decode(headers[key])
        return headers, envelope[0] or BINARY, envelope[1] or "", envelope[2], envelope[3]

    def into(self, message: Message, pairs: Collection[tuple[str, str | bytes]], what: Callable[[], str]) -> Message:
        """``message`` (its body set) with the envelope and headers of ``pairs``.

        :raises _Unreadable: the ``nested`` headers are not a JSON object; the
            message keeps its content type and their text, for the dead-letter
            queue (``what()`` names it in the reason).
        """
        try:
            message.headers, message.content_type, message.id, message.correlation_id, message.reply_to = \
                self.read(pairs)
        except ValueError as exc:
            found = {key.lower(): value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                     for key, value in pairs}
            message.content_type = found.get(self.names[0].lower(), BINARY)
            message.headers = {"x-original-headers": found.get(str(self.nested).lower(), "")}
            raise _Unreadable(message, f"{what()} has an unreadable envelope: {exc}") from None
        return message


def _reply_value(reply: Message, queue: str) -> Any:
    """What ``request()`` returns for a reply, or the consumer's error."""
    error = reply.headers.get("x-error")
    if error is not None:
        raise RemoteError(f"the consumer of {queue!r} failed: {error}")
    return decode(reply.data, reply.content_type)


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


_CLOSE_TIMEOUT = 5.0


def _cancelling() -> bool:
    """Whether the running task is being cancelled (not a client library
    ending its own operations with CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _sent(outcomes: list[Any]) -> None:
    """Raise the error of a batch of one message, if it was not sent."""
    if isinstance(outcomes[0], BaseException):
        raise outcomes[0]


async def _closing(what: str, operation: Awaitable[Any]) -> None:
    """A shutdown step that talks to a server, bounded in time: a client may
    wait for a lost connection to come back with no limit (aio-pika does); a
    stop must not, and by then the broker took back what was unacknowledged."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await operation
    except Exception as exc:  # gone already, or the server is unreachable
        log.debug("%s: %r", what, exc)


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
                      REDIS: "redis", SQS: "aws_sqs", POSTGRES: "postgresql"}


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


def _probes(consumers: Callable[[], Iterable[Consumer]]) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """The aiohttp handlers of a streamtools server's probes, by path:
    ``GET /healthz`` (alive), ``/readyz`` (200 once every consumer of
    ``consumers()`` is ready, else 503 naming those that are not) and
    ``/metrics`` (Prometheus' text format; 404 while metrics are off)."""
    web = _require("aiohttp.web", "aiohttp")

    async def health(request: Any) -> Any:
        return web.json_response({"status": "ok"})

    async def readiness(request: Any) -> Any:
        waiting = sorted(c.queue_name for c in consumers() if not c.ready)
        body = {"status": "waiting", "not_ready": waiting} if waiting else {"status": "ready"}
        return web.json_response(body, status=503 if waiting else 200)

    async def metrics(request: Any) -> Any:
        if _metrics is None:
            error = "metrics are off: call streamtools.enable_metrics() or set STREAMTOOLS_METRICS=1"
            return web.json_response({"error": error}, status=404)
        data, content_type = _metrics.exposition()
        return web.Response(body=data, headers={"Content-Type": content_type})

    return {"/healthz": health, "/readyz": readiness, "/metrics": metrics}


###############################################################################
# Legacy forms ################################################################
###############################################################################

# The legacy library's ways of naming queues, passing send arguments and
# registering handlers, gathered here; the base classes and HTTP call these.


def _legacy_queue_name(queue_name: str, queues_labels: Mapping[str, Any] | None) -> str:
    """``Cls(label, queues_labels)``: the wire queue is ``queues_labels[label]["queue"]``."""
    if queues_labels is None:
        return queue_name
    if not isinstance(queues_labels, Mapping):
        raise ConfigError(f"queues_labels must be a dict of {{label: {{'queue': name}}}}, "
                          f"got {type(queues_labels).__name__}")
    label = queues_labels.get(queue_name)
    return label["queue"] if isinstance(label, Mapping) and label.get("queue") else queue_name


def _legacy_send_args(legacy: tuple[Any, ...], flags: dict[str, Any], headers_tag: str | None) -> str | None:
    """``send(msg, method, endpoint, headers_tag)`` positionally: the flags
    and the headers tag they mean."""
    if len(legacy) > 3:
        raise ConfigError("send() takes at most method, endpoint and headers_tag positionally")
    for name, value in zip(("method", "endpoint"), legacy):
        if value is not None:
            flags.setdefault(name, value)
    return headers_tag or (legacy[2] if len(legacy) == 3 else None)


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
    ``await handler()``: called with no message, it consumes until cancelled,
    then stops gracefully. Called with a message, it is the handler itself."""
    async def consume_forever() -> None:
        await consumer.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await consumer.stop()

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def entry(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                return await consume_forever()
            return await fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                return consume_forever()
            return fn(*args, **kwargs)
    entry._streamtools_handler = fn  # type: ignore[attr-defined]
    return entry  # type: ignore[return-value]


def _legacy_route(consumer: Consumer, route: str, override: bool) -> None:
    """Legacy ``@consumer("name")``: the route was cosmetic unless the
    consumer had none or ``override=True`` (HTTP)."""
    if consumer.listens and (override or not consumer.queue_name):
        if consumer._ready:
            raise ConfigError(f"{consumer!r} is serving already: route {route!r} comes too late")
        consumer.queue_name = consumer._check_name(route)


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


def _legacy_json_text(msg: Any, tag: str | None) -> str | None:
    """Legacy HTTP services sent ``json.dumps(obj)``: such a string goes as the JSON it is."""
    if isinstance(msg, str) and not tag and msg.lstrip().startswith(("{", "[")) and _is_json_text(msg):
        return JSON
    return None


###############################################################################
# Base classes ################################################################
###############################################################################


class _Endpoint(abc.ABC):
    """What producers and consumers share: a queue name, the transport's
    facts, options checked once, and a connection made once however many
    callers ask for it at the same time.

    A transport declares its facts as class attributes (read by the
    registries, the CLI, the helpers and the tests), takes its own options as
    keyword parameters of :meth:`configure`, and writes :meth:`connect` and
    :meth:`disconnect`.
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
        self.queue_name = self._check_name(_legacy_queue_name(queue_name, queues_labels))
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
        self.configure(**options)

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

    def configure(self) -> None:
        """Transport hook: take the transport's own options (keyword
        parameters with defaults). One that extends another's takes
        ``**options`` and passes them on."""

    @classmethod
    @functools.cache
    def option_names(cls) -> frozenset[str]:
        """The transport options this class takes (its ``configure`` keywords)."""
        names: set[str] = set()
        for klass in cls.__mro__:
            configure = klass.__dict__.get("configure")
            if configure is None:
                continue
            params = inspect.signature(configure).parameters.values()
            names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                         and p.name != "self")
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        return frozenset(names)

    @classmethod
    def client_module(cls, module: str | None = None) -> Any:
        """The transport's client library (or one of its modules), imported
        now; a missing one raises :class:`MissingDependency` naming its package."""
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
                try:
                    await self.connect()
                except BaseException:  # what it opened before it failed is released
                    await _closing(f"closing {self!r} after a failed connect", self.disconnect())
                    raise
                self._ready = True

    @abc.abstractmethod
    async def connect(self) -> None:
        """Transport hook (services call ``a_init()``): connect and declare
        the queue; raise :class:`ConnectionFailed` otherwise (``disconnect``
        then releases what it opened)."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Transport hook: release what ``connect`` took, also after a
        ``connect`` that failed half-way; bounded in time, never raises."""


_ReplyFuture = asyncio.Future["Message"]


class Producer(_Endpoint):
    """Sends messages to one queue. A transport writes its wire in
    :meth:`publish` and, for request/reply, :meth:`listen_for_replies`.

    :param queue_name: the queue (RabbitMQ), route (HTTP) or in-process queue.
    """

    #: Per-message flags ``send`` takes on this transport (others' are ignored).
    send_flags: ClassVar[frozenset[str]] = frozenset()
    #: True where concurrent sends of one turn of the event loop go to the
    #: broker together, through one :meth:`publish_many` (a pipeline, a batch).
    pipelined: ClassVar[bool] = False
    #: True where ``send(delay=...)`` is supported: :meth:`publish` takes ``delay``.
    delays: ClassVar[bool] = False

    def __init__(self, queue_name: str = "", queues_labels: Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        super().__init__(queue_name, queues_labels, **options)
        self._replies: dict[str, _ReplyFuture] = {}
        self._replies_ready: asyncio.Future[str] | None = None
        self._closed = False
        self._turn: dict[tuple[Any, ...], list[tuple[Message, asyncio.Future[Any] | None]]] = {}
        self._batches: set[asyncio.Task[None]] = set()
        self._turn_loop: asyncio.AbstractEventLoop  # set by the send that opens a turn's batch

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

    def _options(self, method: str, flags: dict[str, Any], timeout: Any,
                 delay: Any) -> tuple[dict[str, Any], float | None]:
        """The per-message flags (``delay`` among them) and the timeout of a send, checked."""
        if flags:
            flags = _check_flags(flags, self.send_flags, f"{type(self).__name__}.{method}")
        if delay is not None and self._delay(delay):
            flags["delay"] = float(delay)
        return flags, None if timeout is None else _number("timeout", timeout, float, 0.001)

    def _delay(self, delay: Any) -> float | None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < float("inf"):
            raise ConfigError(f"delay is a number of seconds, at least 0, got {delay!r}")
        if not self.delays:
            why = "it delivers at once, with no broker to hold the message" if not self.brokered \
                else "the transport does not support delay="
            raise ConfigError(f"{type(self).__name__} cannot send a message later: {why}")
        return float(delay) or None

    async def _ensure_open(self) -> None:
        if self._closed:
            raise SendError(f"{self!r} is closed; create a new producer to send again")
        await self.a_init()

    async def send(self, msg: Any, *legacy: Any, headers_tag: str | None = None, header_tag: str | None = None,
                   content_type: str | None = None, headers: Mapping[str, Any] | None = None,
                   message_id: str | None = None, timeout: float | None = None, delay: float | None = None,
                   **flags: Any) -> Any:
        """Send ``msg`` and return once the transport took responsibility for it.

        :param msg: any JSON value, ``str`` or ``bytes``.
        :param headers_tag: legacy content type name, ``"JSON"`` or ``"SSI"``
            (``header_tag``, as the legacy README spells it, works too).
        :param content_type: an explicit content type; wins over ``headers_tag``.
        :param headers: extra headers carried with the message.
        :param timeout: seconds to wait for the transport to accept it.
        :param delay: seconds before a handler may get it: the broker stores it
            now and holds it until then (brokered transports).
        :param legacy: the legacy positional ``method, endpoint, headers_tag``.
        :return: the reply on synchronous transports (HTTP), else ``None``.
        :raises SendError: the message was not accepted; nothing is dropped silently.
        """
        if legacy:
            headers_tag = _legacy_send_args(legacy, flags, headers_tag)
        if flags or timeout is not None or delay is not None:
            flags, timeout = self._options("send()", flags, timeout, delay)
        message = self._message(msg, headers_tag, header_tag, content_type, headers, message_id)
        if not self._ready:
            await self._ensure_open()
        publish = self._in_turn if self.pipelined else self.publish
        if self._hooks or _global_hooks:
            return await self._observed(publish, message, timeout, flags)
        if flags:
            return await publish(message, timeout, **flags)
        return await publish(message, timeout)

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

    def _in_turn(self, message: Message, timeout: float | None, **flags: Any) -> Awaitable[Any]:
        """Publish ``message`` with the other sends of this turn of the event
        loop, in one :meth:`publish_many`: the first send of a turn yields
        once, so the others join its batch, then publishes them all (no
        timer; a send with nothing else ready to run goes at once); each
        caller gets its own result or error. A send that joins awaits a bare
        future: no coroutine of its own (a quarter of the send's cost)."""
        key = (timeout, *sorted(flags.items())) if flags else (timeout,)
        batch = self._turn.get(key)
        if batch is not None:
            future = self._turn_loop.create_future()  # the running loop: a batch lasts one turn of it
            batch.append((message, future))
            return future
        return self._lead_turn(key, message, timeout, flags)

    async def _lead_turn(self, key: tuple[Any, ...], message: Message, timeout: float | None,
                         flags: dict[str, Any]) -> Any:
        """The first send of a turn: gather the turn's batch, publish it."""
        loop = self._turn_loop = asyncio.get_running_loop()
        if not getattr(loop, "_ready", True):  # nothing else runs this turn: none can join
            return await self.publish(message, timeout, **flags)
        batch = self._turn[key] = []
        try:
            await asyncio.sleep(0)  # the other sends of this turn run now, and join the batch
        finally:
            del self._turn[key]
            if batch and _cancelling():  # this caller gave up: the others' messages still go
                task = asyncio.ensure_future(self._publish_turn(batch, timeout, flags))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
        if not batch:
            return await self.publish(message, timeout, **flags)
        results = await self._publish_turn([(message, None), *batch], timeout, flags)
        if isinstance(results, BaseException):
            raise results
        return results

    async def _publish_turn(self, batch: list[tuple[Message, asyncio.Future[Any] | None]], timeout: float | None,
                            flags: dict[str, Any]) -> Any:
        """Publish a turn's batch; hand each waiting caller its result; return the
        result of the message without a future (the caller that publishes)."""
        own: Any = None
        try:
            results = await self.publish_many([message for message, _ in batch], timeout, **flags)
        except Exception as exc:  # every caller of the batch gets it
            results = [exc] * len(batch)
        except BaseException:  # cancelled (the loop is closing): the callers are told
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(SendError(f"sending to {self.queue_name!r} was cancelled"))
            raise
        for (_, future), result in zip(batch, results):
            if future is None:
                own = result
            elif future.done():  # its caller was cancelled
                continue
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        return own

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
                        timeout: float | None = None, delay: float | None = None, **flags: Any) -> list[Any]:
        """Send every message of ``messages``, pipelined, and return once each
        one is confirmed (the results of ``send``, in order). The keywords
        apply to each message. Every message is encoded before any is sent.

        :raises BatchSendError: some were not sent; its ``failed`` maps their
            indices to the errors, and every other message was sent.
        """
        if flags or timeout is not None or delay is not None:
            flags, timeout = self._options("send_many()", flags, timeout, delay)
        batch = [self._message(body, headers_tag, None, content_type, headers, None) for body in messages]
        if not self._ready:
            await self._ensure_open()
        hooks = [*_global_hooks, *self._hooks]
        if hooks:
            for message in batch:
                message.transport = self.transport
            tokens = [_before_sending(hooks, message) for message in batch]
            began = time.perf_counter()
        results = await self.publish_many(batch, timeout, **flags) if batch else []
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

    async def publish_many(self, batch: list[Message], timeout: float | None, **flags: Any) -> list[Any]:
        """Transport hook: publish a batch; each result or exception in order.
        By default the publishes run concurrently, so their confirms pipeline."""
        return await asyncio.gather(*(self.publish(m, timeout, **flags) for m in batch), return_exceptions=True)

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        """Publish with a reply address and wait for the reply the transport
        hands to :meth:`deliver_reply`. Synchronous transports override this."""
        future: _ReplyFuture = asyncio.get_running_loop().create_future()
        self._replies[message.id] = future
        try:
            async with asyncio.timeout(timeout):
                message.reply_to = await self.reply_address()
                await self.publish(message, timeout, **flags)
                reply = await future
        except TimeoutError:
            raise RequestTimeout(f"no reply from queue {self.queue_name!r} within {timeout}s") from None
        finally:
            self._replies.pop(message.id, None)
        return _reply_value(reply, self.queue_name)

    def deliver_reply(self, reply: Message) -> None:
        """For transports: hand a reply (found by its ``correlation_id``) to
        the request waiting for it; a late one is dropped."""
        future = self._replies.get(reply.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(reply)

    async def close(self) -> None:
        """Release connections, once the sends under way are done. Idempotent;
        the producer cannot send afterwards."""
        self._closed = True
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self._ready:
            self._ready = False
            await self.stop_replies()
            await self.disconnect()

    async def stop_replies(self) -> None:
        """Transport hook, before :meth:`disconnect` on ``close()``: stop listening for replies."""

    async def __aenter__(self) -> Self:
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @abc.abstractmethod
    async def publish(self, message: Message, timeout: float | None, **flags: Any) -> Any:
        """Transport hook (services call ``send``): hand ``message`` to the
        transport; return once it took responsibility (or the reply, on
        synchronous transports), else raise :class:`SendError`. ``flags`` are
        this transport's ``send_flags``, and ``delay`` where it ``delays``."""

    async def reply_address(self) -> str:
        """Where replies to this producer's requests go: the address from the
        transport's :meth:`listen_for_replies`, which runs once however many
        first requests come at the same time (and again after it failed)."""
        ready = self._replies_ready
        if ready is None or (ready.done() and not ready.cancelled() and ready.exception() is not None):
            ready = self._replies_ready = asyncio.ensure_future(self.listen_for_replies())
        return await asyncio.shield(ready)

    async def listen_for_replies(self) -> str:
        """Transport hook: start listening for replies (handing each to
        :meth:`deliver_reply`); return the address."""
        raise ConfigError(f"{type(self).__name__} does not support request()")


_Handler = Callable[[Any], Awaitable[Any]]


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


def _before_handling(hooks: list[Hook], message: Message, tokens: list[Any]) -> None:
    for hook in hooks:  # a hook that raises fails the attempt, as the handler would
        tokens.append(hook.on_handle(message))


class Consumer(_Endpoint):
    """Receives the messages of one queue and hands each to a handler.

    The delivery contract lives here, once, for every transport: a message is
    acknowledged only after its handler returned; a handler that raises gets
    it again after a backoff, up to ``max_retries`` times, and then it goes to
    the dead-letter queue ``<queue>.dead`` with the error in its headers; at
    most ``prefetch`` handlers run at once; ``stop()`` drains.

    A transport feeds each message it receives to :meth:`deliver` and writes
    the hooks marked abstract below (its wire): :meth:`connect` /
    :meth:`disconnect`, :meth:`start_intake` / :meth:`stop_intake`, and
    settling a message: :meth:`ack`, :meth:`requeue` (hand back unfinished),
    :meth:`dead_letter`, :meth:`reply`. :meth:`retry_later` lets a broker
    hold a failed message during its backoff.

    :param queue_name: the queue to consume.
    :param prefetch: how many messages are handled at once.
    :param max_retries: retries after the first failed attempt.
    :param retry_backoff: first retry delay in seconds; doubles each retry.
    :param retry_backoff_max: the longest retry delay.
    :param drain_timeout: how long ``stop()`` waits for running handlers.
    """

    #: Flags the decorator takes on this transport (others' are ignored).
    handler_flags: ClassVar[frozenset[str]] = frozenset()
    #: False where ``ack`` has nothing to do (the response is the ack; a
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
            _legacy_route(self, handler, override)
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
        await self.start_intake()
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
            await self.stop_intake()
        pending = set(self._active)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.drain_timeout if timeout is None else timeout)
            if late:
                log.warning("%d handler(s) of %r did not finish in time; their messages go back to the queue",
                            len(late), self.queue_name)
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
        if self._running:
            await self.drained()
        self._running = False
        self._ready = False
        await self.disconnect()

    async def drained(self) -> None:
        """Transport hook: at ``stop()``, every handler finished (or was
        cancelled, its message handed back); ``disconnect`` comes next."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def deliver(self, message: Message, key: str = "", decoded: bool = False) -> None:
        """For transports: the delivery contract, for one message received.
        Within the concurrency bound, decode (unless ``decoded``), run the
        handler as ``current_message()``, then reply and acknowledge; on
        failure retry after a backoff, then dead-letter."""
        task = asyncio.current_task()
        assert task is not None
        await self._deliver_in(task, message, key, decoded)

    async def _deliver_in(self, task: asyncio.Task[Any], message: Message, key: str = "",
                          decoded: bool = False) -> None:
        """:meth:`deliver` in ``task`` (a worker knows it without asking): take
        a slot, drop a request nobody waits for, decode, then the attempts."""
        active = self._active  # the messages in flight: their count is the prefetch bound
        if len(active) >= self.prefetch:
            await self._free_slot()
        active.add(task)
        message.transport = self.transport
        hooks = [*_global_hooks, *self._hooks] if _global_hooks or self._hooks else None
        try:
            if _EXPIRES in message.headers and message.reply_to is not None and await self._expired(message, hooks):
                return
            if not decoded:
                content_type = message.content_type
                try:  # decode() without its two calls: a tenth of the memory transport's time per message
                    message.body = (_decoders.get(content_type) or _decoder(content_type))(message.data)
                except (ValueError, LookupError) as exc:
                    return await self._unreadable(message, DecodeError(f"body is not valid {content_type}: {exc}"))
            await self._attempts(message, self._handlers[key][1], hooks)
        finally:
            active.discard(task)
            if self._slot_waiters:
                waiter = self._slot_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    async def _attempts(self, message: Message, handler: Callable[[Any], Awaitable[Any]],
                        hooks: list[Hook] | None) -> None:
        """Run ``handler`` on the decoded message until an attempt settles it:
        done (replied, acknowledged), held on the broker for a retry, or given up."""
        while True:
            token = _current.set(message)
            tokens: list[Any] = []
            began = time.perf_counter() if hooks else 0.0
            try:
                if hooks:
                    _before_handling(hooks, message, tokens)
                result = await handler(message.body)
            except asyncio.CancelledError:  # the drain timed out: hand the message back
                await self.requeue(message)
                raise
            except Exception as exc:
                if await self._failed(message, exc, hooks, tokens, began):
                    continue
                return
            finally:
                _current.reset(token)
            if message.reply_to is not None or self.acks or hooks:
                await self._done(message, result, hooks, tokens, began)
            return

    async def _done(self, message: Message, result: Any, hooks: list[Hook] | None, tokens: list[Any],
                    began: float) -> None:
        """The handler returned: reply, acknowledge, tell the hooks."""
        if message.reply_to is not None:
            await self._answer(message, result, None)
        if self.acks:
            await self.ack(message)
        if hooks:  # after the reply: a tracing hook's span is current while it is sent
            _after_handling(hooks, tokens, message, "ok", began, None)

    async def _failed(self, message: Message, exc: Exception, hooks: list[Hook] | None, tokens: list[Any],
                      began: float) -> bool:
        """An attempt failed: give the message up, or have the broker hold it
        for its backoff, or wait it out here and return True to try again."""
        final = message.attempt > self.max_retries
        if hooks:
            outcome = "retried" if not final else "dead_lettered" if self.brokered else "failed"
            _after_handling(hooks, tokens, message, outcome, began, exc)
        if final:
            await self._give_up(message, exc)
            return False
        delay = _backoff(message.attempt, self.retry_backoff, self.retry_backoff_max)
        log.warning("handler of %r failed on message %s (attempt %d of %d), retrying in %.2fs: %r",
                    self.queue_name, message.id, message.attempt, self.max_retries + 1, delay, exc)
        log.debug("the handler's traceback", exc_info=exc)
        if await self.retry_later(message, delay):
            return False  # the broker holds it for the backoff; the slot is free
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            await self.requeue(message)
            raise
        message.attempt += 1
        return True

    async def _expired(self, message: Message, hooks: list[Hook] | None) -> bool:
        """Drop (acknowledged, unhandled) a request whose requester stopped waiting."""
        expires = message.headers[_EXPIRES]
        if not isinstance(expires, int) or time.time() * 1000 <= expires:
            return False
        log.debug("dropping request %s of %r: its requester stopped waiting", message.id, self.queue_name)
        if hooks:
            _handled_at_once(hooks, message, "expired", None)
        await self.ack(message)
        return True

    async def _unreadable(self, message: Message, exc: Exception) -> None:
        """No retry can fix a message that does not decode, or whose envelope
        cannot be read: to the dead-letter queue at once, as opaque bytes (so
        that queue stays readable), with the reason."""
        message.headers = {**message.headers, "x-original-content-type": message.content_type}
        message.content_type = BINARY
        hooks = [*_global_hooks, *self._hooks]
        if hooks:
            message.transport = self.transport
            _handled_at_once(hooks, message, "dead_lettered", exc)
        await self._give_up(message, exc)

    async def _answer(self, message: Message, result: Any, error: str | None) -> None:
        """Reply to a request; a return value that cannot be sent answers as an error."""
        try:
            await self.reply(message, result, error)
        except EncodeError as exc:  # the work is done; the requester learns its answer is lost
            log.error("the handler of %r returned what cannot be sent for message %s: %s",
                      self.queue_name, message.id, exc)
            await self._answer(message, None, f"EncodeError: the handler's return value cannot be sent: {exc}")
        except Exception as exc:  # the requester may be gone; the work itself is done
            log.warning("could not send the reply to message %s of %r: %r", message.id, self.queue_name, exc)

    def reply_message(self, message: Message, result: Any, error: str | None) -> Message:
        """For transports: the reply to the request ``message``: the handler's
        ``result`` encoded, or its ``error`` (in ``x-error``), with the
        request's correlation id, addressed to its ``reply_to``.

        :raises EncodeError: ``result`` cannot be encoded.
        """
        headers: dict[str, Any] = {} if error is None else {"x-error": error}
        if _tracing is not None:  # the reply joins the handling's trace
            _tracing.inject(headers)
        data, content_type = (b"", TEXT) if error is not None else encode(result)
        return Message(data=data, content_type=content_type, headers=headers, id=next(_ids),
                       queue=message.reply_to or "", correlation_id=message.correlation_id)

    @property
    def ready(self) -> bool:
        """True while consuming with the broker connected (``GET /readyz``)."""
        return self._running and not self._stopping and self.connected()

    def connected(self) -> bool:
        """Transport hook: whether the broker connection is up (true where
        there is no broker)."""
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
            except _Unreadable as exc:  # the consumer goes on; the message keeps its reason
                await self._unreadable(exc.message, exc)
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
            await self.dead_letter(message, headers)
        except asyncio.CancelledError:
            await self.requeue(message)
            raise
        except Exception:
            log.exception("could not dead-letter message %s of %r; it goes back to the queue",
                          message.id, self.queue_name)
            await self.requeue(message)
            return
        if message.reply_to is not None:
            await self._answer(message, None, error)
        await self.ack(message)

    @abc.abstractmethod
    async def start_intake(self) -> None:
        """Transport hook: start feeding received messages to :meth:`deliver`."""

    @abc.abstractmethod
    async def stop_intake(self) -> None:
        """Transport hook: stop receiving; messages already in :meth:`deliver` finish."""

    @abc.abstractmethod
    async def ack(self, message: Message) -> None:
        """Transport hook: the message is done; the transport forgets it."""

    @abc.abstractmethod
    async def requeue(self, message: Message) -> None:
        """Transport hook: hand an unfinished message back, for redelivery."""

    @abc.abstractmethod
    async def dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        """Transport hook: store the message in ``dead_letter_queue`` with ``headers``."""

    @abc.abstractmethod
    async def reply(self, message: Message, result: Any, error: str | None) -> None:
        """Transport hook: answer a request (``message.reply_to``) with the
        handler's result, or its error (see :meth:`reply_message`)."""

    async def retry_later(self, message: Message, delay: float) -> bool:
        """Transport hook: have the broker hold a failed message for ``delay``
        seconds and deliver it again with ``attempt + 1``; True if it did. By
        default the message is retried in process, holding its slot."""
        return False

    def producer_options(self) -> dict[str, Any]:
        """Options a producer needs to reach this consumer (HTTP: its URL)."""
        return {}

    async def delete_queues(self) -> None:
        """Delete this consumer's queue and its dead-letter queue where a
        broker keeps them (what demo, bench and tests clean up with)."""


###############################################################################
# Base classes: brokers #######################################################
###############################################################################

_Errors = tuple[type[BaseException], ...]


@functools.cache
def _error_types(names: tuple[str, ...]) -> _Errors:
    """Exception classes by dotted name (``"redis.exceptions.ConnectionError"``),
    imported when first needed: a transport declares its client's errors
    without importing the client."""
    types = []
    for name in names:
        module, _, attr = name.rpartition(".")
        types.append(getattr(importlib.import_module(module or "builtins"), attr))
    return tuple(types)


# What a broker endpoint made once per event loop (a topic, a stream, a queue, a table), by
# (transport, where, name): concurrent callers share the one attempt, a failed one is tried again.
_ensured: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, str], asyncio.Future[None]]] = \
    weakref.WeakKeyDictionary()


class BrokerEndpoint(_Endpoint):
    """What the producers and consumers of every broker share: the
    connection's and the send's timeouts, connecting with retry, sending with
    retry, the error texts (credentials scrubbed), and things made once per
    event loop. A transport names its broker and declares its client's errors
    (by dotted name, so nothing is imported before it is used): those of a
    lost connection (retried with backoff), those of a refused one (never
    retried), and the client's base error (any other is a refusal of the send).

    :param connect_timeout: how long the first connection is retried, then
        :class:`ConnectionFailed` naming the broker's address.
    :param send_timeout: how long a send is retried through an outage, then
        :class:`SendError`: it never hangs and never drops a message silently.
    """

    #: The broker's name in messages ("Redis").
    broker: ClassVar[str] = ""
    #: Errors of a lost or unreachable connection: retried.
    lost_errors: ClassVar[tuple[str, ...]] = ("builtins.OSError",)
    #: Errors of a connection the broker refused (credentials): not retried.
    refused_errors: ClassVar[tuple[str, ...]] = ()
    #: The client's base error: a send failing with any other is refused.
    client_errors: ClassVar[tuple[str, ...]] = ()
    #: What a refused connection's message says to check.
    refused_hint: ClassVar[str] = "check the credentials"

    def configure(self, *, connect_timeout: float = 30.0, send_timeout: float = 30.0) -> None:
        self.client_module()  # before its error types: a missing client is a MissingDependency
        self.connect_timeout = _number("connect_timeout", connect_timeout)
        self.send_timeout = _number("send_timeout", send_timeout, float, 0.001)
        self.lost = _error_types(self.lost_errors)
        self.refused = _error_types(self.refused_errors)
        self.failures = _error_types(self.client_errors)
        self.address = _Address([], "", [])

    @property
    def where(self) -> str:
        """``host:port`` of the broker(s), for messages (never the credentials)."""
        return self.address.where

    def cause(self, exc: BaseException) -> str:
        """An error's text for a message of ours, with every password of the addresses scrubbed."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        for url in self.address.urls:
            try:
                password = urllib.parse.urlsplit(url).password or ""
            except ValueError:
                continue
            for secret in {password, urllib.parse.unquote(password)} - {""}:
                text = text.replace(secret, "***")
        return text

    async def connecting(self, connect: Callable[[], Awaitable[_T]],
                         refusal: Callable[[BaseException], str] | None = None) -> _T:
        """For transports: ``connect()`` until it succeeds. A host name that
        does not resolve fails at once (retrying a typo only hides it), a lost
        or unreachable connection is retried with backoff until
        ``connect_timeout``, a refused one is not (``refusal(error)`` says
        what to fix, else ``refused_hint``).

        :raises ConnectionFailed: naming the broker's address, never a password.
        """
        hosts, unresolved = self.address.hosts, []
        for host, port in hosts:
            try:
                await _resolve(host.strip("[]"), port, f"{self.broker} at {host}:{port}")
            except ConnectionFailed as exc:
                unresolved.append(exc)
        if unresolved and len(unresolved) == len(hosts):
            raise unresolved[0] if len(hosts) == 1 else \
                ConnectionFailed(f"none of the {self.broker} hosts {self.where} resolves") from None
        for failure in unresolved:
            log.warning("%s; trying the others", failure)
        try:  # bounded as a whole too: a client may wait with no limit on its first connection (nats-py)
            async with asyncio.timeout(self.connect_timeout + 2.0):
                connection: _T = await _retry(connect, what=f"connecting to {self.broker} at {self.where}",
                                              retry_on=self.lost + (TimeoutError,), fatal=self.refused,
                                              deadline=time.monotonic() + self.connect_timeout, base=0.25, cap=5.0)
                return connection
        except self.refused as exc:
            raise ConnectionFailed(refusal(exc) if refusal is not None else f"{self.broker} at {self.where} refused "
                                   f"the connection ({self.cause(exc)}): {self.refused_hint}") from None
        except self.lost + (TimeoutError,) as exc:
            raise ConnectionFailed(f"cannot connect to {self.broker} at {self.where} within "
                                   f"{self.connect_timeout}s: {self.cause(exc)}") from None

    async def sending(self, what: str, operation: Callable[[], Awaitable[_T]], timeout: float | None = None, *,
                      failed: BaseException | None = None, retry_on: _Errors = (),
                      late: Callable[[float], str] | None = None) -> _T:
        """For transports: ``operation()`` until it succeeds, retrying a lost
        connection (and ``retry_on``) with backoff until ``timeout`` (the send
        timeout); ``failed`` is the error of a first try the caller made
        itself (its hot path spared this coroutine).

        :raises SendError: ``what`` was not taken in time (``late(timeout)``
            says why, if given), or the broker refused it.
        """
        timeout = self.send_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                result: _T = await _retry(operation, what=f"sending {what} to {self.broker} at {self.where}",
                                          retry_on=self.lost + retry_on, base=0.1, cap=2.0, failed=failed)
                return result
        except TimeoutError:
            raise SendError(late(timeout) if late is not None else
                            f"{self.broker} at {self.where} did not take {what} within {timeout}s") from None
        except self.failures + self.lost as exc:
            raise SendError(f"{self.broker} at {self.where} refused {what}: {self.cause(exc)}") from None

    async def repeating(self, what: str, step: Callable[[], Awaitable[float | None]]) -> None:
        """For transports' background tasks: ``step()`` again and again,
        pausing as many seconds as it returns; a lost or refused connection is
        logged and tried again after half a second. Ends when cancelled."""
        while not _cancelling():  # some clients turn a cancellation into a connection error
            try:
                pause = await step()
            except self.lost + self.failures as exc:
                if _cancelling():
                    return
                log.warning("%s on %s failed (%s); retrying", what, self.where, self.cause(exc))
                pause = 0.5
            if pause:
                await asyncio.sleep(pause)

    async def confirmations(self, acks: list[Any], timeout: float | None, what: str) -> list[Any]:
        """For transports that pipeline sends: wait for each future of
        ``acks`` (an exception stands for a send that failed at once) until
        ``timeout`` (the send timeout); each one's error or None, in order,
        :class:`SendError` for ``what`` those not confirmed by then."""
        timeout = self.send_timeout if timeout is None else timeout
        with contextlib.suppress(TimeoutError):
            # In order rather than gathered: a batch is confirmed at once, so most futures are done
            # by the time their turn comes, and none costs a callback.
            async with asyncio.timeout(timeout):
                for ack in acks:
                    if not isinstance(ack, BaseException) and not ack.done():
                        await asyncio.wait((ack,))
        late = SendError(f"{self.broker} at {self.where} did not confirm {what} within {timeout}s")
        return [ack if isinstance(ack, BaseException) else late if not ack.done() else
                SendError(f"sending {what} was cancelled") if ack.cancelled() else ack.exception() for ack in acks]

    async def ensure_once(self, name: str, create: Callable[[], Awaitable[None]]) -> None:
        """For transports: run ``create`` (make a topic, a stream, a queue)
        once per event loop for ``name`` on this broker, however many callers
        ask at the same time; one that failed is tried again by the next."""
        known = _ensured.setdefault(asyncio.get_running_loop(), {})
        key = (self.transport, self.where, name)
        made = known.get(key)
        if made is None or (made.done() and (made.cancelled() or made.exception() is not None)):
            made = known[key] = asyncio.ensure_future(create())
        await asyncio.shield(made)

    def forget(self, *names: str) -> None:
        """For transports: ``names`` were deleted; :meth:`ensure_once` makes them again."""
        known = _ensured.get(asyncio.get_running_loop(), {})
        for name in names:
            known.pop((self.transport, self.where, name), None)

    def connection_event(self, event: str) -> None:
        """For transports: the broker connection was ``"lost"`` or ``"restored"``
        (logged, and told to the hooks' ``on_connection``)."""
        _connection_event(self.transport, self.where, event)


class BrokeredConsumer(Consumer):
    """A consumer with a broker in between. Dead letters and replies are
    messages it sends: a transport writes :meth:`send_to` (store a message in
    a queue, made if missing, confirmed) and, where replies travel otherwise,
    :meth:`send_reply`; and :meth:`connected`, so readiness is true."""

    async def dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        await self.send_to(self.dead_letter_queue, Message(
            data=message.data, content_type=message.content_type, headers=headers, id=message.id,
            queue=self.dead_letter_queue, correlation_id=message.correlation_id))

    async def reply(self, message: Message, result: Any, error: str | None) -> None:
        await self.send_reply(message.reply_to or "", self.reply_message(message, result, error))

    @abc.abstractmethod
    async def send_to(self, queue: str, message: Message) -> None:
        """Transport hook: store ``message`` in ``queue`` (made if missing);
        return once the broker confirmed it."""

    async def send_reply(self, address: str, reply: Message) -> None:
        """Transport hook: send ``reply`` to a requester's reply ``address``
        (by default as :meth:`send_to` would)."""
        await self.send_to(address, reply)

    @abc.abstractmethod
    def connected(self) -> bool:
        """Transport hook: whether this consumer's broker connection is up."""


class PullingConsumer(BrokerEndpoint, BrokeredConsumer):
    """A consumer that asks its broker for messages (Kafka, NATS, Redis, SQS,
    PostgreSQL): up to ``prefetch`` in flight, fetched again in batches once
    a quarter of them finished, handed to ``prefetch`` worker tasks.

    A transport writes :meth:`fetch` (up to ``room`` raw messages),
    :meth:`received` (a raw message as a :class:`Message`), either
    :meth:`acknowledge` or :meth:`acknowledge_many` (the messages that
    finished in a turn of the event loop, at once) and, as its broker allows,
    :meth:`hand_back`, :meth:`hold` (a failed attempt waits on the broker),
    :meth:`unstarted`, :meth:`background`, and with ``lease_interval`` set,
    :meth:`extend_leases`.
    """

    #: Seconds between extensions of the lease of messages whose handler
    #: still runs, where the broker gives a message held too long to another
    #: consumer (:meth:`extend_leases`); None: no lease.
    lease_interval: float | None = None
    _acker: asyncio.Task[None] | None = None

    async def start_intake(self) -> None:
        self._in_flight = 0
        self._low_water = max(1, self.prefetch // 4)  # fetch in batches, not a message per finished handler
        self._room = asyncio.Event()
        self._fetching = True
        self._inbox = _Inbox()
        self._leased: dict[int, tuple[Message, float]] = {}
        self._acks_due: list[Message] = []
        self._acks_wake = asyncio.Event()
        self._acks_closing = False
        self._start_workers(self._inbox, self.received if self.lease_interval is None else self._lease)
        self._acker = asyncio.create_task(self._ack_batches())
        background = [*self.background(), *([self._keep_leases()] if self.lease_interval else [])]
        self._tasks = [asyncio.create_task(self._pull()), *map(asyncio.create_task, background)]

    async def _pull(self) -> None:
        low_water = self._low_water
        while not self._stopping:
            room = self.prefetch - self._in_flight
            if room < low_water and not self.requested():
                self._room.clear()
                await self._room.wait()
                continue
            try:
                items = await self.fetch(room)
            except self.failures + self.lost as exc:
                if self._stopping:
                    return
                self._fetching = False
                log.warning("fetching from %r on %s failed (%s); retrying", self.queue_name,
                            self.where, self.cause(exc))
                await asyncio.sleep(0.5)
                continue
            self._fetching = True
            if items:
                self._in_flight += len(items)
                self._inbox.put_many(items)

    async def stop_intake(self) -> None:
        self._room.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_workers()
        left = list(self._inbox.items)  # received, never started
        self._inbox.items.clear()
        await self.unstarted(left)

    def _settled(self, message: Message) -> None:
        self._in_flight -= 1
        if self.prefetch - self._in_flight >= self._low_water:  # the fetching wakes for a batch, not each one
            self._room.set()
        if self._leased:
            self._leased.pop(id(message), None)

    async def ack(self, message: Message) -> None:
        self._settled(message)
        await self.acknowledge(message)

    async def requeue(self, message: Message) -> None:
        self._settled(message)
        try:
            await self.hand_back(message)
        except Exception as exc:
            log.warning("could not hand message %s of %r back to %s (%r); it comes back after its timeout",
                        message.id, self.queue_name, self.where, exc)

    async def retry_later(self, message: Message, delay: float) -> bool:
        try:
            if not await self.hold(message, delay):
                return False
        except (SendError,) + self.failures + self.lost as exc:
            log.warning("could not have %s hold message %s of %r for its retry (%s); it waits here", self.broker,
                        message.id, self.queue_name, exc if isinstance(exc, SendError) else self.cause(exc))
            return False
        self._settled(message)
        return True

    def _lease(self, raw: Any) -> Message:
        message = self.received(raw)
        self._leased[id(message)] = (message, time.monotonic())
        return message

    async def _keep_leases(self) -> None:
        """Extend the leases of messages whose handler still runs, so the
        broker does not give them to another consumer meanwhile."""
        interval = self.lease_interval or 1.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            long = [message for message, started in self._leased.values() if now - started >= interval]
            if long:
                await _closing(f"extending leases of {self.queue_name!r}", self.extend_leases(long))

    async def _ack_batches(self) -> None:
        """Hand :meth:`acknowledge_many` the messages that finished, a turn of
        the event loop's at a time, until :meth:`drained` (not cancelled:
        taken acknowledgements would be lost)."""
        while not (self._acks_closing and not self._acks_due):
            await self._acks_wake.wait()
            self._acks_wake.clear()
            messages, self._acks_due = self._acks_due, []
            if messages:
                try:
                    await self.acknowledge_many(messages)
                except Exception as exc:
                    log.warning("acknowledging %d messages of %r on %s failed (%r); the broker delivers them again",
                                len(messages), self.queue_name, self.where, exc)

    async def drained(self) -> None:
        if self._acker is not None:
            self._acks_closing = True
            self._acks_wake.set()
            await asyncio.gather(self._acker, return_exceptions=True)

    @abc.abstractmethod
    async def fetch(self, room: int) -> list[Any]:
        """Transport hook: up to ``room`` raw messages (waiting a while for
        some; none is fine). A lost connection's error is retried."""

    @abc.abstractmethod
    def received(self, raw: Any) -> Message:
        """Transport hook: the :class:`Message` of a raw one; raises
        ``_Unreadable`` for one whose envelope cannot be read."""

    async def acknowledge(self, message: Message) -> None:
        """Transport hook: the broker forgets the message; never raises (a
        failure means it is delivered again). By default it goes in the next
        :meth:`acknowledge_many`."""
        self._acks_due.append(message)
        self._acks_wake.set()

    async def acknowledge_many(self, messages: list[Message]) -> None:
        """Transport hook, where :meth:`acknowledge` is not overridden: the
        broker forgets these messages (an error is logged: it delivers them again)."""
        raise NotImplementedError

    async def extend_leases(self, messages: list[Message]) -> None:
        """Transport hook, with ``lease_interval``: the broker keeps these
        messages for this consumer for another lease."""

    async def hand_back(self, message: Message) -> None:
        """Transport hook: an unfinished message goes back to the broker now
        (by default it comes back by itself, after a timeout or a restart);
        an error is logged, the message comes back by itself."""

    async def hold(self, message: Message, delay: float) -> bool:
        """Transport hook: have the broker give the failed message again
        after ``delay`` seconds, as attempt ``message.attempt + 1``; True if it
        does (a broker's error is logged, and the retry waits here)."""
        return False

    async def unstarted(self, raws: list[Any]) -> None:
        """Transport hook: ``raws`` were received but not started at ``stop()``."""

    def requested(self) -> int:
        """Transport hook: how many messages requests still under way asked
        for (the next :meth:`fetch` takes what they bring, whatever the room)."""
        return 0

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Transport hook: coroutines to run beside the fetching while consuming."""
        return []

    def connected(self) -> bool:
        """Whether the last fetch reached the broker."""
        return self._fetching


class PumpedReplies(BrokerEndpoint, Producer):
    """A producer that reads its replies from an address of its own (a
    topic, a stream, a queue) with one task, and deletes that address when it
    closes. A transport writes :meth:`open_replies`, :meth:`read_replies` and
    and :meth:`close_replies`; ``close()`` stops the pump before ``disconnect``."""

    _reply_pump: asyncio.Task[None] | None = None

    async def listen_for_replies(self) -> str:
        address = await self.open_replies()

        async def pump() -> None:
            for reply in await self.read_replies(address):
                self.deliver_reply(reply)

        self._reply_pump = asyncio.create_task(self.repeating("reading replies", pump))
        return address

    async def stop_replies(self) -> None:
        """Stop reading replies and delete the reply address."""
        pump, self._reply_pump = self._reply_pump, None
        if pump is None:
            return
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        ready = self._replies_ready
        if ready is not None and ready.done() and not ready.cancelled() and ready.exception() is None:
            await _closing(f"deleting the reply address {ready.result()!r}", self.close_replies(ready.result()))

    @abc.abstractmethod
    async def open_replies(self) -> str:
        """Transport hook: make this producer's reply address; return it."""

    @abc.abstractmethod
    async def read_replies(self, address: str) -> list[Message]:
        """Transport hook: the replies that arrived (waiting a while for some)."""

    @abc.abstractmethod
    async def close_replies(self, address: str) -> None:
        """Transport hook: delete the reply address."""



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

    def later(self, delay: float, name: str, item: Any) -> None:
        """Put ``item`` in queue ``name`` after ``delay`` seconds (a delayed send, a retry)."""
        asyncio.get_running_loop().call_later(delay, lambda: self.queue(name).put(item))


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
    delays = True

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._broker = _memory_broker()
        self._queue = self._broker.queue(self.queue_name)

    async def disconnect(self) -> None:
        """Nothing to release: the broker belongs to the event loop."""

    async def publish(self, message: Message, timeout: float | None, delay: float | None = None,
                      **flags: Any) -> None:
        if self._loop is not asyncio.get_running_loop():  # reused under a new asyncio.run()
            await self.connect()
        # A tuple of strings and bytes, not the Message: the garbage collector untracks it, so a
        # backlog costs no full collections (a backlog of Messages cost 0.8 us a message in them).
        item = (message.data, message.content_type, message.headers or None, message.id, message.correlation_id,
                message.reply_to)
        if delay:
            self._broker.later(delay, self.queue_name, item)
        else:
            self._queue.put(item)

    async def reply_address(self) -> str:
        if self._loop is not asyncio.get_running_loop():
            await self.connect()
        self._broker.producers[id(self)] = self
        return str(id(self))


class MemoryConsumer(Consumer):
    """Consumes a queue of the in-process broker with ``prefetch`` workers; a
    failed attempt waits out its backoff in the broker, freeing its slot."""

    in_process = True
    acks = False

    async def connect(self) -> None:
        self._broker = _memory_broker()
        self._queue = self._broker.queue(self.queue_name)

    async def disconnect(self) -> None:
        """Nothing to release: the broker belongs to the event loop."""

    async def start_intake(self) -> None:
        self._start_workers(self._queue, self._received)

    def _received(self, item: tuple[Any, ...] | Message) -> Message:
        if type(item) is not tuple:  # handed back, retried or dead-lettered: a Message already
            return item  # type: ignore[return-value]
        data, content_type, headers, message_id, correlation_id, reply_to = item
        return Message(data=data, content_type=content_type, headers={} if headers is None else headers,
                       id=message_id, queue=self.queue_name, correlation_id=correlation_id, reply_to=reply_to)

    async def stop_intake(self) -> None:
        await self._stop_workers()

    async def ack(self, message: Message) -> None:
        """Nothing to do: a message taken off the queue is gone from it."""

    async def requeue(self, message: Message) -> None:
        message.redelivered = True
        self._queue.put(message)

    async def retry_later(self, message: Message, delay: float) -> bool:
        message.attempt += 1
        message.redelivered = True
        self._broker.later(delay, self.queue_name, message)
        return True

    async def dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        dead = Message(data=message.data, content_type=message.content_type, headers=headers, id=message.id,
                       queue=self.dead_letter_queue, correlation_id=message.correlation_id)
        self._broker.queue(self.dead_letter_queue).put(dead)

    async def reply(self, message: Message, result: Any, error: str | None) -> None:
        producer = self._broker.producers.get(int(message.reply_to or 0))
        if producer is not None:
            producer.deliver_reply(self.reply_message(message, result, error))

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
#: The longest delay a RabbitMQ delay queue holds (its TTL is a 32-bit count of milliseconds).
_RMQ_MAX_DELAY_MS = 2**31 - 1


def _rmq_address(url: str | Sequence[str] | None, host: str | None, port: int | str | None, user: str | None,
                 password: str | None, vhost: str | None) -> _Address:
    """The AMQP URLs of the brokers (several: the nodes of a cluster, tried in
    turn) from options, else ``RMQ_URL``, else ``RMQ_HOST``... ; a list, or
    comma-separated in a string."""
    urls = url or os.environ.get("RMQ_URL")
    if not urls:
        user = user if user is not None else _setting("RMQ_USER", "guest")
        password = password if password is not None else _setting("RMQ_PASS", "guest")
        vhost = vhost if vhost is not None else _setting("RMQ_VHOST", "/")
        quote, built = urllib.parse.quote, []
        for one in [h.strip() for h in (host or _setting("RMQ_HOST", "localhost")).split(",") if h.strip()] \
                or ["localhost"]:
            one_port = port
            if ":" in one and not one.startswith("["):  # RMQ_HOST=host:port, as the legacy library took it
                one, _, host_port = one.rpartition(":")
                one_port = one_port or host_port
            number = _port("RMQ_PORT", one_port or _setting("RMQ_PORT", "5672"), 1)
            built.append(f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{one}:{number}/"
                         f"{quote(vhost, safe='')}")
        urls = built
    return _addresses(urls, (), "", "RabbitMQ", ("amqp", "amqps"), {"amqp": 5672, "amqps": 5671})


class _Nacked(Exception):
    """RabbitMQ refused a publish (``Basic.Nack``): retried on a fresh channel."""


def _delay_ms(delay: float) -> int:
    """A delay in milliseconds, rounded up to two significant digits (at most
    10% later): every message of a delay queue waits as long, so none waits
    behind another."""
    ms = max(1, math.ceil(delay * 1000))
    scale = int(10 ** max(0, len(str(ms)) - 2))
    return -(-ms // scale) * scale


class _SharedConnection:
    """One robust connection to a broker list, shared by the producers and
    consumers of an event loop for one role, and the channels they gave back.
    A channel is taken again rather than closed: aiormq keeps a little of
    every channel closed on a live connection until that connection closes,
    so a producer made per request would grow the process without bound."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.users = 0
        self.lock = asyncio.Lock()
        self.idle: list[Any] = []


# Two robust connections per broker list per event loop, one that publishes and
# one that consumes (as RabbitMQ advises: a memory or disk alarm blocks every
# connection that publishes, acknowledgements included), each shared by every
# producer and consumer of the process; each of them takes a channel of its own.
_rmq_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                            dict[tuple[str, str], _SharedConnection]] = weakref.WeakKeyDictionary()


class _BlockedReasons(logging.Filter):
    """Why RabbitMQ blocked a connection ("low on memory"): aiormq only logs
    it. Also silences the clients' lines about a failed connection attempt,
    which streamtools retries and reports in its own words."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == "Connection %r was blocked by: %r" and len(args) == 2:
            self.reasons[args[0]] = str(args[1])
        elif record.msg == "Connection %r was unblocked" and args:
            self.reasons.pop(args[0], None)
        return not str(record.msg).startswith(("Connection attempt to", "Unexpected connection close from remote",
                                                "Reconnecting to", "Connection to", "error when creating transport"))


_blocked = _BlockedReasons()


class _AMQPLink:
    """One producer's or consumer's link to RabbitMQ: the shared robust
    connection of its role, a channel with publisher confirms, queue
    declaration and a confirmed publish that survives reconnection."""

    def __init__(self, owner: _RabbitMQEndpoint, role: str) -> None:
        self.owner, self.role = owner, role
        self.errors, self.spec = owner.aiormq.exceptions, owner.aiormq.spec
        self.connection: Any = None
        self.channel: Any = None
        self.prefetch = 0
        self.declared: dict[str, float] = {}  # queue name: when declared (delay queues expire unused)
        #: Run after the channel was replaced by a fresh one, or reopened after a reconnection.
        self.on_renew: Callable[[], Awaitable[None]] | None = None
        self._renewing = asyncio.Lock()

    # The shared connection.

    def _shared(self) -> _SharedConnection:
        return _rmq_connections.setdefault(asyncio.get_running_loop(), {}).setdefault(
            (",".join(self.owner.address.urls), self.role), _SharedConnection())

    async def _acquire(self) -> _SharedConnection:
        shared = self._shared()
        async with shared.lock:
            if shared.connection is None or shared.connection.is_closed:
                shared.connection, shared.idle = await self._connect(), []
            shared.users += 1
            return shared

    async def _connect(self) -> Any:
        owner = self.owner
        turn = itertools.cycle(owner.address.urls)

        async def connect() -> Any:  # the brokers in turn, one a try
            owner.url = next(turn)
            return await owner.aio_pika.connect_robust(owner.url, reconnect_interval=owner.reconnect_interval,
                                                       timeout=min(10.0, owner.connect_timeout or 10.0))

        connection = await owner.connecting(connect, owner.refusal)

        def lost(_: Any, exc: BaseException | None) -> None:
            if isinstance(exc, Exception):
                owner.connection_event("lost")
                if len(owner.address.urls) > 1:
                    asyncio.ensure_future(self._fail_over(connection))

        connection.close_callbacks.add(lost)
        connection.reconnect_callbacks.add(lambda _: owner.connection_event("restored"))
        return connection

    async def _fail_over(self, connection: Any) -> None:
        """While the robust connection is reconnecting, point it at the next
        broker before each of its attempts (aio-pika takes one URL): a
        cluster's live node takes over within a few reconnect intervals."""
        urls, owner = self.owner.address.urls, self.owner
        index = urls.index(owner.url) if owner.url in urls else 0
        while not connection.connected.is_set() and not connection.close_called and not connection.is_closed:
            index = (index + 1) % len(urls)
            owner.url = urls[index]
            connection.url = type(connection.url)(owner.url)
            log.info("reconnecting to RabbitMQ at %s:%d", *owner.address.hosts[index])
            await asyncio.sleep(owner.reconnect_interval)

    async def _release(self) -> None:
        shared = self._shared()
        async with shared.lock:
            shared.users -= 1
            if shared.users <= 0 and shared.connection is not None:
                connection, shared.connection, shared.idle = shared.connection, None, []
                await _closing(f"closing the connection to {self.owner.where}", connection.close())

    # A channel on it.

    async def open(self, *queues: str, prefetch: int = 0) -> None:
        """Take a channel of the shared connection (one given back, or a new
        one), set its QoS and declare durable ``queues``, within
        ``connect_timeout``: a broker that is down is an error, not a hang."""
        owner = self.owner
        shared = await self._acquire()  # connecting is retried until connect_timeout, then ConnectionFailed
        self.connection, self.prefetch = shared.connection, prefetch
        try:
            async with asyncio.timeout(owner.connect_timeout):
                await self.connection.connected.wait()  # the shared connection may be reconnecting
                while shared.idle and self.channel is None:
                    channel = shared.idle.pop()
                    self.channel = None if channel.is_closed else channel
                if self.channel is None:
                    self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
                self.channel.reopen_callbacks.add(self._reopened)
                if prefetch:
                    await self.channel.set_qos(prefetch_count=prefetch)
                for name in queues:
                    await self.declare(name)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise ConnectionFailed(f"RabbitMQ at {owner.where} did not open a channel and declare "
                                       f"{list(queues)} within {owner.connect_timeout}s") from None
            if isinstance(exc, owner.lost + (RuntimeError,)) and not isinstance(exc, ConnectionFailed):
                # aio-pika's RuntimeError: "Connection was not opened"
                raise ConnectionFailed(f"lost the connection to RabbitMQ at {owner.where} while opening a "
                                       f"channel: {owner.cause(exc)}") from None
            raise

    async def _reopened(self, *_: Any) -> None:
        if self.on_renew is not None:
            await self.on_renew()

    async def declare(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        """Declare the durable queue ``name`` (on aiormq's channel: aio-pika
        would keep each declaration to redo after a reconnection, and the
        queues are durable)."""
        arguments = {**(self.owner.queue_args or {}), **(arguments or {})} or None
        try:
            await (await self.channel.get_underlay_channel()).queue_declare(name, durable=True, arguments=arguments)
        except self.errors.ChannelPreconditionFailed as exc:
            if "'durable'" not in str(exc) and "'auto_delete'" not in str(exc):
                raise ConfigError(f"queue {name!r} exists on {self.owner.where} with other settings (classic or "
                                  f"quorum?): use the same queue_type everywhere or delete the queue ({exc})") from None
            # Declared by another client (or the legacy library) as not durable: use it as it is, so
            # services sharing the broker can upgrade one at a time.
            await self._reopen()  # the refused declaration closed the channel
            await (await self.channel.get_underlay_channel()).queue_declare(name, passive=True)
            log.warning("queue %r on %s was declared by another client (or the legacy streamtools) as not "
                        "durable: its messages are lost if the broker restarts, and it may be auto-deleted. "
                        "It is used as it is; to make it durable, stop its consumers, let it empty and delete "
                        "it, and streamtools declares it durable", name, self.owner.where)
        self.declared[name] = time.monotonic()

    async def declared_once(self, name: str, arguments: dict[str, Any] | None = None) -> str:
        """``name``, declared when first needed."""
        if name not in self.declared:
            await self.declare(name, arguments)
        return name

    async def _reopen(self) -> None:
        fresh = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        if self.prefetch:
            await fresh.set_qos(prefetch_count=self.prefetch)
        old, self.channel = self.channel, fresh
        old.reopen_callbacks.discard(self._reopened)
        fresh.reopen_callbacks.add(self._reopened)
        # Publishes still waiting for a confirm on the old channel fail with it and are retried.
        await _closing(f"closing a channel to {self.owner.where}", old.close())

    async def renew(self, channel: Any) -> None:
        """Replace ``channel`` by a fresh one, unless another send did already.
        After a failover, RabbitMQ may nack every publish on a channel for as
        long as a quorum queue elects its leader, while a fresh one is acked."""
        async with self._renewing:
            if self.channel is not channel or self.connection is None:
                return
            try:
                async with asyncio.timeout(self.owner.connect_timeout):
                    await self._reopen()
            except Exception as exc:  # the retry goes on on the old channel, or after a reconnection
                log.debug("could not open a fresh channel to %s: %r", self.owner.where, exc)
                return
            await self._reopened()

    def blocked(self) -> str | None:
        """The reason RabbitMQ gave for blocking this link's connection, if it did."""
        transport = getattr(self.connection, "transport", None)
        connection = getattr(transport, "connection", None)
        return _blocked.reasons.get(connection) if connection is not None else None

    async def close(self) -> None:
        """Give the channel back to the shared connection and leave it."""
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reopen_callbacks.discard(self._reopened)
            shared = self._shared()
            if shared.connection is self.connection and not channel.is_closed:
                shared.idle.append(channel)
            else:
                await _closing(f"closing a channel to {self.owner.where}", channel.close())
        if self.connection is not None:
            self.connection = None
            await self._release()

    async def cancel(self, tag: str, what: str) -> None:
        """Cancel the consumer ``tag`` of this link's channel."""
        async def cancel() -> None:
            await (await self.channel.get_underlay_channel()).basic_cancel(tag)

        await _closing(f"cancelling {what}", cancel())

    async def delete(self, *queues: str) -> None:
        """Delete ``queues``."""
        await self.open()
        try:
            async with asyncio.timeout(self.owner.connect_timeout):
                underlay = await self.channel.get_underlay_channel()
                for name in queues:
                    await underlay.queue_delete(name)
        finally:
            await self.close()

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

    async def delay_queue(self, queue: str, ms: int) -> str:
        """The queue in which a message for ``queue`` waits ``ms`` milliseconds
        (declared when first needed, and again before it could expire unused)."""
        name = f"{queue}.delay.{ms}"
        declared = self.declared.get(name)
        if declared is None or time.monotonic() - declared > (ms / 1000 + 60) / 2:
            # Every message waits as long (the queue's TTL), then goes to ``queue``; the queue
            # deletes itself once unused for longer than any message stays in it.
            await self.declare(name, {"x-message-ttl": ms, "x-expires": 2 * ms + 60_000, **self.owner.dead_end(queue)})
        return name

    async def publish(self, message: Message, routing_key: str, timeout: float | None = None,
                      mandatory: bool = True, expiration: float | None = None) -> None:
        """Publish to ``routing_key`` and wait for the broker's confirm. A
        lost connection and a nack are retried until the send timeout: the
        message is either confirmed or an error is raised, never dropped."""
        owner, errors = self.owner, self.errors
        timeout = owner.send_timeout if timeout is None else timeout
        properties = self.properties(message, expiration)
        body = message.data
        nacked: list[str] = []  # the broker's refusals: what a send that times out says

        async def publish(confirm_within: float | None = None) -> None:
            channel = self.channel
            try:
                await (await channel.get_underlay_channel()).basic_publish(
                    body, routing_key=routing_key, properties=properties, mandatory=mandatory,
                    timeout=confirm_within)
            except errors.PublishError:
                raise Unroutable(f"RabbitMQ at {owner.where} has no queue {routing_key!r} for the message") from None
            except errors.DeliveryError as exc:
                nacked.append(owner.cause(exc))
                log.warning("RabbitMQ at %s refused a message to %r (%s); retrying on a fresh channel",
                            owner.where, routing_key, nacked[-1])
                await self.renew(channel)
                raise _Nacked(nacked[-1]) from None
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                # aiormq ends the publishes of a connection it closed (a dead link found by the
                # heartbeat) with CancelledError: that is a lost connection, not our cancellation.
                raise ConnectionError("the connection was closed under the publish") from None

        def late(waited: float) -> str:
            if nacked:
                return f"RabbitMQ at {owner.where} refused the message to {routing_key!r} on every try " \
                       f"for {waited}s: {nacked[-1]}"
            blocked = self.blocked()
            return f"RabbitMQ at {owner.where} did not confirm the message to {routing_key!r} within " \
                   f"{waited}s" + (f": it blocks publishing ({blocked})" if blocked else "")

        try:
            if self.connection.connected.is_set():  # the hot path: one try, without the retry's coroutines
                await publish(timeout)
                return
            failed: BaseException = ConnectionError("the connection is down")
        except TimeoutError:
            raise SendError(late(timeout)) from None
        except _Nacked as exc:
            failed = exc
        except owner.lost as exc:
            failed = exc
            log.warning("publishing to %r on %s failed (%s); retrying as the connection comes back",
                        routing_key, owner.where, owner.cause(exc))
        await owner.sending(f"the message to {routing_key!r}", publish, timeout, failed=failed,
                            retry_on=(_Nacked,), late=late)


class _RabbitMQEndpoint(BrokerEndpoint):
    """The connection options of both RabbitMQ sides.

    :param url: ``amqp://`` or ``amqps://`` URL, or a list of them (the nodes
        of a cluster: tried in turn on connecting and on every reconnection);
        else ``RMQ_URL`` (comma-separated), else built from ``host``/``port``/
        ``user``/``password``/``vhost`` (or ``RMQ_HOST`` (``host``,
        ``host:port``, comma-separated), ``RMQ_PORT``, ``RMQ_USER``,
        ``RMQ_PASS``, ``RMQ_VHOST``).
    :param queue_type: ``"classic"`` or ``"quorum"`` (replicated, for clusters).
    :param reconnect_interval: pause between reconnection attempts.
    :param heartbeat: seconds between AMQP heartbeats (default 9: a dead link is
        noticed within 30 s); a ``heartbeat=`` in the URL wins.
    Takes ``connect_timeout`` and ``send_timeout`` (see :class:`BrokerEndpoint`).
    """

    client = ("aio_pika", "aio-pika")
    address_option = "url"
    broker = "RabbitMQ"
    lost_errors = ("builtins.OSError", "aiormq.exceptions.AMQPConnectionError",
                   "aiormq.exceptions.ChannelInvalidStateError", "aiormq.exceptions.ChannelClosed")
    refused_errors = ("aiormq.exceptions.AuthenticationError", "aiormq.exceptions.ProbableAuthenticationError",
                      "aiormq.exceptions.ConnectionNotAllowed", "aiormq.exceptions.ProtocolSyntaxError")
    client_errors = ("aiormq.exceptions.AMQPError",)

    def configure(self, url: str | Sequence[str] | None = None, host: str | None = None,
                  port: int | str | None = None, user: str | None = None, password: str | None = None,
                  vhost: str | None = None, queue_type: str = "classic", reconnect_interval: float = 1.0,
                  heartbeat: float = 9, **options: Any) -> None:
        super().configure(**options)
        self.aio_pika = self.client_module()
        self.aiormq = importlib.import_module("aiormq")  # aio-pika's own dependency
        logging.getLogger("aiormq").addHandler(_quiet)
        for name in ("aiormq.connection", "aio_pika.robust_connection", "aio_pika.connection"):
            logging.getLogger(name).addFilter(_blocked)  # idempotent: the same filter object
        # aiormq gives up on a silent link after (heartbeat + 1) * 3 seconds: the default 60
        # leaves a blackholed connection unnoticed for 3 minutes; 9 notices it within 30 s.
        beat = _number("heartbeat", heartbeat, int, 0)
        address = _rmq_address(url, host, port, user, password, vhost)
        self.address = address._replace(urls=[u if "heartbeat=" in u else f"{u}{'&' if '?' in u else '?'}"
                                                                            f"heartbeat={beat}" for u in address.urls])
        self.url = self.address.urls[0]
        if queue_type not in ("classic", "quorum"):
            raise ConfigError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
        self.queue_args = {"x-queue-type": queue_type} if queue_type == "quorum" else None
        self.reconnect_interval = _number("reconnect_interval", reconnect_interval)
        self._link = _AMQPLink(self, "publish")

    def refusal(self, exc: BaseException) -> str:
        """What a refused connection's error says to fix."""
        parts = urllib.parse.urlsplit(self.url)
        user, vhost = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.path[1:]) or "/"
        if isinstance(exc, self.aiormq.exceptions.ProtocolSyntaxError):  # the broker closed the handshake
            return f"RabbitMQ at {self.where} refused vhost {vhost!r} for user {user!r}: it does not " \
                   "exist or the user may not use it; check RMQ_VHOST (or RMQ_URL)"
        return f"RabbitMQ at {self.where} refused user {user!r}: check RMQ_USER, RMQ_PASS and RMQ_VHOST (or RMQ_URL)"

    def dead_end(self, queue: str) -> dict[str, Any]:
        """The arguments of a delay queue that hands its expired messages to ``queue``."""
        arguments: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
        if self.queue_args:  # quorum: dead-lettering is confirmed, never dropped
            arguments.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        return arguments

    def add_agent_uuid(self, **keys: str) -> None:
        """Legacy: the queue name gets the first five characters of the
        ``RabbitMQ`` id as a suffix (``orders-1a2b3``)."""
        super().add_agent_uuid(**keys)
        key = keys.get("RabbitMQ")
        if key:
            if self._ready:
                raise ConfigError(f"add_agent_uuid() renames queue {self.queue_name!r}: call it before a_init()")
            self.queue_name = f"{self.queue_name}-{key[:5]}"

    async def disconnect(self) -> None:
        await self._link.close()


class RabbitMQProducer(_RabbitMQEndpoint, Producer):
    """Sends persistent messages to a durable RabbitMQ queue, with publisher
    confirms and mandatory routing; ``send`` returns once the broker
    confirmed. Requests use direct reply-to and expire with their timeout.
    ``send(delay=)`` waits in a delay queue. Options: see :class:`_RabbitMQEndpoint`."""

    delays = True

    async def connect(self) -> None:
        self._reply_tag: str | None = None
        await self._link.open(self.queue_name)

    async def disconnect(self) -> None:
        if self._reply_tag is not None:  # the channel is taken again: its reply consumer must go
            tag, self._reply_tag, self._link.on_renew = self._reply_tag, None, None
            await self._link.cancel(tag, "the reply consumer")
        await self._link.close()

    async def publish(self, message: Message, timeout: float | None, delay: float | None = None,
                      **flags: Any) -> None:
        expiration = None
        if message.reply_to is not None and timeout is not None:
            expiration = timeout  # a request nobody answered in time costs no work later
        queue = self.queue_name
        if delay:
            ms = _delay_ms(delay)
            if ms > _RMQ_MAX_DELAY_MS:
                raise ConfigError(f"RabbitMQ holds a message for at most {_RMQ_MAX_DELAY_MS // 1000}s, "
                                  f"got delay={delay}")
            queue = await self._link.delay_queue(queue, ms)
        await self._link.publish(message, queue, timeout, expiration=expiration)

    async def listen_for_replies(self) -> str:
        # Direct reply-to: consumed on the publishing channel (again on a fresh or reopened one).
        try:
            underlay = await self._link.channel.get_underlay_channel()
            self._reply_tag = (await underlay.basic_consume(_REPLY_TO, self._on_amqp_reply, no_ack=True)).consumer_tag
        except self.lost + self.failures as exc:
            raise SendError(f"cannot listen for replies on RabbitMQ at {self.where}: {self.cause(exc)}") from None
        self._link.on_renew = self._relisten
        return _REPLY_TO

    async def _relisten(self) -> None:
        try:
            await self.listen_for_replies()
        except SendError as exc:  # requests sent from now on time out; their senders are told so
            log.warning("%s", exc)

    async def _on_amqp_reply(self, delivered: Any) -> None:
        properties = delivered.header.properties
        self.deliver_reply(Message(data=delivered.body, content_type=properties.content_type or "",
                                   headers=_amqp_headers(properties), correlation_id=properties.correlation_id))


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


def _amqp_headers(properties: Any) -> dict[str, Any]:
    headers = dict(properties.headers or {})
    floats = headers.pop(_FLOAT_HEADERS, None)
    if floats:
        for key in str(floats).split(","):
            try:
                headers[key] = float(headers[key])
            except (KeyError, TypeError, ValueError):
                pass
    return headers


class RabbitMQConsumer(_RabbitMQEndpoint, BrokeredConsumer):
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

    async def connect(self) -> None:
        self._consumer_tag: str | None = None
        self._consuming = False
        self._acks: _Acks | None = None
        self._link = _AMQPLink(self, "consume")
        self._out = _AMQPLink(self, "publish")
        self._out_lock = asyncio.Lock()
        self._ours = (f"{self.queue_name}.retry.", f"{self.queue_name}.delay.")
        self._link.on_renew = self._consume
        await self._link.open(self.queue_name, prefetch=self.prefetch)

    async def _publisher(self) -> _AMQPLink:
        """The link to publish on, opened when first needed."""
        if self._out.channel is None:
            async with self._out_lock:
                if self._out.channel is None:
                    await self._out.open()
        return self._out

    async def disconnect(self) -> None:
        acks, self._acks = self._acks, None
        if acks is not None and self._link.channel is not None:
            async def hand_back() -> None:  # what was delivered and not settled, before the channel is taken again
                await acks.flush()
                for tag in [tag for tag in acks.pending if tag not in acks.settled]:
                    await acks.channel.basic_nack(tag, requeue=True, wait=False)

            await _closing(f"handing back the unsettled messages of {self.queue_name!r}", hand_back())
        await self._out.close()
        await self._link.close()

    async def start_intake(self) -> None:
        self._consuming = True
        await self._consume()

    async def _consume(self) -> None:
        # Consumed on aiormq's channel under aio-pika's robust one, which reopens it after a
        # reconnection (and then this consumes again): aio-pika's own consume costs a second
        # task and an IncomingMessage per delivery, about a fifth of the time per message.
        if not self._consuming:
            return  # not started yet, or stopped: start_intake consumes
        underlay = await self._link.channel.get_underlay_channel()
        self._acks = _Acks(underlay)
        self._consumer_tag = (await underlay.basic_consume(self.queue_name, self._on_message)).consumer_tag

    def connected(self) -> bool:
        connection = self._link.connection
        return connection is not None and connection.connected.is_set()

    async def stop_intake(self) -> None:
        self._consuming = False
        if self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            await self._link.cancel(tag, f"the consumer of {self.queue_name!r}")

    async def _on_message(self, delivered: Any) -> None:
        # aiormq runs this in a task of its own per message; QoS bounds how many.
        acks = self._acks
        if acks is not None and delivered.channel is acks.channel:
            acks.pending.append(delivered.delivery.delivery_tag)
        if self._stopping:
            return  # unsettled: handed back at disconnect, or by the broker when the channel closes
        properties = delivered.header.properties
        attempt = 1
        if properties.headers:
            headers = _amqp_headers(properties)
            retried = headers.pop(_ATTEMPT, None)
            if retried is not None or str(headers.get("x-first-death-queue", "")).startswith(self._ours):
                attempt = retried if isinstance(retried, int) else 1  # back from a delay queue of ours
                for key in _DEATH_HEADERS:
                    headers.pop(key, None)
            count = headers.get("x-delivery-count")  # quorum queues count redeliveries
            if isinstance(count, int):
                attempt += count
        else:
            headers = {}
        await self.deliver(Message(
            data=delivered.body, content_type=properties.content_type or "", headers=headers,
            id=properties.message_id or "", queue=self.queue_name, correlation_id=properties.correlation_id,
            reply_to=properties.reply_to, attempt=attempt,
            redelivered=bool(delivered.delivery.redelivered), raw=delivered))

    async def ack(self, message: Message) -> None:
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

    async def requeue(self, message: Message) -> None:
        delivered = message.raw
        try:
            await delivered.channel.basic_nack(delivered.delivery.delivery_tag, requeue=True, wait=False)
        except Exception as exc:
            log.debug("nack of %s: %r (the broker requeues it with the channel)", message.id, exc)
        acks = self._acks
        if acks is not None and delivered.channel is acks.channel:
            acks.settled[delivered.delivery.delivery_tag] = _SETTLED

    async def retry_later(self, message: Message, delay: float) -> bool:
        name = f"{self.queue_name}.retry.{message.attempt}"
        headers = {**message.headers, _ATTEMPT: message.attempt + 1}
        headers.pop("x-delivery-count", None)
        again = Message(data=message.data, content_type=message.content_type, headers=headers, id=message.id,
                        correlation_id=message.correlation_id, reply_to=message.reply_to)
        try:
            out = await self._publisher()
            # A queue per attempt: its messages all wait about as long, so one expiring at the head
            # never holds back a shorter wait behind it; a wait ends in the consumer's queue.
            await out.publish(again, await out.declared_once(name, self.dead_end(self.queue_name)), expiration=delay)
        except Exception as exc:
            log.warning("could not hand message %s of %r to the broker for its retry (%r); it waits here",
                        message.id, self.queue_name, exc)
            return False
        await self.ack(message)
        return True

    async def send_to(self, queue: str, message: Message) -> None:
        out = await self._publisher()
        await out.publish(message, await out.declared_once(queue))

    async def send_reply(self, address: str, reply: Message) -> None:
        # Not mandatory: a requester that gave up has no reply queue any more.
        await (await self._publisher()).publish(reply, address, mandatory=False)

    async def delete_queues(self) -> None:
        """Delete this consumer's queue, its dead-letter queue and its retry
        queues on the broker (delay queues delete themselves once unused)."""
        link = _AMQPLink(self, "publish")
        await link.delete(self.queue_name, self.dead_letter_queue,
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


#: An HTTP message's envelope: its headers, typed as on every transport (a value that is not a
#: string travels as JSON, named in X-St-Json); Content-Type, X-Message-Id and X-Correlation-Id.
_HTTP_ENVELOPE = _Envelope("Content-Type", "X-Message-Id", "X-Correlation-Id", "X-Reply-To")
#: Request headers that are HTTP's own (and the transport's), never a message's: as aiohttp
#: spells them, then in lower case for other clients; X-Forwarded-* and Proxy-* too.
_HTTP_PLUMBING = frozenset({
    "Host", "User-Agent", "Accept", "Accept-Encoding", "Content-Length", "Content-Type", "Connection",
    "Authorization", "X-Attempt"})
_HTTP_PLUMBING_LOWER = frozenset({
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "accept-charset", "content-length",
    "content-encoding", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "expect",
    "authorization", "cookie", "via", "forwarded", "origin", "referer", "cache-control", "pragma", "x-attempt",
    "x-real-ip"})
#: The response header of a 500 that a handler's failure caused (its error is in the JSON body).
_HANDLER_FAILED = "X-St-Handler-Error"


def _http_plumbing(key: str) -> bool:
    if key in _HTTP_PLUMBING:
        return True
    lower = key.lower()
    return lower in _HTTP_PLUMBING_LOWER or lower.startswith(("x-forwarded-", "proxy-", "sec-"))


def _http_route(queue_name: Any) -> str:
    """The route of a queue name: "/orders" (legacy) means "orders"; "" or "/" is the root."""
    return "" if queue_name in ("", "/") else _check_queue_name(
        queue_name.strip("/") if isinstance(queue_name, str) else queue_name)


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

    _check_name = staticmethod(_http_route)

    def _message(self, msg: Any, headers_tag: str | None, header_tag: str | None,
                 content_type: str | None, headers: Mapping[str, Any] | None,
                 message_id: str | None) -> Message:
        content_type = content_type or _legacy_json_text(msg, headers_tag or header_tag)
        return super()._message(msg, headers_tag, header_tag, content_type, headers, message_id)

    def configure(self, host: str | None = None, endpoint: str | None = None, retries: int = 3,
               retry_backoff: float = 0.1, timeout: float = 30.0, auth_token: str | None = None,
               ssl_context: ssl.SSLContext | None = None, pool_size: int = 100) -> None:
        self.client_module()
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

    async def connect(self) -> None:
        aiohttp = self.client_module()
        self._aiohttp = aiohttp
        self._default_timeout = aiohttp.ClientTimeout(total=self.timeout)  # made once, not per request
        self._retryable = (aiohttp.ClientConnectionError, _RetryableStatus)
        self._session = aiohttp.ClientSession(
            timeout=self._default_timeout,
            connector=aiohttp.TCPConnector(limit=self.pool_size, ssl=self._ssl if self._ssl else True))

    async def disconnect(self) -> None:
        await self._session.close()

    def _shown(self, endpoint: str | None) -> str:
        """The URL a request goes to, fit for a message (no password)."""
        return _redact(endpoint) if endpoint else self._shown_endpoint

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        try:
            async with asyncio.timeout(timeout):  # retries included: the caller's deadline is the whole exchange
                return await self.publish(message, timeout, **flags)
        except (TimeoutError, _NoAnswer):
            raise RequestTimeout(f"no answer from {self._shown(flags.get('endpoint'))} within {timeout}s") from None

    async def publish(self, message: Message, timeout: float | None, method: str = "POST",
                       endpoint: str | None = None, **flags: Any) -> Any:
        # The common case (a POST of a message without headers) builds one dict literal and calls no
        # helper: on this path each step measured about 1% of a request, far more than on its own.
        if method != "POST":
            method = method.upper()
        if message.headers or message.correlation_id:
            if _EXPIRES in message.headers:  # a request expires with its connection here
                message.headers = {k: v for k, v in message.headers.items() if k != _EXPIRES}
            headers = _HTTP_ENVELOPE.pairs(message)
            headers["X-Attempt"] = "1"
        else:
            headers = {"X-Message-Id": message.id, "X-Attempt": "1"}
        if self._auth:
            headers.update(self._auth)
        if method in _BODYLESS:
            if not isinstance(message.body, (Mapping, type(None))):
                raise EncodeError(f"{method} sends the message as query parameters: pass a dict, "
                                  f"got {type(message.body).__name__}")
            params = {k: v if isinstance(v, str) else _json_encode(v) for k, v in (message.body or {}).items()}
            data = None
            headers.pop("Content-Type", None)
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
            raise self._refusal(status, body, ctype, endpoint)
        if status == 202 or not body:
            return None
        try:
            return decode(body, ctype)
        except DecodeError as exc:  # the consumer took the message: sending it again would duplicate it
            log.warning("the answer of %s to message %s does not decode (%s); returning its bytes",
                        self._shown(endpoint), message.id, exc)
            return body

    def _refusal(self, status: int, body: bytes, content_type: str, endpoint: str | None) -> HTTPError:
        """The error of a non-2xx answer: :class:`HTTPRemoteError` where the handler failed."""
        if status == 500 and content_type.startswith(JSON):
            try:
                error = _json_decode(body).get(_HANDLER_FAILED)
            except (ValueError, AttributeError):
                error = None
            if isinstance(error, str):
                return HTTPRemoteError(error, _excerpt(body), self._shown(endpoint))
        return HTTPError(status, _excerpt(body), self._shown(endpoint))

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


class _HTTPServer:
    """One aiohttp application on host:port, shared by every HTTP consumer
    (and runner) of the event loop that asks for that address, and stopped
    when the last one leaves. It serves the probes (``GET /healthz``...),
    dispatches ``/{queue}`` to the consumer serving it now, and answers JSON 404s."""

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
        #: Consumers whose readiness ``/readyz`` reports, beside the routes' (a runner's).
        self.watched: list[Consumer] = []
        self.probes = _probes(lambda: {*self.watched, *self.routes.values()})
        for path, probe in self.probes.items():
            self.app.router.add_get(path, probe)
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

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The server's handler, in front of the application's: a request for
        a consumer goes straight to it, without the router's resolution, match
        info and middleware chain (about 5% of a request's time). The
        application takes the rest: its routes, 404s, ``Expect:
        100-continue`` and legacy handlers, which take the request and may
        read its match info."""
        path = request.path
        consumer = self.routes.get(path[1:])
        if (consumer is None or path in self.probes or request.method in consumer._takes_request
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

    _check_name = staticmethod(_http_route)

    def configure(self, host: str | None = None, port: int | None = None, max_body: int = _DEFAULT_MAX_BODY,
               auth_token: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.client_module()
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

    def producer_options(self) -> dict[str, Any]:
        return {"endpoint": self.url, "ssl_context": self.ssl_context}

    async def connect(self) -> None:
        global _RESPONSE
        self._web = self.client_module("aiohttp.web")
        if isinstance(_RESPONSE, str) and hasattr(self._web, "RequestKey"):  # aiohttp >= 3.12 wants typed keys
            _RESPONSE = self._web.RequestKey(_RESPONSE, self._web.StreamResponse)

    async def disconnect(self) -> None:
        """Nothing to release: the route left the server in ``stop_intake``."""

    async def start_intake(self) -> None:
        if self._mounted:
            return
        server = await _HTTPServer.acquire(self.host, self.port, self.ssl_context, self.drain_timeout)
        known = server.routes.get(self.queue_name)
        if known is not None and known is not self:
            await server.release()
            raise ConfigError(f"{self.host}:{self.port} already serves /{self.queue_name} for {known!r}")
        server.routes[self.queue_name] = self
        self._server = server

    async def stop_intake(self) -> None:
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
        own, _, message_id, correlation_id, _ = _HTTP_ENVELOPE.read(
            (key, value) for key, value in headers.items() if not _http_plumbing(key))
        message = Message(body=body, data=data, content_type=ctype, headers=own, id=message_id or next(_ids),
                          queue=self.queue_name, correlation_id=correlation_id, reply_to="",
                          attempt=1 if attempt == "1" or not attempt.isdigit() else int(attempt), raw=request)
        task = asyncio.current_task()
        assert task is not None
        await self._deliver_in(task, message, method, decoded=True)
        response: web.StreamResponse = request[_RESPONSE]
        return response

    # Settling a message is writing its response.

    async def reply(self, message: Message, result: Any, error: str | None) -> None:
        web = self._web
        if error is not None:  # the requester's RemoteError names it, as on every transport
            response = web.json_response({"error": "the handler failed", _HANDLER_FAILED: error}, status=500,
                                         headers={"X-Message-Id": message.id})
        elif isinstance(result, web.StreamResponse):  # legacy handlers answer with their own response
            response = result
        elif result is None:
            response = web.Response(status=202)
        else:
            if type(result) in _JSON_CONTAINERS:  # the common case, without encode()'s calls
                data, ctype = _to_json(result), JSON
            else:
                data, ctype = encode(result)
            response = web.Response(body=data, headers={"Content-Type": ctype})
        message.raw[_RESPONSE] = response

    async def ack(self, message: Message) -> None:
        """Nothing more: the response is the acknowledgement."""

    async def requeue(self, message: Message) -> None:
        """Nothing to hand back: the caller sees its request fail and may retry."""

    async def dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        """No dead-letter queue: the caller gets the 500 and keeps its message."""


###############################################################################
# Transports: Kafka ###########################################################
###############################################################################

#: The envelope in record headers (bytes), beside the message's own headers.
_KAFKA_ENVELOPE = _Envelope("content-type", "message-id", "correlation-id", "reply-to")
# Delays and retries wait on the broker in tier topics, ``<queue>.delay.<n>s``: a record stays
# at most n seconds in one (held by pausing its partition until then), so each tier's records
# come due in the order they were written; a longer wait hops on through the tiers.
_KAFKA_TIERS = (1, 30, 900)
_K_DUE, _K_HOLD, _K_ATTEMPT = "x-st-due", "x-st-hold", "x-st-attempt"  # ms since the epoch; the next attempt


def _kafka_tiers(queue: str) -> list[str]:
    return [f"{queue}.delay.{tier}s" for tier in _KAFKA_TIERS]


class _IdempotenceRefused(logging.Filter):
    """aiokafka logs an ERROR when a broker refuses the idempotent producer
    (Tansu does); streamtools then produces with ``acks="all"`` only and says so itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unexpected error during InitProducerIdRequest")


_idempotence_refused = _IdempotenceRefused()


class _KafkaEndpoint(BrokerEndpoint):
    """The settings and the producing side both Kafka classes share.

    :param bootstrap_servers: ``host:port`` or a list (comma-separated in a
        string); else ``KAFKA_BOOTSTRAP_SERVERS``, else ``KAFKA_HOST``.
    :param partitions: partitions of the topics it creates (a topic per queue).
    :param replication_factor: replicas of the topics it creates (default:
        as many brokers as the cluster has, at most 3).
    :param max_request_size: the largest record the producer sends, in bytes;
        a record batch holds at most this much (and 256 KiB).
    :param security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``;
        with ``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``,
        ``sasl_plain_password`` (never shown in logs or errors), as aiokafka takes them.
    Takes ``connect_timeout`` and ``send_timeout`` (see :class:`BrokerEndpoint`).
    """

    client = ("aiokafka", "aiokafka")
    address_option = "bootstrap_servers"
    broker = "Kafka"
    lost_errors = ("aiokafka.errors.KafkaConnectionError", "builtins.OSError")
    refused_errors = ("aiokafka.errors.AuthenticationFailedError", "aiokafka.errors.SaslAuthenticationFailed")
    client_errors = ("aiokafka.errors.KafkaError",)
    refused_hint = "check sasl_plain_username and sasl_plain_password"

    def configure(self, *, bootstrap_servers: str | Sequence[str] | None = None, partitions: int = 4,
                  replication_factor: int | None = None, max_request_size: int = 1048576,
                  security_protocol: str = "PLAINTEXT", ssl_context: ssl.SSLContext | None = None,
                  sasl_mechanism: str | None = None, sasl_plain_username: str | None = None,
                  sasl_plain_password: str | None = None, **options: Any) -> None:
        super().configure(**options)
        self._aiokafka = self.client_module()
        self._errors = self.client_module("aiokafka.errors")
        self._partitioner = self.client_module("aiokafka.partitioner").DefaultPartitioner()
        logging.getLogger("aiokafka.producer.sender").addFilter(_idempotence_refused)
        self.address = _addresses(bootstrap_servers, ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_HOST"), "localhost:9092",
                                  "Kafka bootstrap server", ("kafka",), 9092, bare=True)
        self.bootstrap_servers = [f"{host}:{port}" for host, port in self.address.hosts]
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
        self._producer_lock = asyncio.Lock()

    async def _started(self, client: Any, what: str, passing: _Errors = ()) -> None:
        """Start an aiokafka client (retried, see :meth:`connecting`);
        ``passing`` errors reach the caller as they are."""
        try:
            await self.connecting(client.start)
        except BaseException as exc:
            stop = getattr(client, "stop", None) or client.close  # the admin client closes instead
            await _closing(f"stopping a Kafka {what} of {self.where}", stop())
            if isinstance(exc, self.failures) and not isinstance(exc, passing):
                raise ConnectionFailed(f"cannot start the Kafka {what} at {self.where}: {self.cause(exc)}") from None
            raise

    async def _admin(self, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """``work(admin)`` with an admin client of its own."""
        admin = self.client_module("aiokafka.admin").AIOKafkaAdminClient(**self._client_options)
        await self._started(admin, "admin client")
        try:
            return await work(admin)
        finally:
            await _closing(f"closing a Kafka admin client of {self.where}", admin.close())

    async def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        async def create(admin: Any) -> None:
            replicas = self.replication_factor or min(3, len((await admin.describe_cluster())["brokers"]) or 1)
            new = self.client_module("aiokafka.admin").NewTopic(
                topic, num_partitions=partitions or self.partitions, replication_factor=replicas)
            for _, code, *rest in (await admin.create_topics([new])).topic_errors:
                if code not in (0, 36):  # 36: it exists already
                    raise SendError(f"Kafka at {self.where} refused to create topic {topic!r}: "
                                    f"error {code} {rest[0] if rest else ''}")

        await self.ensure_once(topic, lambda: self._admin(create))

    async def produce_later(self, queue: str, message: Message, due: float, attempt: int | None = None,
                            timeout: float | None = None) -> None:
        """Write ``message`` to the tier topic of ``queue`` that holds it
        until ``due`` (ms since the epoch), or as close as a tier can."""
        left = (due - time.time() * 1000) / 1000
        tier = max((n for n in _KAFKA_TIERS if n <= left), default=_KAFKA_TIERS[0])
        topic = f"{queue}.delay.{tier}s"
        await self.ensure_topic(topic, partitions=1)
        headers = {**message.headers, _K_DUE: str(int(due)), _K_HOLD: str(int(due - (left - min(tier, left)) * 1000))}
        if attempt is not None:
            headers[_K_ATTEMPT] = str(attempt)
        _sent(await self.produce(topic, [dataclasses.replace(message, headers=headers)], timeout=timeout))

    async def delete_topics(self, *topics: str) -> None:
        self.forget(*topics)
        await self._admin(lambda admin: _closing(f"deleting topics {list(topics)}", admin.delete_topics(list(topics))))

    async def _producing(self) -> Any:
        """The started producer, with ``acks="all"``, idempotent where the
        broker supports it (Tansu, for one, refuses ``InitProducerId``)."""
        if self._producer is not None:
            return self._producer
        async with self._producer_lock:
            if self._producer is None:
                # A batch of several records never exceeds max_request_size (see _produce_batches).
                options = {**self._client_options, "acks": "all", "max_request_size": self.max_request_size,
                           "max_batch_size": min(262144, self.max_request_size),
                           "request_timeout_ms": int(self.send_timeout * 1000)}
                refused = _kafka_no_idempotence.setdefault(asyncio.get_running_loop(), set())
                if self.where not in refused:
                    producer = self._aiokafka.AIOKafkaProducer(enable_idempotence=True, **options)
                    try:
                        await self._started(producer, "producer", (self._errors.UnknownError,
                                                                   self._errors.UnsupportedVersionError))
                        self._producer = producer
                        return producer
                    except (self._errors.UnknownError, self._errors.UnsupportedVersionError) as exc:
                        log.info("Kafka at %s refused the idempotent producer (%s); producing with acks=all only",
                                 self.where, type(exc).__name__)
                        refused.add(self.where)
                producer = self._aiokafka.AIOKafkaProducer(**options)
                await self._started(producer, "producer")
                self._producer = producer
        return self._producer

    async def produce(self, topic: str, batch: list[Message], key: Any = None,
                      timeout: float | None = None) -> list[SendError | None]:
        """Send records, then wait for the broker's acknowledgements; each
        one's error or None. A few go into the producer's own batches, shared
        with other sends; more go in record batches built here (a third of the
        cost of ``send()`` per record, but a batch waits until the partition's
        previous one left)."""
        producer = self._producer or await self._producing()
        if isinstance(key, str):
            key = key.encode()
        pairs, errors = _KAFKA_ENVELOPE.pairs, self._errors
        if len(batch) < 16:
            acks = []
            for message in batch:
                try:
                    acks.append(await producer.send(topic, message.data, key=key,
                                                    headers=[(k, v.encode()) for k, v in pairs(message).items()]))
                except errors.KafkaError as exc:
                    acks.append(exc)
        else:
            acks = await self._produce_batches(producer, topic, batch, key)
        outcomes = await self.confirmations(acks, timeout, f"the record to {topic!r}")
        return [self._send_error(topic, message, outcome) if isinstance(outcome, errors.KafkaError) else outcome
                for message, outcome in zip(batch, outcomes)]

    async def _produce_batches(self, producer: Any, topic: str, batch: list[Message], key: bytes | None) -> list[Any]:
        """Each record's acknowledgement (a future, or the error): in batches
        to the key's partition (as ``send()`` picks it), else each batch to
        the next partition from a random one, so they go out together."""
        try:
            partitions = sorted(await producer.partitions_for(topic))
            available = list(producer.client.cluster.available_partitions_for_topic(topic))
        except self._errors.KafkaError as exc:
            return [exc] * len(batch)
        if key is None:
            spread = available or partitions
            targets: Iterator[int] = itertools.islice(itertools.cycle(spread), random.randrange(len(spread)), None)
        else:
            targets = itertools.repeat(self._partitioner(key, partitions, available))
        acks: list[Any] = []
        builder, members = producer.create_batch(), 0

        async def send_batch() -> None:
            try:
                ack = await producer.send_batch(builder, topic, partition=next(targets))
            except self._errors.KafkaError as exc:
                ack = exc
            acks.extend([ack] * members)

        for message in batch:
            headers = [(k, v.encode()) for k, v in _KAFKA_ENVELOPE.pairs(message).items()]
            if builder.append(key=key, value=message.data, timestamp=None, headers=headers) is None:  # full
                await send_batch()
                builder, members = producer.create_batch(), 0
                builder.append(key=key, value=message.data, timestamp=None, headers=headers)
            if not members and builder.size() > self.max_request_size:  # a batch takes a first record of any size
                acks.append(self._errors.MessageSizeTooLargeError())
                builder = producer.create_batch()
                continue
            members += 1
        if members:
            await send_batch()
        return acks

    def _send_error(self, topic: str, message: Message, exc: BaseException) -> SendError:
        if isinstance(exc, self._errors.MessageSizeTooLargeError):
            return SendError(f"the record of {len(message.data)} bytes to {topic!r} is over the size limit "
                             f"(max_request_size={self.max_request_size}, or the broker's message.max.bytes)")
        if isinstance(exc, self._errors.KafkaTimeoutError):
            return SendError(f"Kafka at {self.where} did not acknowledge the record to {topic!r} "
                             f"within {self.send_timeout}s")
        return SendError(f"Kafka at {self.where} did not take the record to {topic!r}: {self.cause(exc)}")

    async def _stop_producer(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _closing(f"stopping a Kafka producer of {self.where}", producer.stop())


#: Clusters that refused the idempotent producer, so it is tried once per event loop.
_kafka_no_idempotence: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[str]] = weakref.WeakKeyDictionary()


class KafkaProducer(_KafkaEndpoint, PumpedReplies):
    """Sends records to the topic named after the queue (created with
    ``partitions`` if missing); ``send`` returns once the broker acknowledged
    the record with ``acks="all"``. ``send(key=...)`` keeps records of one key
    in order, in one partition. Requests get their replies on a reply topic of
    the producer's own, deleted on ``close()``. Options: see :class:`_KafkaEndpoint`."""

    send_flags = frozenset({"key"})
    tells_redelivery = False
    pipelined = True
    delays = True

    async def connect(self) -> None:
        self._reply_consumer: Any = None
        await self.ensure_topic(self.queue_name)
        await self._producing()

    async def disconnect(self) -> None:
        await self._stop_producer()

    async def publish(self, message: Message, timeout: float | None, key: Any = None, delay: float | None = None,
                      **flags: Any) -> None:
        if delay:
            await self.produce_later(self.queue_name, message, time.time() * 1000 + delay * 1000, timeout=timeout)
            return
        _sent(await self.produce(self.queue_name, [message], key, timeout))

    async def publish_many(self, batch: list[Message], timeout: float | None, key: Any = None,
                           delay: float | None = None, **flags: Any) -> list[Any]:
        if delay:
            return await super().publish_many(batch, timeout, delay=delay)
        return await self.produce(self.queue_name, batch, key, timeout)

    async def open_replies(self) -> str:
        topic = f"streamtools.reply.{_new_id()}"
        await self.ensure_topic(topic, partitions=1)
        consumer = self._aiokafka.AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                                   **self._client_options)
        await self._started(consumer, "reply consumer")
        consumer.assign([self._aiokafka.TopicPartition(topic, 0)])
        self._reply_consumer = consumer
        return topic

    async def read_replies(self, address: str) -> list[Message]:
        batches = await self._reply_consumer.getmany(timeout_ms=1000)
        return [_kafka_message(record) for records in batches.values() for record in records]

    async def close_replies(self, address: str) -> None:
        await _closing("stopping the Kafka reply consumer", self._reply_consumer.stop())
        await self.delete_topics(address)


def _kafka_message(record: Any, queue: str = "") -> Message:
    headers, content_type, message_id, correlation_id, reply_to = _KAFKA_ENVELOPE.read(record.headers or ())
    return Message(data=record.value or b"", content_type=content_type, headers=headers,
                   id=message_id or f"{record.topic}-{record.partition}-{record.offset}", queue=queue,
                   correlation_id=correlation_id, reply_to=reply_to, raw=record)


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


class KafkaConsumer(_KafkaEndpoint, PullingConsumer):
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

    def configure(self, *, group: str | None = None, session_timeout: float = 10.0, commit_interval: float = 0.2,
                  fetch_max_wait: float = 0.05, **options: Any) -> None:
        super().configure(**options)
        self.fetch_max_wait = _number("fetch_max_wait", fetch_max_wait, float, 0.001)
        self.group = group or self.queue_name
        self.session_timeout = _number("session_timeout", session_timeout, float, 0.1)
        self.commit_interval = _number("commit_interval", commit_interval, float, 0.001)

    async def connect(self) -> None:
        self._partitions: dict[tuple[str, int], _Offsets] = {}
        self._paused: dict[Any, asyncio.TimerHandle] = {}
        self._joined = asyncio.Event()
        self.tiers = _kafka_tiers(self.queue_name)
        await self.ensure_topic(self.queue_name)
        for tier in self.tiers:
            await self.ensure_topic(tier, partitions=1)
        session_ms = int(self.session_timeout * 1000)
        self._consumer = self._aiokafka.AIOKafkaConsumer(
            group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, session_ms // 3),
            max_poll_records=self.prefetch, fetch_max_wait_ms=int(self.fetch_max_wait * 1000),
            **self._client_options)
        self._consumer.subscribe([self.queue_name, *self.tiers], listener=self._rebalance_listener())
        await self._started(self._consumer, f"consumer of group {self.group!r}")

    def _rebalance_listener(self) -> Any:
        consumer = self

        class Listener(self.client_module("aiokafka.abc").ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await consumer._commit()  # what finished; the rest goes to the partition's new owner
                for tp in revoked:
                    consumer._partitions.pop((tp.topic, tp.partition), None)
                    held = consumer._paused.pop(tp, None)
                    if held is not None:
                        held.cancel()

            async def on_partitions_assigned(self, assigned: Any) -> None:
                for tp in assigned:
                    consumer._partitions.setdefault((tp.topic, tp.partition), _Offsets())
                consumer._joined.set()

        return Listener()

    async def start_intake(self) -> None:
        await super().start_intake()
        # start() returns once the group gave this member its partitions (maybe none): a message
        # sent next is consumed at once, not after the join (about 0.3 s on Tansu).
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._joined.wait()
        except TimeoutError:
            log.warning("consumer of %r has not joined group %r on %s within %ss; it goes on joining",
                        self.queue_name, self.group, self.where, self.connect_timeout)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._commit_every()]

    def connected(self) -> bool:
        # aiokafka forgets the group's coordinator when it stops answering (a heartbeat fails).
        coordinator = getattr(self._consumer, "_coordinator", None)
        return self._fetching and getattr(coordinator, "coordinator_id", 0) is not None

    def received(self, record: Any) -> Message:
        message = _kafka_message(record, self.queue_name)
        if record.topic != self.queue_name:  # from a tier: a delayed message, or a retry with its attempt
            headers = message.headers
            headers.pop(_K_DUE, None)
            headers.pop(_K_HOLD, None)
            message.attempt = int(headers.pop(_K_ATTEMPT, 1))
            message.redelivered = message.attempt > 1
        return message

    async def fetch(self, room: int) -> list[Any]:
        batches = await self._consumer.getmany(timeout_ms=200, max_records=room)
        taken = []
        for tp, records in batches.items():
            offsets = self._partitions.setdefault((tp.topic, tp.partition), _Offsets())
            if tp.topic != self.queue_name:
                records = await self._due(tp, records, offsets)
            else:
                offsets.pending.extend(r.offset for r in records)
            taken += records
        return taken

    async def _due(self, tp: Any, records: list[Any], offsets: _Offsets) -> list[Any]:
        """The records of a tier's partition that are due, registered in
        ``offsets`` (those due later hop to the next tier); at the first one
        held longer, the partition pauses, read again from there when it is due."""
        due = []
        for record in records:
            headers = dict(record.headers or ())
            now = time.time() * 1000
            hold = int(headers.get(_K_HOLD, b"0") or 0)
            if hold > now:
                self._hold_partition(tp, record.offset, (hold - now) / 1000)
                break
            until = int(headers.get(_K_DUE, b"0") or 0)
            offsets.pending.append(record.offset)
            if until <= now + 1:
                due.append(record)
                continue
            message = _kafka_message(record, self.queue_name)
            attempt = message.headers.pop(_K_ATTEMPT, None)
            try:
                await self.produce_later(self.queue_name, message, until, None if attempt is None else int(attempt))
            except SendError as exc:
                log.warning("moving a delayed record of %r on %s failed (%s); retrying", self.queue_name,
                            self.where, exc)
                offsets.pending.pop()
                self._hold_partition(tp, record.offset, 1.0)
                break
            offsets.done(record.offset)
        return due

    def _hold_partition(self, tp: Any, offset: int, seconds: float) -> None:
        self._consumer.pause(tp)
        self._consumer.seek(tp, offset)

        def resume() -> None:
            if self._paused.pop(tp, None) is not None and tp in self._consumer.assignment():
                self._consumer.resume(tp)

        held = self._paused.pop(tp, None)
        if held is not None:
            held.cancel()
        self._paused[tp] = asyncio.get_running_loop().call_later(seconds, resume)

    async def _commit_every(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            await self._commit()

    async def _commit(self) -> None:
        """Commit each partition's finished prefix that moved since the last commit."""
        due = {p: o.commit for p, o in self._partitions.items() if o.commit is not None}
        if not due:
            return
        tps = {self._aiokafka.TopicPartition(*p): offset for p, offset in due.items()}
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

    async def disconnect(self) -> None:
        for held in self._paused.values():
            held.cancel()
        await self._commit()
        await _closing(f"leaving group {self.group!r}", self._consumer.stop())
        await self._stop_producer()

    async def acknowledge(self, message: Message) -> None:
        offsets = self._partitions.get((message.raw.topic, message.raw.partition))
        if offsets is not None:  # else revoked: its new owner has the record again
            offsets.done(message.raw.offset)

    async def hold(self, message: Message, delay: float) -> bool:
        await self.produce_later(self.queue_name, message, time.time() * 1000 + delay * 1000, message.attempt + 1)
        await self.acknowledge(message)
        return True

    async def send_to(self, queue: str, message: Message) -> None:
        await self.ensure_topic(queue)
        _sent(await self.produce(queue, [message]))

    async def send_reply(self, address: str, reply: Message) -> None:
        _sent(await self.produce(address, [reply]))

    async def delete_queues(self) -> None:
        """Delete the queue's topic, its tier topics and its dead-letter topic."""
        await self.delete_topics(self.queue_name, *_kafka_tiers(self.queue_name), self.dead_letter_queue)


###############################################################################
# Transports: NATS JetStream ##################################################
###############################################################################

#: The envelope in NATS headers (strings); Nats-Msg-Id makes JetStream drop a resent duplicate.
_NATS_ENVELOPE = _Envelope("Content-Type", "Nats-Msg-Id", "X-Correlation-Id", "X-Reply-To")
#: The message id, where Nats-Msg-Id cannot be it (a dead letter: JetStream would drop it as a
#: duplicate of an earlier dead letter of the same message).
_N_MESSAGE_ID = "X-Message-Id"
#: When a delayed message is due (ms since the epoch), in the queue's delay stream.
_N_DUE = "X-St-Due"


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


def _nats_message(msg: Any, queue: str = "") -> Message:
    headers, content_type, message_id, correlation_id, reply_to = _NATS_ENVELOPE.read((msg.headers or {}).items())
    return Message(data=msg.data, content_type=content_type, headers=headers,
                   id=headers.pop(_N_MESSAGE_ID, None) or message_id, queue=queue,
                   correlation_id=correlation_id, reply_to=reply_to, raw=msg)


class _NATSEndpoint(BrokerEndpoint):
    """The settings and the connection both NATS classes share.

    :param servers: server URLs (a list, or comma-separated); else ``NATS_URL``.
        nats-py fails over between them and reconnects by itself.
    :param user: with ``password``; or ``token``; never shown in logs or errors.
    :param tls: an ``ssl.SSLContext`` (or use ``tls://`` URLs).
    :param replicas: copies of each stream the queue uses (the queue's, its
        delay and dead-letter streams) in a JetStream cluster: 3 to ride out a
        server's loss; a stream that exists keeps its own.
    Takes ``connect_timeout`` and ``send_timeout`` (see :class:`BrokerEndpoint`).
    """

    client = ("nats", "nats-py")
    address_option = "servers"
    broker = "NATS"
    lost_errors = ("builtins.OSError", "nats.errors.NoServersError", "nats.errors.TimeoutError",
                   "nats.errors.ConnectionClosedError", "nats.errors.NoRespondersError",
                   "nats.errors.ConnectionReconnectingError", "nats.js.errors.NoStreamResponseError")
    refused_errors = ("nats.errors.AuthorizationError",)
    client_errors = ("nats.errors.Error", "nats.js.errors.Error")
    refused_hint = "check user/password or token"

    def configure(self, *, servers: str | Sequence[str] | None = None, user: str | None = None,
                  password: str | None = None, token: str | None = None, tls: ssl.SSLContext | None = None,
                  replicas: int = 1, **options: Any) -> None:
        super().configure(**options)
        self.replicas = _number("replicas", replicas, int, 1)
        self._nats = self.client_module()
        self._js_errors = self.client_module("nats.js.errors")
        self.address = _addresses(servers, ("NATS_URL",), "nats://localhost:4222", "NATS",
                                  ("nats", "tls", "ws", "wss"), 4222, bare=True)
        #: The server URLs (nats-py fails over between them).
        self.servers = self.address.urls
        credentials = {"user": user, "password": password, "token": token, "tls": tls}
        self._credentials = {k: v for k, v in credentials.items() if v is not None}
        self.subject = _nats_subject(self.queue_name)
        self.stream = _nats_name(self.queue_name)
        # Delayed messages wait in a stream of their own (no queue name has a space; no queue's
        # subject starts with "streamtools-delay.").
        self.delay_stream, self.delay_subject = _nats_name(f"{self.queue_name} delay"), f"streamtools-delay.{self.queue_name}"
        self._nc: Any = None

    async def _open(self) -> None:
        def event(what: str) -> Callable[[], Awaitable[None]]:
            async def tell() -> None:
                if self._nc is not None and not self._nc.is_closed:  # not our own close
                    self.connection_event(what)
            return tell

        async def error(exc: Exception) -> None:
            log.debug("NATS at %s: %r", self.where, exc)

        async def connect() -> Any:
            return await self._nats.connect(
                self.address.urls, connect_timeout=min(5.0, max(0.5, self.connect_timeout)),
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True,
                disconnected_cb=event("lost"), reconnected_cb=event("restored"), error_cb=error,
                name="streamtools", **self._credentials)

        self._nc = await self.connecting(connect)
        self._js = self._nc.jetstream()

    async def ensure_stream(self, stream: str, subject: str) -> None:
        async def create() -> None:
            try:
                await self._js.add_stream(name=stream, subjects=[subject], retention="workqueue", storage="file",
                                          num_replicas=self.replicas)
            except self._js_errors.BadRequestError as exc:  # it exists with other settings
                info = await self._js.stream_info(stream)
                if subject not in (info.config.subjects or []):
                    raise ConfigError(f"JetStream stream {stream!r} on {self.where} exists without subject "
                                      f"{subject!r}: delete it or use another queue name ({exc})") from None

        await self.ensure_once(stream, create)

    async def disconnect(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await _closing(f"closing the connection to NATS at {self.where}", nc.close())

    async def js_publish(self, subject: str, data: bytes, headers: dict[str, str], timeout: float | None = None) -> None:
        """Publish to JetStream and wait for its PubAck, retrying through an
        outage until the send timeout (a resend carries the same Nats-Msg-Id,
        so the server drops it if the first one had arrived)."""
        timeout = self.send_timeout if timeout is None else timeout

        async def publish() -> None:
            await self._js.publish(subject, data, timeout=min(5.0, timeout), headers=headers)

        try:  # the first try without the retry's coroutines
            await publish()
        except self.lost as exc:
            await self.sending(f"the message to {subject!r}", publish, timeout, failed=exc)
        except self.failures as exc:
            raise SendError(f"NATS at {self.where} refused the message to {subject!r}: {self.cause(exc)}") from None


class NATSProducer(_NATSEndpoint, Producer):
    """Publishes to the queue's JetStream stream (work-queue retention, file
    storage, created if missing); ``send`` returns once JetStream acknowledged
    the message (PubAck). Requests use a core NATS inbox of the producer's own
    for the replies. Options: see :class:`_NATSEndpoint`."""

    pipelined = True
    delays = True

    async def connect(self) -> None:
        await self._open()
        await self.ensure_stream(self.stream, self.subject)

    async def _delayed(self, delay: float) -> tuple[str, Callable[[Message], dict[str, str]]]:
        """The delay stream's subject, and the headers of a message due in ``delay`` seconds."""
        await self.ensure_stream(self.delay_stream, self.delay_subject)
        due = str(int((time.time() + delay) * 1000))
        return self.delay_subject, lambda message: {**_NATS_ENVELOPE.pairs(message), _N_DUE: due}

    async def publish(self, message: Message, timeout: float | None, delay: float | None = None,
                      **flags: Any) -> None:
        subject, pairs = await self._delayed(delay) if delay else (self.subject, _NATS_ENVELOPE.pairs)
        await self.js_publish(subject, message.data, pairs(message), timeout)

    async def publish_many(self, batch: list[Message], timeout: float | None, delay: float | None = None,
                           **flags: Any) -> list[Any]:
        # Pipelined: every message out at once, then the PubAcks together; one that failed is
        # sent again on its own, with the retries of send (its Nats-Msg-Id drops a duplicate).
        js = self._js
        subject, pairs = await self._delayed(delay) if delay else (self.subject, _NATS_ENVELOPE.pairs)
        acks = []
        for message in batch:
            try:
                acks.append(await js.publish_async(subject, message.data, headers=pairs(message)))
            except self.failures as exc:
                acks.append(exc)
        # nats-py's acknowledgements have no timeout of their own; past it, the unacknowledged fail.
        outcomes = await self.confirmations(acks, timeout, f"the message to {subject!r}")
        for i, outcome in enumerate(outcomes):
            if outcome is not None and not isinstance(outcome, SendError):
                try:  # on its own, with the retries of send
                    await self.js_publish(subject, batch[i].data, pairs(batch[i]), timeout)
                    outcomes[i] = None
                except SendError as exc:
                    outcomes[i] = exc
        return outcomes

    async def listen_for_replies(self) -> str:
        inbox: str = self._nc.new_inbox()

        async def on_reply(msg: Any) -> None:
            self.deliver_reply(_nats_message(msg))

        await self._nc.subscribe(inbox, cb=on_reply)
        return inbox


class _NATSPull:
    """A durable pull consumer read through an inbox of this process: one
    pull request out at a time, for the room asked, its messages gathered by
    a callback (nats-py's ``fetch`` waits for each message with tasks of its
    own, which cost more than the rest of consuming it)."""

    def __init__(self, endpoint: _NATSEndpoint, stream: str) -> None:
        self.endpoint, self.stream = endpoint, stream
        self.taken: list[Any] = []  # arrived, not fetched yet
        self._asked, self._until, self._status = 0, 0.0, ""  # what the request out may still bring, till when
        self._arrived = asyncio.Event()

    async def start(self, subject: str, ack_wait: float, max_ack_pending: int) -> None:
        """Make the stream and its consumer if missing; subscribe the inbox."""
        api = self.endpoint.client_module("nats.js.api")
        self._config = api.ConsumerConfig(durable_name=self.stream, ack_policy=api.AckPolicy.EXPLICIT,
                                          ack_wait=ack_wait, max_ack_pending=max_ack_pending, max_deliver=-1,
                                          filter_subject=subject)
        await self.endpoint.ensure_stream(self.stream, subject)
        await self._ensure_consumer()
        self._inbox = self.endpoint._nc.new_inbox()
        await self.endpoint._nc.subscribe(self._inbox, cb=self._on_message)

    async def _ensure_consumer(self) -> None:
        try:
            await self.endpoint._js.consumer_info(self.stream, self.stream)
        except self.endpoint._js_errors.NotFoundError:
            log.warning("JetStream consumer %r on %s is missing; making it", self.stream, self.endpoint.where)
            await self.endpoint._js.add_consumer(self.stream, self._config)

    async def _on_message(self, msg: Any) -> None:
        status = (msg.headers or {}).get("Status")
        if status:  # the request ended: 408 expired, 409, or 503 (no such consumer)
            self._asked, self._status = 0, status
        else:
            self.taken.append(msg)
            self._asked -= 1
        self._arrived.set()

    async def fetch(self, room: int, wait: float = 1.0) -> list[Any]:
        """What arrived, else what arrives within ``wait`` seconds (a pull
        request for ``room`` sent first unless one is out)."""
        if self._asked <= 0 or time.monotonic() > self._until:  # none out, or it vanished
            if (self._asked > 0 and not self._status) or self._status == "503":
                await self._ensure_consumer()  # no 408 at its expiry, or no responders: the consumer may be gone
            self._asked, self._until, self._status = room, time.monotonic() + wait + 0.5, ""
            request = json.dumps({"batch": room, "expires": int(wait * 1e9)}).encode()
            await self.endpoint._nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.stream}", request,
                                            reply=self._inbox)
        if not self.taken:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._until - time.monotonic())):
                    await self._arrived.wait()
        if self._status == "503":
            raise self.endpoint._nats.errors.NoRespondersError
        taken, self.taken = self.taken, []
        return taken


class NATSConsumer(_NATSEndpoint, PullingConsumer):
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

    def configure(self, *, ack_wait: float = 30.0, **options: Any) -> None:
        super().configure(**options)
        self.ack_wait = _number("ack_wait", ack_wait, float, 0.1)
        self.lease_interval = self.ack_wait / 3  # in-progress acks for handlers that run long

    async def connect(self) -> None:
        await self._open()
        # The pull batch bounds the messages in flight here; the server's max_ack_pending also
        # counts messages waiting out a retry delay, so it gets room for them beyond prefetch.
        self._reader, self._delay_reader = _NATSPull(self, self.stream), _NATSPull(self, self.delay_stream)
        await self._reader.start(self.subject, self.ack_wait, self.prefetch * 10)
        await self._delay_reader.start(self.delay_subject, 30.0, -1)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self.repeating(f"moving the delayed messages of {self.queue_name!r}", self._move_due)]

    async def _move_due(self) -> None:
        """Publish delayed messages to the queue's stream when they are due;
        the server holds each one until then (a nak with that delay)."""
        msgs = await self._delay_reader.fetch(100)
        now = time.time() * 1000
        for msg in msgs:
            headers = dict(msg.headers or {})
            left = (int(headers.pop(_N_DUE, 0) or 0) - now) / 1000
            try:
                if left > 0.002:
                    await msg.nak(delay=left)
                    continue
                await self.js_publish(self.subject, msg.data, headers)
                await msg.ack()
            except (SendError,) + self.lost + self.failures as exc:  # it comes back after ack_wait
                log.warning("moving a delayed message of %r on %s failed (%r); it is tried again",
                            self.queue_name, self.where, exc)

    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    def received(self, msg: Any) -> Message:
        message = _nats_message(msg, self.queue_name)
        tokens = (msg.reply or "").split(".")
        # The delivery count and stream sequence from the ack subject, cheaper than nats-py's full
        # metadata: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        if len(tokens) == 9:
            delivered, sequence = int(tokens[4]), tokens[5]
        else:  # the newer form, with domain and account hash
            delivered, sequence = int(msg.metadata.num_delivered or 1), str(msg.metadata.sequence.stream)
        message.id = message.id or f"{self.stream}-{sequence}"  # another client's message, without an id
        message.attempt, message.redelivered = delivered, delivered > 1
        return message

    async def fetch(self, room: int) -> list[Any]:
        return await self._reader.fetch(room)

    async def extend_leases(self, messages: list[Message]) -> None:
        for message in messages:
            await _closing("an in-progress ack", message.raw.in_progress())

    async def acknowledge_many(self, messages: list[Message]) -> None:
        for message in messages:  # each a publish: nats-py sends them in one write
            await message.raw.ack()

    async def hand_back(self, message: Message) -> None:
        await message.raw.nak()

    async def hold(self, message: Message, delay: float) -> bool:
        # Held either way: a nak that did not arrive is redelivered after ack_wait.
        await _closing(f"handing message {message.id} back", message.raw.nak(delay=delay))
        return True

    async def unstarted(self, raws: list[Any]) -> None:
        for msg in [*raws, *self._reader.taken]:  # received, never started: back to the server now
            await _closing("nak", msg.nak())

    async def send_to(self, queue: str, message: Message) -> None:
        subject = _nats_subject(queue)
        await self.ensure_stream(_nats_name(queue), subject)
        pairs = _NATS_ENVELOPE.pairs(message)
        # A Nats-Msg-Id of its own: a message dead-lettered again (or another client's, without an
        # id) would be dropped as a duplicate of the first; the id travels beside it.
        pairs.update({"Nats-Msg-Id": f"{message.id}.dead.{_new_id()}", _N_MESSAGE_ID: message.id})
        await self.js_publish(subject, message.data, pairs)

    async def send_reply(self, address: str, reply: Message) -> None:
        await self._nc.publish(address, reply.data, headers=_NATS_ENVELOPE.pairs(reply))

    async def delete_queues(self) -> None:
        """Delete the queue's stream, its delay stream and its dead-letter stream."""
        try:
            await self._open()
            for stream in (self.stream, self.delay_stream, _nats_name(self.dead_letter_queue)):
                with contextlib.suppress(self._js_errors.NotFoundError):
                    await self._js.delete_stream(stream)
                self.forget(stream)
        finally:
            await self.disconnect()


###############################################################################
# Transports: Redis Streams ###################################################
###############################################################################

#: An entry's fields: ``data`` (the body), and the envelope beside it; the headers travel as
#: one JSON object in ``headers``, so their types survive.
_REDIS_ENVELOPE = _Envelope("content-type", "id", "correlation-id", "reply-to", nested="headers")
_REPLY_TTL = 60  # seconds a requester's reply stream outlives its last reply
# Messages go in by a script, as many as it is given in one call (a pipeline of XADDs costs the
# client several times more per message). Delayed entries wait in a sorted set by due time (the
# server's clock), each one's fields in a hash beside it; consumers move those due into the
# stream, atomically, so each moves once. ARGV: maxlen or '', the delay in ms or '', a prefix
# for delayed entries' names, then each message's number of field names and values, and them.
_REDIS_ADD = """
local due, i = nil, 4
if ARGV[2] ~= '' then
  local t = redis.call('TIME')
  due = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2])
end
while i <= #ARGV do
  local last = i + tonumber(ARGV[i])
  if due then
    redis.call('HSET', KEYS[2] .. ':' .. ARGV[3] .. i, unpack(ARGV, i + 1, last))
    redis.call('ZADD', KEYS[2], due, ARGV[3] .. i)
  elseif ARGV[1] ~= '' then redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, i + 1, last))
  else redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, last)) end
  i = last + 1
end
"""
_REDIS_MOVE_DUE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  local fields = redis.call('HGETALL', KEYS[1] .. ':' .. id)
  if #fields > 0 then
    if ARGV[1] ~= '' then redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
    else redis.call('XADD', KEYS[2], '*', unpack(fields)) end
  end
  redis.call('DEL', KEYS[1] .. ':' .. id)
  redis.call('ZREM', KEYS[1], id)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return tonumber(nxt[2]) - now end
return -1
"""


def _redis_message(entry_id: bytes, fields: dict[bytes, bytes], queue: str = "") -> Message:
    """The message of a stream entry. One without a ``data`` field, as
    another client writes it, is delivered with its fields as the body (a
    JSON object of text); one whose envelope cannot be read raises _Unreadable."""
    data = fields.pop(b"data", None)
    text = {key.decode("utf-8", "backslashreplace"): value for key, value in fields.items()}
    if data is None:
        body = {key: value.decode("utf-8", "backslashreplace") for key, value in text.items()}
        return Message(data=_to_json(body), content_type=JSON, id=entry_id.decode(), queue=queue, raw=entry_id)
    message = _REDIS_ENVELOPE.into(Message(data=data, queue=queue, raw=entry_id), text.items(),
                                   lambda: f"entry {entry_id.decode()} of {queue!r}")
    message.id = message.id or entry_id.decode()
    return message


def _sentinels(url: str) -> tuple[_Address, tuple[list[tuple[str, int]], str, int]]:
    """The sentinels, master name and database of a ``redis+sentinel://`` URL.

    :raises ConfigError: it names no sentinel or no master.
    """
    rest = url[len("redis+sentinel://"):]
    netloc, _, path = rest.partition("/")
    login, _, hosts = netloc.rpartition("@")
    master, _, db = path.partition("/")
    names = [host for host in hosts.split(",") if host]
    if not master or not names or (db and not db.isdigit()):
        raise ConfigError(f"a Sentinel URL is redis+sentinel://host:port,host:port/<master name>[/<db>], "
                          f"got {_redact(url)!r}")
    addresses = _addresses([f"redis://{login + '@' if login else ''}{host}" for host in names],
                           (), "", "Redis Sentinel", ("redis",), 26379)
    return addresses, (addresses.hosts, master, int(db or 0))


class _RedisEndpoint(BrokerEndpoint):
    """The settings and the connection both Redis classes share.

    :param url: ``redis://`` or ``rediss://`` (TLS) URL with the database,
        and credentials if any (never shown); else ``REDIS_URL``. With Sentinel:
        ``redis+sentinel://[user:password@]host:port,host:port/<master name>[/<db>]``
        (the sentinels' addresses; redis-py's ``Sentinel`` finds the master,
        and finds it again after a failover).
    :param maxlen: trim the stream to about this many entries on each send
        (approximate, as Redis trims whole nodes); entries beyond it are lost.
    :param wait_replicas: ``send`` returns only once this many replicas have
        the entry (``WAIT``), so a master's death loses nothing it confirmed;
        else :class:`SendError` after ``wait_timeout`` seconds (the entry may
        still be delivered). 0, the default: the master's memory only.
    Takes ``connect_timeout`` and ``send_timeout`` (see :class:`BrokerEndpoint`).
    """

    client = ("redis", "redis")
    address_option = "url"
    broker = "Redis"
    lost_errors = ("redis.exceptions.ConnectionError", "redis.exceptions.TimeoutError", "builtins.OSError")
    refused_errors = ("redis.exceptions.AuthenticationError", "redis.exceptions.ResponseError")
    client_errors = ("redis.exceptions.RedisError",)
    refused_hint = "check the user and password in the URL, or REDIS_URL"

    def configure(self, *, url: str | None = None, maxlen: int | None = None, wait_replicas: int = 0,
                  wait_timeout: float = 2.0, **options: Any) -> None:
        super().configure(**options)
        self._redis = self.client_module("redis.asyncio")
        self._redis_errors = self.client_module("redis.exceptions")
        url = url or os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
        self.sentinel: tuple[list[tuple[str, int]], str, int] | None = None
        if url.startswith("redis+sentinel://"):
            self.address, self.sentinel = _sentinels(url)
        else:
            self.address = _addresses(url, (), "", "Redis", ("redis", "rediss", "unix"), 6379)
        self.url = self.address.urls[0]
        self.wait_replicas = _number("wait_replicas", wait_replicas, int, 0)
        self.wait_timeout = _number("wait_timeout", wait_timeout, float, 0.001)
        self.maxlen = None if maxlen is None else _number("maxlen", maxlen, int, 1)
        self.key = f"streamtools:{self.queue_name}"
        self.delayed = f"streamtools-delayed:{self.queue_name}"
        self._r: Any = None

    async def _open(self) -> None:
        timeouts = {"socket_connect_timeout": min(5.0, max(0.5, self.connect_timeout)), "health_check_interval": 15}
        if self.sentinel is None:
            self._r = self._redis.Redis.from_url(self.url, **timeouts)
        else:
            hosts, master, db = self.sentinel
            parts = urllib.parse.urlsplit(self.url)
            login = {"username": parts.username, "password": parts.password}
            sentinel = self.client_module("redis.asyncio.sentinel").Sentinel(
                hosts, sentinel_kwargs={"socket_connect_timeout": timeouts["socket_connect_timeout"]}, **timeouts)
            self._r = sentinel.master_for(master, db=db, **timeouts, **{k: v for k, v in login.items() if v})
        await self.connecting(self._r.ping)
        self._move_script = self._r.register_script(_REDIS_MOVE_DUE)

    async def disconnect(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            await _closing(f"closing the connection to Redis at {self.where}", r.aclose())

    def _fields(self, message: Message) -> dict[str, Any]:
        return {"data": message.data, **_REDIS_ENVELOPE.pairs(message)}

    def replicated(self, outcomes: list[Any], what: str) -> list[Any]:
        """With ``wait_replicas``: the pipeline ended with a WAIT; its answer checked."""
        if not self.wait_replicas:
            return outcomes
        copies = outcomes.pop()
        if isinstance(copies, Exception) or copies < self.wait_replicas:
            late = SendError(f"Redis at {self.where} has {what} but only {copies} of the {self.wait_replicas} "
                             f"replicas asked for confirmed it within {self.wait_timeout}s (it may still be "
                             "delivered)")
            return [late if not isinstance(o, Exception) else o for o in outcomes]
        return outcomes

    async def add(self, key: str, batch: list[Message], delay: float | None = None,
                  timeout: float | None = None) -> list[SendError | None]:
        """Add ``batch`` to the stream ``key`` (with ``delay``, to the queue's
        delayed set) in one pipeline: a lone message by XADD, others by
        :data:`_REDIS_ADD`, 500 a call (a script holds up the server while it
        runs); then WAIT for the replicas asked for. Each message's error or
        None. On a lost connection the whole batch is sent again, until the
        send timeout."""
        what = "the message" if len(batch) == 1 else f"{len(batch)} messages"
        lone = len(batch) == 1 and not delay

        async def add_all() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            if lone:
                pipe.xadd(key, self._fields(batch[0]), maxlen=self.maxlen, approximate=True)
            for start in range(0, 0 if lone else len(batch), 500):
                args: list[Any] = ["" if self.maxlen is None else self.maxlen, int(delay * 1000) if delay else "",
                                   f"{_new_id()}-"]
                for message in batch[start:start + 500]:
                    fields = self._fields(message)
                    args.append(2 * len(fields))
                    for pair in fields.items():
                        args += pair
                pipe.eval(_REDIS_ADD, 2, key, self.delayed, *args)
            if self.wait_replicas:
                pipe.wait(self.wait_replicas, int(self.wait_timeout * 1000))
            outcomes = self.replicated(await pipe.execute(raise_on_error=False), what)
            return outcomes if lone else [outcomes[i // 500] for i in range(len(batch))]

        try:
            outcomes = await self.sending(f"{what} to {key!r}", add_all, timeout)
        except SendError as exc:
            return [exc] * len(batch)
        return [o if isinstance(o, SendError) else SendError(f"Redis at {self.where} refused the message: "
                                                              f"{self.cause(o)}") if isinstance(o, Exception) else None
                for o in outcomes]


class RedisProducer(_RedisEndpoint, PumpedReplies):
    """Adds each message to the queue's stream (XADD); ``send`` returns once
    Redis accepted it, and the sends of one turn of the event loop go in one
    pipeline. How durable that is depends on the server: see the README.
    Requests get replies on a stream of the requester's own, which expires
    when unused. Options: see :class:`_RedisEndpoint`."""

    pipelined = True
    delays = True

    async def connect(self) -> None:
        self._reply_last = "0-0"
        await self._open()

    async def publish(self, message: Message, timeout: float | None, delay: float | None = None,
                      **flags: Any) -> None:
        _sent(await self.add(self.key, [message], delay, timeout))

    async def publish_many(self, batch: list[Message], timeout: float | None, delay: float | None = None,
                           **flags: Any) -> list[Any]:
        return await self.add(self.key, batch, delay, timeout)

    async def open_replies(self) -> str:
        return f"streamtools:reply:{_new_id()}"

    async def read_replies(self, address: str) -> list[Message]:
        found = await self._r.xread({address: self._reply_last}, block=1000, count=100)
        replies = []
        for _, entries in found or ():
            for entry_id, fields in entries:
                self._reply_last = entry_id
                with contextlib.suppress(_Unreadable):
                    replies.append(_redis_message(entry_id, fields))
        return replies

    async def close_replies(self, address: str) -> None:
        await self._r.delete(address)


class RedisConsumer(_RedisEndpoint, PullingConsumer):
    """Consumes the queue's stream as a member of one consumer group named
    after the queue. Entries are acknowledged (XACK, and deleted: the stream
    is a work queue) only after their handler returned. Entries a member left
    pending longer than ``claim_idle`` (it crashed) are claimed by the live
    members (XAUTOCLAIM); a member restarted under the same ``consumer_name``
    first takes back its own pending entries. A failed attempt stays pending
    and is claimed again after its backoff, so it holds no slot; its attempt
    number is the entry's delivery count, which survives a crash. A server
    that lost the stream (restarted without persistence) gets it and the
    group made again, with a warning.

    :param claim_idle: seconds an entry may stay pending before another member takes it.
    :param consumer_name: this member's name in the group (default: host, process
        and a random part); give a stable one to resume own pending entries on restart.
    Takes the options of :class:`RedisProducer` too.
    """

    def configure(self, *, claim_idle: float = 30.0, consumer_name: str | None = None, **options: Any) -> None:
        super().configure(**options)
        self.claim_idle = _number("claim_idle", claim_idle, float, 0.01)
        self.group = self.queue_name
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{_new_id()}"

    async def connect(self) -> None:
        self._retries: set[asyncio.TimerHandle] = set()
        self._own = "0"  # first this member's own pending entries (a restart under the same name), then new ones
        self._next_claim = 0.0
        await self._open()
        await self._make_group()

    async def _make_group(self) -> None:
        try:
            await self._r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except self._redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise ConfigError(f"cannot create consumer group {self.group!r} on {self.key!r}: {exc}") from None

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self.repeating(f"moving the due entries of {self.queue_name!r}", self._move_due)]

    async def _move_due(self) -> float:
        """Move delayed entries into the stream when they are due; then wait
        until the next is due (checking at least twice a second for new ones)."""
        left = await self._move_script(keys=[self.delayed, self.key], args=["" if self.maxlen is None else self.maxlen])
        return 0.5 if left < 0 else min(0.5, max(0.005, left / 1000))

    def received(self, raw: tuple[bytes, dict[bytes, bytes], int]) -> Message:
        entry_id, fields, delivered = raw
        message = _redis_message(entry_id, fields, self.queue_name)
        message.attempt, message.redelivered = delivered, delivered > 1
        return message

    async def fetch(self, room: int) -> list[Any]:
        r = self._r
        try:
            if time.monotonic() >= self._next_claim:  # entries of members that died
                self._next_claim = time.monotonic() + min(self.claim_idle / 2, 5.0)
                _, claimed, *_ = await r.xautoclaim(self.key, self.group, self.consumer_name,
                                                    int(self.claim_idle * 1000), "0-0", count=room)
                if claimed:
                    return await self._taken(claimed, None)
            found = await r.xreadgroup(self.group, self.consumer_name, {self.key: self._own}, count=room,
                                       block=None if self._own == "0" else 500)
        except self._redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("Redis at %s has no stream %r or no group %r (it lost its data?); making them again",
                        self.where, self.key, self.group)
            await self._make_group()
            return []
        entries = found[0][1] if found else []
        if self._own == "0":
            if not entries:
                self._own = ">"
            return await self._taken(entries, None)
        return await self._taken(entries, 1)

    async def _taken(self, entries: list[Any], delivered: int | None) -> list[Any]:
        """Entries with their delivery counts (for claimed ones, from the group's pending list)."""
        taken = []
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile (acknowledged by another member)
                continue
            count = delivered
            if count is None:
                pending = await self._r.xpending_range(self.key, self.group, entry_id, entry_id, 1)
                count = pending[0]["times_delivered"] if pending else 2
            taken.append((entry_id, fields, count))
        return taken

    async def acknowledge_many(self, messages: list[Message]) -> None:
        """XACK and XDEL, one round trip."""
        ids = [message.raw for message in messages]

        async def settle() -> None:
            pipe = self._r.pipeline(transaction=False)
            pipe.xack(self.key, self.group, *ids)
            pipe.xdel(self.key, *ids)
            await pipe.execute()

        try:
            await self.sending(f"the acknowledgement of {len(ids)} entries", settle,
                               min(self.send_timeout, self.claim_idle / 2))
        except SendError as exc:  # still pending: claimed again after claim_idle
            log.warning("%s; they will be delivered again", exc)

    async def unstarted(self, raws: list[Any]) -> None:
        """Read, not started: pending, so claimed again (or read again on a restart)."""
        for handle in self._retries:
            handle.cancel()

    async def hold(self, message: Message, delay: float) -> bool:
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
        except self.lost as exc:
            log.warning("could not take back entry %s of %r (%r); another member claims it after claim_idle",
                        message.id, self.queue_name, exc)
            return
        taken = await self._taken(claimed, message.attempt + 1)
        self._in_flight += len(taken)
        self._inbox.put_many(taken)

    async def send_to(self, queue: str, message: Message) -> None:
        _sent(await self.add(f"streamtools:{queue}", [message]))

    async def send_reply(self, address: str, reply: Message) -> None:
        fields = self._fields(reply)

        async def send() -> Any:
            pipe = self._r.pipeline(transaction=False)
            pipe.xadd(address, fields, maxlen=1000, approximate=True)
            pipe.expire(address, _REPLY_TTL)  # a requester that went away leaves nothing behind for long
            return await pipe.execute()

        await self.sending(f"the reply to {address!r}", send)

    async def delete_queues(self) -> None:
        """Delete the queue's stream (with its group) and its dead-letter stream."""
        try:
            await self._open()
            waiting = [f"{self.delayed}:{key.decode()}" for key in await self._r.zrange(self.delayed, 0, -1)]
            await self._r.delete(self.key, f"streamtools:{self.dead_letter_queue}", self.delayed, *waiting)
        finally:
            await _RedisEndpoint.disconnect(self)


###############################################################################
# Transports: Amazon SQS ######################################################
###############################################################################

#: The envelope in message attributes (SQS takes ten at most: the headers travel as one JSON object).
_SQS_ENVELOPE = _Envelope("content-type", "message-id", "correlation-id", "reply-to", nested="headers")
_SQS_MAX_SIZE = 256 * 1024  # a message's body and attributes together
_SQS_MAX_DELAY = 900  # SendMessage's DelaySeconds; a longer delay is sent again when its 15 minutes end
_SQS_DUE, _SQS_BASE64 = "x-st-due", "x-st-base64"  # when a delayed message is due; a body that is not text


def _sqs_name(queue: str) -> str:
    """The SQS queue of a streamtools queue: ``orders.dead`` is ``orders-dead``."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in queue)[:80]


class _SQSEndpoint(BrokerEndpoint):
    """The settings and the client both SQS classes share, on aiobotocore.

    :param endpoint_url: the SQS API's URL; else ``SQS_ENDPOINT_URL``; unset is AWS itself.
    :param region: else ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, else ``us-east-1``.
    :param visibility_timeout: seconds a received message stays invisible to
        other consumers (extended while its handler runs); queues are created with it.
    :param wait_time: seconds a receive waits for messages (SQS long polling, at most 20).
    :param pool_size: the most HTTP connections to SQS; else 20, or 10 more than a
        consumer's concurrent receives (``prefetch`` / 10), whichever is more.
    Credentials come from botocore's standard chain (never shown). Takes
    ``connect_timeout`` and ``send_timeout`` (see :class:`BrokerEndpoint`).
    """

    client = ("aiobotocore", "aiobotocore")
    address_option = "endpoint_url"
    broker = "SQS"
    lost_errors = ("builtins.OSError", "botocore.exceptions.EndpointConnectionError",
                   "botocore.exceptions.ConnectionClosedError", "botocore.exceptions.ReadTimeoutError",
                   "botocore.exceptions.ConnectTimeoutError", "aiohttp.ClientConnectionError")
    refused_errors = ("botocore.exceptions.NoCredentialsError", "botocore.exceptions.ClientError")
    client_errors = ("botocore.exceptions.BotoCoreError", "botocore.exceptions.ClientError")
    refused_hint = "check the AWS credentials (botocore's chain: AWS_ACCESS_KEY_ID, a profile, a role...)"

    def configure(self, *, endpoint_url: str | None = None, region: str | None = None,
                  visibility_timeout: float = 30.0, wait_time: float = 5.0, pool_size: int | None = None,
                  **options: Any) -> None:
        super().configure(**options)
        self.region = region or _setting("AWS_REGION", "") or _setting("AWS_DEFAULT_REGION", "us-east-1")
        endpoint = endpoint_url or os.environ.get("SQS_ENDPOINT_URL")
        self.endpoint_url = endpoint or None
        self.address = _addresses(endpoint or f"https://sqs.{self.region}.amazonaws.com", (), "", "SQS",
                                  ("http", "https"), {"http": 80, "https": 443})
        self.visibility_timeout = _number("visibility_timeout", visibility_timeout, int, 0, 43200)
        self.wait_time = _number("wait_time", wait_time, int, 0, 20)
        self.pool_size = _number("pool_size", pool_size, int, 1) if pool_size is not None else None
        self.sqs_queue = _sqs_name(self.queue_name)
        self._urls: dict[str, str] = {}
        self._sqs: Any = None

    async def _open(self) -> None:
        config = importlib.import_module("aiobotocore.config").AioConfig(
            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=min(10.0, self.connect_timeout or 10.0),
            read_timeout=self.wait_time + 30, max_pool_connections=self.pool_size or max(20, getattr(self, "prefetch", 0) // 10 + 10))
        session = importlib.import_module("aiobotocore.session").get_session()
        self._client_context = session.create_client("sqs", region_name=self.region, endpoint_url=self.endpoint_url,
                                                     config=config)
        self._sqs = await self._client_context.__aenter__()
        await self.connecting(lambda: self.queue_url(self.queue_name))

    async def disconnect(self) -> None:
        sqs, self._sqs = self._sqs, None
        if sqs is not None:
            await _closing(f"closing the SQS client of {self.where}", self._client_context.__aexit__(None, None, None))

    async def queue_url(self, queue: str) -> str:
        """The URL of the SQS queue of ``queue``, created when first needed.

        :raises ConfigError: another streamtools queue's name maps onto the same SQS queue.
        """
        url = self._urls.get(queue)
        if url is None:
            name, errors = _sqs_name(queue), self._sqs.exceptions
            try:  # an existing queue first: creating it again could overwrite its tags
                url = (await self._sqs.get_queue_url(QueueName=name))["QueueUrl"]
            except errors.QueueDoesNotExist:
                try:
                    url = (await self._sqs.create_queue(QueueName=name, tags={"streamtools-queue": queue}, Attributes={
                        "VisibilityTimeout": str(self.visibility_timeout),
                        "MessageRetentionPeriod": "1209600"}))["QueueUrl"]
                except errors.QueueNameExists:  # made meanwhile, with other attributes: used as it is
                    url = (await self._sqs.get_queue_url(QueueName=name))["QueueUrl"]
            try:  # the streamtools queue it was made for, where the credentials may read tags
                tags = (await self._sqs.list_queue_tags(QueueUrl=url)).get("Tags") or {}
            except errors.ClientError:
                tags = {}
            owner = tags.get("streamtools-queue", queue)
            if owner != queue:
                raise ConfigError(f"queue {queue!r} maps to the SQS queue {name!r}, which belongs to queue {owner!r}: "
                                  "SQS names take letters, digits, - and _ only; rename one of them")
            self._urls[queue] = url
        return url

    def entry(self, message: Message, delay: float | None = None) -> dict[str, Any]:
        """SendMessage's arguments for ``message`` (body, attributes, delay).

        :raises SendError: it is over SQS's 256 KiB.
        """
        attributes = _SQS_ENVELOPE.pairs(message)
        try:
            body = message.data.decode()
        except UnicodeDecodeError:  # SQS carries text: bytes that are not go as base64
            body, attributes[_SQS_BASE64] = base64.b64encode(message.data).decode(), "1"
        entry: dict[str, Any] = {"MessageBody": body, "MessageAttributes": {
            key: {"DataType": "String", "StringValue": value} for key, value in attributes.items()}}
        if delay:
            if delay > _SQS_MAX_DELAY:
                entry["MessageAttributes"][_SQS_DUE] = {"DataType": "Number",
                                                        "StringValue": str(int((time.time() + delay) * 1000))}
            entry["DelaySeconds"] = min(_SQS_MAX_DELAY, math.ceil(delay))
        size = len(body.encode()) + sum(len(k) + len(v) for k, v in attributes.items())
        if size > _SQS_MAX_SIZE:
            raise SendError(f"the message of {size} bytes to {message.queue!r} is over SQS's limit of "
                            f"{_SQS_MAX_SIZE} bytes (body and attributes)")
        return entry

    async def send_entries(self, queue: str, entries: list[dict[str, Any]], timeout: float | None = None) -> list[Any]:
        """SendMessageBatch, ten a call and the calls at once: each entry's
        message id, or its SendError."""
        url = await self.queue_url(queue)

        async def batch(part: list[dict[str, Any]]) -> list[Any]:
            answer = await self.sending(f"{len(part)} messages to {queue!r}", lambda: self._sqs.send_message_batch(
                QueueUrl=url, Entries=[{"Id": str(i), **entry} for i, entry in enumerate(part)]), timeout)
            results: list[Any] = [None] * len(part)
            for done in answer.get("Successful", ()):
                results[int(done["Id"])] = done["MessageId"]
            for failed in answer.get("Failed", ()):
                results[int(failed["Id"])] = SendError(f"SQS at {self.where} refused the message to {queue!r}: "
                                                       f"{failed.get('Code')}: {failed.get('Message')}")
            return results

        parts = await asyncio.gather(*(batch(entries[i:i + 10]) for i in range(0, len(entries), 10)),
                                     return_exceptions=True)
        return [r for part, n in zip(parts, range(0, len(entries), 10))
                for r in (part if isinstance(part, list) else [part] * len(entries[n:n + 10]))]

    async def send_one(self, queue: str, message: Message, delay: float | None = None,
                       timeout: float | None = None) -> None:
        entry, url = self.entry(message, delay), await self.queue_url(queue)
        await self.sending(f"the message to {queue!r}", lambda: self._sqs.send_message(QueueUrl=url, **entry), timeout)


def _sqs_message(raw: dict[str, Any], queue: str = "") -> Message:
    attributes = {key: value.get("StringValue", "") for key, value in raw.get("MessageAttributes", {}).items()}
    body = raw.get("Body", "")
    data = base64.b64decode(body) if attributes.pop(_SQS_BASE64, None) else body.encode()
    attributes.pop(_SQS_DUE, None)
    message = _SQS_ENVELOPE.into(Message(data=data, queue=queue, raw=raw), attributes.items(),
                                 lambda: f"SQS message {raw.get('MessageId')} of {queue!r}")
    message.id = message.id or raw.get("MessageId", "")
    return message


class SQSProducer(_SQSEndpoint, PumpedReplies):
    """Sends to the SQS queue of the queue (created if missing); ``send``
    returns once SendMessage returned its id, and the sends of one turn of
    the event loop go in SendMessageBatch calls of ten. ``send(delay=)`` is
    SQS's ``DelaySeconds`` (sent again past 15 minutes). Requests get replies
    on a temporary queue of the requester's own, deleted on ``close()``.
    Options: see :class:`_SQSEndpoint`."""

    pipelined = True
    delays = True

    async def connect(self) -> None:
        await self._open()

    async def publish(self, message: Message, timeout: float | None, delay: float | None = None,
                      **flags: Any) -> None:
        await self.send_one(self.queue_name, message, delay, timeout)

    async def publish_many(self, batch: list[Message], timeout: float | None, delay: float | None = None,
                           **flags: Any) -> list[Any]:
        entries: list[Any] = []
        for message in batch:
            try:
                entries.append(self.entry(message, delay))
            except SendError as exc:
                entries.append(exc)
        good = [entry for entry in entries if not isinstance(entry, BaseException)]
        sent = iter(await self.send_entries(self.queue_name, good, timeout) if good else [])
        return [entry if isinstance(entry, BaseException) else
                (result if isinstance(result := next(sent), BaseException) else None) for entry in entries]

    async def open_replies(self) -> str:
        return await self.queue_url(f"streamtools-reply-{_new_id()}")

    async def read_replies(self, address: str) -> list[Message]:
        answer = await self._sqs.receive_message(QueueUrl=address, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                                 MessageAttributeNames=["All"])
        received = answer.get("Messages", [])
        if received:
            await self._sqs.delete_message_batch(QueueUrl=address, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received)])
        return [_sqs_message(m) for m in received]

    async def close_replies(self, address: str) -> None:
        await self._sqs.delete_queue(QueueUrl=address)


class SQSConsumer(_SQSEndpoint, PullingConsumer):
    """Consumes the queue's SQS queue with long polls (several at once for a
    ``prefetch`` above 10); a message is deleted (in batches) after its
    handler returned. A failed attempt waits on SQS (its visibility timeout
    set to the backoff), freeing its slot; the attempt number is SQS's
    ``ApproximateReceiveCount``, so it survives a crash. A consumer killed with
    SIGKILL loses nothing: its messages come back after ``visibility_timeout``.
    A handler that runs longer keeps its message invisible. ``stop()`` makes
    received messages that did not start visible again at once.
    Options: see :class:`_SQSEndpoint`."""

    def configure(self, **options: Any) -> None:
        super().configure(**options)
        self._polls: dict[asyncio.Future[dict[str, Any]], int] = {}
        self.lease_interval = max(1.0, self.visibility_timeout / 3)

    async def connect(self) -> None:
        await self._open()

    def requested(self) -> int:
        return sum(self._polls.values())

    async def fetch(self, room: int) -> list[Any]:
        asked = out = self.requested()
        url = self._urls[self.queue_name]
        # A receive takes ten at most: more at once for a larger prefetch; while others
        # are out, only receives of ten (one of a few costs a call as much as one of ten).
        while room - asked >= 10 or (not out and room > asked):
            ask = min(10, room - asked)
            poll = asyncio.ensure_future(self._sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=ask, WaitTimeSeconds=self.wait_time, AttributeNames=["All"],
                VisibilityTimeout=self.visibility_timeout,  # this consumer's, whoever made the queue
                MessageAttributeNames=["All"]))
            self._polls[poll] = ask
            asked += ask
        done, _ = await asyncio.wait(self._polls, return_when=asyncio.FIRST_COMPLETED)
        received: list[dict[str, Any]] = []
        failures: list[BaseException] = []
        for poll in done:
            del self._polls[poll]
            failure = poll.exception()
            if failure is not None:
                failures.append(failure)
            else:
                received += poll.result().get("Messages", [])
        if failures and not received:
            raise failures[0]
        now = time.time() * 1000
        ready: list[dict[str, Any]] = []
        later: list[dict[str, Any]] = []
        for raw in received:  # a delay longer than SQS's 15 minutes: sent again for what is left
            due = raw.get("MessageAttributes", {}).get(_SQS_DUE)
            (later if due is not None and int(due["StringValue"]) > now + 1000 else ready).append(raw)
        if later:
            await self._delay_again(later)
        return ready

    async def _delay_again(self, raws: list[dict[str, Any]]) -> None:
        url = self._urls[self.queue_name]
        for raw in raws:
            left = (int(raw["MessageAttributes"][_SQS_DUE]["StringValue"]) - time.time() * 1000) / 1000
            attributes = {k: {"DataType": v["DataType"], "StringValue": v["StringValue"]}
                          for k, v in raw["MessageAttributes"].items()}
            await self.sending("a delayed message", lambda: self._sqs.send_message(
                QueueUrl=url, MessageBody=raw["Body"], MessageAttributes=attributes,
                DelaySeconds=min(_SQS_MAX_DELAY, math.ceil(left))))
            await self._sqs.delete_message(QueueUrl=url, ReceiptHandle=raw["ReceiptHandle"])

    def received(self, raw: dict[str, Any]) -> Message:
        message = _sqs_message(raw, self.queue_name)
        message.attempt = int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        message.redelivered = message.attempt > 1
        return message

    async def acknowledge_many(self, messages: list[Message]) -> None:
        """DeleteMessageBatch calls of ten, at once."""
        await self._in_batches("delete_message_batch", [message.raw for message in messages], "deleting",
                               "they will be delivered again")

    async def _in_batches(self, operation: str, raws: list[dict[str, Any]], doing: str, otherwise: str,
                          **entry: Any) -> None:
        """A batch ``operation`` on the messages ``raws`` (``entry`` in each
        entry), in calls of ten at once; what fails is logged."""
        url, call = self._urls.get(self.queue_name), getattr(self._sqs, operation)

        async def batch(part: list[dict[str, Any]]) -> list[Any]:
            entries = [{"Id": str(n), "ReceiptHandle": raw["ReceiptHandle"], **entry} for n, raw in enumerate(part)]
            try:
                return (await call(QueueUrl=url, Entries=entries)).get("Failed") or []
            except self.failures + self.lost as exc:
                return [{"Message": self.cause(exc)}] * len(part)

        failed = [f for fs in await asyncio.gather(*(batch(raws[i:i + 10]) for i in range(0, len(raws), 10)))
                  for f in fs]
        if failed:
            log.warning("%s %d messages of %r on %s failed (%s); %s", doing, len(failed), self.queue_name,
                        self.where, failed[0].get("Message") or failed[0], otherwise)

    async def _visible_in(self, raw: dict[str, Any], seconds: float) -> None:
        await self._sqs.change_message_visibility(QueueUrl=self._urls[self.queue_name],
                                                  ReceiptHandle=raw["ReceiptHandle"], VisibilityTimeout=int(seconds))

    async def extend_leases(self, messages: list[Message]) -> None:
        await self._in_batches("change_message_visibility_batch", [message.raw for message in messages],
                               "extending the visibility timeout of", "another consumer may receive them meanwhile",
                               VisibilityTimeout=self.visibility_timeout)

    async def hand_back(self, message: Message) -> None:
        await _closing("handing a message back", self._visible_in(message.raw, 0))

    async def hold(self, message: Message, delay: float) -> bool:
        await self._visible_in(message.raw, min(43200, math.ceil(delay)))
        return True

    async def unstarted(self, raws: list[Any]) -> None:
        for poll in self._polls:  # a receive under way may take messages: they come back at once too
            with contextlib.suppress(Exception):
                raws += (await poll).get("Messages", [])
        self._polls.clear()
        await self._in_batches("change_message_visibility_batch", raws, "handing back",
                               "they come back after their visibility timeout", VisibilityTimeout=0)

    async def send_to(self, queue: str, message: Message) -> None:
        await self.send_one(queue, message)

    async def send_reply(self, address: str, reply: Message) -> None:
        entry = self.entry(reply)
        await self.sending("the reply", lambda: self._sqs.send_message(QueueUrl=address, **entry))

    async def delete_queues(self) -> None:
        """Delete the queue's SQS queue and its dead-letter queue."""
        try:
            await self._open()
            for queue in (self.queue_name, self.dead_letter_queue):
                await self._sqs.delete_queue(QueueUrl=await self.queue_url(queue))
                self._urls.pop(queue, None)
        finally:
            await _SQSEndpoint.disconnect(self)


###############################################################################
# Transports: PostgreSQL ######################################################
###############################################################################

#: The envelope is a row's columns; the headers are one JSON object.
_PG_ROW = (("content_type", "text"), ("message_id", "text"), ("correlation_id", "text"), ("reply_to", "text"),
           ("headers", "jsonb"), ("body", "bytea"))
_PG_COLUMNS = "id, attempt, content_type, message_id, correlation_id, reply_to, headers::text AS headers, body"


def _pg_schema(schema: str, tables: Sequence[str]) -> str:
    """The DDL of the transport's tables in ``schema``: a message is a row,
    due at ``visible_at``; every insert notifies the queues it filled."""
    s = '"' + schema.replace('"', '""') + '"'
    ddl = [f"SELECT pg_advisory_xact_lock(7152018);  -- one creator at a time, in every process\n"
           f"CREATE SCHEMA IF NOT EXISTS {s};\n"
           f"CREATE OR REPLACE FUNCTION {s}.notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN\n"
           "  PERFORM pg_notify(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, queue) FROM (SELECT DISTINCT queue FROM new) q;\n"
           "  RETURN NULL; END $$;"]
    for table in tables:
        extra = "transport text NOT NULL, " if table == "outbox" else ""
        ddl.append(
            f"CREATE TABLE IF NOT EXISTS {s}.{table} (id bigserial PRIMARY KEY, {extra}queue text NOT NULL, "
            "visible_at timestamptz NOT NULL DEFAULT now(), attempt integer NOT NULL DEFAULT 0, content_type text, "
            "message_id text, correlation_id text, reply_to text, headers jsonb, body bytea NOT NULL DEFAULT '', "
            "created_at timestamptz NOT NULL DEFAULT now());\n"
            f"CREATE INDEX IF NOT EXISTS {table}_due ON {s}.{table} (queue, visible_at, id);\n"
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'notify' AND tgrelid = "
            f"'{s}.{table}'::regclass) THEN CREATE TRIGGER notify AFTER INSERT ON {s}.{table} REFERENCING NEW "
            f"TABLE AS new FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify(); END IF; END $$;")
    return "\n".join(ddl)


async def _pg_keep_session(_connection: Any) -> None:
    """The pool's reset: nothing to undo. The pool runs single statements of
    the transport only (no LISTEN, session lock or setting), so asyncpg's
    default reset query is a round trip per statement for nothing; asyncpg
    still rolls back a transaction left open before calling this."""


class _PostgresEndpoint(BrokerEndpoint):
    """The settings and the connections both PostgreSQL classes share, on asyncpg.

    :param dsn: ``postgresql://user:password@host:port/database``; else
        ``POSTGRES_URL``, else ``DATABASE_URL``, else ``postgresql://127.0.0.1:5432/postgres``.
    :param schema: the schema of the transport's tables (made on first use).
    :param lease: seconds a claimed message stays invisible to other
        consumers (extended while its handler runs): a consumer that died
        gives its messages back after it.
    :param pool_size: the most connections of the pool.
    :param query_timeout: seconds a statement of the transport may go
        unanswered before its connection counts as lost (a dead link would
        otherwise hold a consumer, or a send past its timeout, forever).
    Takes ``connect_timeout`` and ``send_timeout`` (see :class:`BrokerEndpoint`).
    """

    client = ("asyncpg", "asyncpg")
    address_option = "dsn"
    broker = "PostgreSQL"
    table = "messages"
    #: Columns written before the queue, of the values in ``extra``.
    extra_columns: tuple[str, ...] = ()
    lost_errors = ("builtins.OSError", "asyncpg.exceptions.PostgresConnectionError",
                   "asyncpg.exceptions.OperatorInterventionError", "asyncpg.exceptions.InterfaceError")
    refused_errors = ("asyncpg.exceptions.InvalidAuthorizationSpecificationError",
                      "asyncpg.exceptions.InvalidCatalogNameError")
    client_errors = ("asyncpg.exceptions.PostgresError", "asyncpg.exceptions.InterfaceError")
    refused_hint = "check the user, the password and the database of the DSN"

    def configure(self, *, dsn: str | None = None, schema: str = "streamtools", lease: float = 30.0,
                  pool_size: int = 10, query_timeout: float = 10.0, **options: Any) -> None:
        super().configure(**options)
        raw = dsn or _setting("POSTGRES_URL", "") or _setting("DATABASE_URL", "") or \
            "postgresql://127.0.0.1:5432/postgres"
        self.address = _addresses([raw], (), "", "PostgreSQL", ("postgresql", "postgres"), 5432)
        if not isinstance(schema, str) or not schema:
            raise ConfigError(f"schema is the name of a PostgreSQL schema, got {schema!r}")
        self.schema = schema
        self.lease = _number("lease", lease, float, 1.0)
        self.pool_size = _number("pool_size", pool_size, int, 1)
        self.query_timeout = _number("query_timeout", query_timeout, float, 0.1)
        self.at = '"' + schema.replace('"', '""') + f'".{self.table}'
        self.channel = f"{schema}.{self.table}"
        self._pool: Any = None
        self._listener: Any = None
        self._woken: dict[str, asyncio.Event] = {}
        self.extra: tuple[Any, ...] = ()  # the values of extra_columns
        self._inserts: dict[tuple[tuple[int, ...], bool], str] = {}

    async def _open(self) -> None:
        asyncpg = self.client_module()
        self._pool = await self.connecting(lambda: asyncpg.create_pool(
            self.address.urls[0], min_size=1, max_size=self.pool_size, timeout=min(10.0, self.connect_timeout or 10.0),
            command_timeout=self.query_timeout,  # asyncpg's: a cancellation alone waits for the server forever
            reset=_pg_keep_session))
        tables = _pg_schema(self.schema, ("messages", "outbox"))
        await self.ensure_once(self.schema, lambda: self.sending(
            f"the tables of schema {self.schema!r}", lambda: self._pool.execute(tables)))

    async def listen(self, queue: str) -> asyncio.Event:
        """An event set whenever rows are inserted into ``queue`` (LISTEN on a connection of its own)."""
        if self._listener is None or self._listener.is_closed():
            self._listener = None
            listener = await self.client_module().connect(self.address.urls[0], timeout=10,
                                                          command_timeout=self.query_timeout)
            await listener.add_listener(self.channel, self._notified)
            self._listener = listener
            for event in self._woken.values():  # what was inserted while nobody listened
                event.set()
        return self._woken.setdefault(queue, asyncio.Event())

    def _notified(self, _connection: Any, _pid: int, _channel: str, queue: str) -> None:
        event = self._woken.get(queue) or self._woken.get("*")  # "*": the relay, woken by every queue
        if event is not None:
            event.set()

    async def disconnect(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await _closing(f"closing the PostgreSQL listener of {self.where}", listener.close(timeout=5))
        pool, self._pool = self._pool, None
        if pool is not None:
            await _closing(f"closing the PostgreSQL pool of {self.where}", pool.close())

    def insert_sql(self, columns: tuple[int, ...] = (0, 1, 2, 3, 4, 5), many: bool = False) -> str:
        """An insert of the :meth:`row` values at ``columns`` (the other columns
        null): ``$1``.. the ``extra`` values, then the queue, the delay, and a
        row's values, or with ``many`` an array of each column's values."""
        sql = self._inserts.get((columns, many))
        if sql is None:
            extra = len(self.extra_columns)
            names = ", ".join((*self.extra_columns, "queue", "visible_at", *(_PG_ROW[i][0] for i in columns)))
            fixed = ", ".join((*(f"${n}" for n in range(1, extra + 1)),
                               f"${extra + 1}", f"now() + make_interval(secs => ${extra + 2})"))
            typed = [f"${n}::{_PG_ROW[i][1]}{'[]' if many else ''}" for n, i in enumerate(columns, extra + 3)]
            source = f"SELECT {fixed}, * FROM unnest({', '.join(typed)})" if many else \
                f"VALUES ({fixed}, {', '.join(typed)})"
            sql = self._inserts[columns, many] = f"INSERT INTO {self.at} ({names}) {source}"
        return sql

    @staticmethod
    def row(message: Message) -> tuple[Any, ...]:
        """The values of ``_PG_ROW`` for ``message``; None where it has none."""
        return (message.content_type, message.id, message.correlation_id or None, message.reply_to or None,
                _json_encode(message.headers) if message.headers else None, message.data)

    async def insert(self, queue: str, messages: list[Message], delay: float | None = None,
                     timeout: float | None = None, connection: Any = None) -> None:
        """Store ``messages`` in ``queue`` in one statement: in ``connection``'s
        transaction when given (seen by consumers once it commits), else on the pool, retried.
        A column null in every row is left out (each array costs asyncpg a check per value)."""
        rows = [self.row(message) for message in messages]
        if len(rows) == 1:
            columns = tuple(i for i, value in enumerate(rows[0]) if value is not None)
            values: list[Any] = [rows[0][i] for i in columns]
        else:
            arrays = list(zip(*rows))
            columns = tuple(i for i, array in enumerate(arrays) if array.count(None) < len(array))
            values = [list(arrays[i]) for i in columns]
        sql, args = self.insert_sql(columns, len(rows) > 1), (*self.extra, queue, delay or 0.0, *values)
        what = f"the message to {queue!r}" if len(rows) == 1 else f"{len(rows)} messages to {queue!r}"
        if connection is None:
            await self.sending(what, lambda: self._pool.execute(sql, *args), timeout)
            return
        try:
            await connection.execute(sql, *args)
        except self.failures + self.lost as exc:
            raise SendError(f"PostgreSQL at {self.where} refused {what}: {self.cause(exc)}") from None

    async def take(self, queue: str, limit: int, lease: float | None = None) -> list[Any]:
        """Claim up to ``limit`` due rows of ``queue`` (the next attempt of each), or
        with no ``lease`` delete them: FOR UPDATE SKIP LOCKED, so consumers share the queue."""
        due = (f"SELECT id FROM {self.at} WHERE queue = $1 AND visible_at <= now() ORDER BY visible_at, id "
               "LIMIT $2 FOR UPDATE SKIP LOCKED")
        args: tuple[Any, ...] = (queue, limit)
        if lease is None:
            sql = f"DELETE FROM {self.at} WHERE id IN ({due}) RETURNING {_PG_COLUMNS}"
        else:
            sql = (f"UPDATE {self.at} m SET visible_at = now() + make_interval(secs => $3), attempt = m.attempt + 1 "
                   f"FROM ({due}) c WHERE m.id = c.id RETURNING {_PG_COLUMNS.replace('id,', 'm.id,', 1)}")
            args = (queue, limit, lease)
        rows = await self._pool.fetch(sql, *args)
        return sorted(rows, key=lambda row: row["id"])

    async def next_due(self, queue: str) -> float | None:
        """Seconds until the next row of ``queue`` is due (a delay, a retry, a lease ending)."""
        due = await self._pool.fetchval(f"SELECT extract(epoch FROM min(visible_at) - now()) FROM {self.at} "
                                        "WHERE queue = $1", queue)
        return None if due is None else float(due)

    async def wait_for(self, queue: str, longest: float) -> None:
        """Until rows may be due in ``queue``: a notification, the next due
        time, or ``longest`` seconds (the safety poll)."""
        woken = await self.listen(queue)
        due = await self.next_due(queue)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), max(0.01, min(longest, due if due is not None else longest)))
        woken.clear()


def _pg_message(row: Any, queue: str) -> Message:
    """The message of a row whose first columns are ``_PG_COLUMNS`` (read by position: the cheapest)."""
    key, attempt, content_type, message_id, correlation_id, reply_to, headers, body = row[:8]
    message = Message(data=body, content_type=content_type or BINARY, id=message_id or str(key), queue=queue,
                      correlation_id=correlation_id, reply_to=reply_to, attempt=max(1, attempt),
                      redelivered=attempt > 1, raw=key)
    if headers is not None:
        message.headers = _json_decode(headers)
        if type(message.headers) is not dict:  # another client's row
            message.headers = {"x-original-headers": headers}
            raise _Unreadable(message, f"row {key} of {queue!r} has an unreadable envelope: its headers "
                              "field is not a JSON object")
    return message


class PostgresProducer(_PostgresEndpoint, PumpedReplies):
    """Inserts the message as a row of the queue; ``send`` returns once the
    insert committed, and the sends of one turn of the event loop go in one
    insert. ``send(msg, connection=conn)`` writes it in the caller's asyncpg
    connection and transaction instead: a rollback means it is never
    delivered. ``send(delay=)`` sets the row's visible time. Options: see
    :class:`_PostgresEndpoint`."""

    send_flags = frozenset({"connection"})
    pipelined = True
    delays = True

    async def connect(self) -> None:
        await self._open()

    async def publish(self, message: Message, timeout: float | None, delay: float | None = None,
                      connection: Any = None, **flags: Any) -> None:
        await self.insert(self.queue_name, [message], delay, timeout, connection)

    async def publish_many(self, batch: list[Message], timeout: float | None, delay: float | None = None,
                           connection: Any = None, **flags: Any) -> list[Any]:
        try:
            await self.insert(self.queue_name, batch, delay, timeout, connection)
        except SendError as exc:
            return [exc] * len(batch)
        return [None] * len(batch)

    async def open_replies(self) -> str:
        address = f"streamtools.reply.{_new_id()}"
        await self.listen(address)
        return address

    async def read_replies(self, address: str) -> list[Message]:
        rows = await self.take(address, 100)
        if not rows:
            await self.wait_for(address, 5.0)
        return [_pg_message(row, address) for row in rows]

    async def close_replies(self, address: str) -> None:
        self._woken.pop(address, None)
        await self._pool.execute(f"DELETE FROM {self.at} WHERE queue = $1", address)


class PostgresConsumer(_PostgresEndpoint, PullingConsumer):
    """Claims due rows of the queue (``FOR UPDATE SKIP LOCKED``) under a
    ``lease``, woken by LISTEN/NOTIFY when rows arrive (and by a poll every
    ``poll`` seconds, for safety); a row is deleted after its handler
    returned. A failed attempt waits in the database (the row's visible time
    set to the backoff), freeing its slot; the attempt number is the row's,
    so it survives a crash. A consumer killed with SIGKILL loses nothing:
    its rows come back when their lease ends; a handler that runs longer
    keeps its lease. ``stop()`` gives received rows that did not start back
    at once. Options: see :class:`_PostgresEndpoint`, and ``poll``."""

    def configure(self, *, poll: float = 5.0, **options: Any) -> None:
        super().configure(**options)
        self.poll = _number("poll", poll, float, 0.05)
        self.lease_interval = max(0.5, self.lease / 3)

    async def connect(self) -> None:
        await self._open()

    async def fetch(self, room: int) -> list[Any]:
        rows = await self.take(self.queue_name, room, self.lease)
        if not rows:
            await self.wait_for(self.queue_name, self.poll)
        return rows

    def received(self, row: Any) -> Message:
        return _pg_message(row, self.queue_name)

    async def acknowledge_many(self, messages: list[Message]) -> None:
        """Delete the rows, in one statement."""
        ids = [message.raw for message in messages]
        try:
            await self.sending(f"the acknowledgement of {len(ids)} messages",
                               lambda: self._pool.execute(f"DELETE FROM {self.at} WHERE id = ANY($1::bigint[])", ids),
                               self.lease / 2)
        except SendError as exc:  # still there: delivered again when the lease ends
            log.warning("%s; they will be delivered again", exc)

    async def extend_leases(self, messages: list[Message]) -> None:
        await self._pool.execute(f"UPDATE {self.at} SET visible_at = now() + make_interval(secs => $2) "
                                 "WHERE id = ANY($1::bigint[])", [message.raw for message in messages], self.lease)

    async def _visible(self, ids: list[int], delay: float, attempt: int = 0) -> None:
        await self._pool.execute(f"UPDATE {self.at} SET visible_at = now() + make_interval(secs => $2), "
                                 "attempt = greatest(0, attempt + $3) WHERE id = ANY($1::bigint[])", ids, delay, attempt)

    async def hand_back(self, message: Message) -> None:
        await _closing("handing a message back", self._visible([message.raw], 0.0))

    async def hold(self, message: Message, delay: float) -> bool:
        await self._visible([message.raw], delay)
        return True

    async def unstarted(self, raws: list[Any]) -> None:
        if raws:  # never started: this attempt does not count
            await _closing("handing messages back", self._visible([row["id"] for row in raws], 0.0, -1))

    async def send_to(self, queue: str, message: Message) -> None:
        await self.insert(queue, [message])

    async def delete_queues(self) -> None:
        """Delete the rows of the queue and of its dead-letter queue."""
        try:
            await self._open()
            await self._pool.execute(f"DELETE FROM {self.at} WHERE queue = ANY($1::text[])",
                                     [self.queue_name, self.dead_letter_queue])
        finally:
            await _PostgresEndpoint.disconnect(self)


class OutboxProducer(PostgresProducer):
    """Writes messages for a queue of another transport into the outbox table,
    in the caller's transaction with ``send(msg, connection=conn)``; an
    :class:`OutboxRelay` forwards them. Made by :meth:`Outbox.producer`."""

    table = "outbox"
    extra_columns = ("transport",)

    def configure(self, *, target: str = MEMORY, **options: Any) -> None:
        super().configure(**options)
        self.target = PRODUCERS.canonical(target)
        self.extra = (self.target,)

    async def listen_for_replies(self) -> str:
        raise ConfigError("an outbox producer sends and forgets: request() needs the target transport's producer")


class OutboxRelay(PostgresConsumer):
    """Forwards the outbox's messages to their transports, each deleted once
    its broker confirmed it: at least once, in order per queue (each queue
    is relayed by one relay at a time: several may run), and a relay killed
    mid-batch loses nothing (its rows come back after their lease). A send
    that fails is retried on the database's time; one that fails
    ``max_retries`` times goes to the PostgreSQL queue ``streamtools.outbox.dead``.
    Run it like a consumer (``ConsumerRunner([relay])``) or with ``streamtools relay``.

    :param targets: options for each transport's producers, by transport name
        (``{"rabbitmq": {"url": ...}}``); by default each reads its environment.
    Options: see :class:`PostgresConsumer`.
    """

    table = "outbox"

    def __init__(self, queue_name: str = "streamtools.outbox", queues_labels: Mapping[str, Any] | None = None, *,
                 prefetch: int = 64, max_retries: int = 100, **options: Any) -> None:
        super().__init__(queue_name, queues_labels, prefetch=prefetch, max_retries=max_retries, **options)
        self(self._forward)

    def configure(self, *, targets: Mapping[str, Mapping[str, Any]] | None = None, **options: Any) -> None:
        super().configure(**options)
        self.targets = {PRODUCERS.canonical(name): dict(given) for name, given in (targets or {}).items()}
        self._producers: dict[tuple[str, str], Producer] = {}
        self._owned: set[tuple[str, str]] = set()
        self._owner: Any = None
        self._targets: dict[int, tuple[str, Message]] = {}

    async def acknowledge(self, message: Message) -> None:
        self._targets.pop(message.raw, None)
        await super().acknowledge(message)

    async def hand_back(self, message: Message) -> None:
        self._targets.pop(message.raw, None)
        await super().hand_back(message)

    async def hold(self, message: Message, delay: float) -> bool:
        held = await super().hold(message, delay)
        if held:
            self._targets.pop(message.raw, None)
        return held

    async def _own_queues(self) -> list[tuple[str, str]]:
        """The queues with due rows this relay relays: each one a session
        advisory lock on its listening connection, so one relay at a time has it."""
        await self.listen("*")
        if self._owner is not self._listener:  # a new session: its locks are to be taken again
            self._owned, self._owner = set(), self._listener
        due = await self._pool.fetch(f"SELECT DISTINCT transport, queue FROM {self.at} WHERE visible_at <= now()")
        for transport, queue in ((row["transport"], row["queue"]) for row in due):
            if (transport, queue) not in self._owned and await self._listener.fetchval(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", f"{self.at} {transport} {queue}"):
                self._owned.add((transport, queue))
        return sorted(self._owned)

    async def fetch(self, room: int) -> list[Any]:
        owned = await self._own_queues()
        rows = await self._pool.fetch(
            f"UPDATE {self.at} m SET visible_at = now() + make_interval(secs => $3), attempt = m.attempt + 1 "
            f"FROM (SELECT id FROM {self.at} WHERE (transport, queue) IN (SELECT * FROM unnest($1::text[], "
            "$2::text[])) AND visible_at <= now() ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED) c WHERE m.id = c.id "
            f"RETURNING {_PG_COLUMNS.replace('id,', 'm.id,', 1)}, m.transport, m.queue",
            [t for t, _ in owned], [q for _, q in owned], self.lease, room) if owned else []
        if not rows:
            await self.wait_for("*", self.poll)
        return sorted(rows, key=lambda row: row["id"])

    async def next_due(self, queue: str) -> float | None:
        """Of the queues this relay relays (another relay's are its own; a new one notifies)."""
        owned = sorted(self._owned)
        due = await self._pool.fetchval(
            f"SELECT extract(epoch FROM min(visible_at) - now()) FROM {self.at} WHERE (transport, queue) IN "
            "(SELECT * FROM unnest($1::text[], $2::text[]))", [t for t, _ in owned], [q for _, q in owned])
        return None if due is None else float(due)

    def received(self, row: Any) -> Message:
        target = _pg_message(row, row["queue"])
        self._targets[row["id"]] = (row["transport"], target)
        return Message(data=b"", id=target.id, queue=self.queue_name, attempt=target.attempt,
                       redelivered=target.redelivered, raw=row["id"])

    async def _forward(self, _: Any) -> None:
        transport, target = self._targets[_current.get().raw]
        key = (transport, target.queue)
        producer = self._producers.get(key)
        if producer is None:
            producer = self._producers[key] = PRODUCERS[transport](target.queue, **self.targets.get(transport, {}))
        if not producer._ready:
            await producer._ensure_open()
        await (producer._in_turn if producer.pipelined else producer.publish)(target, None)

    async def dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        transport, target = self._targets.pop(message.raw)
        target.headers = {**target.headers, **headers, "x-outbox-transport": transport, "x-outbox-queue": target.queue}
        await self.send_to(self.dead_letter_queue, target)

    async def send_to(self, queue: str, message: Message) -> None:
        """Into the PostgreSQL queue ``queue`` (the messages table), where a PostgresConsumer reads it."""
        sql = self.insert_sql().replace(self.at, self.at.rsplit(".", 1)[0] + ".messages")
        await self.sending(f"the message to {queue!r}", lambda: self._pool.execute(
            sql, queue, 0.0, *self.row(message)))

    async def disconnect(self) -> None:
        producers, self._producers = list(self._producers.values()), {}
        await asyncio.gather(*(producer.close() for producer in producers), return_exceptions=True)
        await super().disconnect()


class Outbox:
    """The transactional outbox: messages written in the service's own
    PostgreSQL transaction, delivered to any transport by an :class:`OutboxRelay`.

    >>> outbox = Outbox()                                # POSTGRES_URL / DATABASE_URL
    >>> orders = outbox.producer("rabbitmq", "orders")
    >>> async with conn.transaction():                   # the service's asyncpg connection
    ...     await conn.execute("INSERT INTO orders ...")
    ...     await orders.send({"id": 7}, connection=conn)  # sent if and only if this commits
    >>> ConsumerRunner([outbox.relay()]).run()           # or: streamtools relay

    :param dsn: as :class:`PostgresProducer`'s; ``options`` (``schema``...) go to both sides.
    """

    def __init__(self, dsn: str | None = None, **options: Any) -> None:
        self.options = {"dsn": dsn, **options}

    def producer(self, transport: str, queue: str, **options: Any) -> OutboxProducer:
        """A producer whose messages go to ``queue`` on ``transport`` through the outbox."""
        return OutboxProducer(queue, target=transport, **self.options, **options)

    def relay(self, **options: Any) -> OutboxRelay:
        """A relay of this outbox (``targets=``, ``prefetch=``...)."""
        return OutboxRelay(**self.options, **options)


###############################################################################
# Registries ##################################################################
###############################################################################


class _Registry(MutableMapping[str, type[_T]]):
    """Transport classes by name: case-insensitive, with aliases.
    :func:`register_transport` adds both sides of a transport; the legacy
    ``PRODUCERS["X"] = cls`` (and ``del``) sets one side, checked the same way."""

    def __init__(self, kind: type) -> None:
        self._classes: dict[str, type[_T]] = {}
        self.aliases: dict[str, str] = {}
        self._kind = kind

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

    def __setitem__(self, name: str, cls: type[_T]) -> None:
        """Legacy: register ``cls`` under ``name`` (it may be another name of a registered class)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a transport name must be a non-empty string, got {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, self._kind)):
            raise ConfigError(f"{name!r} must be a subclass of streamtools.{self._kind.__name__}, got {cls!r}")
        if "transport" not in cls.__dict__:  # a new class; another name of a registered one keeps its own
            cls.transport = name  # type: ignore[attr-defined]
        self._add(name, cls, ())
        _known_flags.update(getattr(cls, "send_flags", ()), getattr(cls, "handler_flags", ()))

    def __delitem__(self, name: str) -> None:
        canonical = self.canonical(name)
        del self._classes[canonical]
        for alias in [alias for alias, target in self.aliases.items() if target == canonical]:
            del self.aliases[alias]

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
PRODUCERS: _Registry[Producer] = _Registry(Producer)
#: Consumer classes by transport name; ``CONSUMERS`` is the same object.
CONSUMER_LOOPS: _Registry[Consumer] = _Registry(Consumer)
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
register_transport(SQS, SQSProducer, SQSConsumer, aliases=("sqs",))
register_transport(POSTGRES, PostgresProducer, PostgresConsumer, aliases=("postgres", "postgresql", "pg"))

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
            self._watch()  # before the others connect: /readyz says 503 until every one consumes
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
        self._started = True

    def _watch(self) -> None:
        server = self._server or next((c._server for c in self.consumers if c.listens), None)  # type: ignore
        if server is not None:
            server.watched.extend(c for c in self.consumers if c not in server.watched)

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
        """Serve until SIGINT or SIGTERM, then stop gracefully. A signal while
        the consumers are still connecting (a broker is down) stops at once."""
        stop = asyncio.Event()
        async with _signals_set(stop):
            starting, stopping = asyncio.ensure_future(self.start()), asyncio.ensure_future(stop.wait())
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stopping before every consumer connected")
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return
            stopping.cancel()
            starting.result()  # a failed start raises here
            try:
                where = f" on {self.host}:{self.port}" if any(c.listens for c in self.consumers) else ""
                log.info("serving %d consumer(s)%s; SIGINT or SIGTERM stops", len(self.consumers), where)
                await stop.wait()
                log.info("stopping")
            finally:
                await self.stop()

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
        producer = producer_cls(queue, **consumer.producer_options(), **options)
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
                consumer.queue_name, **{**options, **consumer.producer_options()})
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
        sub.add_argument("--url", help="the broker's address, else the transport's environment: the RabbitMQ URL "
                                       "(RMQ_URL), Kafka bootstrap servers (KAFKA_BOOTSTRAP_SERVERS), NATS servers "
                                       "(NATS_URL), Redis URL (REDIS_URL), SQS endpoint (SQS_ENDPOINT_URL), "
                                       "PostgreSQL DSN (POSTGRES_URL / DATABASE_URL), HTTP host (HTTP_HOST)")
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

    relay = command("relay", help="forward the PostgreSQL outbox's messages to their brokers until SIGINT/SIGTERM")
    relay.add_argument("--dsn", help="the outbox's database (default POSTGRES_URL / DATABASE_URL)")
    relay.add_argument("--schema", default="streamtools", help="the outbox's schema (default streamtools)")
    relay.add_argument("--prefetch", type=int, default=64, help="messages forwarded at once (default 64)")
    relay.add_argument("--port", type=_cli_port, help="serve /healthz, /readyz and /metrics on this port")
    relay.set_defaults(run=None)

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
        if args.command == "relay":
            ConsumerRunner([OutboxRelay(dsn=args.dsn, schema=args.schema, prefetch=args.prefetch)],
                           port=args.port).run()
            return 0
        return int(asyncio.run(args.run(args)))
    except StreamtoolsError as exc:
        print(f"streamtools: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
