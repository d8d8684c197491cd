"""Exact verification of shapes-world captions by pixel analysis.

An image is segmented into objects: a pixel is foreground if some channel differs from the world's
background by more than ``FG_THRESHOLD`` and it lies within ``PALETTE_RADIUS`` (RGB distance) of a palette
colour, which it then takes (pixels of no palette colour -- muddy sampling noise -- are ignored); the objects
are the 8-connected components of each colour class with at least ``MIN_AREA`` pixels. An object's
shape is the template (square = its bounding box, circle = the inscribed ellipse, upward triangle) that
overlaps it best (intersection over union); its bounding-box fill ratio (square ~1, circle ~pi/4,
triangle ~1/2) is kept for inspection, and its position is its centroid.

:func:`check` scores a caption's parts -- ``colour``, ``shape``, ``count`` and (for relations)
``relation`` -- each 0 or 1; :func:`verify` is their conjunction and :func:`partial_credit` their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shapes.world import BACKGROUND, COLOURS, PALETTE, CaptionSpec, parse_caption

FG_THRESHOLD = 0.3  # max-channel distance from the background that makes a pixel foreground
PALETTE_RADIUS = 0.45  # RGB distance within which a pixel takes a palette colour
MIN_AREA = 12  # smallest component (pixels) that counts as an object (the smallest rendered one has ~25)
RELATION_MARGIN = 1.5  # pixels the centroids must differ by along the relation's axis


@dataclass(frozen=True)
class SceneObject:
    """One segmented object: its colour, shape, centroid (x, y in pixels), area (pixels) and fill ratio."""

    colour: str
    shape: str
    x: float
    y: float
    area: int
    fill: float


def classify_shape(mask: torch.Tensor) -> str:
    """The shape whose template, fitted to the bounding box of the boolean ``mask`` [h, w] (cropped to the
    box), overlaps it best: square (the box), circle (the inscribed ellipse) or triangle (apex up)."""
    h, w = mask.shape
    v = (torch.arange(h) + 0.5) / (h / 2) - 1.0  # pixel centres in [-1, 1]
    u = (torch.arange(w) + 0.5) / (w / 2) - 1.0
    v, u = v[:, None], u[None, :]
    def iou(template: torch.Tensor) -> float:
        return float((mask & template).sum()) / float((mask | template).sum())

    # a digitised disc of radius r spans a box whose half-side lies within half a pixel of r
    grow = 1.0 + 1.0 / max(h, w)
    scores = {
        "circle": max(iou(u**2 + v**2 <= 1.0), iou(u**2 + v**2 <= grow**2)),
        "square": iou(torch.ones(h, w, dtype=torch.bool)),
        "triangle": iou(u.abs() <= (v + 1.0) / 2.0 + 1.0 / w),
    }
    return max(scores, key=scores.__getitem__)


def colour_classes(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel colour class of [N, 3, H, W] images in [0, 1]: LongTensor[N, H, W], -1 = background or no
    palette colour, k = COLOURS[k]."""
    images = images.float()
    bg = torch.tensor(BACKGROUND)[None, :, None, None]
    fg = (images - bg).abs().amax(dim=1) > FG_THRESHOLD  # [N, H, W]
    refs = torch.tensor([PALETTE[c] for c in COLOURS])  # [K, 3]
    dist2, nearest = ((images[:, None] - refs[None, :, :, None, None]) ** 2).sum(dim=2).min(dim=1)  # [N, H, W]
    keep = fg & (dist2 < PALETTE_RADIUS**2)
    return torch.where(keep, nearest, torch.full_like(nearest, -1))


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of boolean masks [N, H, W]: LongTensor, 0 = off, else a label > 0
    shared by exactly the pixels of one component (label propagation by 3x3 max-pooling, each image until its own
    labels stop changing)."""
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, h, w).expand(n, h, w)
    labels = torch.where(mask, ids, torch.zeros(()))
    active = torch.arange(n)  # images whose labels changed in the last round
    while active.numel():
        current = labels[active]
        grown = torch.nn.functional.max_pool2d(current[:, None], 3, stride=1, padding=1)[:, 0]
        grown = torch.where(mask[active], grown, torch.zeros(()))
        labels[active] = grown
        active = active[(grown != current).flatten(1).any(dim=1)]
    return labels.long()


def segment(images: torch.Tensor) -> list[list[SceneObject]]:
    """Objects of each of the [N, 3, H, W] images in [0, 1] (see the module docstring)."""
    classes = colour_classes(images)
    n, h, w = classes.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    scenes: list[list[SceneObject]] = [[] for _ in range(n)]
    for k, colour in enumerate(COLOURS):
        labels = connected_components(classes == k)
        for i in range(n):
            for label in labels[i].unique():
                if label == 0:
                    continue
                px = labels[i] == label
                area = int(px.sum())
                if area < MIN_AREA:
                    continue
                rows, cols = px.any(dim=1).nonzero()[:, 0], px.any(dim=0).nonzero()[:, 0]
                crop = px[int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]
                shape = classify_shape(crop)
                x, y = float(xs[px].mean()), float(ys[px].mean())
                scenes[i].append(SceneObject(colour, shape, x, y, area, area / crop.numel()))
    return scenes


def _relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether subject ``a`` is ``relation`` reference ``b`` (image y grows downwards)."""
    gap = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]
    return gap > RELATION_MARGIN


def check_objects(spec: CaptionSpec, objects: list[SceneObject]) -> dict[str, bool]:
    """The parts of ``spec`` that the segmented ``objects`` satisfy: colour, shape, count (and relation)."""
    if spec.family in ("single", "count"):
        (colour, shape), = spec.objects
        mine = [o for o in objects if o.colour == colour]
        return {
            "colour": bool(objects) and len(mine) == len(objects),
            "shape": bool(mine) and all(o.shape == shape for o in mine),
            "count": len(objects) == spec.count,
        }
    (c1, s1), (c2, s2) = spec.objects
    first = [o for o in objects if o.colour == c1]
    second = [o for o in objects if o.colour == c2]
    one_each = len(first) == 1 and len(second) == 1
    return {
        "colour": bool(first) and bool(second),
        "shape": one_each and first[0].shape == s1 and second[0].shape == s2,
        "count": len(objects) == 2,
        "relation": one_each and _relation_holds(spec.relation, first[0], second[0]),
    }


def check(captions: list[str], images: torch.Tensor) -> list[dict[str, bool]]:
    """Check each caption against its image ([N, 3, H, W] in [0, 1]); one dict of parts per image."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images; they must match")
    specs = [parse_caption(c) for c in captions]
    return [check_objects(s, objs) for s, objs in zip(specs, segment(images), strict=True)]


def verify(captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """1.0 where the image satisfies every part of its caption, else 0.0: FloatTensor[N]."""
    return torch.tensor([float(all(parts.values())) for parts in check(captions, images)])


def partial_credit(captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """Share of the caption's parts that the image satisfies (each part worth the same): FloatTensor[N]."""
    return torch.tensor([sum(parts.values()) / len(parts) for parts in check(captions, images)])
