"""SRRL for any model family (``config.family``): ``python train.py --config config/stage_process.py:tiny``."""

from cli.entry import launch

if __name__ == "__main__":
    launch(default_config="config/stage_process.py:sd14")
