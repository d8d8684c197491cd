"""Loading the policy (a diffusers pipeline + LoRA) and moving LoRA weights in and out.

A model family (:mod:`srrl.families`) loads its pipeline and hands the parts to :func:`finish_model`; the rest of
the core is family-agnostic. SD and SDXL use a UNet and DDIM (:class:`srrl.ddim.DDIMSampler`), SD3 and FLUX a transformer
and the rectified-flow sampler (:class:`srrl.flow_match.FlowMatchSampler`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from srrl.conditioning import PromptEncoder
from srrl.ddim import DDIMSampler
from srrl.errors import LoadError
from srrl.profiling import timed
from srrl.rundir import load_tensors
from srrl.sampler import Sampler
from srrl.validate import lora_targets

logger = logging.getLogger(__name__)

#: Model sources by scheme: ``pretrained.model = "<scheme>:<name>"`` is resolved to a local pipeline folder by
#: ``MODEL_SOURCES[scheme]`` (registered by the entry wiring, e.g. ``builtin:`` for the testbed's built-in models).
MODEL_SOURCES: dict[str, Callable[[str], str]] = {}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name (load_lora_weights)
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft's file name (PeftModel.from_pretrained), beside adapter_config.json


@dataclass
class DiffusionModel:
    """The frozen pipeline parts, the LoRA-adapted denoiser, the sampler and the prompt encoder of one run."""

    pipeline_class: type
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    sampler: Sampler
    prompt_encoder: PromptEncoder
    resolution: int  # image size in pixels
    weight_dtype: torch.dtype
    latent_channels: int  # C of the latents the sampler works on (FLUX packs 2x2 patches only inside its denoiser)
    embedded_guidance: bool = False  # the denoiser takes the guidance scale as an input (FLUX.1-dev): one pass

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.resolution // factor
        return (self.latent_channels, side, side)

    def set_timesteps(self, num_steps: int, device: torch.device) -> None:
        self.sampler.set_timesteps(num_steps, device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32) of ``latents`` [B, C, h, w] (``z / scaling_factor + shift_factor``
        into the VAE, as the stock pipelines); VAE upcast to fp32 if its config asks."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        images = []
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0  # SD3 / FLUX VAEs: latents = (z - shift) * scale
        with timed("vae_decode"):
            for start in range(0, latents.shape[0], chunk):
                z = latents[start : start + chunk].to(dtype) / self.vae.config.scaling_factor
                z = z + shift if shift else z
                images.append(self.vae.decode(z, return_dict=False)[0].float())
        if upcast:
            self.vae.to(self.weight_dtype)
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


def register_model_source(scheme: str, resolve: Callable[[str], str]) -> None:
    """Resolve ``pretrained.model`` values ``"<scheme>:..."`` with ``resolve`` (name -> local pipeline folder)."""
    MODEL_SOURCES[scheme] = resolve


def resolve_model(name: str) -> str:
    """The folder or hub id to load for ``pretrained.model=name``: a registered ``scheme:`` name resolved by its
    source (:func:`register_model_source`), anything else as it is; an unregistered scheme is one LoadError."""
    scheme, sep, _ = name.partition(":")
    if not sep or Path(name).exists() or "/" in scheme or "\\" in scheme:
        return name
    if scheme not in MODEL_SOURCES:
        known = ", ".join(f"{k}:" for k in sorted(MODEL_SOURCES)) or "none registered"
        raise LoadError(f"pretrained.model={name!r}: no model source {scheme!r}: is registered (known: {known}); "
                        "built-in models are registered by the entry wiring (train.py, or import cli.wiring)")
    try:
        return MODEL_SOURCES[scheme](name)
    except ValueError as err:
        raise LoadError(str(err)) from None


def load_pipeline(pipeline_class: type, name: str, revision: str, dtype: torch.dtype, **extra):
    """``pipeline_class.from_pretrained`` (with the family's ``extra`` keyword arguments) with one clear error when
    the model is not available."""
    kwargs = {"dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    kwargs.update(extra)
    source = resolve_model(name)
    try:
        return pipeline_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        local = Path(name).exists()
        where = "the local folder" if local else "the hub id"
        fetch = f"`hf download REPO_ID --local-dir {name}`" if local else f"`hf download {name}`"
        raise LoadError(
            f"cannot load pretrained.model={name!r} ({where}): {str(err).splitlines()[0]} -- download it with network "
            f"access ({fetch}) or set --config.pretrained.model to a local diffusers pipeline folder"
        ) from None


def finish_model(pipeline_class: type, pipe, prompt_encoder: PromptEncoder, config, device: torch.device,
                 weight_dtype: torch.dtype, sampler: Sampler | None = None,
                 denoiser: torch.nn.Module | None = None, latent_channels: int | None = None,
                 embedded_guidance: bool = False) -> DiffusionModel:
    """Freeze the pipeline, add LoRA to its denoiser (``denoiser``, default ``pipe.unet``; fp32 adapter weights) and
    attach ``sampler`` (default: DDIM of the pipeline's scheduler config). ``latent_channels`` defaults to the
    denoiser's ``in_channels``; ``embedded_guidance``: see :class:`DiffusionModel`. A model family's loader ends
    here."""
    vae = pipe.vae.to(device).requires_grad_(False)
    denoiser = (pipe.unet if denoiser is None else denoiser).to(device).requires_grad_(False)
    targets = lora_targets(config)
    try:
        denoiser.add_adapter(
            LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                       target_modules=targets)
        )
    except ValueError as err:  # peft: none of the target modules is in the denoiser
        raise LoadError(f"lora_target_modules={','.join(targets)!r} matches no module of the denoiser of "
                           f"{config.pretrained.model!r} ({str(err).splitlines()[0][:120]}); use names such as "
                           "to_q,to_k,to_v,to_out.0,conv1,conv2") from None
    adapted = [name for name, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
    unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in adapted)]
    if unmatched:
        raise LoadError(f"lora_target_modules: {','.join(unmatched)!r} matches no module of the denoiser of "
                        f"{config.pretrained.model!r}; use names such as to_q,to_k,to_v,to_out.0,conv1,conv2")
    for p in denoiser.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if config.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    return DiffusionModel(
        pipeline_class=pipeline_class,
        denoiser=denoiser,
        vae=vae.eval(),
        sampler=sampler if sampler is not None else DDIMSampler(pipe.scheduler.config),
        prompt_encoder=prompt_encoder,
        resolution=config.sample.resolution,
        weight_dtype=weight_dtype,
        latent_channels=denoiser.config.in_channels if latent_channels is None else latent_channels,
        embedded_guidance=embedded_guidance,
    )


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The denoiser's LoRA weights in peft's key format (``<module>.lora_A.weight``), on CPU.

    Kept in peft's format rather than converted to diffusers' older ``lora.down`` names: that conversion only
    renames attention projections, and a file mixing both formats (e.g. with conv LoRA) loses the attention part
    in ``load_lora_weights``."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}


def lora_component(pipeline_class: type) -> str:
    """The name under which ``pipeline_class`` saves and loads its denoiser's LoRA: ``unet`` (SD, SDXL) or
    ``transformer`` (SD3, FLUX), read from its ``save_lora_weights`` signature."""
    parameters = inspect.signature(pipeline_class.save_lora_weights).parameters
    return "transformer" if "transformer_lora_layers" in parameters else "unet"


def save_lora(pipeline_class: type, denoiser: torch.nn.Module, directory: Path) -> None:
    """Write the LoRA of ``denoiser`` to ``directory`` in two forms: ``pytorch_lora_weights.safetensors`` (with the
    adapter's LoRA config as diffusers metadata) for ``pipeline_class.load_lora_weights(directory)``, and peft's
    ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained(denoiser, directory)``."""
    state = lora_state_dict(denoiser)
    lora_config = denoiser.peft_config["default"]
    component = lora_component(pipeline_class)
    metadata = lora_config.to_dict()
    if isinstance(metadata.get("target_modules"), (set, list)):  # a set in peft: its order varies by process
        metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_class.save_lora_weights(directory, safe_serialization=True, **{
        f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata})
    lora_config.save_pretrained(str(directory))
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(Path(directory) / PEFT_WEIGHTS))


def read_lora(denoiser: torch.nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``directory`` (written by :func:`save_lora`) in peft's key format, checked against the
    adapted ``denoiser``: every tensor present, none extra, shapes equal, values finite; else one-line LoadError."""
    path = Path(directory) / LORA_WEIGHTS
    state = load_tensors(path, "LoRA file", required=True)
    state = convert_unet_state_dict_to_peft({_strip_component(k): v for k, v in state.items()})
    expected = lora_state_dict(denoiser)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = f"{len(missing)} of {len(expected)} tensors missing (e.g. {missing[0]})" if missing else \
            f"{len(extra)} tensors the denoiser has no place for (e.g. {extra[0]})"
        raise LoadError(f"LoRA file {path} does not fit the denoiser: {what}; check lora_rank and lora_target_modules")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise LoadError(f"LoRA file {path} does not fit the denoiser: {key} has shape {tuple(value.shape)}, the denoiser "
                            f"expects {tuple(expected[key].shape)}; check lora_rank and lora_target_modules")
        if not bool(torch.isfinite(value).all()):
            raise LoadError(f"LoRA file {path} holds non-finite values ({key}); use an earlier checkpoint")
    return state


def _strip_component(key: str) -> str:
    """A diffusers LoRA key without its component prefix (``unet.`` or ``transformer.``)."""
    for prefix in ("unet.", "transformer."):
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key


def load_lora(denoiser: torch.nn.Module, directory: Path) -> None:
    """Load LoRA weights written by :func:`save_lora` into the (already adapted) ``denoiser`` (checked by
    :func:`read_lora`; nothing is changed when the file is refused)."""
    set_lora_state(denoiser, read_lora(denoiser, directory))


def set_lora_state(denoiser: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (peft key format, as :func:`read_lora` returns) into the adapted ``denoiser``."""
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    if result is not None and result.unexpected_keys:
        raise LoadError(f"LoRA weights do not fit the denoiser: {result.unexpected_keys[:3]} ...")


@contextmanager
def merged_lora(denoiser: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block the denoiser's LoRA adapters are merged into their base weights, so a forward pass costs what
    the frozen model costs (no extra adapter products per layer); for no-grad passes (sampling, reflection,
    evaluation). On exit the adapters are unmerged and the base weights restored bit for bit from a copy, so
    repeated merges never drift. The outputs equal the unmerged ones up to float rounding. ``enabled=False``: no-op.
    """
    if not enabled:
        yield
        return
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for layer in layers:
            layer.merge()
        yield
    finally:
        for layer, weight in zip(layers, saved, strict=True):
            if layer.merged:
                layer.unmerge()
            layer.get_base_layer().weight.data.copy_(weight)


@contextmanager
def lora_disabled(denoiser: torch.nn.Module) -> Iterator[None]:
    """Inside the block the denoiser's LoRA adapters are switched off: its forward passes are the base model's (the
    KL anchor's reference). On exit they are on again, trainable as before."""
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class CastDenoiser(torch.nn.Module):
    """A denoiser run in another dtype: floating inputs (the timestep excepted) are cast to ``dtype``, the output
    back to the sample's dtype."""

    def __init__(self, denoiser: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network, self.dtype = denoiser, dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False,
                **kwargs) -> tuple[torch.Tensor]:
        out = self.network(sample.to(self.dtype), timestep=timestep, **self._cast(kwargs), return_dict=False)[0]
        return (out.to(sample.dtype),)

    def _cast(self, value):
        """Floating tensors (also inside dicts) in ``self.dtype``; anything else as it is."""
        if isinstance(value, dict):
            return {k: self._cast(v) for k, v in value.items()}
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(self.dtype)
        return value


@contextmanager
def inference_denoiser(denoiser: torch.nn.Module, merge: bool, dtype: torch.dtype | None = None) -> Iterator[torch.nn.Module]:
    """The denoiser for a no-grad pass: ``denoiser`` itself (LoRA merged when ``merge``, see :func:`merged_lora`), or, when
    ``dtype`` differs from its parameters' dtype, a :class:`CastDenoiser` of a copy of it with the LoRA merged in,
    cast to ``dtype`` (contiguous layout) -- e.g. bfloat16 on a CPU with bf16 matrix units, ~1.5x faster per
    row for the testbed UNet. ``denoiser`` itself is left bit for bit as it was."""
    if dtype is None or dtype == next(denoiser.parameters()).dtype:
        with merged_lora(denoiser, merge):
            yield denoiser
        return
    with torch.no_grad(), merged_lora(denoiser):
        copy = deepcopy(denoiser)
    # torch.nn.Module.to: diffusers' ModelMixin.to warns about modules to keep in fp32 (the SD and SDXL UNets have none)
    torch.nn.Module.to(copy, dtype=dtype, memory_format=torch.contiguous_format)
    yield CastDenoiser(copy.eval(), dtype)
