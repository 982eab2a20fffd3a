"""`edgeslim operator`: runs kopf with our handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf


def run(namespaces: list[str] | None = None, verbose: bool = False) -> int:
    from edgeslim.operator import handlers  # noqa: F401  (registers the handlers)
    from edgeslim.operator.settings import Settings

    watched = namespaces or (
        [Settings.from_env().namespace] if Settings.from_env().namespace else []
    )
    kopf.configure(verbose=verbose, log_prefix=True)
    logging.getLogger("edgeslim").setLevel(logging.INFO)
    asyncio.run(kopf.operator(standalone=True, clusterwide=not watched, namespaces=watched))
    return 0
