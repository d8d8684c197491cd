"""SRRL on SDXL: ``python train_xl.py --config config/stage_process.py:tiny_xl`` (see README)."""

from srrl.entry import launch

if __name__ == "__main__":
    launch(family="sdxl", default_config="config/stage_process.py:sdxl")
