"""Exceptions raised by plstar.

Every refusal of bad input is a ``PlstarInputError`` (a ``ValueError``), so callers can catch one
type and the command line can turn it into a message and exit code 2 without a traceback.
"""

from __future__ import annotations


class PlstarInputError(ValueError):
    """Input that plstar refuses to measure: the message names the problem and, where one
    exists, the fix."""


class IllDefinedModelError(PlstarInputError):
    """F is not a function of the parameters alone (Dropout or batch-coupled BatchNorm in train
    mode), or the model has no trainable parameters."""


class DataError(PlstarInputError):
    """Data that is empty, non-finite, mis-shaped, or a file that cannot be read."""
