"""Splitting a stage across processes and putting the pieces back together (accelerate / torch.distributed).

Every process samples a contiguous block of the stage's prompt rows with noise keyed by the *global* row id,
so the union of all blocks is the same for any process count. Rewards are gathered to every process, so
normalisation and selection are computed identically everywhere; the selected trajectories are then
assembled on every process by a summed all-reduce, and each process trains a strided share of them.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from srrl.sampling import Trajectories

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by mixed_precision


def make_accelerator(
    mixed_precision: str, log_with: str | None = None, project_dir: str | os.PathLike | None = None
) -> Accelerator:
    """The run's Accelerator. Under torchrun on a machine without CUDA, accelerate only picks gloo (MULTI_CPU) when
    told ``cpu=True``, so that is set when ``WORLD_SIZE`` > 1 and no GPU is visible.

    ``project_dir`` is the run directory; trackers that write files (tensorboard) log under
    ``<project_dir>/tensorboard``. accelerate refuses such a tracker without a logging directory, so when the run
    directory is not known yet the logging directory is ``./tensorboard`` until :class:`srrl.trackers.StageLogger`
    points it at the run directory (before any tracker starts).
    """
    if project_dir is None:
        project = ProjectConfiguration(logging_dir="tensorboard")
    else:
        project = ProjectConfiguration(project_dir=os.fspath(project_dir),
                                       logging_dir=os.path.join(os.fspath(project_dir), "tensorboard"))
    on_cpu_cluster = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with, cpu=on_cpu_cluster, project_config=project)


def local_rows(total: int, world: int, rank: int) -> list[int]:
    """The contiguous block of global row ids of process ``rank`` (``total`` must divide by ``world``)."""
    if total % world:
        raise ValueError(f"{total} rows do not split over {world} processes")
    per = total // world
    return list(range(rank * per, (rank + 1) * per))


def strided_share(order: torch.Tensor, world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share ``order[rank::world]`` padded to ``ceil(len / world)`` entries.

    Returns ``(indices [L], weight [L])`` with weight 0 on padding, so every process runs the same number of
    micro-steps (DDP needs that) and padding contributes no gradient.
    """
    length = -(-order.numel() // world)
    share = order[rank::world]
    weight = torch.ones(length)
    if share.numel() < length:
        pad = length - share.numel()
        filler = order[:1].expand(pad) if order.numel() else torch.zeros(pad, dtype=torch.long)
        share = torch.cat([share, filler])
        weight[length - pad :] = 0.0
    return share, weight


def gather_flat(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``values`` [n, ...] in rank order (n equal on all processes); on CPU."""
    if accelerator.num_processes == 1:
        return values.cpu()
    return accelerator.gather(values.to(accelerator.device).contiguous()).cpu()


def _assemble(accelerator, local: torch.Tensor, wanted: torch.Tensor, offset: int) -> torch.Tensor:
    """Rows ``wanted`` (global ids) of a tensor whose rows ``offset..offset+len(local)`` live on this process."""
    out = torch.zeros((wanted.numel(), *local.shape[1:]), dtype=local.dtype, device=local.device)
    mine = (wanted >= offset) & (wanted < offset + local.shape[0])
    out[mine.to(local.device)] = local[(wanted[mine] - offset).to(local.device)]
    if accelerator.num_processes > 1:
        dtype = out.dtype
        out = accelerator.reduce(out.float() if dtype in (torch.float16, torch.bfloat16) else out, "sum").to(dtype)
    return out


def select_trajectories(accelerator, traj: Trajectories, wanted: torch.Tensor, offset: int) -> Trajectories:
    """The trajectories with global ids ``wanted`` [M], on every process (``traj`` holds ids from ``offset``): the
    tensors training reads (conditioning, kept steps, their log-probs) gathered; the sampler settings as they are;
    prompts and final latents, which training never reads, left out."""
    pick = lambda t: _assemble(accelerator, t, wanted, offset)  # noqa: E731
    return replace(traj, prompts=[], cond=traj.cond.map(pick), latents=pick(traj.latents),
                   next_latents=pick(traj.next_latents), log_probs=pick(traj.log_probs), final_latents=None)


def all_true(accelerator, flag: bool) -> bool:
    """``flag`` and-ed over all processes (one tiny all-reduce when there are several)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, "sum").item() == accelerator.num_processes)
