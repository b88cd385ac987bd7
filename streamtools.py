"""streamtools: one async Producer/Consumer API over RabbitMQ, HTTP and an
in-process broker, picked by name so a service can switch transport from an
environment variable.

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

    asyncio.run(main())

Only the standard library is imported here; aio-pika (RabbitMQ) and aiohttp
(HTTP) are imported by the transport that needs them.

License: MIT (see LICENSE). Copyright (c) 2026 the streamtools developers.
"""

from __future__ import annotations

__version__ = "1.0.0"
__all__ = [
    "ASYNCIO",
    "BINARY",
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
    "HTTPError",
    "HTTPProducer",
    "HandleMsgs",
    "HandlerFactory",
    "JSON",
    "MEMORY",
    "MemoryConsumer",
    "MemoryProducer",
    "Message",
    "MissingDependency",
    "PRODUCERS",
    "Producer",
    "RABBITMQ",
    "RabbitMQConsumer",
    "RabbitMQProducer",
    "RemoteError",
    "RequestTimeout",
    "SSI",
    "SendError",
    "StreamtoolsError",
    "TEXT",
    "UnknownTransport",
    "Unroutable",
    "bench",
    "current_message",
    "decode",
    "encode",
    "main",
    "register_transport",
]

import argparse
import asyncio
import base64
import contextvars
import hmac
import importlib
import inspect
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
import urllib.parse
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    ClassVar,
    Iterable,
    Mapping,
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


def _number(name: str, value: Any, kind: type = float, minimum: float = 0) -> Any:
    """Check a numeric option and say what to fix when it is wrong."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
    return number


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


class UnknownTransport(ConfigError, KeyError):
    """A transport name that no registry knows; the message lists valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingDependency(StreamtoolsError, ImportError):
    """A transport's client library is not installed; names the pip extra."""


class EncodeError(StreamtoolsError, TypeError):
    """A message body that cannot be encoded with the chosen content type."""


class DecodeError(StreamtoolsError, ValueError):
    """Bytes that do not decode as their content type says."""


class ConnectionFailed(StreamtoolsError, ConnectionError):
    """The transport could not connect (host and port named, never a password)."""


class SendError(StreamtoolsError):
    """The transport did not take responsibility for a message."""


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

_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
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
    JSON-like ``content_type`` JSON-encodes the body (``bytes`` are taken as
    already encoded).

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


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


_json_decode = json.JSONDecoder().decode


def _decode_json(data: bytes) -> Any:
    return _json_decode(data.decode())  # JSON on the wire is UTF-8 (RFC 8259)


def _decoder(content_type: str) -> Callable[[bytes], Any]:
    decoder = _decoders.get(content_type)
    if decoder is None:
        main = content_type.split(";", 1)[0].strip().lower()
        if _is_json_type(main):
            decoder = _decode_json
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
        return _decoder(content_type or "")(data)
    except (ValueError, LookupError) as exc:  # JSONDecodeError, UnicodeDecodeError, bad charset
        raise DecodeError(f"body is not valid {content_type}: {exc}") from None


class Message:
    """The envelope of a message a handler is working on.

    Read it with :func:`current_message` inside a handler. ``body`` is the
    decoded body, ``data`` the bytes on the wire, ``attempt`` counts deliveries
    (1 the first time), ``redelivered`` tells whether the transport gave it
    before. ``correlation_id`` and ``reply_to`` are set on requests.
    """

    __slots__ = ("body", "data", "content_type", "headers", "id", "correlation_id",
                 "reply_to", "attempt", "queue", "redelivered", "raw")

    def __init__(self, body: Any, data: bytes, content_type: str, headers: dict[str, Any],
                 id: str, queue: str, correlation_id: str | None = None,
                 reply_to: str | None = None, attempt: int = 1, redelivered: bool = False,
                 raw: Any = None) -> None:
        self.body = body
        self.data = data
        self.content_type = content_type
        self.headers = headers
        self.id = id
        self.queue = queue
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.attempt = attempt
        self.redelivered = redelivered
        #: The transport's own message object (aio-pika ``IncomingMessage``,
        #: aiohttp ``Request``), for what the envelope does not carry.
        self.raw = raw

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
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(6).hex()
    _id_counter = itertools.count(1)


_id_prefix = ""
_id_counter = itertools.count(1)
_reset_ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_ids)


def _new_id() -> str:
    return f"{_id_prefix}-{next(_id_counter):x}"


def _reply_value(data: bytes, content_type: str, headers: Mapping[str, Any], queue: str) -> Any:
    """What ``request()`` returns for a reply, or the consumer's error."""
    error = headers.get("x-error")
    if error is not None:
        raise RemoteError(f"the consumer of {queue!r} failed: {error}")
    return decode(data, content_type)


###############################################################################
# Shared machinery: lazy imports, retries, flags ##############################
###############################################################################

#: Which pip extra brings each optional client library.
_EXTRAS = {"aio_pika": "rabbitmq", "aiohttp": "http", "aiohttp.web": "http"}


def _require(module: str) -> Any:
    """Import an optional client library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS[module]
        raise MissingDependency(
            f"the {extra} transport needs {module.split('.')[0]}: pip install \"streamtools[{extra}]\""
        ) from exc


def _backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter, so retrying clients do not march in step."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


async def _retry(operation: Callable[[], Awaitable[Any]], *, what: str,
                 retry_on: tuple[type[BaseException], ...],
                 fatal: tuple[type[BaseException], ...] = (),
                 attempts: int | None = None, deadline: float | None = None,
                 base: float = 0.1, cap: float = 5.0) -> Any:
    """Run ``operation`` until it succeeds, retrying ``retry_on`` errors with
    backoff, at most ``attempts`` times or until the monotonic ``deadline``;
    then the last error propagates. ``fatal`` errors are never retried."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except fatal:
            raise
        except retry_on as exc:
            delay = _backoff(attempt, base, cap)
            if attempts is not None and attempt >= attempts:
                raise
            if deadline is not None:  # the last try comes at the deadline, not before it
                delay = min(delay, deadline - time.monotonic())
                if delay <= 0:
                    raise
            log.warning("%s failed (%s: %s); retry %d in %.2fs", what, type(exc).__name__, exc, attempt, delay)
            await asyncio.sleep(delay)


#: Every per-message flag some transport takes. A transport ignores the flags
#: of the others, so transport-agnostic code can pass them; any other name is
#: an error.
_KNOWN_FLAGS = frozenset({"method", "endpoint"})


def _check_flags(flags: dict[str, Any], own: frozenset[str], what: str) -> dict[str, Any]:
    unknown = set(flags) - _KNOWN_FLAGS - own
    if unknown:
        raise ConfigError(f"{what} got unknown flag(s) {sorted(unknown)}; it takes {sorted(own) or 'none'}")
    return {k: v for k, v in flags.items() if k in own}


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


###############################################################################
# Base classes ################################################################
###############################################################################


class _Endpoint:
    """What producers and consumers share: a queue name and a connection
    made once, however many callers ask for it at the same time."""

    #: The registry name of the transport.
    transport: ClassVar[str] = ""

    def __init__(self, queue_name: str) -> None:
        self.queue_name = _check_queue_name(queue_name)
        self._ready = False
        self._init_lock: asyncio.Lock | None = None  # made in a_init: no event loop is needed before

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.queue_name!r}>"

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

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        pass


class Producer(_Endpoint):
    """Sends messages to one queue. Subclasses add a transport's wire.

    :param queue_name: the queue (RabbitMQ), route (HTTP) or in-process queue.
    """

    #: Per-message flags ``send`` takes on this transport.
    send_flags: ClassVar[frozenset[str]] = frozenset()

    def _message(self, msg: Any, headers_tag: str | None, header_tag: str | None,
                 content_type: str | None, headers: Mapping[str, Any] | None,
                 message_id: str | None) -> Message:
        data, ctype = encode(msg, _content_type(headers_tag or header_tag, content_type))
        return Message(msg, data, ctype, dict(headers) if headers else {},
                       message_id or _new_id(), self.queue_name)

    async def send(self, msg: Any, *, headers_tag: str | None = None, header_tag: str | None = None,
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
        :return: the reply on synchronous transports (HTTP), else ``None``.
        :raises SendError: the message was not accepted; nothing is dropped silently.
        """
        if flags:
            flags = _check_flags(flags, self.send_flags, f"{type(self).__name__}.send()")
        message = self._message(msg, headers_tag, header_tag, content_type, headers, message_id)
        if not self._ready:
            await self.a_init()
        return await self._publish(message, timeout, **flags)

    async def request(self, msg: Any, timeout: float = 5.0, *, headers_tag: str | None = None,
                      header_tag: str | None = None, content_type: str | None = None,
                      headers: Mapping[str, Any] | None = None, **flags: Any) -> Any:
        """Send ``msg`` and return the handler's return value.

        :raises RequestTimeout: no reply within ``timeout`` seconds.
        :raises RemoteError: the handler failed on every attempt.
        """
        if flags:
            flags = _check_flags(flags, self.send_flags, f"{type(self).__name__}.request()")
        message = self._message(msg, headers_tag, header_tag, content_type, headers, None)
        message.correlation_id = message.id
        if not self._ready:
            await self.a_init()
        return await self._request(message, _number("timeout", timeout), **flags)

    async def close(self) -> None:
        """Release connections. Idempotent."""
        if self._ready:
            self._ready = False
            await self._disconnect()

    async def __aenter__(self) -> Producer:
        await self.a_init()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # The wire, per transport.
    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> Any:
        raise NotImplementedError

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        raise NotImplementedError


class Consumer(_Endpoint):
    """Receives the messages of one queue and hands each to a handler.

    The delivery contract lives here, once, for every transport: a message is
    acknowledged only after its handler returned; a handler that raises gets
    it again after a backoff, up to ``max_retries`` times, and then it goes to
    the dead-letter queue ``<queue>.dead`` with the error in its headers; at
    most ``prefetch`` handlers run at once; ``stop()`` drains.

    :param queue_name: the queue to consume.
    :param prefetch: how many messages are handled at once.
    :param max_retries: retries after the first failed attempt.
    :param retry_backoff: first retry delay in seconds; doubles each retry.
    :param retry_backoff_max: the longest retry delay.
    :param drain_timeout: how long ``stop()`` waits for running handlers.
    """

    #: Flags the decorator takes on this transport.
    handler_flags: ClassVar[frozenset[str]] = frozenset()
    #: True where the consumer serves HTTP routes on a host and port.
    listens: ClassVar[bool] = False

    def __init__(self, queue_name: str, *, prefetch: int = _DEFAULT_PREFETCH,
                 max_retries: int = _DEFAULT_MAX_RETRIES, retry_backoff: float = 0.2,
                 retry_backoff_max: float = 30.0, drain_timeout: float = 30.0) -> None:
        super().__init__(queue_name)
        self.prefetch = _number("prefetch", prefetch, int, 1)
        self.max_retries = _number("max_retries", max_retries, int, 0)
        self.retry_backoff = _number("retry_backoff", retry_backoff)
        self.retry_backoff_max = _number("retry_backoff_max", retry_backoff_max)
        self.drain_timeout = _number("drain_timeout", drain_timeout)
        self.dead_letter_queue = f"{queue_name}.dead"
        self._handlers: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._active: set[asyncio.Task[Any]] = set()
        self._running = False
        self._stopping = False

    @overload
    def __call__(self, handler: _F, **flags: Any) -> _F: ...

    @overload
    def __call__(self, handler: None = None, **flags: Any) -> Callable[[_F], _F]: ...

    def __call__(self, handler: _F | None = None, **flags: Any) -> _F | Callable[[_F], _F]:
        """Register a handler: ``@consumer()`` (or ``@consumer``) above an
        ``async def handler(msg)``; a bound method works too. The handler's
        return value is the reply to a request."""
        flags = _check_flags(flags, self.handler_flags, f"{type(self).__name__} decorator")
        key = self._handler_key(flags)

        def register(fn: _F) -> _F:
            if not callable(fn):
                raise ConfigError(f"a handler must be callable, got {fn!r}")
            known = self._handlers.get(key)
            if known is not None and known[0] != fn:
                where = f" for {key}" if key else ""
                raise ConfigError(f"queue {self.queue_name!r} already has a handler{where}: {known[0]!r}")
            self._handlers[key] = (fn, inspect.iscoroutinefunction(fn))
            return fn

        return register(handler) if handler is not None else register

    def _handler_key(self, flags: dict[str, Any]) -> str:
        return ""

    @property
    def handlers(self) -> list[Callable[..., Any]]:
        """The registered handler functions."""
        return [fn for fn, _ in self._handlers.values()]

    async def start(self) -> None:
        """Start handing messages to the handler; returns once consuming."""
        if self._running:
            return
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

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def _deliver(self, message: Message) -> None:
        """Decode, run the handler with retries, then reply and acknowledge,
        or dead-letter. Transports call this once per message received."""
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        settled = False
        try:
            try:
                message.body = decode(message.data, message.content_type)
            except DecodeError as exc:  # no retry can fix a poison message
                settled = True
                # Dead-letter it as opaque bytes, so the dead-letter queue stays readable.
                message.headers = {**message.headers, "x-original-content-type": message.content_type}
                message.content_type = BINARY
                await self._give_up(message, exc)
                return
            fn, is_coroutine = self._handlers[""]
            while True:
                token = _current.set(message)
                try:
                    result = await fn(message.body) if is_coroutine else await _maybe_await(fn(message.body))
                    if message.reply_to is not None:
                        data, ctype = encode(result)
                        await self._reply(message, data, ctype, {})
                except Exception as exc:
                    if message.attempt > self.max_retries:
                        settled = True
                        await self._give_up(message, exc)
                        return
                    delay = _backoff(message.attempt, self.retry_backoff, self.retry_backoff_max)
                    log.warning("handler of %r failed on message %s (attempt %d of %d), retrying in %.2fs: %r",
                                self.queue_name, message.id, message.attempt, self.max_retries + 1, delay, exc)
                    await asyncio.sleep(delay)
                    message.attempt += 1
                    continue
                finally:
                    _current.reset(token)
                settled = True
                await self._ack(message)
                return
        except asyncio.CancelledError:
            if not settled:  # the drain timed out: hand the message back
                await self._requeue(message)
            raise
        finally:
            self._active.discard(task)

    async def _give_up(self, message: Message, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:1000]
        log.error("giving up on message %s of %r after %d attempt(s), dead-lettering to %r: %s",
                  message.id, self.queue_name, message.attempt, self.dead_letter_queue, error)
        headers = dict(message.headers)
        headers.update({"x-error": error, "x-error-type": type(exc).__qualname__,
                        "x-attempts": message.attempt, "x-original-queue": self.queue_name,
                        "x-failed-at": time.time()})
        try:
            await self._dead_letter(message, headers)
        except Exception:
            log.exception("could not dead-letter message %s of %r; it goes back to the queue",
                          message.id, self.queue_name)
            await self._requeue(message)
            return
        if message.reply_to is not None:
            try:
                await self._reply(message, b"", TEXT, {"x-error": error})
            except Exception:
                log.exception("could not send the error reply for message %s", message.id)
        await self._ack(message)

    # The wire, per transport.
    async def _start_intake(self) -> None:
        raise NotImplementedError

    async def _stop_intake(self) -> None:
        pass

    async def _ack(self, message: Message) -> None:
        pass

    async def _requeue(self, message: Message) -> None:
        raise NotImplementedError

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _reply(self, message: Message, data: bytes, content_type: str, headers: dict[str, Any]) -> None:
        raise NotImplementedError

    def _producer_options(self) -> dict[str, Any]:
        """Options a producer needs to reach this consumer (HTTP: its URL)."""
        return {}


###############################################################################
# Transports: memory ##########################################################
###############################################################################


class _MemoryBroker:
    """Queues by name and pending replies, one broker per event loop."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[Message]] = {}
        self.replies: dict[str, asyncio.Future[tuple[bytes, str, dict[str, Any]]]] = {}

    def queue(self, name: str) -> asyncio.Queue[Message]:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = asyncio.Queue()
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

    transport = MEMORY

    async def _connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._broker = _memory_broker()
        self._queue = self._broker.queue(self.queue_name)

    async def _publish(self, message: Message, timeout: float | None, **flags: Any) -> None:
        if self._loop is not asyncio.get_running_loop():  # reused under a new asyncio.run()
            await self._connect()
        self._queue.put_nowait(message)

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        if self._loop is not asyncio.get_running_loop():
            await self._connect()
        future: asyncio.Future[tuple[bytes, str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._broker.replies[message.id] = future
        message.reply_to = message.id
        try:
            self._queue.put_nowait(message)
            try:
                async with asyncio.timeout(timeout):
                    data, ctype, headers = await future
            except TimeoutError:
                raise RequestTimeout(f"no reply from queue {self.queue_name!r} within {timeout}s") from None
        finally:
            self._broker.replies.pop(message.id, None)
        return _reply_value(data, ctype, headers, self.queue_name)


class MemoryConsumer(Consumer):
    """Consumes a queue of the in-process broker with ``prefetch`` workers."""

    transport = MEMORY

    async def _connect(self) -> None:
        self._broker = _memory_broker()
        self._queue = self._broker.queue(self.queue_name)
        self._workers: list[asyncio.Task[None]] = []

    async def _start_intake(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.prefetch)]

    async def _work(self) -> None:
        queue = self._queue
        while not self._stopping:
            await self._deliver(await queue.get())

    async def _stop_intake(self) -> None:
        idle = [worker for worker in self._workers if worker not in self._active]
        for worker in idle:  # waiting in queue.get(), which gives up nothing when cancelled
            worker.cancel()
        await asyncio.gather(*idle, return_exceptions=True)

    async def _requeue(self, message: Message) -> None:
        message.redelivered = True
        self._queue.put_nowait(message)

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        dead = Message(None, message.data, message.content_type, headers, message.id, self.dead_letter_queue)
        self._broker.queue(self.dead_letter_queue).put_nowait(dead)

    async def _reply(self, message: Message, data: bytes, content_type: str, headers: dict[str, Any]) -> None:
        future = self._broker.replies.get(message.reply_to or "")
        if future is not None and not future.done():
            future.set_result((data, content_type, headers))


###############################################################################
# Transports: RabbitMQ ########################################################
###############################################################################

_REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's direct reply-to pseudo-queue


def _rmq_url(url: str | None, host: str | None, port: int | str | None, user: str | None,
             password: str | None, vhost: str | None) -> str:
    """The AMQP URL from options, else ``RMQ_URL``, else ``RMQ_HOST``... ."""
    url = url or os.environ.get("RMQ_URL")
    if url:
        scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
        if scheme not in ("amqp", "amqps"):
            raise ConfigError(f"a RabbitMQ URL starts with amqp:// or amqps://, got {_redact(url)!r}")
        return url
    host = host or _setting("RMQ_HOST", "localhost")
    port = _number("RMQ_PORT", port or _setting("RMQ_PORT", "5672"), int, 1)
    user = user if user is not None else _setting("RMQ_USER", "guest")
    password = password if password is not None else _setting("RMQ_PASS", "guest")
    vhost = vhost if vhost is not None else _setting("RMQ_VHOST", "/")
    quote = urllib.parse.quote
    return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(vhost, safe='')}"


def _cause(exc: BaseException, url: str) -> str:
    """An error's text for a message of ours, with the URL's password scrubbed."""
    text = f"{type(exc).__name__}: {exc}"
    password = urllib.parse.urlsplit(url).password or ""
    for secret in {password, urllib.parse.unquote(password)} - {""}:
        text = text.replace(secret, "***")
    return text


def _where(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"


class _SharedConnection:
    def __init__(self) -> None:
        self.connection: Any = None
        self.users = 0
        self.lock = asyncio.Lock()


# One robust connection per URL per event loop, shared by every producer and
# consumer; each of them opens its own channel on it.
_rmq_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _SharedConnection]] = \
    weakref.WeakKeyDictionary()


_Errors = tuple[type[BaseException], ...]


def _rmq_errors() -> tuple[_Errors, _Errors]:
    """(errors of a lost connection, errors a retry cannot fix)."""
    _require("aio_pika")
    errors = importlib.import_module("aiormq").exceptions  # aio-pika's own dependency
    lost: _Errors = (OSError, errors.AMQPConnectionError, errors.ChannelInvalidStateError, errors.ChannelClosed)
    fatal: _Errors = (errors.AuthenticationError, errors.ProbableAuthenticationError, errors.ConnectionNotAllowed,
             errors.DeliveryError, errors.ChannelAccessRefused, errors.ChannelPreconditionFailed)
    return lost, fatal


async def _rmq_acquire(url: str, connect_timeout: float, reconnect_interval: float) -> Any:
    aio_pika = _require("aio_pika")
    shared = _rmq_connections.setdefault(asyncio.get_running_loop(), {}).setdefault(url, _SharedConnection())
    async with shared.lock:
        if shared.connection is None or shared.connection.is_closed:
            lost, fatal = _rmq_errors()

            async def connect() -> Any:
                return await aio_pika.connect_robust(url, reconnect_interval=reconnect_interval,
                                                     timeout=min(10.0, connect_timeout or 10.0))

            try:
                shared.connection = await _retry(
                    connect, what=f"connecting to RabbitMQ at {_where(url)}", retry_on=lost + (TimeoutError,),
                    fatal=fatal, deadline=time.monotonic() + connect_timeout, base=0.25, cap=5.0)
            except fatal:
                user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "")
                raise ConnectionFailed(f"RabbitMQ at {_where(url)} refused user {user!r}: check "
                                       "RMQ_USER, RMQ_PASS and RMQ_VHOST (or RMQ_URL)") from None
            except lost + (TimeoutError,) as exc:
                raise ConnectionFailed(f"cannot connect to RabbitMQ at {_where(url)} within {connect_timeout}s: "
                                       f"{_cause(exc, url)}") from None
        shared.users += 1
        return shared.connection


async def _closing(what: str, operation: Awaitable[Any]) -> None:
    """A shutdown step that talks to the broker. aio-pika waits for a lost
    connection to come back with no limit; a stop must not: by then the
    broker has taken back every unacknowledged message anyway."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await operation
    except Exception as exc:  # gone already, or the broker is unreachable
        log.debug("%s: %r", what, exc)


_CLOSE_TIMEOUT = 5.0


async def _rmq_release(url: str) -> None:
    shared = _rmq_connections.get(asyncio.get_running_loop(), {}).get(url)
    if shared is None:
        return
    async with shared.lock:
        shared.users -= 1
        if shared.users <= 0 and shared.connection is not None:
            connection, shared.connection = shared.connection, None
            await _closing(f"closing the connection to {_where(url)}", connection.close())


class _RabbitMQ:
    """What the RabbitMQ producer and consumer share: settings, the shared
    connection, a channel with publisher confirms, queue declaration and a
    confirmed publish that survives reconnection."""

    queue_name: str
    _lost: _Errors
    _fatal: _Errors
    _no_retry: _Errors

    def _rmq_setup(self, url: str | None, host: str | None, port: int | str | None,
                   user: str | None, password: str | None, vhost: str | None, queue_type: str,
                   connect_timeout: float, reconnect_interval: float, send_timeout: float) -> None:
        self._aio_pika = _require("aio_pika")
        self._url = _rmq_url(url, host, port, user, password, vhost)
        if queue_type not in ("classic", "quorum"):
            raise ConfigError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
        self._queue_args = {"x-queue-type": queue_type} if queue_type == "quorum" else None
        self.connect_timeout = _number("connect_timeout", connect_timeout)
        self.reconnect_interval = _number("reconnect_interval", reconnect_interval)
        self.send_timeout = _number("send_timeout", send_timeout)
        self._lost, self._fatal = _rmq_errors()
        self._no_retry = (TimeoutError,) + self._fatal  # a retry would resend, or cannot help
        self._errors = importlib.import_module("aiormq").exceptions
        #: ``host:port`` of the broker, for messages (never the credentials).
        self.where = _where(self._url)

    async def _open(self, *queues: str, prefetch: int = 0) -> list[Any]:
        """Open a channel on the shared connection, set its QoS and declare
        durable ``queues``, within ``connect_timeout``: a broker that is down
        is an error, not a hang."""
        self._connection = await _rmq_acquire(self._url, self.connect_timeout, self.reconnect_interval)
        self._channel: Any = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._connection.connected.wait()  # the shared connection may be reconnecting
                self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = self._channel.default_exchange
                if prefetch:
                    await self._channel.set_qos(prefetch_count=prefetch)
                return [await self._declare(name) for name in queues]
        except BaseException as exc:
            await self._close_channel()
            if isinstance(exc, TimeoutError):
                raise ConnectionFailed(f"RabbitMQ at {self.where} did not open a channel and declare "
                                       f"{list(queues)} within {self.connect_timeout}s") from None
            if isinstance(exc, self._lost + (RuntimeError,)):  # aio-pika: "Connection was not opened"
                raise ConnectionFailed(f"lost the connection to RabbitMQ at {self.where} while opening a "
                                       f"channel: {_cause(exc, self._url)}") from None
            raise

    async def _declare(self, name: str) -> Any:
        try:
            return await self._channel.declare_queue(name, durable=True, arguments=self._queue_args)
        except self._errors.ChannelPreconditionFailed as exc:
            raise ConfigError(f"queue {name!r} exists on {self.where} with other settings (classic or quorum?): "
                              f"use the same queue_type everywhere or delete the queue ({exc})") from None

    async def _close_channel(self) -> None:
        if self._channel is not None:
            await _closing(f"closing a channel to {self.where}", self._channel.close())
        await _rmq_release(self._url)

    async def _publish(self, message: Message, timeout: float | None, routing_key: str | None = None,
                       mandatory: bool = True, **flags: Any) -> None:
        """Publish to ``routing_key`` (default: the queue) and wait for the
        broker's confirm. A lost connection is retried until the send timeout:
        the message is either confirmed or an error is raised, never dropped."""
        routing_key = routing_key or self.queue_name
        timeout = self.send_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        aio_pika, errors = self._aio_pika, self._errors
        amqp_message = aio_pika.Message(
            message.data, content_type=message.content_type, headers=message.headers or None,
            message_id=message.id, correlation_id=message.correlation_id, reply_to=message.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            try:
                if self._connection.connected.is_set():  # the hot path, one await deep
                    await self._exchange.publish(amqp_message, routing_key, mandatory=mandatory, timeout=timeout)
                    return
            except self._no_retry:
                raise
            except self._lost as exc:
                log.warning("publishing to %r on %s failed (%r); retrying as the connection comes back",
                            routing_key, self.where, exc)
            await self._publish_reconnecting(amqp_message, routing_key, mandatory, deadline)
        except errors.PublishError:
            raise Unroutable(f"RabbitMQ at {self.where} has no queue {routing_key!r} for the message") from None
        except errors.DeliveryError as exc:
            raise SendError(f"RabbitMQ at {self.where} refused the message to {routing_key!r}: "
                            f"{_cause(exc, self._url)}") from None
        except TimeoutError:
            raise SendError(f"RabbitMQ at {self.where} did not confirm the message to {routing_key!r} "
                            f"within {timeout}s") from None
        except self._lost as exc:
            raise SendError(f"lost the connection to RabbitMQ at {self.where} while sending to "
                            f"{routing_key!r}: {_cause(exc, self._url)}") from None


    async def _publish_reconnecting(self, amqp_message: Any, routing_key: str, mandatory: bool,
                                    deadline: float) -> None:
        async def publish() -> None:
            # The robust channel waits for a reconnection with no limit: bound it.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._exchange.publish(amqp_message, routing_key, mandatory=mandatory)

        await _retry(publish, what=f"publishing to {routing_key!r} on {self.where}", retry_on=self._lost,
                     fatal=self._no_retry, deadline=deadline, base=0.1, cap=2.0)


class RabbitMQProducer(_RabbitMQ, Producer):
    """Sends persistent messages to a durable RabbitMQ queue, with publisher
    confirms and mandatory routing; ``send`` returns once the broker confirmed.

    :param url: ``amqp://`` or ``amqps://`` URL; else ``RMQ_URL``, else built
        from ``host``/``port``/``user``/``password``/``vhost`` (or ``RMQ_HOST``,
        ``RMQ_PORT``, ``RMQ_USER``, ``RMQ_PASS``, ``RMQ_VHOST``).
    :param queue_type: ``"classic"`` or ``"quorum"`` (replicated, for clusters).
    :param connect_timeout: how long the first connection is retried.
    :param send_timeout: how long a send waits for a confirm, reconnecting.
    """

    transport = RABBITMQ

    def __init__(self, queue_name: str, *, url: str | None = None, host: str | None = None,
                 port: int | str | None = None, user: str | None = None, password: str | None = None,
                 vhost: str | None = None, queue_type: str = "classic", connect_timeout: float = 30.0,
                 reconnect_interval: float = 1.0, send_timeout: float = 30.0) -> None:
        super().__init__(queue_name)
        self._rmq_setup(url, host, port, user, password, vhost, queue_type,
                        connect_timeout, reconnect_interval, send_timeout)
        self._replies: dict[str, asyncio.Future[tuple[bytes, str, dict[str, Any]]]] = {}
        self._reply_consumer: str | None = None

    async def _connect(self) -> None:
        await self._open(self.queue_name)

    async def _disconnect(self) -> None:
        self._reply_consumer = None
        await self._close_channel()

    async def _on_reply(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self._replies.get(incoming.correlation_id or "")
        if future is not None and not future.done():
            future.set_result((incoming.body, incoming.content_type or "", dict(incoming.headers or {})))

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        if self._reply_consumer is None:
            # Direct reply-to: consume the pseudo-queue on the publishing channel.
            queue = await self._channel.declare_queue(_REPLY_TO, passive=True)
            self._reply_consumer = await queue.consume(self._on_reply, no_ack=True)
        future: asyncio.Future[tuple[bytes, str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._replies[message.id] = future
        message.reply_to = _REPLY_TO
        try:
            async with asyncio.timeout(timeout):
                await self._publish(message, timeout)
                data, ctype, headers = await future
        except TimeoutError:
            raise RequestTimeout(f"no reply from queue {self.queue_name!r} on {self.where} "
                                 f"within {timeout}s") from None
        finally:
            self._replies.pop(message.id, None)
        return _reply_value(data, ctype, headers, self.queue_name)


class RabbitMQConsumer(_RabbitMQ, Consumer):
    """Consumes a durable RabbitMQ queue with QoS ``prefetch``, acknowledging
    each message after its handler returned. Takes the connection options of
    :class:`RabbitMQProducer` and the delivery options of :class:`Consumer`.
    After a lost connection it resumes by itself."""

    transport = RABBITMQ

    def __init__(self, queue_name: str, *, prefetch: int = _DEFAULT_PREFETCH,
                 max_retries: int = _DEFAULT_MAX_RETRIES, retry_backoff: float = 0.2,
                 retry_backoff_max: float = 30.0, drain_timeout: float = 30.0, url: str | None = None,
                 host: str | None = None, port: int | str | None = None, user: str | None = None,
                 password: str | None = None, vhost: str | None = None, queue_type: str = "classic",
                 connect_timeout: float = 30.0, reconnect_interval: float = 1.0,
                 send_timeout: float = 30.0) -> None:
        Consumer.__init__(self, queue_name, prefetch=prefetch, max_retries=max_retries,
                          retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
                          drain_timeout=drain_timeout)
        self._rmq_setup(url, host, port, user, password, vhost, queue_type,
                        connect_timeout, reconnect_interval, send_timeout)
        self._consumer_tag: str | None = None

    async def _connect(self) -> None:
        self._queue, _ = await self._open(self.queue_name, self.dead_letter_queue, prefetch=self.prefetch)

    async def _disconnect(self) -> None:
        await self._close_channel()

    async def _start_intake(self) -> None:
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def _stop_intake(self) -> None:
        if self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            await _closing(f"cancelling the consumer of {self.queue_name!r}", self._queue.cancel(tag))

    async def _on_message(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        # aio-pika runs this in a task of its own per message; QoS bounds how many.
        if self._stopping:
            return  # left unacknowledged: the broker gets it back when the channel closes
        headers = dict(incoming.headers or {})
        count = headers.get("x-delivery-count")  # quorum queues count redeliveries
        await self._deliver(Message(
            None, incoming.body, incoming.content_type or "", headers, incoming.message_id or "",
            self.queue_name, incoming.correlation_id, incoming.reply_to,
            1 + count if isinstance(count, int) else 1, bool(incoming.redelivered), incoming))

    async def _ack(self, message: Message) -> None:
        try:
            await message.raw.ack()
        except Exception as exc:  # the channel went down: the broker redelivers it
            log.warning("could not acknowledge message %s of %r (%r); the broker will redeliver it",
                        message.id, self.queue_name, exc)

    async def _requeue(self, message: Message) -> None:
        try:
            await message.raw.nack(requeue=True)
        except Exception as exc:
            log.debug("nack of %s: %r (the broker requeues it with the channel)", message.id, exc)

    async def _dead_letter(self, message: Message, headers: dict[str, Any]) -> None:
        dead = Message(None, message.data, message.content_type, headers, message.id,
                       self.dead_letter_queue, message.correlation_id)
        await self._publish(dead, None, self.dead_letter_queue)

    async def _reply(self, message: Message, data: bytes, content_type: str, headers: dict[str, Any]) -> None:
        reply = Message(None, data, content_type, headers, _new_id(), message.reply_to or "",
                        message.correlation_id)
        # Not mandatory: a requester that gave up has no reply queue any more.
        await self._publish(reply, None, message.reply_to or "", mandatory=False)


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
    :param timeout: seconds for a whole request, retries not counted.
    :param auth_token: sent as ``Authorization: Bearer``; else ``HTTP_AUTH_TOKEN``.
    :param ssl_context: for HTTPS with a private CA or client certificates.
    :param pool_size: connections kept open to the consumer.
    """

    transport = HTTP
    send_flags = frozenset({"method", "endpoint"})

    def __init__(self, queue_name: str, *, host: str | None = None, endpoint: str | None = None,
                 retries: int = 3, retry_backoff: float = 0.1, timeout: float = 30.0,
                 auth_token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 pool_size: int = 100) -> None:
        super().__init__(queue_name)
        _require("aiohttp")
        self.endpoint = endpoint or f"{_http_host_url(host, ssl_context)}/{queue_name}"
        if urllib.parse.urlsplit(self.endpoint).scheme not in ("http", "https"):
            raise ConfigError(f"an HTTP endpoint starts with http:// or https://, got {_redact(self.endpoint)!r}")
        self.retries = _number("retries", retries, int, 0)
        self.retry_backoff = _number("retry_backoff", retry_backoff)
        self.timeout = _number("timeout", timeout)
        self.pool_size = _number("pool_size", pool_size, int, 1)
        token = auth_token if auth_token is not None else os.environ.get("HTTP_AUTH_TOKEN")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl_context
        self._shown_endpoint = _redact(self.endpoint)  # for messages, computed once

    async def _connect(self) -> None:
        aiohttp = _require("aiohttp")
        self._aiohttp = aiohttp
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.pool_size, ssl=self._ssl if self._ssl else True))

    async def _disconnect(self) -> None:
        await self._session.close()

    def _shown(self, endpoint: str | None) -> str:
        """The URL a request goes to, fit for a message (no password)."""
        return _redact(endpoint) if endpoint else self._shown_endpoint

    async def _publish(self, message: Message, timeout: float | None, method: str = "POST",
                       endpoint: str | None = None, **flags: Any) -> Any:
        aiohttp = self._aiohttp
        method = method.upper()
        url = endpoint or self.endpoint
        shown = self._shown(endpoint)
        headers = {k: v if isinstance(v, str) else str(v) for k, v in message.headers.items()}
        headers.update({"X-Message-Id": message.id, **self._auth})
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
        client_timeout = aiohttp.ClientTimeout(total=timeout) if timeout else None
        attempt = 0

        async def once() -> tuple[int, bytes, str]:
            nonlocal attempt
            attempt += 1
            headers["X-Attempt"] = str(attempt)
            try:
                async with self._session.request(method, url, data=data, params=params, headers=headers,
                                                 timeout=client_timeout) as response:
                    body = await response.read()
            except TimeoutError:
                raise RequestTimeout(f"{method} {shown} got no answer within "
                                     f"{timeout or self.timeout}s") from None
            if response.status in _RETRY_STATUSES:
                raise _RetryableStatus(response.status, body)
            return response.status, body, response.headers.get("Content-Type", "")

        try:
            status, body, ctype = await _retry(
                once, what=f"{method} {shown}", retry_on=(aiohttp.ClientConnectionError, _RetryableStatus),
                attempts=self.retries + 1, base=self.retry_backoff, cap=5.0)
        except _RetryableStatus as exc:
            raise HTTPError(exc.status, _excerpt(exc.body), shown) from None
        except aiohttp.ClientConnectionError as exc:
            raise SendError(f"cannot reach {shown} after {attempt} attempt(s): "
                            f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise HTTPError(status, _excerpt(body), shown)
        if status == 202 or not body:
            return None
        return decode(body, ctype)

    async def _request(self, message: Message, timeout: float, **flags: Any) -> Any:
        try:
            async with asyncio.timeout(timeout):  # retries included: the caller's deadline is the whole exchange
                return await self._publish(message, timeout, **flags)
        except RequestTimeout:
            raise
        except TimeoutError:
            raise RequestTimeout(f"no answer from {self._shown(flags.get('endpoint'))} within {timeout}s") from None


def _json_error(status: int, error: str, **headers: str) -> web.Response:
    json_response: Callable[..., web.Response] = importlib.import_module("aiohttp.web").json_response
    return json_response({"error": error}, status=status, headers=headers or None)


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or ``None`` when it is larger than ``limit``."""
    length = request.content_length
    if length is not None:
        return None if length > limit else await request.content.read()
    data = bytearray()
    async for chunk in request.content.iter_any():  # chunked: count as it comes
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


class _HTTPServer:
    """One aiohttp application on host:port serving HTTP consumers' routes,
    ``GET /healthz`` and JSON 404s; stopping it drains in-flight requests."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                 shutdown_timeout: float = 30.0) -> None:
        self._web = _require("aiohttp.web")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        self.app = self._web.Application()
        self.app.router.add_get("/healthz", self._health)
        self._runner: Any = None

    def add(self, consumer: HTTPConsumer) -> None:
        consumer.mount(self.app)
        consumer._server = self

    async def _health(self, request: web.Request) -> web.Response:
        return self._web.json_response({"status": "ok"})

    async def _not_found(self, request: web.Request) -> web.Response:
        return _json_error(404, f"no route {request.path!r}")

    async def start(self) -> None:
        web = self._web
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)  # last, so it only catches the rest
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConnectionFailed(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._runner.addresses[0][1]
        log.info("serving HTTP on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def url(self, path: str) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}/{path}"


class HTTPConsumer(Consumer):
    """Serves ``/{queue_name}``: a POST body is decoded by content type, a
    GET's query parameters arrive as a dict of strings. The handler's return
    value answers 200, ``None`` answers 202; bad input gets a JSON 4xx and
    never reaches the handler; a handler error answers 500. HTTP is
    synchronous: the caller sees failures, retries are the producer's.

    :param host: address to listen on (default ``0.0.0.0``).
    :param port: port (default ``HTTP_PORT``, else 9000; 0 picks a free one).
    :param max_body: largest body accepted, in bytes (413 above).
    :param auth_token: require ``Authorization: Bearer <token>``; else ``HTTP_AUTH_TOKEN``.
    :param ssl_context: serve HTTPS.

    ``max_retries`` and the backoff options are accepted, so transport-agnostic
    code can pass them, and unused: the producer retries.
    """

    transport = HTTP
    handler_flags = frozenset({"method"})
    listens = True

    def __init__(self, queue_name: str, *, prefetch: int = _DEFAULT_PREFETCH,
                 max_retries: int = _DEFAULT_MAX_RETRIES, retry_backoff: float = 0.2,
                 retry_backoff_max: float = 30.0, drain_timeout: float = 30.0, host: str | None = None,
                 port: int | None = None, max_body: int = _DEFAULT_MAX_BODY, auth_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(queue_name, prefetch=prefetch, max_retries=max_retries, retry_backoff=retry_backoff,
                         retry_backoff_max=retry_backoff_max, drain_timeout=drain_timeout)
        _require("aiohttp")
        if any(c in queue_name for c in "/?#{}%"):
            raise ConfigError(f"an HTTP queue name is one path segment without / ? # {{ }} %, got {queue_name!r}")
        self.host = host or "0.0.0.0"
        self.port = _number("port", _setting("HTTP_PORT", "9000") if port is None else port, int, 0)
        self.max_body = _number("max_body", max_body, int, 0)
        token = auth_token if auth_token is not None else os.environ.get("HTTP_AUTH_TOKEN")
        self._auth = f"Bearer {token}".encode() if token else None
        self.ssl_context = ssl_context
        self._server: _HTTPServer | None = None
        self._own_server = False
        self._slots: asyncio.Semaphore | None = None

    def _handler_key(self, flags: dict[str, Any]) -> str:
        method = str(flags.get("method", "POST")).upper()
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ConfigError(f"method must be GET, POST, PUT, PATCH or DELETE, got {flags['method']!r}")
        return method

    def mount(self, app: web.Application) -> None:
        """Serve this consumer's route on an existing aiohttp ``Application``
        (its owner runs it; ``start()`` then opens no port of its own)."""
        app.router.add_route("*", f"/{self.queue_name}", self._serve)
        self._server = self._server or _EXTERNAL

    @property
    def url(self) -> str:
        """The URL a producer posts to, once serving."""
        if self._server is None or self._server is _EXTERNAL:
            raise ConfigError(f"HTTP consumer {self.queue_name!r} is not serving on a port of its own")
        return self._server.url(self.queue_name)

    def _producer_options(self) -> dict[str, Any]:
        return {"endpoint": self.url, "ssl_context": self.ssl_context}

    async def _connect(self) -> None:
        self._web = _require("aiohttp.web")
        self._slots = asyncio.Semaphore(self.prefetch)

    async def _start_intake(self) -> None:
        if self._server is None:
            self._server = _HTTPServer(self.host, self.port, self.ssl_context, self.drain_timeout)
            self._server.add(self)
            self._own_server = True
            try:
                await self._server.start()
            except BaseException:
                self._server, self._own_server = None, False
                raise

    async def _stop_intake(self) -> None:
        if self._own_server and self._server is not None:
            server, self._server, self._own_server = self._server, None, False
            await server.stop()  # aiohttp drains in-flight requests

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if self._auth is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), self._auth):
            return _json_error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        entry = self._handlers.get(request.method)
        if entry is None:
            return _json_error(405, f"{request.method} is not allowed on /{self.queue_name}",
                               Allow=", ".join(sorted(self._handlers)))
        if self._slots is None:  # mounted on a user's application without start()
            await self.a_init()
        headers = request.headers
        if request.method in _BODYLESS:
            data, ctype, body = b"", "", dict(request.query)
        else:
            raw = await _read_body(request, self.max_body)
            if raw is None:
                return _json_error(413, f"body larger than {self.max_body} bytes")
            data, ctype = raw, headers.get("Content-Type", "")
            try:
                body = decode(data, ctype)
            except DecodeError as exc:
                return _json_error(400, str(exc))
        attempt = headers.get("X-Attempt", "1")
        message = Message(body, data, ctype, dict(headers), headers.get("X-Message-Id") or _new_id(),
                          self.queue_name, headers.get("X-Correlation-Id"), None,
                          int(attempt) if attempt.isdigit() else 1, False, request)
        fn, is_coroutine = entry
        assert self._slots is not None
        async with self._slots:
            token = _current.set(message)
            try:
                result = await fn(body) if is_coroutine else await _maybe_await(fn(body))
                if result is None:
                    return self._web.Response(status=202)
                data, ctype = encode(result)
            except Exception:
                log.exception("handler of %r failed on message %s", self.queue_name, message.id)
                return _json_error(500, "the handler failed; see the consumer's log", **{"X-Message-Id": message.id})
            finally:
                _current.reset(token)
        return self._web.Response(body=data, headers={"Content-Type": ctype})


_EXTERNAL: Any = object()  # an HTTP consumer mounted on an application someone else runs


###############################################################################
# Registries ##################################################################
###############################################################################


class _Registry(dict[str, type[_T]]):
    """A dict of transport classes by name: case-insensitive, with aliases."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.aliases: dict[str, str] = {}

    def canonical(self, name: Any) -> str:
        if isinstance(name, str):
            if dict.__contains__(self, name):
                return name
            found = self.aliases.get(name.lower())
            if found is not None:
                return found
        own = {key.lower() for key in self}
        valid = sorted(self) + sorted(alias for alias in self.aliases if alias not in own)
        raise UnknownTransport(f"unknown transport {name!r}; choose one of: {', '.join(valid)}")

    def __getitem__(self, name: Any) -> type[_T]:
        return dict.__getitem__(self, self.canonical(name))

    def __contains__(self, name: object) -> bool:
        try:
            self.canonical(name)
        except UnknownTransport:
            return False
        return True

    def get(self, name: Any, default: Any = None) -> Any:
        return self[name] if name in self else default

    def add(self, name: str, cls: type[_T], aliases: Iterable[str]) -> None:
        dict.__setitem__(self, name, cls)
        for alias in (name, *aliases):
            self.aliases[alias.lower()] = name


#: Producer classes by transport name (``PRODUCERS[RABBITMQ]``, ``PRODUCERS["rabbitmq"]``).
PRODUCERS: _Registry[Producer] = _Registry("producer")
#: Consumer classes by transport name; ``CONSUMERS`` is the same object.
CONSUMER_LOOPS: _Registry[Consumer] = _Registry("consumer")
CONSUMERS = CONSUMER_LOOPS


def register_transport(name: str, producer_cls: type[Producer], consumer_cls: type[Consumer],
                       aliases: Iterable[str] = ()) -> None:
    """Make a transport available in :data:`PRODUCERS` and :data:`CONSUMER_LOOPS`
    under ``name`` and ``aliases`` (case-insensitive). Re-registering a name
    replaces it.

    :raises ConfigError: the classes are not a Producer and a Consumer.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a transport name must be a non-empty string, got {name!r}")
    if not (isinstance(producer_cls, type) and issubclass(producer_cls, Producer)):
        raise ConfigError(f"producer_cls must subclass streamtools.Producer, got {producer_cls!r}")
    if not (isinstance(consumer_cls, type) and issubclass(consumer_cls, Consumer)):
        raise ConfigError(f"consumer_cls must subclass streamtools.Consumer, got {consumer_cls!r}")
    aliases = tuple(aliases)
    PRODUCERS.add(name, producer_cls, aliases)
    CONSUMER_LOOPS.add(name, consumer_cls, aliases)


register_transport(MEMORY, MemoryProducer, MemoryConsumer, aliases=("memory", "asyncio", "inproc"))
register_transport(RABBITMQ, RabbitMQProducer, RabbitMQConsumer, aliases=("rabbitmq", "rmq", "amqp"))
register_transport(HTTP, HTTPProducer, HTTPConsumer, aliases=("http",))


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
        self.queue_name = config.get("name") or queue_name
        if not config.get("consumer_loop") and not config.get("producer"):
            raise ConfigError(f"config of {queue_name!r} names neither a 'consumer_loop' nor a 'producer'")
        consumer_cls = self._lookup(CONSUMER_LOOPS, config, queue_name, "consumer_loop")
        producer_cls = self._lookup(PRODUCERS, config, queue_name, "producer")
        self.consumer = consumer_cls(self.queue_name, **(consumer_options or {})) if consumer_cls else None
        self.producer = producer_cls(self.queue_name, **(producer_options or {})) if producer_cls else None

    @staticmethod
    def _lookup(registry: _Registry[_T], config: Mapping[str, Any], queue_name: str, key: str) -> type[_T] | None:
        if not config.get(key):
            return None
        try:
            return registry[config[key]]
        except UnknownTransport as exc:
            raise ConfigError(f"{queue_name}.{key}: {exc}") from None

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
        self.handlers = {key: HandleMsgs(key, msg_queues, consumer_options, producer_options)
                         for key in msg_queues}

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


class ConsumerFactory:
    """Creates one consumer per route of a given transport, Flask style::

        consumers = ConsumerFactory(HTTP, port=9000)

        @consumers.route("queue_1")
        async def handler(msg): ...

    :param queue_type: a transport name of :data:`CONSUMER_LOOPS`.
    :param port: the port HTTP consumers are served on.
    :param host: the address HTTP consumers listen on.
    :param options: passed to every consumer (``prefetch``, ``url``...).
    """

    def __init__(self, queue_type: str, port: int = 9000, host: str | None = None, **options: Any) -> None:
        self.queue_type = queue_type
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
        consumer = self._by_queue.get(queue_name)
        if consumer is None:
            consumer = self.consumer_class(queue_name, **self.options)
            self._by_queue[queue_name] = consumer
            self.instances.append(consumer)
        decorate = consumer(**flags)

        def register(fn: _F) -> _F:
            decorate(fn)
            self.handlers.append(fn)
            return fn

        return register

    def mount(self, app: web.Application) -> None:
        """Serve every HTTP route on an existing aiohttp ``Application``."""
        for consumer in self.instances:
            if not isinstance(consumer, HTTPConsumer):
                raise ConfigError(f"only HTTP consumers can be mounted, {consumer!r} is {consumer.transport}")
            consumer.mount(app)

    def runner(self, **options: Any) -> ConsumerRunner:
        """A :class:`ConsumerRunner` serving these consumers."""
        return ConsumerRunner(consumers=self.instances, port=self.port, host=self.host, **options)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (see :meth:`ConsumerRunner.run`)."""
        self.runner().run()


class ConsumerRunner:
    """Runs a set of consumers: every HTTP route on one aiohttp application on
    ``host:port`` (a port is bound only when there are HTTP consumers), every
    RabbitMQ consumer on one shared connection.

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
        http = [c for c in self.consumers if isinstance(c, HTTPConsumer)]
        self.host = host or next((c.host for c in http), "0.0.0.0")
        self.port = port if port is not None else next((c.port for c in http), 9000)
        self.ssl_context = ssl_context or next((c.ssl_context for c in http if c.ssl_context), None)
        self._http = http
        self._server: _HTTPServer | None = None
        self._started = False

    async def start(self) -> None:
        """Connect every consumer and start serving."""
        if self._started:
            return
        started: list[Consumer] = []
        try:
            if self._http:
                drain = max(c.drain_timeout for c in self._http)
                self._server = _HTTPServer(self.host, self.port, self.ssl_context, drain)
                for http_consumer in self._http:
                    self._server.add(http_consumer)
            for consumer in self.consumers:
                await consumer.start()
                started.append(consumer)
            if self._server is not None:
                await self._server.start()
                self.port = self._server.port
        except BaseException:
            await asyncio.gather(*(c.stop() for c in started), return_exceptions=True)
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop gracefully: finish in-flight work, then close connections."""
        if not self._started:
            return
        self._started = False
        if self._server is not None:
            await self._server.stop()  # stops listening, drains in-flight requests
        results = await asyncio.gather(*(c.stop() for c in self.consumers), return_exceptions=True)
        for consumer, result in zip(self.consumers, results):
            if isinstance(result, BaseException):
                log.error("stopping %r failed: %r", consumer, result)

    async def __aenter__(self) -> ConsumerRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    async def serve(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        try:
            async with self:
                log.info("serving %d consumer(s); SIGINT or SIGTERM stops", len(self.consumers))
                await stop.wait()
                log.info("stopping")
        finally:
            for sig in signals:
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass

    def run(self) -> None:
        """Block serving until SIGINT or SIGTERM; then stop gracefully and return."""
        try:
            asyncio.run(self.serve())
        except KeyboardInterrupt:  # where signal handlers are unavailable
            pass


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


def _transport_options(args: argparse.Namespace, cls: type[Producer] | type[Consumer]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if getattr(args, "url", None):
        options["url"] = args.url
    if getattr(args, "endpoint", None):
        options["endpoint"] = args.endpoint
    listens = getattr(cls, "listens", False)
    if getattr(args, "port", None) is not None and listens:
        options["port"] = args.port
    if getattr(args, "host", None) and listens:
        options["host"] = args.host
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

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    async with consumer:
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


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def bench(kind: str = MEMORY, n: int = 10000, size: int = 100, concurrency: int = 50,
                progress: Callable[[int, int], None] | None = None, **options: Any) -> dict[str, Any]:
    """Send ``n`` messages of ``size`` payload bytes through a transport,
    ``concurrency`` senders at once, and measure end to end (send, handler,
    acknowledgement): throughput and latency percentiles."""
    queue = "streamtools-bench"
    run_id = _new_id()
    consumer_cls, producer_cls = CONSUMER_LOOPS[kind], PRODUCERS[kind]
    place: dict[str, Any] = {"host": "127.0.0.1", "port": 0} if consumer_cls.listens else {}
    consumer = consumer_cls(queue, prefetch=max(64, concurrency), **place, **options)
    latencies: list[float] = []
    done = asyncio.Event()
    clock = time.perf_counter

    @consumer()
    async def handle(msg: Any) -> None:
        if msg.get("run") != run_id:  # left over from an interrupted run
            return
        latencies.append(clock() - msg["t"])
        if len(latencies) >= n:
            done.set()

    await consumer.start()
    producer = producer_cls(queue, **consumer._producer_options(), **options)
    sent = 0
    payload = "x" * size

    async def sender(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            await producer.send({"run": run_id, "t": clock(), "payload": payload})
            sent += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            if progress:
                progress(sent, len(latencies))

    try:
        await producer.a_init()
        share, extra = divmod(n, concurrency)
        started = clock()
        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(sender(share + (i < extra)) for i in range(concurrency)))
            await done.wait()
        finally:
            reporter.cancel()
        elapsed = clock() - started
        if progress:
            progress(sent, len(latencies))
    finally:
        await producer.close()
        await consumer.stop()
    latencies.sort()
    return {"transport": consumer_cls.transport, "n": n, "size": size, "concurrency": concurrency,
            "seconds": round(elapsed, 4), "msgs_per_sec": round(n / elapsed, 1),
            "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
            "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3)}


async def _cli_bench(args: argparse.Namespace) -> int:
    def progress(sent: int, received: int) -> None:
        print(f"\rsent {sent}/{args.n}, handled {received}/{args.n}", end="", file=sys.stderr, flush=True)

    result = await bench(args.transport, args.n, args.size, args.concurrency, progress)
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
    pricing, orders, notifications = (cls(f"streamtools-demo.{name}", **place)
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
    async with runner:
        for consumer in runner.consumers:
            to[consumer.queue_name.rpartition(".")[2]] = PRODUCERS[kind](
                consumer.queue_name, **consumer._producer_options())
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
    print("demo finished: 3 orders priced and announced")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    kinds = ", ".join(sorted(set(PRODUCERS.aliases) - {name.lower() for name in PRODUCERS}))
    parser = argparse.ArgumentParser(prog="streamtools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"streamtools {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def transport_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--url", help="RabbitMQ URL (default from RMQ_URL / RMQ_HOST...)")
        command.add_argument("--endpoint", help="HTTP URL to send to (default http://$HTTP_HOST/QUEUE)")

    def transport_first(command: argparse.ArgumentParser, *slots: str) -> None:
        # `send rabbitmq QUEUE MSG` and `send --transport rabbitmq QUEUE MSG` both work.
        command.add_argument("words", nargs="+", metavar="ARG", help=f"[KIND] {' '.join(slots)}")
        command.add_argument("--transport", metavar="KIND", help=f"instead of KIND: {kinds}")
        command.set_defaults(word_names=slots)

    send = commands.add_parser("send", help="send one message", usage="%(prog)s [options] [KIND] QUEUE MESSAGE",
                               description="Send MESSAGE (JSON, else text) to QUEUE.")
    transport_first(send, "QUEUE", "MESSAGE")
    send.add_argument("--request", action="store_true", help="wait for the reply and print it")
    send.add_argument("--timeout", type=float, default=10.0)
    transport_options(send)
    send.set_defaults(run=_cli_send)

    listen = commands.add_parser("listen", help="print each message received as a JSON line",
                                 usage="%(prog)s [options] [KIND] QUEUE")
    transport_first(listen, "QUEUE")
    listen.add_argument("--count", type=int, default=0, help="exit after this many messages")
    listen.add_argument("--host", help="HTTP: address to listen on")
    listen.add_argument("--port", type=int, help="HTTP: port to listen on")
    transport_options(listen)
    listen.set_defaults(run=_cli_listen)

    run = commands.add_parser("run", help="serve the consumers of MODULE:ATTR until SIGINT/SIGTERM")
    run.add_argument("target", metavar="MODULE:ATTR",
                     help="a ConsumerFactory, ConsumerRunner, HandlerFactory or Consumer")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.set_defaults(run=None)

    bench_cmd = commands.add_parser("bench", help="end-to-end throughput and latency")
    bench_cmd.add_argument("--transport", default="memory", metavar="KIND")
    bench_cmd.add_argument("-n", type=int, default=20000, help="messages (default 20000)")
    bench_cmd.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    bench_cmd.add_argument("--concurrency", type=int, default=50, help="concurrent senders (default 50)")
    bench_cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    bench_cmd.set_defaults(run=_cli_bench)

    demo = commands.add_parser("demo", help="two services talking, on the memory transport by default")
    demo.add_argument("--transport", default="memory", metavar="KIND")
    demo.set_defaults(run=_cli_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``streamtools`` command; returns the exit status."""
    # User code loaded by `run` imports streamtools: give it this module, not a second copy.
    sys.modules.setdefault("streamtools", sys.modules[__name__])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if hasattr(args, "words"):
        words = list(args.words)
        if args.transport is None and len(words) == len(args.word_names) + 1:
            args.transport = words.pop(0)
        if args.transport is None or len(words) != len(args.word_names):
            parser.error(f"{args.command} takes KIND {' '.join(args.word_names)} (or --transport KIND "
                         f"{' '.join(args.word_names)}), got {len(args.words)} argument(s)")
        for name, word in zip(args.word_names, words):
            setattr(args, name.lower(), word)
    if hasattr(args, "transport") and args.transport not in PRODUCERS:
        parser.error(str(UnknownTransport(f"unknown transport {args.transport!r}; choose one of: "
                                          f"{', '.join(sorted(PRODUCERS.aliases))}")))
    for flag, name in (("-n", "n"), ("--concurrency", "concurrency"), ("--size", "size")):
        if getattr(args, name, 1) < (0 if name == "size" else 1):
            parser.error(f"{flag} must be at least {0 if name == 'size' else 1}")
    if args.command in ("send", "listen") and PRODUCERS.canonical(args.transport) == MEMORY:
        parser.error("the memory transport lives inside one process, so a message sent from (or listened "
                     "for in) this command reaches no other program; use rabbitmq or http, or try "
                     "`streamtools demo`")
    try:
        if args.command == "run":
            _runner_for(_load(args.target), args.port, args.host).run()
            return 0
        return int(asyncio.run(args.run(args)))
    except (StreamtoolsError, MissingDependency) as exc:
        print(f"streamtools: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
