"""Saved LoRA: diffusers and peft load it; a file with missing, extra, mis-shaped or non-finite tensors, or a
truncated one, is refused in one line naming the file, and nothing is changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from srrl.errors import LoadError
from srrl.families.sd import load_sd_model
from srrl.models import LORA_WEIGHTS, load_lora, lora_state_dict, save_lora
from tests.conftest import fast_config

CPU = torch.device("cpu")


@pytest.fixture()
def adapted(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path, lora_target_modules="to_q,to_v,conv1")
    model = load_sd_model(config, CPU, torch.float32)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_lora(StableDiffusionPipeline, model.denoiser, directory)
    return config, model, directory


def _noise_prediction(unet, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def test_peft_and_diffusers_load_the_checkpoint_directory(adapted, tiny_pipe_dir):
    from peft import PeftModel

    config, model, directory = adapted
    assert {"adapter_config.json", "adapter_model.safetensors", LORA_WEIGHTS} <= {p.name for p in directory.iterdir()}
    want = _noise_prediction(model.denoiser.eval(), model)
    peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet"),
                                          str(directory)).eval()
    torch.testing.assert_close(_noise_prediction(peft_unet, model), want, atol=1e-5, rtol=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(directory))
    torch.testing.assert_close(_noise_prediction(pipe.unet.eval(), model), want, atol=1e-5, rtol=1e-5)
    base = _noise_prediction(UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet").eval(), model)
    assert (base - want).abs().max() > 1e-3  # the LoRA matters, so the comparisons above can fail


def _damaged(directory: Path, how: str) -> None:
    path = directory / LORA_WEIGHTS
    state = load_file(str(path))
    keys = sorted(state)
    if how == "missing":
        state = {k: state[k] for k in keys[: len(keys) // 2]}
    elif how == "extra":
        state["unet.nowhere.lora_A.weight"] = torch.zeros(4, 4)
    elif how == "shape":
        state[keys[0]] = torch.zeros(3, 3)
    elif how == "nan":
        state[keys[0]] = torch.full_like(state[keys[0]], float("nan"))
    if how in ("truncated", "empty"):
        path.write_bytes(path.read_bytes()[:200] if how == "truncated" else b"")
    else:
        save_file(state, str(path))


@pytest.mark.parametrize("how", ["missing", "extra", "shape", "nan", "truncated", "empty"])
def test_a_damaged_lora_file_is_refused_in_one_line_and_changes_nothing(adapted, how):
    config, model, directory = adapted
    before = lora_state_dict(model.denoiser)
    _damaged(directory, how)
    with pytest.raises(LoadError) as info:
        load_lora(model.denoiser, directory)
    assert str(directory / LORA_WEIGHTS) in str(info.value) and "\n" not in str(info.value)
    after = lora_state_dict(model.denoiser)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_targets_that_match_nothing_are_one_line(tiny_pipe_dir, tmp_path):
    for targets in ("foo_bar", "to_q,foo_bar"):
        with pytest.raises(LoadError, match="foo_bar.*matches no module"):
            load_sd_model(fast_config(tiny_pipe_dir, tmp_path, lora_target_modules=targets), CPU, torch.float32)
