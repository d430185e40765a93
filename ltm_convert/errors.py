"""The one user-facing error type.

Everything a user can get wrong (a bad ratio, an unknown model, a corrupt file, an unsupported
family) raises :class:`LtmError` with a one-line message that names the problem and the fix.
The CLI prints it as a single line and exits with status 2; a full traceback is shown only when
``LTM_DEBUG=1`` is set.
"""
from __future__ import annotations


class LtmError(Exception):
    """A problem with the user's input, worded as one line: what is wrong, and what to do."""


class UnsupportedModelError(LtmError):
    """The model has no block that ltm_convert can convert safely (the reason names what was found)."""


class TrainingDiverged(LtmError):
    """Fine-tuning produced a NaN/inf loss, gradient or weights. The message says where it happened,
    what was kept (checkpoint, best weights written to the output) and whether ``--resume`` can help."""
