"""Reflection rounds (docs/algorithm.md §3b) and branched sampling with log-probabilities (docs/algorithm.md §3c),
through the model family's sampler (:class:`srrl.sampler.Sampler`; DDIM for SD and SDXL).

Every denoiser evaluation goes through :class:`GuidedDenoiser`, which runs the conditional and the
unconditional half of classifier-free guidance as one doubled batch, chunked to ``max_micro_batch`` rows,
so all prompts and all branches of a denoising step share denoiser calls. Timesteps go to the denoiser and back to the
sampler as the sampler gave them (integer or float tensors, never cast).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from srrl.conditioning import Conditioning
from srrl.profiling import timed
from srrl.sampler import Sampler


def row_generators(seed: int, rows: Sequence[int], child: int = -1) -> list[torch.Generator]:
    """One CPU generator per global row index, so a row's noise does not depend on how rows are batched.

    ``child >= 0`` gives the generator of branch ``child`` of that row (after the fork).
    """
    out = []
    for row in rows:
        key = (seed * 1_000_003 + row) * 101 + (child + 1)
        out.append(torch.Generator().manual_seed(key % (2**63 - 1)))
    return out


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """``x_T ~ N(0, I)`` of shape [len(generators), *shape], one generator per row (drawn on CPU)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device=device, dtype=dtype)


class GuidedDenoiser:
    """Classifier-free-guided denoiser evaluation, batched and chunked. With ``embedded_guidance`` (guidance-distilled
    models such as FLUX.1-dev) the scale goes into the denoiser as its ``guidance`` input [B] and one pass runs."""

    def __init__(self, network: torch.nn.Module, max_micro_batch: int, embedded_guidance: bool = False) -> None:
        self.network = network
        self.max_micro_batch = max_micro_batch
        self.embedded_guidance = embedded_guidance
        self.calls = 0  # denoiser forward calls since construction (for benchmarks)
        self.rows = 0  # denoiser rows (latents through the denoiser, CFG halves counted) since construction
        self._bar: tqdm | None = None

    @contextmanager
    def progress(self, desc: str, total_rows: int, enabled: bool = True) -> Iterator[None]:
        """A progress bar over the denoiser rows of the calls made inside the block (``total_rows`` expected)."""
        bar = tqdm(total=total_rows, desc=desc, unit="row", leave=False, disable=not enabled, dynamic_ncols=True)
        self._bar = bar
        try:
            yield
        finally:
            self._bar = None
            bar.close()

    def __call__(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        cond: Conditioning,
        uncond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """``eps_u + w (eps_c - eps_u)`` for ``latents`` [B, C, h, w] with ``cond`` [B] and single-row ``uncond``.

        ``timestep`` is an int or a [B] tensor. With ``guidance_scale == 1`` only the conditional half runs.
        """
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device)
        t = t.expand(batch) if t.ndim == 0 else t
        if self.embedded_guidance:  # as the FLUX pipeline's guidance input: the scale, float32, one per row
            guidance = torch.full((batch,), float(guidance_scale), device=latents.device, dtype=torch.float32)
            return self._forward(latents, t, cond, guidance)
        if guidance_scale == 1.0:
            return self._forward(latents, t, cond)
        both = Conditioning.cat([uncond.expand_to(batch), cond])
        out = self._forward(torch.cat([latents, latents]), torch.cat([t, t]), both)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        outputs = []
        for start in range(0, latents.shape[0], self.max_micro_batch):
            rows = slice(start, start + self.max_micro_batch)
            extra = {} if guidance is None else {"guidance": guidance[rows]}
            with timed("unet_forward"):  # bucket and metric names kept from the UNet-only format
                out = self.network(latents[rows], timestep=t[rows], **cond.index(rows).denoiser_kwargs(), **extra,
                                return_dict=False)[0]
            self.calls += 1
            self.rows += out.shape[0]
            if self._bar is not None:
                self._bar.update(out.shape[0])
            outputs.append(out)
        return torch.cat(outputs)


def guided_rows(rows: int, guidance_scale: float, embedded_guidance: bool = False) -> int:
    """Denoiser rows of one guided step over ``rows`` latents (CFG doubles them unless the scale is 1 or the denoiser
    takes the scale as an input)."""
    return rows if guidance_scale == 1.0 or embedded_guidance else 2 * rows


@torch.no_grad()
def denoise(
    denoiser: GuidedDenoiser,
    sampler: Sampler,
    x_T: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: float,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """From ``x_T`` [B, C, h, w] to ``x_0`` over ``sampler.timesteps``: deterministic with ``eta`` 0, else each
    step's noise drawn from ``generators`` (one per row), keeping nothing of the trajectory."""
    x = x_T
    for t in sampler.timesteps:
        eps = denoiser(x, t, cond, uncond, guidance_scale)
        x = sampler.step(eps, t, x, eta, generators).prev_sample
    return x


@torch.no_grad()
def invert(
    denoiser: GuidedDenoiser,
    sampler: Sampler,
    x_0: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: float,
    iterations: int = 0,
) -> torch.Tensor:
    """Inversion of ``x_0`` [B, C, h, w] back to a noise latent over ``sampler.inverse_timesteps``.

    Each step evaluates the denoiser at the less noisy latent it starts from (the usual DDIM / Euler inversion).
    The sampler's step from the noisier latent evaluates it there instead, so the step is inverted exactly only
    where the denoiser's output does not change between the two. ``iterations`` > 0 re-evaluates the denoiser at
    the step's own result that many times (fixed-point iteration of the implicit inverse step; ReNoise, Garibi et
    al. 2024, arXiv 2403.14602), which converges to the exact inverse of the sampler's step where the iteration
    contracts, at ``1 + iterations`` denoiser calls a step.
    """
    x = x_0
    for t in sampler.inverse_timesteps:
        eps = denoiser(x, t, cond, uncond, guidance_scale)
        x_next = sampler.inverse_step(eps, t, x)
        for _ in range(iterations):
            eps = denoiser(x_next, t, cond, uncond, guidance_scale)
            x_next = sampler.inverse_step(eps, t, x)
        x = x_next
    return x


@torch.no_grad()
def reflect(
    denoiser: GuidedDenoiser,
    sampler: Sampler,
    x_T: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    rounds: int,
    forward_guidance_scale: float,
    inverse_guidance_scale: float,
    inversion_iterations: int = 0,
) -> torch.Tensor:
    """The condition-guided forward process: ``rounds`` times denoise ``x_T`` to ``x_0`` and invert it back
    (:func:`invert` with ``inversion_iterations``).

    The sampler must have ``set_timesteps(num_steps)`` applied. Returns the new ``x_T`` (same shape).
    """
    for _ in range(rounds):
        x_0 = denoise(denoiser, sampler, x_T, cond, uncond, forward_guidance_scale)
        x_T = invert(denoiser, sampler, x_0, cond, uncond, inverse_guidance_scale, inversion_iterations)
    return x_T


@dataclass
class Trajectories:
    """The post-fork part of a stage's sampled trajectories; ``N = rows * group_size``, siblings contiguous, and the
    sampler settings they were drawn with (the training recompute of the log-probs reads them from here)."""

    prompts: list[str]  # [N]
    cond: Conditioning  # [N]
    timesteps: torch.Tensor  # [S] timesteps of the kept (post-fork) steps, S = split_step, as the sampler gave them
    latents: torch.Tensor  # [N, S, C, h, w] x_t before each kept step
    next_latents: torch.Tensor  # [N, S, C, h, w] x_prev after it
    log_probs: torch.Tensor  # [N, S] float32 log-prob of each kept step at sampling time
    final_latents: torch.Tensor | None  # [N, C, h, w]; None in the rows selected for training
    eta: float  # the sampler's noise scale of the kept steps
    guidance_scale: float  # their CFG scale
    group_size: int  # children per fork (siblings share a prefix); 1 when every image is its own trajectory


def first_kept_steps(traj: Trajectories, window: int) -> Trajectories:
    """``traj`` with only its first ``window`` kept steps (the ones right after the fork) when ``window`` > 0, or
    without its last ``-window`` steps (the final, nearly noiseless ones) when ``window`` < 0; all of them when
    ``window`` is 0 or keeps them all. At least one step is always kept (validation rejects a ``window`` that
    would drop them all). The dropped steps are neither re-scored nor trained."""
    n = traj.timesteps.numel()
    keep = max(1, window if window > 0 else n + window)
    if window == 0 or keep >= n:
        return traj
    cut = slice(0, keep)
    return replace(traj, timesteps=traj.timesteps[cut], latents=traj.latents[:, cut],
                   next_latents=traj.next_latents[:, cut], log_probs=traj.log_probs[:, cut])


@torch.no_grad()
def sample_branched(
    denoiser: GuidedDenoiser,
    sampler: Sampler,
    x_T: torch.Tensor,
    prompts: Sequence[str],
    cond: Conditioning,
    uncond: Conditioning,
    split_step: int,
    split_time: int,
    guidance_scale: float,
    eta: float,
    seed: int,
    row_ids: Sequence[int],
) -> Trajectories:
    """The sampler with ``eta`` from ``x_T`` [R, C, h, w]; at step index ``num_steps - split_step`` each row forks into
    ``split_time`` children that share the prefix and continue with independent noise.

    ``row_ids`` are the global indices of the R rows; the noise of a row (and of each child) comes from a
    generator keyed by ``(seed, row id, child)``, so results do not depend on batching or process count.
    """
    timesteps = sampler.timesteps
    fork = len(timesteps) - split_step
    x = x_T
    generators = row_generators(seed, row_ids)
    kept_latents, kept_next, kept_logp = [], [], []
    for i, t in enumerate(timesteps):
        if i == fork:
            x = x.repeat_interleave(split_time, dim=0)
            cond = cond.repeat_interleave(split_time)
            generators = [g for r in row_ids for k in range(split_time) for g in row_generators(seed, [r], child=k)]
        eps = denoiser(x, t, cond, uncond, guidance_scale)
        out = sampler.step(eps, t, x, eta, generators)
        if i >= fork:
            kept_latents.append(x)
            kept_next.append(out.prev_sample)
            kept_logp.append(out.log_prob)
        x = out.prev_sample
    return Trajectories(
        prompts=[p for p in prompts for _ in range(split_time)],
        cond=cond,
        timesteps=timesteps[fork:].clone(),
        latents=torch.stack(kept_latents, dim=1),
        next_latents=torch.stack(kept_next, dim=1),
        log_probs=torch.stack(kept_logp, dim=1),
        final_latents=x,
        eta=eta,
        guidance_scale=guidance_scale,
        group_size=split_time,
    )
