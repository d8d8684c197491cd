"""What the thin entry points share: flag parsing, logging set-up, model-family choice, one-line errors."""

from __future__ import annotations

import logging
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags
from transformers.utils import logging as hf_logging

from srrl.errors import ConfigError, LoadError, TrainingError

hf_logging.set_verbosity_error()  # importing diffusers pipelines warns about optional torchvision; not actionable
from cli.wiring import FAMILIES, trainer_for  # noqa: E402,F401  (FAMILIES: evaluate.py's --family)

hf_logging.set_verbosity_warning()

logger = logging.getLogger("srrl")


def launch(default_config: str, family: str | None = None) -> None:
    """The whole entry point: an absl app with a ``--config`` flag that runs SRRL with the config's model family
    (``config.family``), or with ``family`` when given (``train_xl.py``: always SDXL, as the original's script)."""
    from absl import app

    config_flag = config_flags.DEFINE_config_file("config", default_config, "Run configuration.")

    def main(argv: list[str]) -> None:
        del argv
        problem = config_file_problem(config_flag.value)
        if problem is not None:
            sys.stderr.write(f"invalid config: {problem}\n")
            sys.exit(2)
        config = config_flag.value
        if family is not None:
            config.family = family
        run_entry(config)

    app.run(main, flags_parser=parse_flags)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its lines joined), for a log line without a traceback."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _last_line(err: BaseException) -> str:
    """The last non-empty line of the message of ``err`` (absl and ml_collections put the cause there)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def config_file_problem(value: object) -> str | None:
    """Why the value of a config-file flag (``--config``) is no config, or None. ml_collections keeps the error of
    a missing or unreadable file in the flag's value and raises it only at the first access."""
    try:
        getattr(value, "keys", None)
    except OSError as err:
        return f"cannot load the config file: {_last_line(err)}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad ``--config`` (unknown preset, bad override) is one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.stderr.write(f"invalid config: {_last_line(err)}\n")
    except OSError as err:  # an override (--config.x=...) of a config file that could not be loaded
        sys.stderr.write(f"invalid config: cannot load the config file: {_last_line(err)}\n")
    except (AttributeError, KeyError) as err:  # an override of a field that does not exist
        text = str(err).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip("'\" ")
        sys.stderr.write(f"invalid config: unknown field {text}\n")
    sys.exit(2)


def run_entry(config: ml_collections.ConfigDict, family: str | None = None) -> None:
    """Run SRRL for ``config`` with its model family (``config.family``; ``family`` overrides it). A bad config value and anything that cannot be
    loaded or written exit 2 with one line; a run that cannot go on (:class:`TrainingError`) exits 1 with one."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if family is not None:
        config.family = family
    try:
        run_dir = trainer_for(config).run()
    except ConfigError as err:
        logger.error("invalid config: %s", one_line(err))
        sys.exit(2)
    except LoadError as err:
        logger.error("%s", one_line(err))
        sys.exit(2)
    except TrainingError as err:
        logger.error("run stopped: %s", one_line(err))
        sys.exit(1)
    logger.info("run finished: %s", run_dir)
