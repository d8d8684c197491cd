"""Tests for rewards/rewards.py (CPU, offline; CLIP uses a tiny randomly initialised model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewards import rewards as rw
from tests.reward_fixtures import save_tiny_clip

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Save a tiny random CLIPModel, a character-level CLIPTokenizer and a CLIPImageProcessor."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


PROMPTS = ["a red cat", "a blue dog", "a green tree", "a red cat", "yellow sun"]


def _images(n: int = 5, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def test_clip_score_tiny_model(tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel

    loads: list[object] = []
    original = CLIPModel.from_pretrained

    def counting(*args: object, **kwargs: object) -> CLIPModel:
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", counting)
    opts = {"clip_model": str(tiny_clip_dir)}
    unchunked = rw.build_reward("clip_score", CPU, opts)
    images = _images()
    scores = unchunked(images, PROMPTS)
    assert scores.shape == (5,)
    assert scores.dtype == torch.float32
    assert torch.all(scores >= -1) and torch.all(scores <= 1)
    assert torch.equal(scores, unchunked(images, PROMPTS))  # deterministic
    assert len(loads) == 1  # loaded once at build time, not per call

    chunked = rw.build_reward("clip_score", CPU, {**opts, "batch_size": 2})
    torch.testing.assert_close(chunked(images, PROMPTS), scores, atol=1e-5, rtol=0)

    same_image = images[:1].expand(3, -1, -1, -1)
    varied = unchunked(same_image, ["a red cat", "a blue dog", "purple rain over the sea"])
    assert len(set(varied.tolist())) == 3  # different prompts, different scores
    # A repeated prompt on the same image gives the same score (up to batch-size float noise).
    torch.testing.assert_close(unchunked(images[:1], ["a red cat"]), scores[:1], atol=1e-5, rtol=0)


def test_clip_score_matches_manual_reference(tiny_clip_dir: Path) -> None:
    """The reward equals a hand-computed cosine similarity using the saved processor mean/std."""
    from transformers import CLIPModel, CLIPTokenizer

    mean = torch.tensor([0.5, 0.4, 0.3])
    std = torch.tensor([0.2, 0.25, 0.3])
    pix = rw.preprocess_for_clip(torch.full((1, 3, 64, 80), 0.5), 32, mean, std)
    assert pix.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pix[0, :, 0, 0], (0.5 - mean) / std)

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    images, prompts = _images(2), ["a red cat", "blue"]
    enc = tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = rw.features(model.get_text_features(**enc))
        image = rw.features(
            model.get_image_features(pixel_values=rw.preprocess_for_clip(images, 32, mean, std))
        )
    expected = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    reward = rw.build_reward("clip_score", CPU, {"clip_model": str(tiny_clip_dir)})
    torch.testing.assert_close(reward(images, prompts), expected, atol=1e-5, rtol=0)


def test_clip_score_bfloat16(tiny_clip_dir: Path) -> None:
    opts = {"clip_model": str(tiny_clip_dir)}
    images = _images(3)
    ref = rw.build_reward("clip_score", CPU, opts)(images, PROMPTS[:3])
    low = rw.build_reward("clip_score", CPU, {**opts, "dtype": "bfloat16"})(images, PROMPTS[:3])
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0)


def _assert_clear_load_error(err: RuntimeError, model_id: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert f"'{model_id}'" in msg
    assert "network access" in msg and "config.reward.clip_model" in msg and "local directory" in msg


def test_clip_score_missing_local_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("clip_score", CPU, {"clip_model": missing})
    _assert_clear_load_error(info.value, missing)


def test_clip_score_empty_local_dir(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("clip_score", CPU, {"clip_model": str(tmp_path)})
    _assert_clear_load_error(info.value, str(tmp_path))


def test_clip_score_offline_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE only at import; the reward re-reads the environment itself,
    # so this fails fast instead of retrying network requests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "srrl-tests/no-such-clip-model"
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("clip_score", CPU, {"clip_model": model_id})
    _assert_clear_load_error(info.value, model_id)


def test_jpeg_noise_less_compressible_than_flat() -> None:
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    flat = torch.full((1, 3, 64, 64), 0.4)
    images = torch.cat([noise, flat])
    comp = rw.build_reward("jpeg_compressibility", CPU)(images, ["", ""])
    incomp = rw.build_reward("jpeg_incompressibility", CPU)(images, ["", ""])
    assert comp.dtype == torch.float32 and comp.shape == (2,)
    assert comp[0] < comp[1] < 0
    assert incomp[0] > incomp[1] > 0
    torch.testing.assert_close(comp, -incomp)


def test_brightness() -> None:
    images = torch.zeros(3, 3, 8, 8)
    images[1] = 1.0
    images[2, :, :4] = 1.0  # top half white
    out = rw.build_reward("brightness", CPU)(images, ["a", "b", "c"])
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.5]))


def _square(rgb: tuple[float, float, float], background: float = 0.0) -> torch.Tensor:
    img = torch.full((1, 3, 32, 32), background)
    img[0, :, 8:24, 8:24] = torch.tensor(rgb).view(3, 1, 1)
    return img


def test_colour_match() -> None:
    reward = rw.build_reward("colour_match", CPU)
    red = _square((0.95, 0.1, 0.05))
    out = reward(
        red.expand(4, -1, -1, -1), ["a red circle", "a blue circle", "a circle", "A RED, round thing"]
    )
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # Background is excluded only when dark: a red square on white covers a quarter of the image.
    on_white = reward(_square((1.0, 0.0, 0.0), background=1.0), ["red square"])
    torch.testing.assert_close(on_white, torch.tensor([0.25]))
    # First colour word wins; synonyms and achromatic words work; an all-black image scores 0.
    grey = _square((0.5, 0.5, 0.5))
    assert reward(grey, ["a grey cat, not blue"]).item() == 1.0
    assert reward(torch.zeros(1, 3, 8, 8), ["a red circle"]).item() == 0.0
    assert rw.prompt_colour("Bored cyan-ish fox") == "cyan"  # whole words only: not 'red' in 'bored'


def test_weighted_spec_is_weighted_sum() -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["red", "blue", "green", "none"]
    weighted = rw.build_reward({"brightness": 1.0, "jpeg_compressibility": 0.5, "colour_match": -2.0}, CPU)
    expected = (
        rw.build_reward("brightness", CPU)(images, prompts)
        + 0.5 * rw.build_reward("jpeg_compressibility", CPU)(images, prompts)
        - 2.0 * rw.build_reward("colour_match", CPU)(images, prompts)
    )
    out = weighted(images, prompts)
    assert out.dtype == torch.float32 and out.shape == (4,)
    torch.testing.assert_close(out, expected)


def test_unknown_reward_lists_known_names() -> None:
    known = rw.known_rewards()
    assert {"clip_score", "brightness", "colour_match", "jpeg_compressibility"} <= set(known)
    for spec in ("xyz", {"brightness": 1.0, "xyz": 2.0}):
        with pytest.raises(ValueError) as info:
            rw.build_reward(spec, CPU)
        assert str(info.value) == f"unknown reward 'xyz'; known rewards: {', '.join(known)}"


def test_register_custom_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rw, "REWARDS", dict(rw.REWARDS))

    @rw.register("constant")
    def _constant(device: torch.device, options: dict) -> rw.RewardFn:
        value = float(options.get("constant_value", 1.0))
        return lambda images, prompts: torch.full((images.shape[0],), value, dtype=torch.float64)

    assert "constant" in rw.known_rewards()
    out = rw.build_reward("constant", "cpu", {"constant_value": 3.0})(torch.zeros(2, 3, 4, 4), ["a", "b"])
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError):
        rw.register("constant")(_constant)


def test_prompt_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        rw.build_reward("brightness", CPU)(torch.zeros(2, 3, 4, 4), ["a"])


def test_import_is_cheap() -> None:
    code = "import sys, rewards.rewards; assert 'transformers' not in sys.modules, 'transformers imported'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
