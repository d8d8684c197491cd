"""SRRL on SDXL, an alias of ``train.py`` that sets ``family = "sdxl"`` (for users of the original's script)."""

from cli.entry import launch

if __name__ == "__main__":
    launch(default_config="config/stage_process.py:sdxl", family="sdxl")
