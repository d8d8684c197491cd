"""scripts/lora_reference.py: the supervised reference's loss and the LoRA it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from config.stage_process import get_config
from srrl.families.sd import load_sd_model
from srrl.models import load_lora, lora_state_dict
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script(ROOT / "scripts" / "lora_reference.py")


class ZeroUNet(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(sample)})()


def test_denoising_loss_is_min_snr_weighted_epsilon_error():
    ref = _script()
    scheduler = DDIMScheduler(num_train_timesteps=3, beta_start=0.01, beta_end=0.9, beta_schedule="linear")
    alphas = scheduler.alphas_cumprod.float()
    latents = torch.randn(4, 4, 2, 2)
    loss = ref.reference_loss(ZeroUNet(), scheduler, latents, torch.zeros(4, 1, 1), 5.0,
                              torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 3, (4,), generator=gen)
    snr = alphas[t] / (1 - alphas[t])
    expected = (snr.clamp(max=5.0) / snr * noise.pow(2).mean(dim=(1, 2, 3))).mean()  # the prediction is 0
    torch.testing.assert_close(loss, expected)


def test_written_lora_is_trained_and_loads_into_the_adapted_unet(testbed_pipe_dir, tmp_path):
    """With 0 steps the file holds the seeded initial LoRA (reproducibly); 2 steps move it (finite)."""
    ref = _script()
    common = ["--model", str(testbed_pipe_dir), "--batch_size", "2", "--seed", "0"]
    ref.main(["--out", str(tmp_path / "zero"), "--steps", "0", *common])
    ref.main(["--out", str(tmp_path / "two"), "--steps", "2", *common])
    config = get_config("tiny")
    config.pretrained.model = str(testbed_pipe_dir)
    model = load_sd_model(config, torch.device("cpu"), torch.float32)
    load_lora(model.denoiser, tmp_path / "zero" / "checkpoint")
    initial = {k: v.clone() for k, v in lora_state_dict(model.denoiser).items()}  # the next load writes in place
    load_lora(model.denoiser, tmp_path / "two" / "checkpoint")
    trained = lora_state_dict(model.denoiser)
    assert initial.keys() == trained.keys() and all(bool(torch.isfinite(v).all()) for v in trained.values())
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 0
    ref.main(["--out", str(tmp_path / "again"), "--steps", "0", *common])  # the seeded start is reproducible,
    weights = "checkpoint/pytorch_lora_weights.safetensors"  # so the change above is the two steps' doing
    again, zero = (load_file(str(tmp_path / run / weights)) for run in ("again", "zero"))
    assert again.keys() == zero.keys() and all(torch.equal(again[k], zero[k]) for k in zero)


def test_family_keeps_only_that_family_of_the_prompt_file(tmp_path):
    ref = _script()
    path = tmp_path / "p.json"
    path.write_text('["a red circle", "two blue squares", "a red circle above a green square"]')
    assert ref.read_captions(str(path)) == ["a red circle", "two blue squares", "a red circle above a green square"]
    assert ref.read_captions(str(path), "relation") == ["a red circle above a green square"]
    assert ref.read_captions(str(path), "count") == ["two blue squares"]
    path.write_text('["a red circle"]')
    with pytest.raises(SystemExit, match="no caption of that family"):
        ref.read_captions(str(path), "relation")
