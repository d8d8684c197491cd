"""The ``remote`` reward: score images on an HTTP reward server (``python -m rewards.server``).

Wire format (JSON both ways, UTF-8):

* ``POST <remote_url>`` (default ``http://127.0.0.1:8765/score``) with the body
  ``{"prompts": [str, ...], "shape": [B, 3, H, W], "dtype": "uint8" | "float32", "images": "<base64>"}``
  where ``images`` is the base64 of the raw C-order (NCHW) little-endian bytes of the image tensor:
  ``uint8`` holds ``round(255 * x)`` (what a PNG would carry, 4x smaller; the default) and ``float32`` the
  values in ``[0, 1]`` exactly.
* The answer is ``200 {"scores": [float, ...]}``, or ``4xx/5xx {"error": "<one line>"}``.
* ``GET <scheme>://<host>:<port>/health`` answers ``{"status": "ok", "reward": "<name>"}``.

The client checks ``/health`` when the reward is built, so a server that is down fails the run at start-up,
not after a stage of sampling. Connection failures and timeouts are retried ``remote_retries`` times with
exponential back-off; HTTP errors are not retried (the server answered).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rewards.common import RewardFn, option_batch_size

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8765/score"
WIRE_DTYPES = {"uint8": np.dtype("uint8"), "float32": np.dtype("<f4")}
RETRY_DELAY_S = 0.5  # first back-off; doubles per retry, at most 8 s


def encode_request(images: torch.Tensor, prompts: list[str], dtype: str = "uint8") -> bytes:
    """The JSON request body for ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` and their prompts."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"remote dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    x = images.detach().float().clamp(0, 1).cpu()
    if dtype == "uint8":
        x = (x * 255).round().to(torch.uint8)
    raw = np.ascontiguousarray(x.numpy().astype(WIRE_DTYPES[dtype], copy=False)).tobytes()
    body = {"prompts": list(prompts), "shape": list(images.shape), "dtype": dtype,
            "images": base64.b64encode(raw).decode("ascii")}
    return json.dumps(body).encode("utf-8")


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """Images ``FloatTensor[B, 3, H, W]`` in ``[0, 1]`` and prompts of a request body; ValueError if malformed."""
    try:
        data = json.loads(body.decode("utf-8"))
        prompts, shape, dtype = data["prompts"], [int(s) for s in data["shape"]], str(data["dtype"])
        raw = base64.b64decode(data["images"], validate=True)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed request: {type(err).__name__}: {err}") from None
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise ValueError(f"shape must be [B, 3, H, W] with positive sizes, got {shape}")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != shape[0]:
        raise ValueError(f"prompts must be a list of {shape[0]} strings")
    expected = int(np.prod(shape)) * WIRE_DTYPES[dtype].itemsize
    if len(raw) != expected:
        raise ValueError(f"images hold {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(raw, dtype=WIRE_DTYPES[dtype]).reshape(shape)
    images = torch.from_numpy(array.astype(np.float32))
    return (images / 255.0 if dtype == "uint8" else images), prompts


def health_url(url: str) -> str:
    """``<scheme>://<host>:<port>/health`` of a score URL."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))


def request_json(url: str, body: bytes | None, timeout: float, retries: int) -> Any:
    """GET (``body`` None) or POST JSON to ``url``; retries connection failures; one-line RuntimeErrors."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(RETRY_DELAY_S * 2 ** (attempt - 1), 8.0))
        request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (json.JSONDecodeError, AttributeError):
                pass
            raise RuntimeError(f"remote reward server {url} answered HTTP {err.code}: {detail.strip()[:300]}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            last = err.reason if isinstance(err, urllib.error.URLError) else err
            logger.warning("remote reward %s: attempt %d/%d failed: %s", url, attempt + 1, retries + 1, last)
    if isinstance(last, TimeoutError):
        why = f"timed out after {timeout:g} s"
    else:
        why = f"is not reachable ({type(last).__name__}: {last})"
    raise RuntimeError(
        f"remote reward server {url} {why} ({retries + 1} attempt(s)); start one with "
        "`python -m rewards.server --reward NAME --port PORT` or set config.reward.remote_url "
        "(raise config.reward.remote_timeout for slow rewards)"
    )


def load_remote(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """The ``remote`` reward function: posts ``options.batch_size`` images per request to ``options.remote_url``.

    Options: ``remote_url``, ``remote_timeout`` (seconds per request, default 120), ``remote_retries``
    (default 2), ``remote_dtype`` (``uint8`` or ``float32``, default ``uint8``), ``batch_size``.
    """
    url = str(options.get("remote_url", DEFAULT_URL))
    timeout = float(options.get("remote_timeout", 120.0))
    retries = int(options.get("remote_retries", 2))
    dtype = str(options.get("remote_dtype", "uint8"))
    batch_size = option_batch_size(options, "remote")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"config.reward.remote_dtype={dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")
    if timeout <= 0 or retries < 0:
        raise ValueError("config.reward.remote_timeout must be > 0 and remote_retries >= 0")
    info = request_json(health_url(url), None, timeout, retries)
    logger.info("remote reward server %s hosts '%s'", url, info.get("reward") if isinstance(info, dict) else info)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores: list[float] = []
        for start in range(0, images.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            answer = request_json(url, encode_request(images[rows], prompts[rows], dtype), timeout, retries)
            chunk = answer.get("scores") if isinstance(answer, dict) else None
            if not isinstance(chunk, list) or len(chunk) != len(prompts[rows]):
                raise RuntimeError(f"remote reward server {url} sent a malformed answer: {str(answer)[:200]}")
            scores.extend(float(s) for s in chunk)
        return torch.tensor(scores, dtype=torch.float32)

    return fn
