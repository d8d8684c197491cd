"""The two kinds of error a user sees as one line (no traceback): a bad config value and something unloadable.

A leaf module: the core, the rewards and the entry points import it; it imports nothing of the project.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line naming the field, its value and what is allowed."""


class LoadError(RuntimeError):
    """A model, checkpoint, run directory or file that cannot be loaded or written; the message is one line that
    names it and says what to do."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. optimizer steps that keep producing non-finite weights); one line naming the
    cause and what to change."""
