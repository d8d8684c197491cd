"""Tiny randomly initialised reward models built in code, and stand-ins for the optional reward packages.

The stand-ins mimic the parts of ``ImageReward``, ``t2v_metrics`` and ``hpsv2`` that ``rewards/packaged.py``
calls, built from a tiny CLIP, so the adapters run offline on CPU through the same code as with the real
packages.
"""

from __future__ import annotations

import json
import string
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

TINY_MEAN = [0.5, 0.4, 0.3]
TINY_STD = [0.2, 0.25, 0.3]


def save_tiny_tokenizer(path: Path) -> None:
    """A character-level CLIPTokenizer (lowercase letters) saved to ``path``."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt")).save_pretrained(path)


def save_tiny_processor(path: Path, mean: list[float] = TINY_MEAN, std: list[float] = TINY_STD) -> None:
    """A 32 px CLIPImageProcessor config with the given normalisation."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    ).save_pretrained(path)


def tiny_clip_model(seed: int = 0, projection_dim: int = 16):
    """A random 2-layer CLIPModel (hidden 32, 32 px images, 8 px patches, text length 32)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 54, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPModel(config).eval()


def save_tiny_clip(path: Path, seed: int = 0, tokenizer: bool = True, processor: bool = True) -> Path:
    """Save a tiny CLIPModel (and optionally its tokenizer and image processor) to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_clip_model(seed).save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path)
    if processor:
        save_tiny_processor(path)
    return path


def tiny_mlp_state(embed_dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the published LAION aesthetic MLP layout (``layers.{0,2,4,6,7}``)."""
    sizes = [embed_dim, 1024, 128, 64, 16, 1]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def save_tiny_mlp(path: Path, embed_dim: int = 16) -> Path:
    """Save :func:`tiny_mlp_state` with safetensors."""
    save_file(tiny_mlp_state(embed_dim), str(path))
    return path


def tokenize(tokenizer, prompts: list[str], length: int = 32) -> dict[str, torch.Tensor]:
    """Pad/truncate ``prompts`` to ``length`` tokens."""
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")


# ---- stand-ins for the optional packages -----------------------------------------------------------


class _FakeOpenClip(nn.Module):
    """What rewards.packaged.load_hpsv2 uses of an HPSv2 OpenCLIP model, backed by a tiny CLIPModel."""

    def __init__(self) -> None:
        super().__init__()
        self.clip = tiny_clip_model(seed=1)
        self.visual = nn.Identity()
        self.visual.image_size = (32, 32)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixels).pooler_output

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=ids).pooler_output


class _FakeBlip(nn.Module):
    """BLIP parts used by ImageReward's scoring: tokenizer, visual encoder, cross-attending text encoder."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.patch = nn.Conv2d(3, 8, kernel_size=56, stride=56)  # 224 px -> 4x4 patches of width 8
        self.embed = nn.Embedding(64, 8)

    def visual_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.patch(pixels).flatten(2).transpose(1, 2)  # [B, 16, 8]

    def text_encoder(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        text = self.embed(ids) * attention_mask[..., None]
        image = (encoder_hidden_states * encoder_attention_mask[..., None]).mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=torch.tanh(text + image))


class _FakeImageReward(nn.Module):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.blip = _FakeBlip(tokenizer)
        self.mlp = nn.Linear(8, 1)
        self.mean, self.std = 0.2, 1.5


class _FakeVQAScore:
    """t2v_metrics.VQAScore stand-in: reads the PNG files and scores mean brightness * (1 + len(text) / 100)."""

    batch_sizes: list[int] = []

    def __init__(self, model: str, device: str, cache_dir: str | None = None) -> None:
        if model == "missing":
            raise OSError("model files not found and the hub is unreachable")

    def batch_forward(self, dataset: list[dict], batch_size: int) -> torch.Tensor:
        type(self).batch_sizes.append(batch_size)
        out = torch.zeros(len(dataset), 1, 1)
        for i, item in enumerate(dataset):
            pixels = np.asarray(Image.open(item["images"][0]), dtype=np.float32) / 255.0
            out[i, 0, 0] = float(pixels.mean()) * (1 + len(item["texts"][0]) / 100)
        return out


def install_fake_packages(tokenizer_dir: Path) -> Iterator[None]:
    """Put ImageReward, t2v_metrics and hpsv2.src.open_clip stand-ins into ``sys.modules`` (generator: undo after)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def load_image_reward(name: str, device: str, download_root: str | None = None) -> _FakeImageReward:
        if name != "ImageReward-v1.0":
            raise RuntimeError(f"Model {name} not found; available models = ['ImageReward-v1.0']")
        return _FakeImageReward(tokenizer)

    def create_model_and_transforms(name: str, pretrained=None, precision="fp32", device="cpu"):
        return _FakeOpenClip(), None, None

    modules = {
        "ImageReward": types.ModuleType("ImageReward"),
        "t2v_metrics": types.ModuleType("t2v_metrics"),
        "hpsv2": types.ModuleType("hpsv2"),
        "hpsv2.src": types.ModuleType("hpsv2.src"),
        "hpsv2.src.open_clip": types.ModuleType("hpsv2.src.open_clip"),
    }
    modules["ImageReward"].load = load_image_reward
    modules["t2v_metrics"].VQAScore = _FakeVQAScore
    open_clip = modules["hpsv2.src.open_clip"]
    open_clip.create_model_and_transforms = create_model_and_transforms
    open_clip.get_tokenizer = lambda name: lambda prompts: tokenize(tokenizer, prompts)["input_ids"]
    modules["hpsv2"].src = modules["hpsv2.src"]
    modules["hpsv2.src"].open_clip = open_clip
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def fake_hps_checkpoint(path: Path) -> tuple[Path, nn.Module]:
    """Save a checkpoint ``{"state_dict": ...}`` of a differently seeded stand-in; return it and the model."""
    model = _FakeOpenClip()
    model.clip = tiny_clip_model(seed=3)
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model.eval()


def serve(reward_fn, name: str, limits=None) -> Iterator:
    """A reward server for ``reward_fn`` on 127.0.0.1 (a free port) in a thread; yields it, then shuts it down."""
    from rewards.server import make_server

    server = make_server(reward_fn, name, "127.0.0.1", 0, **({"limits": limits} if limits is not None else {}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
