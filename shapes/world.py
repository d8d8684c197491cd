"""The shapes world: captioned scenes of coloured shapes whose correctness can be checked exactly.

A scene is a uniform dark background with one to three flat (hard-edged) shapes. Captions come from a
small grammar with three families:

* ``single``   -- ``"a red circle"``: exactly one object of that colour and shape;
* ``count``    -- ``"three blue squares"``: exactly N (2 or 3) objects, all of that colour and shape;
* ``relation`` -- ``"a red circle left of a blue square"``: exactly two objects of different colours, the
  first ``left of`` / ``right of`` / ``above`` / ``below`` the second (by centroid).

:func:`parse_caption` turns a caption back into a :class:`CaptionSpec`; :func:`render` draws a scene for a
spec; :mod:`shapes.verify` checks a (generated) image against a caption by pixel analysis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32  # image side in pixels
#: RGB in [0, 1] of the colour words; the background is BACKGROUND.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
}
BACKGROUND: tuple[float, float, float] = (0.08, 0.08, 0.08)
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
FAMILIES: tuple[str, ...] = ("single", "count", "relation")
#: Every word of the caption grammar (each is one token of the testbed tokenizer).
WORDS: tuple[str, ...] = (
    *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), "a", "two", "three", "left", "right", "of", "above", "below",
)  # fmt: skip
#: Half-extent (pixels) ranges of the objects of each family.
RADIUS: dict[str, tuple[float, float]] = {"single": (5.0, 9.0), "count": (3.5, 5.0), "relation": (4.0, 6.0)}


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for. ``objects`` holds (colour, shape) pairs: one for ``single``, the repeated
    object for ``count``, (subject, reference) for ``relation``."""

    family: str
    objects: tuple[tuple[str, str], ...]
    count: int = 1
    relation: str = ""


def make_caption(spec: CaptionSpec) -> str:
    """The caption of ``spec`` (the inverse of :func:`parse_caption`)."""
    if spec.family == "single":
        (colour, shape), = spec.objects
        return f"a {colour} {shape}"
    if spec.family == "count":
        (colour, shape), = spec.objects
        return f"{COUNT_WORDS[spec.count]} {colour} {shape}s"
    (c1, s1), (c2, s2) = spec.objects
    return f"a {c1} {s1} {spec.relation} a {c2} {s2}"


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_SINGLE = re.compile(rf"^a ({_COLOUR}) ({_SHAPE})$")
_COUNT = re.compile(rf"^(two|three) ({_COLOUR}) ({_SHAPE})s$")
_RELATION = re.compile(rf"^a ({_COLOUR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) a ({_COLOUR}) ({_SHAPE})$")


def parse_caption(caption: str) -> CaptionSpec:
    """Parse a caption of the grammar; raises ValueError (naming the caption and the grammar) otherwise."""
    text = " ".join(caption.lower().split())
    if m := _SINGLE.match(text):
        return CaptionSpec("single", ((m[1], m[2]),))
    if m := _COUNT.match(text):
        return CaptionSpec("count", ((m[2], m[3]),), count=2 if m[1] == "two" else 3)
    if (m := _RELATION.match(text)) and m[1] != m[4]:
        return CaptionSpec("relation", ((m[1], m[2]), (m[4], m[5])), relation=m[3])
    raise ValueError(
        f"caption {caption!r} is not in the shapes-world grammar: expected 'a COLOUR SHAPE', "
        f"'two|three COLOUR SHAPEs' or 'a COLOUR SHAPE left of|right of|above|below a OTHER-COLOUR SHAPE' "
        f"with COLOUR in {COLOURS} and SHAPE in {SHAPES}"
    )


def all_specs(family: str) -> list[CaptionSpec]:
    """Every caption spec of ``family`` in a fixed order."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if family == "single":
        return [CaptionSpec("single", (p,)) for p in pairs]
    if family == "count":
        return [CaptionSpec("count", (p,), count=n) for n in (2, 3) for p in pairs]
    if family == "relation":
        return [
            CaptionSpec("relation", (a, b), relation=r)
            for r in RELATIONS for a in pairs for b in pairs if a[0] != b[0]
        ]  # fmt: skip
    raise ValueError(f"unknown caption family {family!r}; known families: {', '.join(FAMILIES)}")


def random_spec(rng: np.random.Generator, family: str | None = None) -> CaptionSpec:
    """A uniformly random spec of ``family`` (or of a uniformly random family)."""
    family = family or FAMILIES[rng.integers(len(FAMILIES))]
    colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    if family == "single":
        return CaptionSpec("single", ((colour, shape),))
    if family == "count":
        return CaptionSpec("count", ((colour, shape),), count=int(rng.integers(2, 4)))
    other = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
    return CaptionSpec(
        "relation",
        ((colour, shape), (other, SHAPES[rng.integers(len(SHAPES))])),
        relation=RELATIONS[rng.integers(len(RELATIONS))],
    )


# ---- rendering ----
def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of a shape with half-extent ``r`` centred at pixel coordinates (cx, cy).

    circle: disc of radius r; square: axis-aligned, side 2r; triangle: upward, base 2r, height 2r
    (bounding-box fill ratios pi/4, 1 and 1/2: what :mod:`~shapes.verify` uses to tell them apart).
    """
    coords = np.arange(size) + 0.5
    dx, dy = coords[None, :] - cx, coords[:, None] - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        inside_y = (dy >= -r) & (dy <= r)
        return inside_y & (np.abs(dx) <= (dy + r) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


def _place(spec: CaptionSpec, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Centres and half-extents (cx, cy, r) of the objects of ``spec``: inside the image, not touching."""
    lo, hi = RADIUS[spec.family]
    n = spec.count if spec.family == "count" else len(spec.objects)
    for _ in range(1000):
        r = rng.uniform(lo, hi, n)
        pos = rng.uniform(r[:, None] + 1, size - 1 - r[:, None], (n, 2))
        if spec.family == "relation":
            axis = 0 if spec.relation in ("left of", "right of") else 1
            sign = -1.0 if spec.relation in ("left of", "above") else 1.0  # subject minus reference
            gap = (pos[0, axis] - pos[1, axis]) * sign
            if gap < r.sum() + 2 or abs(pos[0, 1 - axis] - pos[1, 1 - axis]) > 0.5 * abs(gap):
                continue
        dist = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1)) - 1.5 * (r[:, None] + r[None]) - 1
        if n == 1 or (dist[~np.eye(n, dtype=bool)] > 0).all():
            return [(float(x), float(y), float(rr)) for (x, y), rr in zip(pos, r, strict=True)]
    raise RuntimeError(f"could not place the objects of {make_caption(spec)!r}")


def render(spec: CaptionSpec, rng: np.random.Generator, size: int = SIZE) -> torch.Tensor:
    """Draw one scene satisfying ``spec``: FloatTensor[3, size, size] in [0, 1]."""
    img = np.empty((size, size, 3))
    img[:] = BACKGROUND
    objects = list(spec.objects) * spec.count if spec.family == "count" else list(spec.objects)
    for (colour, shape), (cx, cy, r) in zip(objects, _place(spec, rng, size), strict=True):
        img[shape_mask(shape, cx, cy, r, size)] = PALETTE[colour]
    return torch.from_numpy(img).permute(2, 0, 1).float()


def sample_batch(
    n: int, rng: np.random.Generator, size: int = SIZE, families: tuple[str, ...] = FAMILIES
) -> tuple[torch.Tensor, list[str]]:
    """``n`` random scenes (families uniform over ``families``) as ([n, 3, size, size] in [0, 1], captions)."""
    specs = [random_spec(rng, families[rng.integers(len(families))]) for _ in range(n)]
    return torch.stack([render(s, rng, size) for s in specs]), [make_caption(s) for s in specs]


#: (colour, shape) pairs whose captions are held out of RL training: one per colour, each shape at least once.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS))


def heldout_split(family: str) -> tuple[list[str], list[str]]:
    """(train, test) captions of ``family``: a caption is held out if its (first) object's colour-shape pair
    is in :data:`HELD_OUT_PAIRS` -- so test captions combine words seen in training in unseen ways."""
    train, test = [], []
    for spec in all_specs(family):
        (test if spec.objects[0] in HELD_OUT_PAIRS else train).append(make_caption(spec))
    return train, test


def prompt_sets() -> dict[str, list[str]]:
    """The testbed prompt files of ``config/prompt`` (name -> captions); in ``testbed_train`` / ``testbed_test``
    relations are thinned to every 12th, ``testbed_full_train`` holds every training caption; ``testbed_count_*``
    are the counting captions (the Quickstart's task)."""
    single, count, relation = (heldout_split(f) for f in FAMILIES)
    return {
        "testbed_single_train": single[0],
        "testbed_single_test": single[1],
        "testbed_train": single[0] + count[0] + relation[0][::12],
        "testbed_test": single[1] + count[1] + relation[1][::12],
        "testbed_full_train": single[0] + count[0] + relation[0],  # every training caption, relations in full
        "testbed_count_train": count[0],
        "testbed_count_test": count[1],
    }


if __name__ == "__main__":  # python -m shapes.world  rewrites the testbed prompt files
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "config" / "prompt"
    for name, captions in prompt_sets().items():
        (folder / f"{name}.json").write_text(json.dumps(captions, indent=1) + "\n", encoding="utf-8")
