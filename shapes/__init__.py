"""The shapes world: a renderer, a caption grammar and an exact pixel verifier. A leaf: it imports nothing of the
project (tests/test_layout.py checks)."""
