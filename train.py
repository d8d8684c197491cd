"""SRRL on Stable Diffusion v1.x: ``python train.py --config config/stage_process.py:tiny``."""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from srrl.entry import parse_flags, run_entry

_CONFIG = config_flags.DEFINE_config_file("config", "config/stage_process.py:sd14", "Run configuration.")


def main(argv: list[str]) -> None:
    del argv
    run_entry(_CONFIG.value, family="sd")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
