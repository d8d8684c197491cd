"""What the thin entry points share: flag parsing, logging set-up, model-family choice, one-line errors."""

from __future__ import annotations

import logging
import sys

import ml_collections
from absl import flags
from transformers.utils import logging as hf_logging

from srrl.validate import ConfigError

hf_logging.set_verbosity_error()  # importing diffusers pipelines warns about optional torchvision; not actionable
from srrl.models import load_sd_model, load_sdxl_model  # noqa: E402

hf_logging.set_verbosity_warning()

FAMILIES = {"sd": load_sd_model, "sdxl": load_sdxl_model}
logger = logging.getLogger("srrl")


def launch(family: str, default_config: str) -> None:
    """The whole entry point: an absl app with a ``--config`` flag that runs SRRL for ``family``."""
    from absl import app
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", default_config, "Run configuration.")

    def main(argv: list[str]) -> None:
        del argv
        run_entry(config_flag.value, family)

    app.run(main, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad ``--config`` (unknown preset, bad override) is one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        sys.stderr.write(f"invalid config: {lines[-1] if lines else err}\n")
    except (AttributeError, KeyError) as err:  # an override of a field that does not exist
        text = str(err).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip("'\" ")
        sys.stderr.write(f"invalid config: unknown field {text}\n")
    sys.exit(2)


def run_entry(config: ml_collections.ConfigDict, family: str) -> None:
    """Run SRRL for ``config`` with the model family ``family``; a bad config exits 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from srrl.trainer import train

    try:
        run_dir = train(config, FAMILIES[family])
    except ConfigError as err:
        logger.error("invalid config: %s", err)
        sys.exit(2)
    except RuntimeError as err:
        if not str(err).startswith("cannot load"):
            raise
        logger.error("%s", err)
        sys.exit(2)
    logger.info("run finished: %s", run_dir)
