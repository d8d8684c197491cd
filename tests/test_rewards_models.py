"""PickScore, the aesthetic predictor and the packaged rewards on tiny random models (CPU, offline)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rewards import rewards as rw
from rewards.clip_family import AestheticMLP, preprocess_for_clip
from tests.reward_fixtures import (
    TINY_MEAN,
    TINY_STD,
    fake_hps_checkpoint,
    install_fake_packages,
    save_tiny_clip,
    save_tiny_mlp,
    save_tiny_processor,
    save_tiny_tokenizer,
    tiny_mlp_state,
    tokenize,
)

CPU = torch.device("cpu")
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a red cat", "yellow sun"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CLIP with everything, a model-only CLIP (PickScore layout), its processor folder and an MLP file."""
    root = tmp_path_factory.mktemp("tiny_rewards")
    processor = root / "processor"
    save_tiny_tokenizer(processor)
    save_tiny_processor(processor)
    return {
        "clip": save_tiny_clip(root / "clip"),
        "model_only": save_tiny_clip(root / "model_only", seed=5, tokenizer=False, processor=False),
        "processor": processor,
        "mlp": save_tiny_mlp(root / "mlp.safetensors"),
    }


@pytest.fixture
def fake_packages(dirs: dict[str, Path]) -> Iterator[None]:
    yield from install_fake_packages(dirs["processor"])


def _images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


def _check_batched(spec: str, options: dict, n: int = 5) -> torch.Tensor:
    """Shape/dtype/determinism, and batch size 2 (5 = 2+2+1) equals one batch; returns the scores."""
    images, prompts = _images(n), PROMPTS[:n]
    whole = rw.build_reward(spec, CPU, {**options, "batch_size": 16})
    scores = whole(images, prompts)
    assert scores.shape == (n,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, whole(images, prompts))
    chunked = rw.build_reward(spec, CPU, {**options, "batch_size": 2})(images, prompts)
    torch.testing.assert_close(chunked, scores, atol=1e-5, rtol=1e-5)
    return scores


def _clip_reference(model_dir: Path, tokenizer_dir: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``logit_scale * cosine`` computed by hand with the tiny processor's mean/std."""
    from transformers import CLIPModel, CLIPTokenizer

    mean, std = TINY_MEAN, TINY_STD
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pixels = preprocess_for_clip(images, 32, torch.tensor(mean), torch.tensor(std))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokenize(tokenizer, prompts)).pooler_output
    return model.logit_scale.exp() * F.cosine_similarity(image, text, dim=-1)


def test_pickscore_model_and_processor_from_separate_folders(dirs: dict[str, Path]) -> None:
    options = {"pickscore_model": str(dirs["model_only"]), "pickscore_processor": str(dirs["processor"])}
    scores = _check_batched("pickscore", options)
    expected = _clip_reference(dirs["model_only"], dirs["processor"], _images(), PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def test_pickscore_is_scaled_clip_score(dirs: dict[str, Path]) -> None:
    """Both rewards run the same embedding path; PickScore multiplies by the model's logit scale."""
    path = str(dirs["clip"])
    pick = rw.build_reward("pickscore", CPU, {"pickscore_model": path, "pickscore_processor": path})
    clip = rw.build_reward("clip_score", CPU, {"clip_model": path})
    images = _images()
    scale = torch.tensor(2.6592).exp()  # CLIPConfig's default logit_scale_init_value
    torch.testing.assert_close(pick(images, PROMPTS), clip(images, PROMPTS) * scale, atol=1e-4, rtol=1e-4)


def test_aesthetic_matches_manual_mlp(dirs: dict[str, Path]) -> None:
    from transformers import CLIPModel

    options = {"aesthetic_clip_model": str(dirs["clip"]), "aesthetic_mlp": str(dirs["mlp"])}
    scores = _check_batched("aesthetic", options)
    model = CLIPModel.from_pretrained(dirs["clip"]).eval()
    mlp = AestheticMLP(16).eval()
    mlp.load_state_dict(tiny_mlp_state(16))
    with torch.no_grad():
        pixels = preprocess_for_clip(_images(), 32, torch.tensor(TINY_MEAN), torch.tensor(TINY_STD))
        expected = mlp(F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    images = _images(2)
    other = rw.build_reward("aesthetic", CPU, options)(images, ["x", "a completely different prompt"])
    torch.testing.assert_close(other, scores[:2], atol=1e-5, rtol=1e-5)  # prompts are ignored


def test_aesthetic_loads_published_torch_layout(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A ``.pth`` state dict (as published) loads too; bare ``N.weight`` keys get the ``layers.`` prefix."""
    state = {k.removeprefix("layers."): v for k, v in tiny_mlp_state(16).items()}
    torch.save(state, tmp_path / "mlp.pth")
    base = {"aesthetic_clip_model": str(dirs["clip"])}
    a = rw.build_reward("aesthetic", CPU, {**base, "aesthetic_mlp": str(tmp_path / "mlp.pth")})
    b = rw.build_reward("aesthetic", CPU, {**base, "aesthetic_mlp": str(dirs["mlp"])})
    torch.testing.assert_close(a(_images(2), PROMPTS[:2]), b(_images(2), PROMPTS[:2]))
    torch.save({k: v for k, v in state.items() if not k.startswith("7.")}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="do not fit the published") as info:
        rw.build_reward("aesthetic", CPU, {**base, "aesthetic_mlp": str(tmp_path / "bad.pth")})
    assert "\n" not in str(info.value)


def test_weighted_mix_of_model_rewards(dirs: dict[str, Path]) -> None:
    options = {"pickscore_model": str(dirs["clip"]), "pickscore_processor": str(dirs["clip"]),
               "aesthetic_clip_model": str(dirs["clip"]), "aesthetic_mlp": str(dirs["mlp"])}
    images = _images()
    mix = rw.build_reward({"pickscore": 1.0, "aesthetic": 0.5, "brightness": -2.0}, CPU, options)(images, PROMPTS)
    parts = {name: rw.build_reward(name, CPU, options)(images, PROMPTS) for name in ("pickscore", "aesthetic", "brightness")}
    torch.testing.assert_close(mix, parts["pickscore"] + 0.5 * parts["aesthetic"] - 2.0 * parts["brightness"])


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        ({"pickscore_model": "/no/such/pickscore"}, ("'/no/such/pickscore'", "config.reward.pickscore_model")),
        ({"pickscore_processor": "/no/such/proc"}, ("'/no/such/proc'", "config.reward.pickscore_processor")),
        ({"aesthetic_clip_model": "/no/such/clip"}, ("'/no/such/clip'", "config.reward.aesthetic_clip_model")),
    ],
)
def test_missing_clip_models_are_one_line(dirs: dict[str, Path], options: dict, needles: tuple[str, ...]) -> None:
    base = {"pickscore_model": str(dirs["model_only"]), "pickscore_processor": str(dirs["processor"])}
    name = "aesthetic" if "aesthetic_clip_model" in options else "pickscore"
    with pytest.raises(RuntimeError) as info:
        rw.build_reward(name, CPU, {**base, **options})
    _one_line(info, "network access", *needles)


def test_missing_aesthetic_weights_are_one_line(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"aesthetic_clip_model": str(dirs["clip"])}
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("aesthetic", CPU, {**base, "aesthetic_mlp": "/no/such/mlp.pth"})
    _one_line(info, "aesthetic MLP weights", "config.reward.aesthetic_mlp")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("aesthetic", CPU, {**base, "aesthetic_mlp": "hf://srrl-tests/no-such-repo/mlp.pth"})
    _one_line(info, "`hf download srrl-tests/no-such-repo mlp.pth", "config.reward.aesthetic_mlp")


@pytest.mark.parametrize(
    ("reward", "module", "extra"),
    [("image_reward", "ImageReward", "image-reward"), ("vqa_score", "t2v_metrics", "vqa-score"),
     ("hpsv2", "hpsv2", "hpsv2")],
)
def test_missing_extra_is_one_line(reward: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail even where the package is installed
    with pytest.raises(RuntimeError) as info:
        rw.build_reward(reward, CPU, {})
    _one_line(info, f"pip install .[{extra}]", f"reward '{reward}'")


def test_image_reward_adapter(fake_packages: None) -> None:
    scores = _check_batched("image_reward", {})
    images, prompts = _images(), PROMPTS
    perm = [3, 0, 4, 1, 2]
    permuted = rw.build_reward("image_reward", CPU, {"batch_size": 2})(images[perm], [prompts[i] for i in perm])
    torch.testing.assert_close(permuted, scores[perm], atol=1e-5, rtol=1e-5)  # each image with its own prompt
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("image_reward", CPU, {"image_reward_model": "/no/such/ImageReward.pt"})
    _one_line(info, "ImageReward weights", "hf download THUDM/ImageReward", "config.reward.image_reward_cache")


def test_vqa_score_adapter(fake_packages: None) -> None:
    scores = _check_batched("vqa_score", {})
    # The stand-in reads the PNGs the adapter writes: brightness of the 8-bit image times a length factor.
    images = _images()
    expected = torch.tensor([(images[i] * 255).round().mean().item() / 255 * (1 + len(p) / 100)
                             for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("vqa_score", CPU, {"vqa_model": "missing"})
    _one_line(info, "VQAScore model 'missing'", "config.reward.vqa_cache_dir")


def test_hpsv2_adapter_loads_checkpoint(fake_packages: None, tmp_path: Path) -> None:
    from rewards.clip_family import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

    path, reference = fake_hps_checkpoint(tmp_path / "hps.pt")
    scores = _check_batched("hpsv2", {"hpsv2_checkpoint": str(path)})
    tokenizer = sys.modules["hpsv2.src.open_clip"].get_tokenizer("ViT-H-14")
    with torch.no_grad():
        pixels = preprocess_for_clip(_images(), 32, torch.tensor(CLIP_IMAGE_MEAN), torch.tensor(CLIP_IMAGE_STD))
        expected = F.cosine_similarity(reference.encode_image(pixels), reference.encode_text(tokenizer(PROMPTS)))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError) as info:
        rw.build_reward("hpsv2", CPU, {"hpsv2_checkpoint": str(tmp_path / "none.pt")})
    _one_line(info, "HPSv2 checkpoint", "config.reward.hpsv2_checkpoint")
