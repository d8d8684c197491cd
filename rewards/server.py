"""An HTTP server that hosts any registry reward for the ``remote`` reward (standard library only).

    python -m rewards.server --reward clip_score --port 8765 --device cuda:1
    python -m rewards.server --reward '{"clip_score": 1.0, "aesthetic": 0.1}' --preset sd14 \
        --option batch_size=32 --option dtype=float16

``--preset`` takes the ``config.reward`` section of a preset of ``config/stage_process.py`` as the reward
options; ``--option KEY=VALUE`` (repeatable; VALUE parsed as JSON when it parses) overrides single fields.
The wire format is documented in ``rewards/remote.py``. Requests are scored one at a time (the model is
shared); the server binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from rewards.common import RewardFn, parse_option_pairs
from rewards.remote import decode_request

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 30  # 1 GiB: far above any sane batch; protects the server from runaway requests


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward function (calls serialised by a lock)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward_fn: RewardFn, name: str, device: torch.device) -> None:
        super().__init__(address, RewardHandler)
        self.reward_fn = reward_fn
        self.reward_name = name
        self.device = device
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The score URL of this server (for ``config.reward.remote_url``)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"


class RewardHandler(BaseHTTPRequestHandler):
    """``GET /health`` and ``POST /score`` (see rewards/remote.py for the format)."""

    server: RewardServer

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """Health check: the hosted reward's name."""
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward_name})
        else:
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

    def do_POST(self) -> None:
        """Score a batch: decode, run the reward under the lock, answer the scores."""
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._send(400, {"error": f"Content-Length must be 1..{MAX_BODY_BYTES}, got {length}"})
            return
        try:
            images, prompts = decode_request(self.rfile.read(length))
        except ValueError as err:
            self._send(400, {"error": str(err)})
            return
        try:
            with self.server.lock:
                scores = self.server.reward_fn(images.to(self.server.device), prompts)
        except Exception as err:  # report any reward failure to the client, keep serving
            logger.exception("reward '%s' failed", self.server.reward_name)
            self._send(500, {"error": f"reward '{self.server.reward_name}' failed: {type(err).__name__}: {err}"})
            return
        self._send(200, {"scores": [float(s) for s in scores.float().cpu().tolist()]})

    def log_message(self, format: str, *args: Any) -> None:
        """Route http.server's access log to ``logging`` (debug level)."""
        logger.debug("%s - %s", self.address_string(), format % args)


def make_server(
    reward_fn: RewardFn, name: str, host: str = "127.0.0.1", port: int = 0, device: str = "cpu"
) -> RewardServer:
    """A bound (not yet serving) server for ``reward_fn``; ``port=0`` picks a free port (see ``.url``)."""
    return RewardServer((host, port), reward_fn, name, torch.device(device))


def _parse_options(preset: str, pairs: list[str]) -> dict[str, Any]:
    """Reward options from a config preset's ``reward`` section plus ``KEY=VALUE`` overrides."""
    options: dict[str, Any] = {}
    if preset:
        from config.stage_process import get_config

        options.update(get_config(preset).reward.to_dict())
    return {**options, **parse_option_pairs(pairs)}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, build the reward once and serve until interrupted."""
    from rewards.rewards import build_reward

    parser = argparse.ArgumentParser(prog="python -m rewards.server", description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help="a registry name or a JSON {name: weight} dict")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind (0 = any free port)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="", help="take config.reward of this preset as options (e.g. sd14)")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE reward option (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec: Any = json.loads(args.reward) if args.reward.lstrip().startswith("{") else args.reward
    try:
        options = _parse_options(args.preset, args.option)
        reward_fn = build_reward(spec, args.device, options)
    except (RuntimeError, ValueError) as err:
        logger.error("%s", err)
        sys.exit(2)
    name = args.reward if isinstance(spec, str) else "+".join(spec)
    server = make_server(reward_fn, name, args.host, args.port, args.device)
    logger.info("serving reward '%s' on %s (device %s)", name, server.url, args.device)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
