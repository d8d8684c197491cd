"""An HTTP server that hosts any registry reward for the ``remote`` reward (standard library only).

    python -m rewards.server --reward clip_score --port 8765 --device cuda:1
    python -m rewards.server --reward '{"clip_score": 1.0, "aesthetic": 0.1}' --preset sd14 \
        --option batch_size=32 --option dtype=float16

``--preset`` takes the ``config.reward`` section of a preset of ``config/stage_process.py`` as the reward
options; ``--option KEY=VALUE`` (repeatable; VALUE parsed as JSON when it parses) overrides single fields.
The wire format is documented in ``rewards/remote.py``. The server binds to 127.0.0.1 unless ``--host`` says
otherwise, and it binds before the reward model is loaded (a port in use fails at once).

Limits (see :class:`ServerLimits`): a request body is at most ``--max_body_mb`` MiB (bigger ones get 413
unread); at most ``--decode_slots`` requests hold a body at once (read, decoded, then waiting for and being
scored; scoring itself is serialised by one lock, the model is shared), which bounds the memory; at most
``--max_connections`` connections are handled at once, more wait in the listen backlog; a client silent for
``--timeout`` seconds is dropped, and a body has ``--timeout`` seconds in all to arrive. Every malformed
request gets a 4xx answer ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from rewards.common import RewardFn
from rewards.remote import decode_request
from srrl.errors import ConfigError

logger = logging.getLogger(__name__)

# The default body limit fits one batch of the largest preset: SDXL (1024 x 1024 RGB), reward.batch_size 16,
# sent as float32 (remote_dtype="float32"; the default uint8 is 4x smaller). Raw: 16 * 3 * 1024 * 1024 * 4 B
# = 192 MiB; base64 makes that 4/3 larger = 256 MiB; prompts and JSON add a few KiB. 320 MiB leaves 25 %.
DEFAULT_MAX_BODY_MB = 320
LISTEN_BACKLOG = 128  # connections the kernel queues while all handlers are busy (was socketserver's 5)
READ_CHUNK = 1 << 20  # bytes per read of a request body


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts; memory is about ``decode_slots * 2 * max_body_bytes`` at worst (decoding a body
    holds it as text plus the images string, see ``rewards.remote.decode_request``), plus the decoded images."""

    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    timeout: float = 60.0  # seconds a client may stay silent; also the most a request body may take in all
    max_connections: int = 64  # connections handled at once (one thread each); more wait in the backlog
    decode_slots: int = 2  # requests that hold a body at once (reading, decoding, scoring)

    def check(self) -> ServerLimits:
        """``self``, or a ConfigError naming the first limit that cannot work."""
        for flag, value, ok in (("--max_body_mb", f"{self.max_body_bytes / 2**20:g}", self.max_body_bytes >= 1),
                                ("--timeout", f"{self.timeout:g}", self.timeout > 0),
                                ("--max_connections", self.max_connections, self.max_connections >= 1),
                                ("--decode_slots", self.decode_slots, self.decode_slots >= 1)):
            if not ok:
                raise ConfigError(f"{flag} must be positive, got {value}")
        return self


def unmap_large_buffers(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, returned to the OS when freed.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after
    the first request, bodies below 32 MiB (e.g. a uint8 SD batch of 16 x 512 x 512: 17 MiB) come from the
    handler threads' heaps, which keep their pages: with 4 concurrent 20 MiB bodies the resident memory rose
    to 6-8x the body instead of 3.5x. Best effort; False where ``mallopt`` is missing (not glibc).
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD (fixes it, not dynamic)
    except (OSError, AttributeError):
        return False


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward function, with the bounds of :class:`ServerLimits`."""

    daemon_threads = True
    block_on_close = False  # closing does not wait for slow clients
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], reward_fn: RewardFn, name: str, device: torch.device,
                 limits: ServerLimits | None = None) -> None:
        self.reward_fn = reward_fn
        self.reward_name = name
        self.device = device
        self.limits = (limits or ServerLimits()).check()
        self.lock = threading.Lock()  # one scoring at a time
        self.slots = threading.BoundedSemaphore(self.limits.decode_slots)
        self.handlers = threading.BoundedSemaphore(self.limits.max_connections)
        self.stopping = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RewardHandler)  # binds and listens (backlog LISTEN_BACKLOG)

    @property
    def url(self) -> str:
        """The score URL of this server (for ``config.reward.remote_url``)."""
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/score"

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a new thread once fewer than ``max_connections`` are busy (else wait)."""
        while not self.handlers.acquire(timeout=0.1):
            if self.stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.handlers.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection in its thread, then free its handler place."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.handlers.release()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (also while it waits for a free handler)."""
        self.stopping.set()
        super().shutdown()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed mid-way (client gone, reset): one log line, not a traceback on stderr."""
        err = sys.exc_info()[1]
        logger.warning("connection from %s failed: %s: %s", client_address, type(err).__name__, err)


class RewardHandler(BaseHTTPRequestHandler):
    """``GET /health`` and ``POST /score`` (see rewards/remote.py for the format); errors as JSON."""

    server: RewardServer
    default_request_version = "HTTP/1.0"  # answers (errors too) keep their status line on a garbled request line

    def setup(self) -> None:
        """Apply the server's socket timeout to this connection (an idle client is dropped)."""
        self.timeout = self.server.limits.timeout
        super().setup()

    def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Answer ``payload`` as JSON with status ``code`` (and extra ``headers``)."""
        body = json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _fail(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer ``{"error": message}`` with ``code`` and close the connection."""
        request = " ".join(getattr(self, "requestline", "").split()[:2])[:120] or "request"
        logger.info("%s from %s: %d %s", request, self.address_string(), code, message)
        self.close_connection = True
        self._send(code, {"error": message}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The errors http.server finds itself (bad request line, headers too long, unknown method) as JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:  # no do_<METHOD>
            self._method_not_allowed()
            return
        self._fail(code, message or explain or HTTPStatus(code).phrase)

    def _method_not_allowed(self) -> None:
        """405 for a method the path does not take."""
        self._fail(405, f"method {self.command} is not allowed here; use GET /health or POST /score",
                   {"Allow": "GET, POST"})

    def _route(self) -> str:
        """The request's path without query and trailing slash."""
        return urllib.parse.urlsplit(self.path).path.rstrip("/")

    def do_GET(self) -> None:
        """Health check: the hosted reward's name and the largest body accepted."""
        route = self._route()
        if route == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward_name,
                             "max_body_bytes": self.server.limits.max_body_bytes})
        elif route == "/score":
            self._method_not_allowed()
        else:
            self._fail(404, f"unknown path {self.path[:100]}; use GET /health or POST /score")

    def do_POST(self) -> None:
        """Score a batch: read and decode it in a slot, run the reward under the lock, answer the scores."""
        route = self._route()
        if route != "/score":
            if route == "/health":
                self._method_not_allowed()
            else:
                self._fail(404, f"unknown path {self.path[:100]}; use POST /score")
            return
        length = self._content_length()
        if length is None:
            return
        answer = self._score(length)
        if answer is not None:
            self._send(*answer)

    def _content_length(self) -> int | None:
        """The request's Content-Length when usable; else answers 411/400/413 (body unread) and returns None."""
        limit = self.server.limits.max_body_bytes
        values = self.headers.get_all("Content-Length") or []
        text = values[0].strip() if values else ""
        if self.headers.get("Transfer-Encoding") or not values:
            self._fail(411, "a Content-Length header is required (Transfer-Encoding is not supported)")
        elif len({v.strip() for v in values}) > 1:
            self._fail(400, f"conflicting Content-Length headers {values[:4]}")
        elif not (text.isascii() and text.isdigit()):
            self._fail(400, f"Content-Length must be a non-negative integer, got {text[:40]!r}")
        elif len(text) > 18 or int(text) > limit:
            self._fail(413, f"request body of {text[:40]} bytes exceeds the limit of {limit} bytes "
                       f"({limit / 2**20:g} MiB, the server's --max_body_mb); send fewer images per request "
                       "(config.reward.batch_size) or use remote_dtype='uint8'")
        elif int(text) == 0:
            self._fail(400, "empty request body; expected the JSON of rewards/remote.py")
        else:
            return int(text)
        return None

    def _read_body(self, length: int) -> bytearray | None:
        """The body, read within ``timeout`` seconds in all; else answers 408 (or sees the client gone): None.

        The buffer is allocated once at ``length`` (a growing one is copied and fragments the heap); that is
        bounded by ``max_body_bytes`` per decode slot.
        """
        timeout = self.server.limits.timeout
        deadline = time.monotonic() + timeout
        body = bytearray(length)
        view, done = memoryview(body), 0
        try:
            while done < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                count = self.rfile.readinto1(view[done:done + READ_CHUNK])
                if not count:
                    logger.info("client %s left after %d of %d body bytes", self.address_string(), done, length)
                    self.close_connection = True
                    return None
                done += count
        except TimeoutError:
            self.connection.settimeout(timeout)
            self._fail(408, f"the request body did not arrive within {timeout:g} s ({done} of {length} bytes)")
            return None
        finally:
            view.release()  # else ``body`` cannot be emptied by decode_request
        self.connection.settimeout(timeout)
        return body

    def _score(self, length: int) -> tuple[int, dict[str, Any]] | None:
        """``(code, payload)`` for a body of ``length`` bytes, holding a decode slot from reading to scoring."""
        server = self.server
        with server.slots:
            body = self._read_body(length)
            if body is None:
                return None
            try:
                images, prompts = decode_request(body)  # empties ``body``
            except ValueError as err:
                self.close_connection = True
                return 400, {"error": str(err)}
            try:
                with server.lock:
                    scores = server.reward_fn(images.to(server.device), prompts)
            except Exception as err:  # report any reward failure to the client, keep serving
                logger.exception("reward '%s' failed", server.reward_name)
                text = " ".join(str(err).split())[:300]
                return 500, {"error": f"reward '{server.reward_name}' failed: {type(err).__name__}: {text}"}
            return 200, {"scores": [float(s) for s in scores.float().cpu().tolist()]}

    def log_message(self, format: str, *args: Any) -> None:
        """Route http.server's access log to ``logging`` (debug level)."""
        logger.debug("%s - %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        """http.server's own complaints (e.g. a request that timed out) at info level."""
        logger.info("%s - %s", self.address_string(), format % args)


def make_server(
    reward_fn: RewardFn, name: str, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
    limits: ServerLimits | None = None,
) -> RewardServer:
    """A bound (not yet serving) server for ``reward_fn``; ``port=0`` picks a free port (see ``.url``)."""
    return RewardServer((host, port), reward_fn, name, torch.device(device), limits)


if __name__ == "__main__":  # the command line lives in rewards/server_cli.py
    from rewards.server_cli import main

    main()
