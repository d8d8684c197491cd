"""SRRL: self-reflective reinforcement learning for diffusion models (arXiv 2505.22407), reimplemented."""

import os

# The Rust tokenizers' worker threads compete with torch's OpenMP threads on small CPU machines
# (several times slower UNet steps when both spin); the text prompts here are short, so keep it serial.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
