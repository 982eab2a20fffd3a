"""Error types that decide how a failure is reported.

BadInput is the user's to fix (CLI exit code 2, operator phase Failed with
reason InvalidSpec, no retry); anything else is ours or the environment's.
"""

from __future__ import annotations

from edgeslim.redact import redact


class EdgeslimError(Exception):
    """Base for errors edgeslim raises on purpose.

    Messages are redacted as they are made (see :mod:`edgeslim.redact`): they
    end up on stderr, in termination messages, status and Events, and an
    endpoint URL or error text may quote credentials.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class BadInput(EdgeslimError):
    """The spec, a file it names or data it points to cannot work as given."""


class StorageUnavailable(EdgeslimError):
    """A storage endpoint failed in a way that may pass (network, 5xx): worth a retry."""


class OutputModelFailed(EdgeslimError):
    """A model edgeslim made (the pipeline's output) fails to run, though its source ran.

    The fault lies in edgeslim or one of its steps, not in the input, so it is
    not BadInput (CLI exit 1); the message names the step chain that made it.
    """
