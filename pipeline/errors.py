"""The errors the offline stages raise on purpose, under one base class, and what each exits with.

``PipelineError`` is the base of every one of them (the model side's base is ``llark.errors.LlarkError``);
each also keeps the built-in base it always had (``ValueError`` for bad configuration and input),
so ``except ValueError`` still catches them. ``EXIT_CODES`` is the one table the command line reads.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of the errors the offline stages raise on purpose."""


class StageConfigError(PipelineError, ValueError):
    """The stage cannot start: its configuration or output location is not usable."""


class OutputLocked(StageConfigError):
    """Another live run is writing the same output."""


class RunAborted(PipelineError, RuntimeError):
    """The run cannot go on (the disk is full or read-only); what was finished is kept in the ledger."""


class ItemError(PipelineError):
    """An expected, explainable failure of one item: it becomes an error record with this code.

    ``code`` is a short stable identifier the summary groups by (e.g. ``silent``, ``not_audio``);
    the message is the human-readable reason.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class InvalidRecord(PipelineError, ValueError):
    """A record that does not satisfy the clip-record contract."""


# What `llark VERB` exits with.
EXIT_OK = 0
EXIT_ITEMS_FAILED = 1  # the run finished, but items failed (with --strict) or a check found problems
EXIT_CONFIG = 2  # nothing was done: the configuration, the input or the output location is not usable
EXIT_ABORTED = 3  # the run stopped part-way (a full or read-only disk); rerunning goes on
EXIT_INTERRUPTED = 130  # Ctrl-C; rerunning goes on
