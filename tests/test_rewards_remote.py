"""The ``remote`` reward against the shipped server (rewards/server.py) on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rewards import rewards as rw
from rewards.remote import decode_request, encode_request
from rewards.server import RewardServer, ServerLimits, make_server
from srrl.errors import ConfigError, LoadError
from tests.reward_fixtures import serve

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square", "a blue circle", "a green ring", "a yellow triangle", "a grey cat"]


def _serve(reward_fn: rw.RewardFn, name: str) -> Iterator[RewardServer]:
    yield from serve(reward_fn, name)


@pytest.fixture
def colour_server() -> Iterator[RewardServer]:
    yield from _serve(rw.build_reward({"colour_match": 1.0, "brightness": 0.5}, CPU), "colour_match+brightness")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 12, 10, generator=torch.Generator().manual_seed(4))


def test_wire_format_round_trip() -> None:
    images = _images(3)
    exact, prompts = decode_request(encode_request(images, PROMPTS[:3], "float32"))
    assert torch.equal(exact, images) and prompts == PROMPTS[:3]
    quantised, _ = decode_request(encode_request(images, PROMPTS[:3]))
    torch.testing.assert_close(quantised, (images * 255).round() / 255)
    for body in (b"{}", b"not json", encode_request(images, PROMPTS[:2])):
        with pytest.raises(ValueError):
            decode_request(body)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_remote_matches_local(colour_server: RewardServer, dtype: str) -> None:
    images = _images()
    local = rw.build_reward({"colour_match": 1.0, "brightness": 0.5}, CPU)
    remote = rw.build_reward("remote", CPU, {"remote_url": colour_server.url, "remote_dtype": dtype, "batch_size": 2})
    scores = remote(images, PROMPTS)  # 5 images in requests of 2, 2, 1
    assert scores.shape == (5,) and scores.dtype == torch.float32
    expected = local(images, PROMPTS) if dtype == "float32" else local((images * 255).round() / 255, PROMPTS)
    torch.testing.assert_close(scores, expected)
    weighted = rw.build_reward({"remote": 2.0, "brightness": 1.0}, CPU, {"remote_url": colour_server.url})
    torch.testing.assert_close(weighted(images, PROMPTS), 2 * remote(images, PROMPTS) + images.mean(dim=(1, 2, 3)),
                               atol=1e-2, rtol=0)


def test_server_rejects_bad_requests(colour_server: RewardServer) -> None:
    request = urllib.request.Request(colour_server.url, data=b'{"prompts": []}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "malformed request" in json.loads(info.value.read())["error"]
    with urllib.request.urlopen(colour_server.url.replace("/score", "/health"), timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok", "reward": "colour_match+brightness",
                                               "max_body_bytes": 320 << 20}


def test_reward_failure_is_reported_not_fatal() -> None:
    def broken(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise ValueError("model exploded")

    for server in _serve(broken, "broken"):
        remote = rw.build_reward("remote", CPU, {"remote_url": server.url})
        with pytest.raises(LoadError, match="HTTP 500: reward 'broken' failed: ValueError: model exploded"):
            remote(_images(1), PROMPTS[:1])


def test_server_down_is_one_clear_line() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/score"
    start = time.monotonic()
    with pytest.raises(LoadError) as info:
        rw.build_reward("remote", CPU, {"remote_url": url, "remote_retries": 1})
    msg = str(info.value)
    assert "\n" not in msg and "is not reachable" in msg and "(2 attempt(s))" in msg and f"127.0.0.1:{port}" in msg
    assert f"`python -m rewards.server --reward NAME --port {port}`" in msg and "config.reward.remote_url" in msg
    assert time.monotonic() - start < 5


def test_timeout_is_one_clear_line() -> None:
    def slow(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        time.sleep(1.5)
        return images.mean(dim=(1, 2, 3))

    for server in _serve(slow, "slow"):
        remote = rw.build_reward("remote", CPU, {"remote_url": server.url, "remote_timeout": 0.3, "remote_retries": 0})
        with pytest.raises(LoadError) as info:
            remote(_images(1), PROMPTS[:1])
        assert "\n" not in str(info.value) and "timed out after 0.3 s" in str(info.value)


class FakeHandler(BaseHTTPRequestHandler):
    """A server that is not a reward server: ``answers[path]`` is ``(code, body)``, or None to hang up."""

    answers: dict[str, tuple[int, bytes] | None] = {}

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = self.answers.get(self.path, (404, b"nope"))
        if answer is None:
            return  # close without an answer
        self.send_response(answer[0])
        self.send_header("Content-Length", str(len(answer[1])))
        self.end_headers()
        self.wfile.write(answer[1])

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("health", "score", "expected"), [
    ((200, b"<html>hi</html>"), None, "sent a malformed answer (not JSON)"),
    ((200, b'{"status": "maybe"}'), None, "/health answered"),
    ((200, b'{"status": "ok"}'), (200, b"scores?"), "sent a malformed answer (not JSON)"),
    ((200, b'{"status": "ok"}'), (200, b'{"scores": [1.0]}'), "malformed answer (expected 2 scores)"),
    ((200, b'{"status": "ok"}'), (200, b'{"scores": ["a", "b"]}'), "malformed answer (expected 2 scores)"),
    ((200, b'{"status": "ok"}'), (503, b'{"error": "busy"}'), "answered HTTP 503: busy"),
    ((200, b'{"status": "ok"}'), "hang up", "is not reachable (RemoteDisconnected"),
    ((500, b"oops"), None, "answered HTTP 500: oops"),
])
def test_every_client_failure_is_a_load_error(health: tuple, score: object, expected: str) -> None:
    FakeHandler.answers = {"/health": health, "/score": None if score == "hang up" else score}
    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
    threading.Thread(target=fake.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{fake.server_address[1]}/score"
    try:
        with pytest.raises(LoadError) as info:
            remote = rw.build_reward("remote", CPU, {"remote_url": url, "remote_retries": 1})
            remote(_images(2), PROMPTS[:2])
        assert expected in str(info.value) and url.rsplit("/", 1)[0] in str(info.value)
        assert "\n" not in str(info.value)
    finally:
        fake.shutdown()
        fake.server_close()


def test_request_over_the_server_limit_is_refused_before_sending() -> None:
    server = make_server(rw.build_reward("brightness", CPU), "brightness", limits=ServerLimits(max_body_bytes=2000))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        remote = rw.build_reward("remote", CPU, {"remote_url": server.url, "remote_dtype": "float32"})
        assert remote(_images(1)[:, :, :4, :4], PROMPTS[:1]).shape == (1,)
        with pytest.raises(LoadError, match=r"at most 2000 bytes .* this one has \d+; .*--max_body_mb"):
            remote(_images(2), PROMPTS[:2])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("options", [{"remote_url": "localhost:8765"}, {"remote_url": "http://h:99999/score"},
                                     {"remote_dtype": "float16"}, {"remote_timeout": "soon"},
                                     {"remote_retries": -1}])
def test_bad_remote_options_are_config_errors(options: dict) -> None:
    with pytest.raises(ConfigError, match="config.reward.remote_"):
        rw.build_reward("remote", CPU, options)


def test_server_command_line() -> None:
    """``python -m rewards.server --reward brightness --port P`` serves until terminated."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--reward", "brightness", "--port", str(port),
                             "--option", "batch_size=4"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        remote = None
        deadline = time.monotonic() + 120  # importing torch takes seconds, more on a loaded machine
        while time.monotonic() < deadline:
            try:
                remote = rw.build_reward("remote", CPU, {"remote_url": f"http://127.0.0.1:{port}/score",
                                                         "remote_retries": 0, "remote_timeout": 5})
                break
            except RuntimeError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.2)
        assert remote is not None, "server did not come up"
        images = _images(3)
        torch.testing.assert_close(remote(images, PROMPTS[:3]), ((images * 255).round() / 255).mean(dim=(1, 2, 3)))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "rewards.server", "--reward", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown reward 'nope'" in bad.stderr
