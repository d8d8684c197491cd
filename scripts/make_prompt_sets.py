"""Write the prompt files of the original SRRL code to ``config/prompt`` from their word lists.

The original repository (github.com/jadenpan0/SRRL, ``config/prompt/``) ships eleven prompt files; its
``config/stage_process.py``, ``train.sh`` and ``train_xl.sh`` all train on ``template1_train.json``. This
script rebuilds each of them, under the same name and with the same prompts in the same order, from data:

- ``template1_{train,test}``: ``"a {animal} {activity}"`` over 45 animals and 3 activities. The animals are
  split into three blocks of 15 in list order; block k trains on activity k. The test split gives every
  animal the two activities it never trains on (90 prompts), so no pairing is in both splits.
- ``template2_{train,test}``: ``"{colour} {fruit}"``. Training: 20 fruits, each in two colours it commonly
  has. Test: each fruit in a third colour, then 20 vegetables that training never shows, one colour each.
- ``template3_{train,test}``: ``"{object} {relation} {object}"`` triples (on, under, left / right of;
  the test split adds behind and in the front of).
- ``template4_train``: 20 scenes that show physical laws and logic; ``template5_train``: 20 scenes that break
  them. The original has no held-out split for either.
- ``single1_train`` (a balance leaning towards its lighter side), ``single2_train`` (a cake with text),
  ``single3_train`` (cars driving on water): the one-prompt case studies, likewise without a test split.

The prompts are written as the original has them, its grammar included ("a ant", "in the front of"), so that a
run on them trains on the same text. Output is deterministic: a JSON list, one-space indent, UTF-8, a final
newline. ``tests/test_prompts.py`` checks that the checked-in files are exactly what this writes.

Usage::

    python scripts/make_prompt_sets.py                 # rewrite config/prompt/template*.json, single*.json
    python scripts/make_prompt_sets.py --check         # exit 1 (writing nothing) if a file differs
    python scripts/make_prompt_sets.py --out /tmp/p    # write somewhere else
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("make_prompt_sets")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "config" / "prompt"

# --- template1: animals doing activities -------------------------------------------------------------------
ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear",
    "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale", "dolphin",
    "squirrel", "mouse", "rat", "snake",
    "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat",
    "gorilla", "hedgehog", "kangaroo",
)
ACTIVITIES = ("washing dishes", "riding a bike", "playing chess")

# --- template2: fruits (two training colours, one test colour) and test-only vegetables --------------------
FRUITS = (
    ("apple", ("red", "green"), "yellow"),
    ("banana", ("yellow", "brown"), "green"),
    ("orange", ("orange", "yellow"), "green"),
    ("strawberry", ("red", "green"), "white"),
    ("grape", ("purple", "green"), "black"),
    ("watermelon", ("red", "green"), "white"),
    ("kiwi", ("brown", "green"), "white"),
    ("mango", ("orange", "yellow"), "green"),
    ("pear", ("green", "yellow"), "brown"),
    ("pineapple", ("yellow", "brown"), "green"),
    ("peach", ("orange", "yellow"), "red"),
    ("plum", ("purple", "green"), "red"),
    ("blueberry", ("blue", "purple"), "black"),
    ("raspberry", ("red", "green"), "black"),
    ("lemon", ("yellow", "green"), "white"),
    ("lime", ("green", "yellow"), "white"),
    ("avocado", ("green", "brown"), "yellow"),
    ("cherry", ("red", "green"), "black"),
    ("pomegranate", ("red", "pink"), "white"),
    ("grapefruit", ("pink", "red"), "yellow"),
)
VEGETABLES = (
    ("carrot", "white"), ("broccoli", "white"), ("tomato", "yellow"), ("cucumber", "white"),
    ("spinach", "brown"), ("lettuce", "red"), ("bell pepper", "yellow"), ("zucchini", "white"),
    ("sweet potato", "white"), ("onion", "green"), ("garlic", "green"), ("celery", "white"),
    ("cabbage", "white"), ("cauliflower", "purple"), ("eggplant", "green"), ("asparagus", "purple"),
    ("peas", "white"), ("corn", "green"), ("green beans", "purple"), ("brussels sprouts", "white"),
)

# --- template3: spatial relations, (object, relation, object) ----------------------------------------------
ON, UNDER, LEFT, RIGHT = "on", "under", "on the left of", "on the right of"
BEHIND, FRONT = "behind", "in the front of"
SPATIAL_TRAIN = (
    ("chair", UNDER, "umbrella"), ("table", UNDER, "umbrella"), ("car", ON, "street"), ("wheel", ON, "train"),
    ("airplane", ON, "street"), ("bag", ON, "street"), ("tree", UNDER, "sky"), ("building", UNDER, "sky"),
    ("street", UNDER, "sky"), ("dog", ON, "boat"), ("tower", UNDER, "sky"), ("cup", ON, "shirt"),
    ("person", ON, "street"), ("laptop", ON, "table"), ("table", UNDER, "laptop"), ("person", ON, "sofa"),
    ("glasses", ON, "face"), ("sofa", UNDER, "person"), ("table", UNDER, "vase"), ("street", UNDER, "car"),
    ("dog", RIGHT, "vase"), ("building", RIGHT, "building"), ("suitcase", LEFT, "person"),
    ("dog", LEFT, "person"), ("kite", RIGHT, "kite"), ("person", LEFT, "ball"), ("ball", RIGHT, "person"),
    ("road", LEFT, "grass"), ("grass", RIGHT, "road"), ("person", LEFT, "pillow"), ("bowl", RIGHT, "plate"),
    ("building", RIGHT, "truck"), ("person", LEFT, "bottle"), ("bottle", RIGHT, "person"),
    ("box", LEFT, "post"), ("building", LEFT, "building"), ("car", RIGHT, "car"), ("truck", RIGHT, "car"),
    ("car", LEFT, "car"), ("person", LEFT, "person"),
)
SPATIAL_TEST = (
    ("vase", ON, "table"), ("shirt", ON, "person"), ("watch", ON, "person"), ("jacket", ON, "person"),
    ("motorcycle", ON, "road"), ("motorcycle", BEHIND, "person"), ("person", BEHIND, "person"),
    ("building", BEHIND, "trees"), ("hydrant", BEHIND, "motorcycle"), ("trees", BEHIND, "grass"),
    ("wheel", FRONT, "wheel"), ("tower", FRONT, "train"), ("truck", FRONT, "building"), ("cat", FRONT, "vase"),
    ("trash can", FRONT, "cabinet"), ("road", UNDER, "bus"), ("road", UNDER, "building"),
    ("road", UNDER, "wheel"), ("table", UNDER, "plate"), ("person", UNDER, "umbrella"),
    ("cone", RIGHT, "cone"), ("car", RIGHT, "umbrella"), ("phone", RIGHT, "monitor"), ("person", RIGHT, "bear"),
    ("bear", RIGHT, "person"), ("bear", LEFT, "person"), ("car", LEFT, "bus"), ("motorcycle", LEFT, "bus"),
    ("motorcycle", LEFT, "car"), ("road", LEFT, "tree"),
)

# --- template4 / template5: scenes that follow / break physical laws and logic -----------------------------
LAWFUL_SCENES = (
    "Dominoes falling to demonstrate cause and effect logic.",
    "Detective connecting clues on a corkboard with string.",
    "Ball rolling down ramp, showing gravity in action.",
    "Magnets attracting and repelling on a metal surface.",
    "Student balancing a scale with diverse weights.",
    "Pendulum swinging, illustrating conservation of energy.",
    "Child testing objects' buoyancy in a water tank.",
    "Person decoding a ciphered message on paper.",
    "Scientist comparing plant growth with and without sunlight.",
    "Teacher drawing a Venn diagram to explain logic.",
    "Robot sorting colored blocks by shape and hue.",
    "Person solving a Sudoku puzzle on a desk.",
    "Two kids racing toy cars on different surfaces.",
    "Person tracing electrical circuits with a tester.",
    "Detective examining fingerprints with a magnifying glass.",
    "Student observing chemical reactions in test tubes.",
    "Person reflecting light using mirrors onto targets.",
    "Detective piecing together torn letter fragments.",
    "Person solving a logic puzzle on a chalkboard.",
    "Student testing friction with objects on ramps.",
)
LAW_BREAKING_SCENES = (
    "A ball rolling uphill against gravity, surprising onlookers.",
    "Dominoes falling in reverse, standing themselves up.",
    "Detective finds a footprint leading to a floating shoe.",
    "A magnet attracts plastic objects, not metal ones.",
    "Shadow points away from the light source, defying logic.",
    "A plant grows upside down, roots in the air.",
    "Water flows upward in a tilted glass, defying gravity.",
    "A clock runs backward, time reversing for everyone.",
    "A mirror reflects a different object than in front.",
    "Ice cubes float in hot coffee, not melting.",
    "A candle flame burns downward, not upward.",
    "Objects fall slower in a vacuum than in air.",
    "A book remains dry underwater, pages untouched.",
    "A person walks through a solid wall unharmed.",
    "Raindrops fall upward from the ground to the sky.",
    "A compass needle spins wildly, never settling north.",
    "A shadow appears without any object present.",
    "A person lifts a heavy rock effortlessly, surprising others.",
    "A glass shatters before being touched by the ball.",
    "A balloon sinks in air, going downwards rapidly.",
)

# --- single1..3: the one-prompt case studies ---------------------------------------------------------------
CASE_STUDIES = {
    "single1": "Draw a balance. The object on the left side is lighter than that on the right side, "
               "but the balance leans to the left",
    "single2": "Draw a cake. On the cake, embed a row of characters: Happy Birthday. Automatically formatted.",
    "single3": "Cars are driving on water.",
}


def animal_activity_splits() -> tuple[list[str], list[str]]:
    """template1: each animal block trains on one activity; the test split holds every other pairing."""
    block = len(ANIMALS) // len(ACTIVITIES)
    assert block * len(ACTIVITIES) == len(ANIMALS), "the animals must split into equal blocks"
    trained = [(animal, ACTIVITIES[i // block]) for i, animal in enumerate(ANIMALS)]
    train = [f"a {animal} {activity}" for animal, activity in trained]
    test = [f"a {animal} {activity}" for animal, own in trained for activity in ACTIVITIES if activity != own]
    return train, test


def colour_splits() -> tuple[list[str], list[str]]:
    """template2: fruits in their training colours; then each fruit's test colour and the vegetables'."""
    train = [f"{colour} {fruit}" for fruit, colours, _ in FRUITS for colour in colours]
    test = [f"{colour} {fruit}" for fruit, _, colour in FRUITS] + [f"{colour} {veg}" for veg, colour in VEGETABLES]
    return train, test


def spatial_splits() -> tuple[list[str], list[str]]:
    """template3: the relation triples written out."""
    def write(triples: tuple[tuple[str, str, str], ...]) -> list[str]:
        return [f"{subject} {relation} {obj}" for subject, relation, obj in triples]

    return write(SPATIAL_TRAIN), write(SPATIAL_TEST)


def prompt_sets() -> dict[str, list[str]]:
    """Every file this script writes: name (without ``.json``) -> prompts, in the original's order."""
    sets: dict[str, list[str]] = {}
    for name, (train, test) in (("template1", animal_activity_splits()), ("template2", colour_splits()),
                                ("template3", spatial_splits())):
        sets[f"{name}_train"], sets[f"{name}_test"] = train, test
    sets["template4_train"] = list(LAWFUL_SCENES)
    sets["template5_train"] = list(LAW_BREAKING_SCENES)
    for name, prompt in CASE_STUDIES.items():
        sets[f"{name}_train"] = [prompt]
    return sets


def render(prompts: list[str]) -> str:
    """A prompt file's exact text: a JSON list with one-space indent and a final newline."""
    return json.dumps(prompts, indent=1, ensure_ascii=False) + "\n"


def stale_files(out: Path) -> list[str]:
    """The names of the files under ``out`` that are missing or differ from what this script writes."""
    stale = []
    for name, prompts in prompt_sets().items():
        path = out / f"{name}.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != render(prompts):
            stale.append(path.name)
    return stale


def write_all(out: Path) -> None:
    """Write every prompt file to ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, prompts in prompt_sets().items():
        (out / f"{name}.json").write_text(render(prompts), encoding="utf-8")
        logger.info("wrote %s (%d prompts)", out / f"{name}.json", len(prompts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the prompt files")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a file is missing or differs from what would be written")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the prompt files; the exit status."""
    args = parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            logger.error("%s is missing or differs from what scripts/make_prompt_sets.py writes", args.out / name)
        if not stale:
            logger.info("all %d prompt files in %s are up to date", len(prompt_sets()), args.out)
        return 1 if stale else 0
    write_all(args.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
