"""One-shot GPU check (``bench/gpu_check.sh``): SD v1.4 at 512 px fp16 and SDXL at 1024 px bf16 (and, with
``--archs sd35,flux``, SD3.5 Medium without T5 and FLUX.1-dev at 512 px bf16), random weights from
``bench/configs``, one short stage each through the real trainer, and two kernel comparisons.

Per architecture: a stage of 2 prompts x 4 branches, 20 DDIM steps, one reflection round, a fork 9 steps before the
end and one PPO update; images/s and UNet rows/s of the sampling, achieved UNet TFLOP/s (FLOPs of one row from
``torch.utils.flop_counter``) against the GPU's dense bf16 peak, the share of the stage inside model compute
(UNet forward and backward, VAE decode), peak GPU memory; then one guided sampling call (16 rows) timed eager vs
``torch.compile`` and with SDPA (default) vs the math attention kernel. Writes ``gpu_check.json`` and
``gpu_check.md`` to ``--out``. ``--tiny`` runs the same on the tiny pipelines of each family (CPU, seconds: the
test).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from config.stage_process import get_config  # noqa: E402
from srrl import profiling  # noqa: E402
from srrl.families.flux import flux_model_from_pipeline  # noqa: E402
from srrl.families.sd import sd_model_from_pipeline  # noqa: E402
from srrl.families.sd3 import sd3_model_from_pipeline  # noqa: E402
from srrl.families.sdxl import sdxl_model_from_pipeline  # noqa: E402
from srrl.sampling import GuidedDenoiser  # noqa: E402
from srrl.trainer import SRRLTrainer  # noqa: E402

logger = logging.getLogger("gpu_check")
#: Dense bf16 peak TFLOP/s by device-name fragment (vendor data sheets, without sparsity).
BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}
RUNS = {"sd14": ("sd14", 512, "fp16"), "sdxl": ("sdxl", 1024, "bf16"), "sd35": ("sd35", 512, "bf16"),
        "flux": ("flux", 512, "bf16")}
FROM_PIPELINE = {"sd14": sd_model_from_pipeline, "sdxl": sdxl_model_from_pipeline, "sd35": sd3_model_from_pipeline,
                 "flux": flux_model_from_pipeline}


def build_pipe(arch: str, tiny: bool, device: torch.device, dtype: torch.dtype, tmp: Path):
    """The random-weight pipeline of ``arch`` (full size from the kept configs, or the tiny test pipelines)."""
    if tiny:
        from testbed.tiny_flux import build_tiny_flux_pipeline
        from testbed.tiny_model import build_tiny_pipeline
        from testbed.tiny_sd3 import build_tiny_sd3_pipeline
        from testbed.tiny_xl import build_tiny_sdxl_pipeline

        build = {"sdxl": build_tiny_sdxl_pipeline, "sd35": build_tiny_sd3_pipeline,
                 "flux": build_tiny_flux_pipeline}.get(arch, build_tiny_pipeline)
        pipe = build(tmp / arch, seed=0, sample_size=16)
    else:
        from testbed.fullsize import build_fullsize_pipeline

        with torch.device(device):  # random initialisation on the GPU: seconds instead of minutes on its CPU
            pipe = build_fullsize_pipeline(arch, tmp / arch)
    return pipe.to(device=device, dtype=dtype)


def stage_config(arch: str, tiny: bool, out: Path):
    preset, resolution, precision = RUNS[arch]
    c = get_config(preset)
    overrides = {"pretrained.model": f"random-{arch}", "mixed_precision": "no" if tiny else precision,
                 "sample.resolution": 16 if tiny else resolution, "sample.num_steps": 4 if tiny else 20,
                 "sample.batch_size": 1, "sample.num_batches_per_epoch": 2, "sample.max_micro_batch": 16,
                 "split_time": 4, "split_step": 2 if tiny else 9, "resample_num": 1, "curriculum.total_stages": 1,
                 "curriculum.split_left": 2 if tiny else 9, "curriculum.split_right": 2 if tiny else 9,
                 "train.num_epochs": 1, "train.batch_size": 2, "train.gradient_accumulation_steps": 1,
                 "eval.every": 0, "reward.fn": "brightness", "logging.tracker": "none", "logging.log_images": False,
                 "save_path": str(out), "exp_name": f"gpu_check_{arch}"}  # fmt: skip
    if arch == "sd35":
        overrides["pretrained.text_encoder_3"] = False  # the random SD3.5 is built without T5
    if tiny and arch in ("sd35", "flux"):
        overrides["pretrained.max_sequence_length"] = 16
    c.update_from_flattened_dict(overrides)
    return c


def flops_per_row(model, device: torch.device) -> float:
    """Forward FLOPs of one denoiser row (counted on a batch of 1, the conditional pass only)."""
    cond = model.prompt_encoder.encode(["a red circle"])
    x = torch.zeros(1, *model.latent_shape, device=device, dtype=model.weight_dtype)
    model.set_timesteps(4, device)
    denoiser = GuidedDenoiser(model.denoiser, 1, model.embedded_guidance)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser(x, model.sampler.timesteps[0], cond, cond, 1.0)
    return float(counter.get_total_flops())


def time_call(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_comparison(model, device: torch.device, compile_denoiser: bool) -> dict:
    """One guided sampling call of 16 rows: eager SDPA, eager math attention and (optionally) compiled."""
    cond = model.prompt_encoder.encode(["a red circle"] * 8)
    uncond = model.prompt_encoder.negative()
    x = torch.randn(8, *model.latent_shape, device=device, dtype=model.weight_dtype)
    model.set_timesteps(4, device)
    t = model.sampler.timesteps[0]
    eager = GuidedDenoiser(model.denoiser, 16, model.embedded_guidance)
    out: dict[str, float | None] = {}
    with torch.no_grad():
        out["sdpa_s"] = time_call(lambda: eager(x, t, cond, uncond, 5.0), 3, device)
        with sdpa_kernel(SDPBackend.MATH):
            out["math_s"] = time_call(lambda: eager(x, t, cond, uncond, 5.0), 3, device)
        out["compiled_s"] = out["compile_first_call_s"] = None
        if compile_denoiser:
            compiled = GuidedDenoiser(torch.compile(model.denoiser), 16, model.embedded_guidance)
            start = time.perf_counter()
            compiled(x, t, cond, uncond, 5.0)
            out["compile_first_call_s"] = time.perf_counter() - start
            out["compiled_s"] = time_call(lambda: compiled(x, t, cond, uncond, 5.0), 3, device)
    return out


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def scaler_check(trainer: SRRLTrainer) -> dict:
    """Force one loss-scale overflow, then take two optimizer steps: the scale before, after the overflow and at
    the end, and the steps taken. Without an fp16 scaler (bf16, or the CPU) a CPU ``GradScaler`` is put where the
    trainer holds it, so the path runs everywhere."""
    if trainer.scaler is None:
        trainer.step_guard.scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu")

    def backward(overflow: bool) -> None:
        loss = sum(p.float().pow(2).sum() for p in trainer.params) * 1e-6 + 1e-3
        trainer.accelerator.backward(loss)
        trainer.acc.micro_steps = 1
        if overflow:
            with torch.no_grad():
                trainer.params[0].grad.view(-1)[0] = float("inf")

    before = float(trainer.scaler.get_scale())
    backward(overflow=True)
    skipped = trainer._optimizer_step() is None
    after_overflow = float(trainer.scaler.get_scale())
    taken = 0
    for _ in range(2):
        backward(overflow=False)
        taken += trainer._optimizer_step() is not None
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.params)
    return {"loss_scale_before": before, "overflow_skipped": skipped, "loss_scale_after_overflow": after_overflow,
            "steps_after_overflow": taken, "loss_scale_after": float(trainer.scaler.get_scale()),
            "weights_finite_after": finite}  # fmt: skip


def check(arch: str, args, device: torch.device, tmp: Path) -> dict:
    """One architecture: the stage through the trainer, then the kernel comparison on the same model."""
    config = stage_config(arch, args.tiny, tmp)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[config.mixed_precision]
    pipe = build_pipe(arch, args.tiny, device, dtype, tmp)
    trainer = SRRLTrainer(config, lambda c, d, w: FROM_PIPELINE[arch](pipe, c, d, w))
    flops = flops_per_row(trainer.model, device)
    profiling.reset()
    profiling.enable_cuda_sync(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows0 = trainer.denoiser.rows
    record = trainer.run_stage(trainer.plan(0))
    buckets = profiling.snapshot()
    sample_rows = record["unet_rows_sampling"]
    compute = sum(buckets.get(k, 0.0) for k in ("unet_forward", "backward", "vae_decode"))
    images = config.sample.num_batches_per_epoch * config.split_time
    report = {
        "arch": arch, "resolution": config.sample.resolution, "precision": config.mixed_precision,
        "images": images, "stage_s": round(record["time_stage_s"], 3),
        "images_per_s": round(images / record["time_sample_s"], 3),
        "unet_rows_per_s_sampling": round(sample_rows / record["time_sample_s"], 2),
        "unet_rows_stage": trainer.denoiser.rows - rows0, "unet_gflops_per_row": round(flops / 1e9, 2),
        "unet_tflops_sampling": round(sample_rows * flops / 1e12 / max(record["time_sample_s"], 1e-9), 2),
        "bf16_peak_tflops": peak_tflops(device), "model_compute_share": round(compute / record["time_stage_s"], 3),
        "optimizer_steps": record["optimizer_steps"],
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }  # fmt: skip
    if report["bf16_peak_tflops"]:
        report["share_of_peak"] = round(report["unet_tflops_sampling"] / report["bf16_peak_tflops"], 3)
    report.update(kernel_comparison(trainer.model, device, args.compile))
    report.update(scaler_check(trainer))
    trainer.lock.release()
    return report


def markdown(reports: list[dict]) -> str:
    keys = [k for k in reports[0] if k != "arch"]
    lines = ["| field | " + " | ".join(r["arch"] for r in reports) + " |", "|---|" + "---|" * len(reports)]
    lines += [f"| {k} | " + " | ".join(str(r.get(k)) for r in reports) + " |" for k in keys]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--archs", default="sd14,sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU (the test)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for arch in args.archs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            reports.append(check(arch, args, device, Path(tmp)))
        logger.info("%s", json.dumps(reports[-1]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "gpu_check.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(reports), encoding="utf-8")


if __name__ == "__main__":
    main()
