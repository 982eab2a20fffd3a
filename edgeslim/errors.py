"""Error types that decide how a failure is reported.

BadInput is the user's to fix (CLI exit code 2, operator phase Failed with
reason InvalidSpec, no retry); anything else is ours or the environment's.
"""

from __future__ import annotations


class EdgeslimError(Exception):
    """Base for errors edgeslim raises on purpose."""


class BadInput(EdgeslimError):
    """The spec, a file it names or data it points to cannot work as given."""


class StorageUnavailable(EdgeslimError):
    """A storage endpoint failed in a way that may pass (network, 5xx): worth a retry."""
