"""The model side's errors under one base class.

``LlarkError`` is the base of every error the model, its data, training, inference and evaluation
raise on purpose (the offline stages' base is ``pipeline.errors.PipelineError``). Configuration
errors also keep ``ValueError`` as a base, as they always had, and the command line exits with
``pipeline.errors.EXIT_CONFIG`` for them.
"""

from __future__ import annotations


class LlarkError(Exception):
    """Base of the errors the model side raises on purpose."""


class LlarkConfigError(LlarkError, ValueError):
    """A setting, a file or a directory the model side was given cannot be used; the message names it."""
