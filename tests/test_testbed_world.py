"""The shapes world (shapes.world), its exact verifier (shapes.verify), the verifier reports
(testbed.report) and the shapes_verify / shapes_partial rewards."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.rewards import build_reward
from shapes.verify import (
    check,
    check_objects,
    classify_shape,
    colour_classes,
    connected_components,
    partial_credit,
    segment,
    verify,
)
from shapes.world import (
    BACKGROUND,
    COLOURS,
    FAMILIES,
    HELD_OUT_PAIRS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZE,
    CaptionSpec,
    all_specs,
    heldout_split,
    make_caption,
    parse_caption,
    prompt_sets,
    random_spec,
    render,
    sample_batch,
    shape_mask,
)
from srrl.heldout import strict_gain
from testbed.verifier import PARTS, check_table, family_summary, table_reward

PROMPT_DIR = Path(__file__).resolve().parents[1] / "config" / "prompt"
FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
N_SCENES = 150  # rendered scenes per family


@pytest.fixture(scope="module")
def scenes() -> dict[str, tuple[list[CaptionSpec], torch.Tensor]]:
    """N_SCENES seeded random scenes per family: (specs, images [N, 3, SIZE, SIZE])."""
    out = {}
    for k, family in enumerate(FAMILIES):
        rng = np.random.default_rng(100 + k)
        specs = [random_spec(rng, family) for _ in range(N_SCENES)]
        out[family] = specs, torch.stack([render(s, rng) for s in specs])
    return out


def background(n: int) -> torch.Tensor:
    return torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None].expand(n, 3, SIZE, SIZE).clone()


def bbox_crop(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(mask)
    rows, cols = m.any(dim=1).nonzero()[:, 0], m.any(dim=0).nonzero()[:, 0]
    return m[int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]


# ------------------------------------------------------------------------------------- (a) ground truth
@pytest.mark.parametrize("family", FAMILIES)
def test_rendered_ground_truth_passes_the_verifier(scenes, family):
    specs, images = scenes[family]
    captions = [make_caption(s) for s in specs]
    assert images.shape == (N_SCENES, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    passed = verify(captions, images)
    assert passed.shape == (N_SCENES,) and set(passed.tolist()) <= {0.0, 1.0}
    failures = [c for c, ok in zip(captions, passed.tolist(), strict=True) if not ok]
    assert passed.mean() >= 0.99, f"{family}: {len(failures)} rendered scenes fail, e.g. {failures[:5]}"
    credit = partial_credit(captions, images)
    assert torch.equal(credit[passed == 1], torch.ones(int(passed.sum())))
    assert credit.mean() >= 0.99


def test_segment_recovers_the_rendered_objects():
    spec = CaptionSpec("relation", (("red", "circle"), ("blue", "square")), relation="left of")
    image = render(spec, np.random.default_rng(0))
    (objects,) = segment(image[None])
    assert sorted((o.colour, o.shape) for o in objects) == [("blue", "square"), ("red", "circle")]
    red = next(o for o in objects if o.colour == "red")
    blue = next(o for o in objects if o.colour == "blue")
    assert red.x < blue.x
    assert blue.fill == pytest.approx(1.0, abs=0.05) and red.fill == pytest.approx(math.pi / 4, abs=0.12)
    count = render(CaptionSpec("count", (("yellow", "triangle"),), count=3), np.random.default_rng(1))
    (objects,) = segment(count[None])
    assert [(o.colour, o.shape) for o in objects] == [("yellow", "triangle")] * 3
    assert all(o.fill == pytest.approx(0.5, abs=0.15) for o in objects)


def test_render_uses_only_palette_and_background_colours():
    images, captions = sample_batch(12, np.random.default_rng(3))
    assert images.shape == (12, 3, SIZE, SIZE) and len(captions) == 12
    assert {parse_caption(c).family for c in captions} <= set(FAMILIES)
    allowed = torch.tensor([BACKGROUND, *PALETTE.values()], dtype=torch.float32)  # [K, 3]
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(pixels, allowed).min(dim=1).values
    assert float(nearest.max()) < 1e-6
    only_single, captions = sample_batch(5, np.random.default_rng(4), families=("single",))
    assert all(parse_caption(c).family == "single" for c in captions)
    assert verify(captions, only_single).tolist() == [1.0] * 5


def test_render_is_deterministic_given_the_rng():
    spec = CaptionSpec("count", (("green", "square"),), count=2)
    a = render(spec, np.random.default_rng(7))
    b = render(spec, np.random.default_rng(7))
    c = render(spec, np.random.default_rng(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------ (b) noise and blanks
def test_noise_images_almost_never_pass():
    rng = np.random.default_rng(11)
    captions = [make_caption(random_spec(rng)) for _ in range(80)]
    noise = torch.rand(80, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert verify(captions, noise).sum() <= 1


def test_blank_background_never_passes():
    captions = ["a red circle", "two blue squares", "three green triangles", "a yellow circle above a red square"]
    blank = background(len(captions))
    assert verify(captions, blank).tolist() == [0.0] * 4
    assert partial_credit(captions, blank).tolist() == [0.0] * 4
    assert segment(blank) == [[]] * 4
    assert bool((colour_classes(blank) == -1).all())


# --------------------------------------------------------------------------------- (c) wrong captions
def mutations(spec: CaptionSpec) -> list[tuple[str, CaptionSpec]]:
    """Captions that differ from ``spec`` in one respect: colour, shape, count or (relations) relation."""
    (colour, shape), *rest = spec.objects
    used = {c for c, _ in spec.objects}
    other_colour = next(c for c in COLOURS if c not in used)
    other_shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    out = [
        ("colour", replace(spec, objects=((other_colour, shape), *rest))),
        ("shape", replace(spec, objects=((colour, other_shape), *rest))),
    ]
    if spec.family == "single":
        out.append(("count", CaptionSpec("count", spec.objects, count=2)))
    elif spec.family == "count":
        out.append(("count", replace(spec, count=5 - spec.count)))
        out.append(("count", CaptionSpec("single", spec.objects)))
    else:
        out.append(("count", CaptionSpec("count", (spec.objects[0],), count=2)))
        out.append(("relation", replace(spec, relation=FLIP[spec.relation])))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_mismatched_captions_fail(scenes, family):
    specs, images = scenes[family]
    specs, images = specs[:80], images[:80]
    captions, rows, kinds = [], [], []
    for i, spec in enumerate(specs):
        for kind, wrong in mutations(spec):
            assert wrong != spec
            captions.append(make_caption(wrong))
            rows.append(i)
            kinds.append(kind)
    passed = verify(captions, images[rows])
    for kind in dict.fromkeys(kinds):
        sel = [j for j, k in enumerate(kinds) if k == kind]
        rate = float(passed[sel].mean())
        assert rate <= 0.03, f"{family}/{kind}: {rate:.1%} of wrong captions pass"
    assert set(kinds) == ({"colour", "shape", "count", "relation"} if family == "relation"
                          else {"colour", "shape", "count"})


# ------------------------------------------------------------------------------------ (d) the grammar
@pytest.mark.parametrize("family", FAMILIES)
def test_parse_inverts_make_caption(family):
    specs = all_specs(family)
    assert len(specs) == {"single": 12, "count": 24, "relation": 4 * 12 * 9}[family]
    captions = [make_caption(s) for s in specs]
    assert len(set(captions)) == len(captions)
    for spec, caption in zip(specs, captions, strict=True):
        assert parse_caption(caption) == spec, caption


def test_caption_examples_and_normalisation():
    assert make_caption(CaptionSpec("single", (("red", "circle"),))) == "a red circle"
    assert make_caption(CaptionSpec("count", (("blue", "square"),), count=3)) == "three blue squares"
    rel = CaptionSpec("relation", (("red", "circle"), ("blue", "square")), relation="above")
    assert make_caption(rel) == "a red circle above a blue square"
    assert parse_caption("  A Red   circle ") == CaptionSpec("single", (("red", "circle"),))
    assert parse_caption("two green triangles") == CaptionSpec("count", (("green", "triangle"),), count=2)
    assert parse_caption("a yellow square right of a green circle").relation == "right of"
    assert set(RELATIONS) == {parse_caption(f"a red circle {r} a blue square").relation for r in RELATIONS}


@pytest.mark.parametrize("caption", [
    "a purple circle",
    "a red circle left of a red square",
    "four red circles",
    "two red circle",
    "a red circles",
    "a red circle next to a blue square",
    "",
])  # fmt: skip
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError) as err:
        parse_caption(caption)
    assert repr(caption) in str(err.value)
    with pytest.raises(ValueError):
        check([caption], background(1))


def test_unknown_family_and_shape_raise():
    with pytest.raises(ValueError, match="nope"):
        all_specs("nope")
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 16, 16, 5)
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        check(["a red circle", "a blue square"], background(1))


def test_random_spec_covers_every_family_and_is_valid():
    rng = np.random.default_rng(5)
    specs = [random_spec(rng) for _ in range(300)]
    assert {s.family for s in specs} == set(FAMILIES)
    for s in specs:
        assert parse_caption(make_caption(s)) == s
    assert {random_spec(rng, "count").count for _ in range(100)} == {2, 3}


# ------------------------------------------------------------------------------ (e) segmentation parts
def test_connected_components_8_connectivity():
    mask = torch.zeros(2, 7, 7, dtype=torch.bool)
    mask[0, 0:2, 0:2] = True  # blob A
    mask[0, 4:7, 4:6] = True  # blob B, separated from A by empty rows/columns
    mask[0, 0, 6] = True  # an isolated pixel
    mask[1, 2, 2] = mask[1, 3, 3] = mask[1, 4, 4] = True  # diagonal chain: one component
    mask[1, 0, 5] = mask[1, 1, 5] = True  # a vertical pair elsewhere
    labels = connected_components(mask)
    assert labels.dtype == torch.long and labels.shape == mask.shape
    assert bool((labels[~mask] == 0).all()) and bool((labels[mask] > 0).all())
    a, b, c = labels[0, 0:2, 0:2], labels[0, 4:7, 4:6], labels[0, 0, 6]
    assert a.unique().numel() == 1 and b.unique().numel() == 1
    assert len({int(a[0, 0]), int(b[0, 0]), int(c)}) == 3
    assert labels[0].unique().numel() == 4  # 0 and three components
    diagonal = {int(labels[1, 2, 2]), int(labels[1, 3, 3]), int(labels[1, 4, 4])}
    assert len(diagonal) == 1 and int(labels[1, 0, 5]) == int(labels[1, 1, 5]) not in diagonal


def test_connected_components_of_a_u_shape_is_one_label():
    """Propagation must travel around corners (a max of indices alone would split the arms)."""
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:7, 1] = mask[0, 1:7, 6] = mask[0, 6, 1:7] = True
    labels = connected_components(mask)
    assert labels[0][mask[0]].unique().numel() == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_classify_shape_on_rendered_masks(shape):
    for r in (3.5, 4.0, 5.0, 6.5, 8.0, 10.0, 12.0):
        for cx, cy in ((16.0, 16.0), (15.5, 16.3), (16.7, 15.6)):
            mask = shape_mask(shape, cx, cy, r)
            assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
            got = classify_shape(bbox_crop(mask))
            assert got == shape, f"{shape} r={r} at ({cx}, {cy}) classified as {got}"


def test_shape_mask_fill_ratios():
    r = 10.0
    for shape, fill in (("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5)):
        crop = bbox_crop(shape_mask(shape, 16.0, 16.0, r))
        assert float(crop.float().mean()) == pytest.approx(fill, abs=0.08)


def test_colour_classes_assigns_palette_colours():
    image = background(1)
    for k, colour in enumerate(COLOURS):
        image[0, :, k, 0] = torch.tensor(PALETTE[colour])
    classes = colour_classes(image)
    assert classes.shape == (1, SIZE, SIZE)
    assert classes[0, : len(COLOURS), 0].tolist() == list(range(len(COLOURS)))
    assert bool((classes[0, :, 1:] == -1).all())


def test_small_specks_are_ignored():
    image = render(CaptionSpec("single", (("red", "square"),)), np.random.default_rng(2))[None]
    corner = background(1)[0, :, :2, :2]
    image[0, :, :2, :2] = corner
    image[0, :, 0, 0] = torch.tensor(PALETTE["blue"])  # one stray pixel < MIN_AREA
    assert verify(["a red square"], image).tolist() == [1.0]


def test_check_objects_parts():
    spec = CaptionSpec("count", (("red", "circle"),), count=2)
    red = segment(render(CaptionSpec("count", (("red", "circle"),), count=3), np.random.default_rng(0))[None])[0]
    assert check_objects(spec, red) == {"colour": True, "shape": True, "count": False}
    assert check_objects(spec, []) == {"colour": False, "shape": False, "count": False}


# --------------------------------------------------------------------------------- (f) prompt files
def test_committed_prompt_files_equal_prompt_sets():
    sets = prompt_sets()
    assert set(sets) == {"testbed_single_train", "testbed_single_test", "testbed_train", "testbed_test",
                         "testbed_full_train", "testbed_count_train", "testbed_count_test"}
    for name, captions in sets.items():
        committed = json.loads((PROMPT_DIR / f"{name}.json").read_text(encoding="utf-8"))
        assert committed == captions, f"config/prompt/{name}.json is stale: rerun python -m shapes.world"


@pytest.mark.parametrize("split", ["testbed_single", "testbed", "testbed_count"])
def test_train_and_test_captions_are_disjoint_and_held_out(split):
    sets = prompt_sets()
    train, test = sets[f"{split}_train"], sets[f"{split}_test"]
    assert train and test and not set(train) & set(test)
    assert not set(sets["testbed_full_train"]) & set(test) and set(sets["testbed_train"]) <= set(sets["testbed_full_train"])
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert all(parse_caption(c).objects[0] in HELD_OUT_PAIRS for c in test)
    assert all(parse_caption(c).objects[0] not in HELD_OUT_PAIRS for c in train)
    train_words = {w for c in train for w in c.split()}
    assert {w for c in test for w in c.split()} <= train_words  # unseen combinations of seen words
    families = {"testbed": FAMILIES, "testbed_single": ("single",), "testbed_count": ("count",)}[split]
    assert {parse_caption(c).family for c in test} == set(families)
    assert {parse_caption(c).family for c in train} == set(families)


def test_held_out_pairs_and_split():
    assert sorted(c for c, _ in HELD_OUT_PAIRS) == sorted(COLOURS)
    assert {s for _, s in HELD_OUT_PAIRS} == set(SHAPES)
    for family in FAMILIES:
        train, test = heldout_split(family)
        assert sorted(train + test) == sorted(make_caption(s) for s in all_specs(family))
    single_train, single_test = heldout_split("single")
    assert len(single_test) == len(HELD_OUT_PAIRS) and len(single_train) == 12 - len(HELD_OUT_PAIRS)


# ------------------------------------------------------------------------------------------ (g) rewards
def test_shapes_rewards_on_rendered_and_wrong_captions(scenes):
    verify_fn = build_reward("shapes_verify", torch.device("cpu"))
    partial_fn = build_reward("shapes_partial", torch.device("cpu"))
    captions, images = [], []
    for family in FAMILIES:
        specs, imgs = scenes[family]
        captions += [make_caption(s) for s in specs[:5]]
        images.append(imgs[:5])
    images = torch.cat(images)
    for fn in (verify_fn, partial_fn):
        scores = fn(images, captions)
        assert scores.dtype == torch.float32 and scores.shape == (15,)
        assert scores.tolist() == [1.0] * 15
    wrong = [make_caption(mutations(parse_caption(c))[0][1]) for c in captions]  # wrong colour
    assert verify_fn(images, wrong).tolist() == [0.0] * 15
    partial = partial_fn(images, wrong)
    assert bool((partial < 1).all()) and bool((partial >= 0).all())


def test_partial_credit_of_a_flipped_relation_is_three_quarters(scenes):
    specs, images = scenes["relation"]
    specs, images = specs[:40], images[:40]
    flipped = [make_caption(replace(s, relation=FLIP[s.relation])) for s in specs]
    scores = build_reward("shapes_partial", torch.device("cpu"))(images, flipped)
    assert scores.tolist() == [0.75] * 40
    assert build_reward("shapes_verify", torch.device("cpu"))(images, flipped).tolist() == [0.0] * 40
    parts = check(flipped[:1], images[:1])[0]
    assert parts == {"colour": True, "shape": True, "count": True, "relation": False}


def test_partial_credit_single_wrong_shape_is_two_thirds():
    image = render(CaptionSpec("single", (("green", "circle"),)), np.random.default_rng(9))[None]
    assert partial_credit(["a green square"], image).tolist() == [pytest.approx(2 / 3)]
    assert partial_credit(["two green circles"], image).tolist() == [pytest.approx(2 / 3)]


# ------------------------------------------------------------------------------------------ (h) report
def mini_set() -> tuple[list[str], torch.Tensor]:
    """Five captions with known verifier results (see test_check_table_on_a_mini_set)."""
    rng = np.random.default_rng(21)
    shown = [
        ("a red circle", CaptionSpec("single", (("red", "circle"),))),  # all right
        ("a blue square", CaptionSpec("single", (("blue", "circle"),))),  # wrong shape
        ("two green triangles", CaptionSpec("count", (("green", "triangle"),), count=3)),  # wrong count
        ("a red circle left of a blue square",
         CaptionSpec("relation", (("red", "circle"), ("blue", "square")), relation="right of")),  # wrong relation
        ("a yellow square above a red triangle",
         CaptionSpec("relation", (("yellow", "square"), ("red", "triangle")), relation="above")),  # all right
    ]  # fmt: skip
    return [c for c, _ in shown], torch.stack([render(s, rng) for _, s in shown])


NAN = float("nan")
EXPECTED_TABLE = [
    [1, 1, 1, 1, NAN],
    [0, 1, 0, 1, NAN],
    [0, 1, 1, 0, NAN],
    [0, 1, 1, 1, 0],
    [1, 1, 1, 1, 1],
]


def test_check_table_on_a_mini_set():
    captions, images = mini_set()
    table = check_table(captions, images)
    assert PARTS == ("strict", "colour", "shape", "count", "relation")
    assert table.dtype == torch.float32 and table.shape == (5, 5)
    torch.testing.assert_close(table, torch.tensor(EXPECTED_TABLE), equal_nan=True)


def test_table_reward_equals_the_verifier_rewards():
    """The held-out pass reads shapes_verify and shapes_partial from the verifier's table (which it computes
    anyway); they must be the registry's rewards of the same images. Other rewards are not in the table."""
    captions, images = mini_set()
    table = check_table(captions, images)
    for name in ("shapes_verify", "shapes_partial"):
        torch.testing.assert_close(table_reward(name, table), build_reward(name, torch.device("cpu"))(images, captions))
    torch.testing.assert_close(table_reward("shapes_partial", table), torch.tensor([1, 2 / 3, 2 / 3, 3 / 4, 1]))
    assert table_reward("brightness", table) is None


def test_family_summary_on_a_mini_set():
    captions, images = mini_set()
    summary = family_summary(captions, check_table(captions, images))
    assert list(summary) == ["single", "count", "relation", "all"]
    single = summary["single"]
    assert single["n"] == 2 and single["strict"] == 0.5 and single["colour"] == 1.0 and single["shape"] == 0.5
    assert single["strict_stderr"] == pytest.approx(0.5) and single["colour_stderr"] == 0.0
    assert "relation" not in single and "relation_stderr" not in single
    count = summary["count"]
    assert count["n"] == 1 and count["strict"] == 0.0 and count["count"] == 0.0 and count["strict_stderr"] == 0.0
    relation = summary["relation"]
    assert relation["n"] == 2 and relation["strict"] == 0.5 and relation["relation"] == 0.5
    assert relation["relation_stderr"] == pytest.approx(0.5)
    everything = summary["all"]
    assert everything["n"] == 5
    assert everything["strict"] == pytest.approx(2 / 5) and everything["shape"] == pytest.approx(4 / 5)
    assert everything["count"] == pytest.approx(4 / 5) and everything["relation"] == 0.5  # over the 2 relations
    expected_stderr = float(np.std([1, 0, 0, 0, 1], ddof=1) / math.sqrt(5))
    assert everything["strict_stderr"] == pytest.approx(expected_stderr)
    for entry in summary.values():
        assert all(not math.isnan(v) for v in entry.values())


def test_family_summary_of_single_only_data_has_no_relation():
    rng = np.random.default_rng(4)
    captions = ["a red circle", "a blue triangle", "a green square"]
    images = torch.stack([render(parse_caption(c), rng) for c in captions])
    images[2] = background(1)[0]  # a miss
    table = check_table(captions, images)
    assert bool(table[:, PARTS.index("relation")].isnan().all())
    summary = family_summary(captions, table)
    assert list(summary) == ["single", "all"]
    for entry in summary.values():
        assert "relation" not in entry and entry["n"] == 3
        assert entry["strict"] == pytest.approx(2 / 3) and entry["colour"] == pytest.approx(2 / 3)




def _eval_record(strict: float, stderr: float, per_image: list[int] | None = None) -> dict:
    record = {"verifier": {"all": {"strict": strict, "strict_stderr": stderr}}}
    return record if per_image is None else {**record, "verifier_strict": per_image}


def test_strict_gain_pairs_the_per_image_outcomes():
    a = [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]  # 5 / 10
    b = [1, 1, 1, 0, 1, 1, 1, 0, 0, 1]  # 7 / 10: 3 gained (images 0-2), 1 lost (image 7)
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    gain = strict_gain(_eval_record(0.5, 0.1, a), _eval_record(0.7, 0.1, b))
    assert (gain.gained, gain.lost) == (3, 1) and gain.paired
    assert gain.delta == pytest.approx(0.2)
    # std of d by hand: d has three 1s, one -1, six 0s; mean 0.2
    assert gain.stderr == pytest.approx(((3 * 0.64 + 1.44 + 6 * 0.04) / 9) ** 0.5 / 10 ** 0.5)
    assert gain.stderr == pytest.approx(float(d.std()) / 10 ** 0.5)
    assert gain.in_se == pytest.approx(0.2 / gain.stderr)
    # identical outcomes: no change and no spread
    same = strict_gain(_eval_record(0.5, 0.1, a), _eval_record(0.5, 0.1, a))
    assert (same.delta, same.stderr, same.in_se, same.gained, same.lost) == (0.0, 0.0, 0.0, 0, 0)


def test_strict_gain_without_per_image_outcomes_treats_the_samples_as_independent():
    gain = strict_gain(_eval_record(0.20, 0.03), _eval_record(0.35, 0.04))
    assert gain.delta == pytest.approx(0.15) and gain.in_se == pytest.approx(0.15 / 0.05)
    assert (gain.gained, gain.lost) == (-1, -1) and not gain.paired
    assert strict_gain(_eval_record(0.35, 0.04), _eval_record(0.20, 0.03)).in_se == pytest.approx(-3.0)
    assert strict_gain(_eval_record(0.20, 0.03, [0, 1]), _eval_record(0.35, 0.04)).in_se == pytest.approx(3.0)
