"""The shapes-world verifier as the held-out evaluation's hand-in (:class:`srrl.heldout.Verifier`): a table of
per-image verifier outcomes, the verifier rewards read from it, and the per-family summary of ``eval.jsonl``."""

from __future__ import annotations

import torch

from shapes.verify import check
from shapes.world import parse_caption

PARTS: tuple[str, ...] = ("strict", "colour", "shape", "count", "relation")


def check_table(captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """Verifier results as FloatTensor[N, len(PARTS)]: 1/0 per part, NaN where a part does not apply."""
    rows = [
        [float(all(p.values()))] + [float(p[k]) if k in p else float("nan") for k in PARTS[1:]]
        for p in check(captions, images)
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(PARTS))


def table_reward(name: str, table: torch.Tensor) -> torch.Tensor | None:
    """The reward ``name`` of the images of a :func:`check_table` [N, parts], read from it: ``shapes_verify`` (the
    strict column) or ``shapes_partial`` (the mean of the parts that apply): FloatTensor[N]; None for other rewards."""
    if name == "shapes_verify":
        return table[:, 0].clone()
    if name == "shapes_partial":
        return table[:, 1:].nanmean(dim=1)
    return None


def family_summary(captions: list[str], table: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per caption family (and ``all``): mean and standard error of each part of a :func:`check_table`."""
    families = [parse_caption(c).family for c in captions]
    out: dict[str, dict[str, float]] = {}
    for family in [*dict.fromkeys(families), "all"]:
        rows = table[[i for i, f in enumerate(families) if family in (f, "all")]]
        entry: dict[str, float] = {"n": float(rows.shape[0])}
        for k, part in enumerate(PARTS):
            col = rows[:, k][~rows[:, k].isnan()]
            if col.numel():
                entry[part] = float(col.mean())
                entry[f"{part}_stderr"] = float(col.std() / col.numel() ** 0.5) if col.numel() > 1 else 0.0
        out[family] = entry
    return out


class ShapesVerifier:
    """The exact shapes-world verifier in the form the core's held-out evaluation takes it (``eval.verifier``)."""

    parts = PARTS

    def check_prompt(self, prompt: str) -> None:
        """Raise ValueError when ``prompt`` is no shapes-world caption."""
        parse_caption(prompt)

    def table(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """:func:`check_table` of ``images`` [N, 3, H, W]: [N, parts], column 0 the strict outcome."""
        return check_table(prompts, images)

    def reward(self, reward_name: str, table: torch.Tensor) -> torch.Tensor | None:
        """The reward ``reward_name`` read from ``table`` (:func:`table_reward`), or None."""
        return table_reward(reward_name, table)

    def summary(self, prompts: list[str], table: torch.Tensor) -> dict[str, dict[str, float]]:
        """:func:`family_summary`: per caption family and ``all``, each part's mean and standard error."""
        return family_summary(prompts, table)
