"""The command line of the reward server: ``python -m rewards.server`` (see rewards/server.py for the usage).

Parses the flags into a reward spec, reward options and :class:`rewards.server.ServerLimits`, binds before the
reward model is loaded (a port in use fails at once), and turns every user error into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import socket
import sys
from typing import Any, NoReturn

import torch

from rewards import server as reward_server
from rewards.common import parse_option_pairs
from rewards.server import DEFAULT_MAX_BODY_MB, RewardServer, ServerLimits, make_server, unmap_large_buffers
from srrl.errors import ConfigError, LoadError

logger = logging.getLogger(__name__)


def _parse_options(preset: str, pairs: list[str]) -> dict[str, Any]:
    """Reward options from a config preset's ``reward`` section plus ``KEY=VALUE`` overrides."""
    options: dict[str, Any] = {}
    if preset:
        from config.stage_process import get_config

        options.update(get_config(preset).reward.to_dict())
    return {**options, **parse_option_pairs(pairs)}


def _reward_spec(text: str) -> str | dict[str, float]:
    """A registry name, or the ``{name: weight}`` dict of a JSON ``--reward``; ConfigError if malformed."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--reward {text[:80]!r} is not valid JSON ({err.msg} at column {err.colno}); "
                          "expected a name or e.g. '{\"clip_score\": 1.0}'") from None
    if not isinstance(spec, dict) or not spec or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in spec.values()):
        raise ConfigError(f"--reward {text[:80]!r}: expected a non-empty JSON object of {{name: weight}}")
    return {str(k): float(w) for k, w in spec.items()}


def bind_error(host: str, port: int, err: OSError) -> LoadError:
    """The one-line error of a server that cannot listen on ``host:port``."""
    where = f"cannot listen on {host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return LoadError(f"{where}: the port is in use (another reward server?); pick another --port or stop it")
    if err.errno == errno.EADDRNOTAVAIL:
        return LoadError(f"{where}: {host} is not an address of this machine; use --host 127.0.0.1 (local) "
                         "or --host 0.0.0.0 (all interfaces)")
    if err.errno == errno.EACCES:
        return LoadError(f"{where}: permission denied (ports below 1024 need privileges); use a --port >= 1024")
    if isinstance(err, socket.gaierror):
        return LoadError(f"{where}: unknown host {host!r} ({err.strerror}); use an address of this machine")
    return LoadError(f"{where}: {err.strerror or err}")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit code 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        """Log ``message`` as one line and exit 2."""
        _exit_error(f"{self.prog}: {message} (see --help)")


def _exit_error(message: str) -> NoReturn:
    """Log a user error as one line and exit with code 2."""
    logger.error("%s", " ".join(str(message).split()))
    sys.exit(2)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line (one-line errors)."""
    parser = _Parser(prog="python -m rewards.server", description=(reward_server.__doc__ or "").splitlines()[0])
    parser.add_argument("--reward", required=True, help="a registry name or a JSON {name: weight} dict")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind (0 = any free port)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="", help="take config.reward of this preset as options (e.g. sd14)")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE reward option (repeatable)")
    parser.add_argument("--max_body_mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help="largest request body in MiB (default: one float32 SDXL batch of 16, with headroom)")
    parser.add_argument("--timeout", type=float, default=ServerLimits.timeout,
                        help="seconds a client may stay silent (and a body may take to arrive)")
    parser.add_argument("--max_connections", type=int, default=ServerLimits.max_connections,
                        help="connections served at once; more wait in the listen backlog")
    parser.add_argument("--decode_slots", type=int, default=ServerLimits.decode_slots,
                        help="requests holding a body (read, decoded, scored) at once; bounds the memory")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is out of range; expected 0..65535 (0 = any free port)")
    return args


def _serve(server: RewardServer) -> None:
    """Serve until interrupted, then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, bind, build the reward once and serve until interrupted; user errors exit 2."""
    from rewards.rewards import build_reward

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _arguments(argv)
    try:
        spec = _reward_spec(args.reward)
        options = _parse_options(args.preset, args.option)
        limits = ServerLimits(int(args.max_body_mb * 2**20), args.timeout, args.max_connections,
                              args.decode_slots).check()
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        _exit_error(str(err))
    name = spec if isinstance(spec, str) else "+".join(spec)
    try:
        server = make_server(_not_loaded, name, args.host, args.port, args.device, limits)
    except (OSError, OverflowError) as err:
        _exit_error(str(bind_error(args.host, args.port, err)) if isinstance(err, OSError) else str(err))
    except (ValueError, RuntimeError) as err:  # e.g. a --device torch does not know
        _exit_error(f"--device {args.device!r}: {err}")
    try:
        server.reward_fn = build_reward(spec, args.device, options)
    except (ValueError, RuntimeError, TypeError) as err:
        server.server_close()
        _exit_error(str(err))
    unmap_large_buffers()
    logger.info("serving reward '%s' on %s (device %s)", name, server.url, args.device)
    _serve(server)


def _not_loaded(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The reward of a server whose model is still loading (never served: serving starts after loading)."""
    raise RuntimeError("the reward is still loading")
