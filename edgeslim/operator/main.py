"""`edgeslim operator`: runs kopf with our handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf

from edgeslim import logs
from edgeslim.errors import BadInput
from edgeslim.redact import RedactingFilter


def run(namespaces: list[str] | None = None, verbose: bool = False) -> int:
    from edgeslim.operator import (
        handlers,  # noqa: F401  (registers the handlers)
        login,  # kopf logs in with our credentials
        malloc,
        memdebug,
        slim,
    )
    from edgeslim.operator.credentials import NoCredentials
    from edgeslim.operator.kube import Kube
    from edgeslim.operator.settings import Settings

    # Fail in a second with a clear line instead of kopf retrying its startup forever
    # (an exec credential plugin runs here: its failure is the line).
    try:
        Kube.connect()
    except NoCredentials as exc:
        raise BadInput(f"no Kubernetes credentials: {exc}") from exc
    settings = Settings.from_env()
    watched = namespaces or ([settings.namespace] if settings.namespace else [])
    configure_logging(settings.log_format, verbose)
    malloc.tune()  # before kopf starts its handler threads
    slim.install()  # watched objects without managedFields
    memdebug.install()  # EDGESLIM_MEMORY_DEBUG only
    login.watch(len(watched))  # sizes kopf's connection pool (its watches hold some)
    asyncio.run(kopf.operator(standalone=True, clusterwide=not watched, namespaces=watched))
    return 0


def configure_logging(fmt: str, verbose: bool = False) -> None:
    """kopf's root handler, redacting, in `fmt` (EDGESLIM_LOG_FORMAT: text or json)."""
    kopf.configure(verbose=verbose, log_prefix=True)
    logging.getLogger("edgeslim").setLevel(logging.INFO)
    # kopf posts per-object warnings as Events and everything reaches the pod
    # log: redact on the way out ('kopf.objects' is where per-object records start).
    logging.getLogger("kopf.objects").addFilter(RedactingFilter())
    # Text keeps kopf's [namespace/name] prefix; json puts the object under "object".
    logs.install(fmt)
