"""The ``remote`` reward: score images on an HTTP reward server (``python -m rewards.server``).

Wire format (JSON both ways, UTF-8):

* ``POST <remote_url>`` (default ``http://127.0.0.1:8765/score``) with a ``Content-Length`` and the body
  ``{"prompts": [str, ...], "shape": [B, 3, H, W], "dtype": "uint8" | "float32", "images": "<base64>"}``
  where ``images`` is the base64 of the raw C-order (NCHW) little-endian bytes of the image tensor:
  ``uint8`` holds ``round(255 * x)`` (what a PNG would carry, 4x smaller; the default) and ``float32`` the
  values in ``[0, 1]`` exactly. The encoded body is ``4/3 * B*3*H*W * itemsize`` bytes plus the prompts.
* The answer is ``200 {"scores": [float, ...]}``, or ``4xx/5xx {"error": "<one line>"}``.
* ``GET <scheme>://<host>:<port>/health`` answers ``{"status": "ok", "reward": "<name>", "max_body_bytes": N}``
  (``N``: the largest request body the server accepts; bigger ones are refused with HTTP 413).

The client checks ``/health`` when the reward is built, so a server that is down fails the run at start-up,
not after a stage of sampling. Connection failures and timeouts are retried ``remote_retries`` times with
exponential back-off; HTTP errors are not retried (the server answered). Every failure of the client is a
one-line :class:`srrl.errors.LoadError` naming the URL; a bad ``config.reward.remote_*`` value is a
:class:`srrl.errors.ConfigError`.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rewards.common import RewardFn, option_batch_size
from srrl.errors import ConfigError, LoadError

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8765/score"
WIRE_DTYPES = {"uint8": np.dtype("uint8"), "float32": np.dtype("<f4")}
REQUEST_FIELDS = ("prompts", "shape", "dtype", "images")
RETRY_DELAY_S = 0.5  # first back-off; doubles per retry, at most 8 s
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def encode_request(images: torch.Tensor, prompts: list[str], dtype: str = "uint8") -> bytes:
    """The JSON request body for ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` and their prompts."""
    if dtype not in WIRE_DTYPES:
        raise ConfigError(f"remote dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    x = images.detach().float().clamp(0, 1).cpu()
    if dtype == "uint8":
        x = (x * 255).round().to(torch.uint8)
    raw = np.ascontiguousarray(x.numpy().astype(WIRE_DTYPES[dtype], copy=False)).tobytes()
    body = {"prompts": list(prompts), "shape": list(images.shape), "dtype": dtype,
            "images": base64.b64encode(raw).decode("ascii")}
    return json.dumps(body).encode("utf-8")


def _malformed(why: str) -> ValueError:
    """The one-line ValueError of a request body that cannot be decoded."""
    return ValueError(f"malformed request: {why}")


def _parse_json(text: str) -> dict[str, Any]:
    """The JSON object of a request body; ValueError for invalid, too deeply nested or non-object JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _malformed(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise _malformed("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise _malformed(f"expected a JSON object with {', '.join(REQUEST_FIELDS)}, got a {type(data).__name__}")
    return data


def _request_fields(data: dict[str, Any]) -> tuple[list[str], list[int], str, str]:
    """Checked ``(prompts, shape, dtype, images)`` of a request object; ``images`` is popped off ``data``."""
    missing = [key for key in REQUEST_FIELDS if key not in data]
    if missing:
        raise _malformed(f"missing field(s) {', '.join(missing)}; expected {', '.join(REQUEST_FIELDS)}")
    prompts, shape, dtype = data["prompts"], data["shape"], data["dtype"]
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise _malformed(f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {str(dtype)[:40]!r}")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            or shape[1] != 3 or min(shape) < 1):
        raise _malformed(f"shape must be [B, 3, H, W] of positive integers, got {str(shape)[:80]}")
    if not isinstance(prompts, list) or len(prompts) != shape[0] or not all(isinstance(p, str) for p in prompts):
        raise _malformed(f"prompts must be a list of {shape[0]} strings (one per image)")
    images = data.pop("images")
    if not isinstance(images, str):
        raise _malformed(f"images must be a base64 string, got a {type(images).__name__}")
    return prompts, shape, dtype, images


def _b64decode(text: str) -> bytes:
    """Strict base64 decoding of an ASCII ``str`` without an intermediate bytes copy (Python >= 3.11)."""
    try:
        if sys.version_info >= (3, 11):
            return binascii.a2b_base64(text, strict_mode=True)
        return base64.b64decode(text, validate=True)
    except ValueError as err:  # binascii.Error, or a non-ASCII string
        raise _malformed(f"images is not valid base64 ({err})") from None


def decode_request(body: bytes | bytearray) -> tuple[torch.Tensor, list[str]]:
    """Images ``FloatTensor[B, 3, H, W]`` in ``[0, 1]`` and prompts of a request body; ValueError if malformed.

    Each copy is dropped as soon as the next one exists, so the peak is about twice the body (the body as text
    plus the images string while JSON is parsed); a ``bytearray`` body is emptied once it has been read (how
    the server keeps one copy of a large request, not two). The decoded float32 images add ``3/4`` of the body
    (``float32`` on the wire) or ``3`` times it (``uint8``).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _malformed(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    if isinstance(body, bytearray):
        body.clear()
    data = _parse_json(text)
    del text
    prompts, shape, dtype, b64 = _request_fields(data)
    del data
    expected = math.prod(shape) * WIRE_DTYPES[dtype].itemsize
    if len(b64) != 4 * math.ceil(expected / 3):
        raise _malformed(f"images hold {len(b64)} base64 characters; shape {shape} of {dtype} needs "
                         f"{4 * math.ceil(expected / 3)} ({expected} bytes)")
    raw = _b64decode(b64)
    del b64
    if len(raw) != expected:
        raise _malformed(f"images hold {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    images = torch.from_numpy(np.frombuffer(raw, dtype=WIRE_DTYPES[dtype]).reshape(shape).astype(np.float32))
    return (images.div_(255.0) if dtype == "uint8" else images), prompts


def health_url(url: str) -> str:
    """``<scheme>://<host>:<port>/health`` of a score URL."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))


def _http_error_detail(err: urllib.error.HTTPError) -> str:
    """The ``error`` of a JSON error answer (else its text), shortened to one line."""
    try:
        detail = err.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return err.reason if isinstance(err.reason, str) else ""
    try:
        detail = str(json.loads(detail).get("error", detail))
    except (ValueError, AttributeError):
        pass
    return " ".join(detail.split())[:300]


def _request_once(url: str, body: bytes | None, timeout: float) -> Any:
    """One GET (``body`` None) or POST; the decoded JSON answer (LoadError if it is not JSON)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LoadError(f"remote reward server {url} sent a malformed answer (not JSON): "
                        f"{text[:120].decode('utf-8', 'replace')!r}; is a `python -m rewards.server` "
                        "listening there?") from None


def _start_hint(url: str) -> str:
    """How to start a server for ``url``: the command line with its port (and ``--host`` when not local)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "127.0.0.1"
    where = "" if host in LOOPBACK_HOSTS else f" on {host}"
    extra = "" if host in LOOPBACK_HOSTS else " --host 0.0.0.0"
    return f"start one{where} with `python -m rewards.server --reward NAME --port {port}{extra}`"


def request_json(url: str, body: bytes | None, timeout: float, retries: int) -> Any:
    """GET (``body`` None) or POST JSON to ``url``; retries connection failures; every failure a LoadError."""
    last: BaseException | str | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(RETRY_DELAY_S * 2 ** (attempt - 1), 8.0))
        try:
            return _request_once(url, body, timeout)
        except urllib.error.HTTPError as err:
            raise LoadError(f"remote reward server {url} answered HTTP {err.code}: {_http_error_detail(err)}") from None
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut-off answer
            last = err.reason if isinstance(err, urllib.error.URLError) else err
            logger.warning("remote reward %s: attempt %d/%d failed: %s", url, attempt + 1, retries + 1, last)
    if isinstance(last, TimeoutError):
        raise LoadError(
            f"remote reward server {url} timed out after {timeout:g} s ({retries + 1} attempt(s)); raise "
            "config.reward.remote_timeout for slow rewards or lower config.reward.batch_size"
        )
    why = f"{type(last).__name__}: {' '.join(str(last).split())}" if isinstance(last, BaseException) else last
    raise LoadError(
        f"remote reward server {url} is not reachable ({why}) ({retries + 1} attempt(s)); {_start_hint(url)} "
        "or set config.reward.remote_url to a running one"
    )


def _remote_options(options: Mapping[str, Any]) -> tuple[str, float, int, str]:
    """``(url, timeout, retries, dtype)`` of the ``remote_*`` options; ConfigError for a bad value."""
    url = str(options.get("remote_url", DEFAULT_URL))
    try:
        parts = urllib.parse.urlsplit(url)
        ok_url = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
        timeout = float(options.get("remote_timeout", 120.0))
        retries = int(options.get("remote_retries", 2))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.reward.remote_url/remote_timeout/remote_retries: bad value ({err})") from None
    if not ok_url:
        raise ConfigError(f"config.reward.remote_url={url!r}; expected http://HOST:PORT/score")
    if not timeout > 0 or retries < 0:
        raise ConfigError(f"config.reward.remote_timeout={timeout:g} must be > 0 and remote_retries={retries} >= 0")
    dtype = str(options.get("remote_dtype", "uint8"))
    if dtype not in WIRE_DTYPES:
        raise ConfigError(f"config.reward.remote_dtype={dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")
    return url, timeout, retries, dtype


def _scores(answer: Any, count: int, url: str) -> list[float]:
    """The ``count`` scores of a score answer; LoadError if the answer does not hold them."""
    chunk = answer.get("scores") if isinstance(answer, dict) else None
    try:
        if isinstance(chunk, list) and len(chunk) == count:
            return [float(s) for s in chunk]
    except (TypeError, ValueError):
        pass
    raise LoadError(f"remote reward server {url} sent a malformed answer (expected {count} scores): "
                    f"{' '.join(str(answer).split())[:200]}")


def load_remote(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """The ``remote`` reward function: posts ``options.batch_size`` images per request to ``options.remote_url``.

    Options: ``remote_url``, ``remote_timeout`` (seconds per request, default 120), ``remote_retries``
    (default 2), ``remote_dtype`` (``uint8`` or ``float32``, default ``uint8``), ``batch_size``.
    """
    url, timeout, retries, dtype = _remote_options(options)
    batch_size = option_batch_size(options, "remote")
    info = request_json(health_url(url), None, timeout, retries)
    if not isinstance(info, dict) or info.get("status") != "ok":
        raise LoadError(f"remote reward server {url}: /health answered {str(info)[:120]!r}, not a reward server's "
                        "status; is a `python -m rewards.server` listening there?")
    limit = info.get("max_body_bytes")
    logger.info("remote reward server %s hosts '%s'", url, info.get("reward"))

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores: list[float] = []
        for start in range(0, images.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            body = encode_request(images[rows], prompts[rows], dtype)
            if isinstance(limit, int) and len(body) > limit:
                raise LoadError(
                    f"remote reward server {url} accepts request bodies of at most {limit} bytes "
                    f"({limit / 2**20:.1f} MiB), this one has {len(body)}; lower config.reward.batch_size "
                    f"(now {batch_size}), use config.reward.remote_dtype='uint8', or start the server with a "
                    "larger --max_body_mb"
                )
            scores.extend(_scores(request_json(url, body, timeout, retries), len(prompts[rows]), url))
        return torch.tensor(scores, dtype=torch.float32)

    return fn
