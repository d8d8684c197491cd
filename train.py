"""SRRL on Stable Diffusion v1.x: ``python train.py --config config/stage_process.py:tiny`` (see README)."""

from srrl.entry import launch

if __name__ == "__main__":
    launch(family="sd", default_config="config/stage_process.py:sd14")
