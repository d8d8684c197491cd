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
from pathlib import Path

import pytest
import torch

from rewards import rewards as rw
from rewards.remote import decode_request, encode_request
from rewards.server import RewardServer, make_server

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square", "a blue circle", "a green ring", "a yellow triangle", "a grey cat"]


def _serve(reward_fn: rw.RewardFn, name: str) -> Iterator[RewardServer]:
    server = make_server(reward_fn, name, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


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
        assert json.loads(response.read()) == {"status": "ok", "reward": "colour_match+brightness"}


def test_reward_failure_is_reported_not_fatal() -> None:
    def broken(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise ValueError("model exploded")

    for server in _serve(broken, "broken"):
        remote = rw.build_reward("remote", CPU, {"remote_url": server.url})
        with pytest.raises(RuntimeError, match="HTTP 500: reward 'broken' failed: ValueError: model exploded"):
            remote(_images(1), PROMPTS[:1])


def test_server_down_is_one_clear_line() -> None:
    url = f"http://127.0.0.1:{_free_port()}/score"
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("remote", CPU, {"remote_url": url, "remote_retries": 1})
    msg = str(info.value)
    assert "\n" not in msg and "is not reachable" in msg and "(2 attempt(s))" in msg
    assert "python -m rewards.server" in msg and "config.reward.remote_url" in msg
    assert time.monotonic() - start < 5


def test_timeout_is_one_clear_line() -> None:
    def slow(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        time.sleep(1.5)
        return images.mean(dim=(1, 2, 3))

    for server in _serve(slow, "slow"):
        remote = rw.build_reward("remote", CPU, {"remote_url": server.url, "remote_timeout": 0.3, "remote_retries": 0})
        with pytest.raises(RuntimeError) as info:
            remote(_images(1), PROMPTS[:1])
        assert "\n" not in str(info.value) and "timed out after 0.3 s" in str(info.value)


def test_server_command_line() -> None:
    """``python -m rewards.server --reward brightness --port P`` serves until terminated."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--reward", "brightness", "--port", str(port),
                             "--option", "batch_size=4"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        remote = None
        for _ in range(100):  # the server needs a few seconds to import torch
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
