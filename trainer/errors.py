"""Errors of the trainer.

`TrainerError` is a mistake the user can fix (a missing run directory, a store that does not
match the run, a bad flag, a tokenizer without the chat tokens); its message is one line and
`run_train.py` prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class TrainerError(ValueError):
    """A user-facing problem with a training, evaluation or chat request; the message is one line."""
