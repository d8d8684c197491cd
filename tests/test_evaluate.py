"""evaluate.py end to end on the tiny pipeline and a 1-stage tiny run (CPU, offline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from cli import evalargs
from rewards.pixel import jpeg_sizes_kb
from srrl.families.sd import load_sd_model
from srrl.stage import heldout_guidance_scale
from srrl.validate import ConfigError, load_prompt_file
from tests.conftest import fast_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SMALL = {"curriculum.total_stages": 1, "eval.every": 0, "sample.num_batches_per_epoch": 1, "sample.num_steps": 2,
         "curriculum.split_left": 1, "curriculum.split_right": 2, "split_time": 2, "sample.batch_size": 1}


@pytest.fixture(scope="module")
def run_dir(tiny_pipe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-stage tiny run (2 DDIM steps) with one checkpoint."""
    from srrl.trainer import train

    return Path(train(fast_config(tiny_pipe_dir, tmp_path_factory.mktemp("run"), **SMALL)))


def test_base_column_zeroes_lora_and_checkpoints_restore_it(run_dir: Path) -> None:
    from safetensors.torch import load_file

    config = ev.resolve_config(None, str(run_dir), True)
    unet = load_sd_model(config, CPU, torch.float32).denoiser
    stage = run_dir / "checkpoints" / "stage_000"

    def lora() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}

    ev.set_lora(unet, stage)
    trained = lora()
    assert trained and any(v.abs().sum() > 0 for n, v in trained.items() if "lora_B" in n)
    assert sum(v.numel() for v in load_file(str(stage / "pytorch_lora_weights.safetensors")).values()) == sum(
        v.numel() for v in trained.values())
    ev.set_lora(unet, None)
    assert all(not v.any() for v in lora().values())
    ev.set_lora(unet, stage)
    assert all(torch.equal(v, trained[n]) for n, v in lora().items())


def test_select_checkpoints(run_dir: Path, tmp_path: Path) -> None:
    stage = run_dir / "checkpoints" / "stage_000"
    assert ev.select_checkpoints(str(run_dir), "all", [], True) == {"base": None, "stage_000": stage}
    assert ev.select_checkpoints(str(run_dir), "last", [], False) == {"stage_000": stage}
    with pytest.raises(ConfigError, match="no checkpoint for stage 3, 4; its checkpoints are stages 0"):
        ev.select_checkpoints(str(run_dir), "3,4", [], True)
    with pytest.raises(ConfigError, match="comma-separated stage numbers"):
        ev.select_checkpoints(str(run_dir), "0,,4", [], True)
    both = ev.select_checkpoints(str(run_dir), "all", [str(stage)], False)
    assert list(both) == ["stage_000", f"{run_dir.name}_stage_000"]
    twice = ev.select_checkpoints("", "all", [str(stage), str(stage)], False)
    assert list(twice) == [f"{run_dir.name}_stage_000", f"{run_dir.name}_stage_000_"]
    with pytest.raises(ConfigError, match="holds no pytorch_lora_weights.safetensors"):
        ev.select_checkpoints("", "all", [str(tmp_path)], True)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        ev.select_checkpoints("", "all", [], False)
    with pytest.raises(ConfigError, match="no config.json"):
        ev.resolve_config(None, str(tmp_path), True)


def _evaluation(run_dir: Path, out: Path, **changes: object) -> ev.Evaluation:
    """The evaluation the command line below builds, made in-process."""
    config = ev.resolve_config(None, str(run_dir), True)
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    config.reward.jpeg_quality = 50
    prompts = load_prompt_file(config.eval.prompt_file, "prompt_file")
    checkpoints = ev.select_checkpoints(str(run_dir), "all", [], True)
    rewards = ["brightness", "colour_match", "jpeg_compressibility"]
    return ev.Evaluation(config, "sd", checkpoints, prompts, rewards, out, CPU, 4, 2)


def test_held_out_guidance_scale_of_the_run(run_dir: Path, tmp_path: Path) -> None:
    """The images' settings record the run's eval.guidance_scale, or its sample.guidance_scale when that is 0."""
    sampled = ev.resolve_config(None, str(run_dir), True).sample.guidance_scale
    assert _evaluation(run_dir, tmp_path / "a").settings()["guidance_scale"] == sampled
    fixed = _evaluation(run_dir, tmp_path / "b", **{"eval.guidance_scale": sampled + 2.5})
    assert fixed.settings()["guidance_scale"] == sampled + 2.5
    config = fixed.config  # --guidance_scale replaces the run's eval.guidance_scale; without it, that one stays
    evalargs.apply_flags(config, {"sample.guidance_scale": None}, [])
    assert heldout_guidance_scale(config) == sampled + 2.5
    evalargs.apply_flags(config, {"sample.guidance_scale": 1.5}, [])
    assert heldout_guidance_scale(config) == 1.5


def test_evaluate_end_to_end_and_resume(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "eval"
    cli = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"--run_dir={run_dir}", "--rewards=brightness,colour_match,jpeg_compressibility",
         "--reward_option=jpeg_quality=50",
         "--num_images_per_prompt=2", "--batch_size=4", f"--out={out}", "--device=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    prompts = ["a red circle", "a blue square"]  # the run's eval.prompt_file
    assert metrics["prompts"] == prompts and metrics["generated"] == {"base": 4, "stage_000": 4}
    for column in ("base", "stage_000"):
        for reward in ("brightness", "colour_match"):
            m = metrics["metrics"][column][reward]
            assert set(m) == {"mean", "std", "stderr", "n"} and m["n"] == 4
            scores = torch.tensor(metrics["scores"][column][reward])
            assert m["mean"] == pytest.approx(scores.mean().item()) and m["std"] == pytest.approx(scores.std().item())
            assert m["stderr"] == pytest.approx(m["std"] / 2)
        assert len(list((out / "images" / column).glob("*.png"))) == 4
    width, height = Image.open(out / "grid.png").size  # 2 prompts x 2 checkpoints, labels above each row
    assert width == 2 * 128 and 2 * 128 < height <= 2 * (128 + 60)
    jpeg = -jpeg_sizes_kb(ev.load_images([out / "images/base/2.png"]), 50)
    assert metrics["scores"]["base"]["jpeg_compressibility"][2] == pytest.approx(jpeg.item())  # --reward_option
    page = (out / "index.html").read_text()
    assert 'src="images/base/3.png"' in page and 'src="images/stage_000/0.png"' in page and "a blue square" in page

    # Resume: everything on disk, so the model is never loaded and the metrics are the same.
    def no_model(*args: object) -> None:
        raise AssertionError("the model was loaded although all images exist")

    monkeypatch.setitem(ev.FAMILIES, "sd", no_model)
    again = _evaluation(run_dir, out).run()
    assert again["generated"] == {"base": 0, "stage_000": 0} and again["metrics"] == metrics["metrics"]
    # Deleted images are regenerated, the same pixels although now generated alone (not in a batch of 4): up to
    # one 8-bit level, since CPU kernels for another batch size (or thread count) may round differently.
    monkeypatch.undo()
    originals = {p: np.asarray(Image.open(p)) for p in (out / "images/stage_000/1.png",)}
    for path in originals:
        path.unlink()
    assert _evaluation(run_dir, out).run()["generated"] == {"base": 0, "stage_000": 1}
    for path, pixels in originals.items():
        diff = np.abs(np.asarray(Image.open(path)).astype(int) - pixels.astype(int))
        assert diff.max() <= 1, diff.max()
    with pytest.raises(ConfigError, match="another seed"):
        _evaluation(run_dir, out, **{"eval.seed": 7}).run()


def test_verifier_columns_and_paired_strict_change(tmp_path: Path) -> None:
    """On the shipped testbed model: the exact verifier per column, each image's strict outcome (equal to the
    shapes_verify reward of the same PNG, and to the trainer's own held-out evaluation of the base model), and
    the paired change of a perturbed-LoRA checkpoint against the base, counted image by image."""
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline

    from cli.wiring import VERIFIER
    from config.stage_process import get_config
    from rewards.rewards import build_reward
    from srrl.heldout import evaluate_heldout
    from srrl.models import save_lora
    from srrl.sampling import GuidedDenoiser

    config = get_config("tiny")
    config.eval.num_images_per_prompt = 6
    prompts = load_prompt_file(config.eval.prompt_file, "eval.prompt_file")  # the held-out captions of the Quickstart
    model = load_sd_model(config, CPU, torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:  # zero at initialisation: the base model
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    save_lora(StableDiffusionPipeline, model.denoiser, tmp_path / "perturbed")

    checkpoints = {"base": None, "perturbed": tmp_path / "perturbed"}
    evaluation = ev.Evaluation(config, "sd", checkpoints, prompts, ["shapes_verify"], tmp_path / "out", CPU, 8, 6)
    metrics = evaluation.run()

    strict = {c: np.array(metrics["verifier_strict"][c]) for c in checkpoints}
    shapes_verify = build_reward("shapes_verify", CPU)
    for column in checkpoints:
        assert strict[column].tolist() == [int(s) for s in metrics["scores"][column]["shapes_verify"]]
        pngs = ev.load_images(evaluation.image_paths(column))  # the reward itself, not read from the table
        assert strict[column].tolist() == shapes_verify(pngs, evaluation.rows).int().tolist()
        assert metrics["verifier"][column]["all"]["strict"] == pytest.approx(strict[column].mean())
        assert metrics["verifier"][column]["all"]["n"] == 6 * len(prompts)
    base, after = strict["base"], strict["perturbed"]
    assert 0 < base.mean() < 1 and (base != after).any()  # something to pair
    change = metrics["strict_change"]["perturbed"]
    assert change["gained"] == int(((base == 0) & (after == 1)).sum())
    assert change["lost"] == int(((base == 1) & (after == 0)).sum())
    assert change["delta"] == pytest.approx(after.mean() - base.mean())
    assert set(metrics["strict_change"]) == {"perturbed"}

    # The trainer's held-out evaluation of the base model scores the same images (float, not 8-bit PNG).
    base_model = load_sd_model(config, CPU, torch.float32)
    record = evaluate_heldout(Accelerator(cpu=True), base_model, GuidedDenoiser(base_model.denoiser, 128),
                              build_reward("shapes_verify", CPU), config, prompts, after_stage=-1,
                              verifier=VERIFIER)
    assert record["verifier_strict"] == base.tolist()
