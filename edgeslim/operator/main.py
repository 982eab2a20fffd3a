"""`edgeslim operator`: runs kopf with our handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf
from kubernetes.config import ConfigException

from edgeslim import logs
from edgeslim.errors import BadInput
from edgeslim.redact import RedactingFilter


def run(namespaces: list[str] | None = None, verbose: bool = False) -> int:
    from edgeslim.operator import handlers  # noqa: F401  (registers the handlers)
    from edgeslim.operator.kube import Kube
    from edgeslim.operator.settings import Settings

    # Fail in a second with a clear line instead of kopf retrying its startup forever.
    try:
        Kube.connect()
    except ConfigException as exc:
        raise BadInput(
            f"no Kubernetes credentials: not running in a pod, and KUBECONFIG / ~/.kube/config "
            f"gave none ({exc})"
        ) from exc
    settings = Settings.from_env()
    watched = namespaces or ([settings.namespace] if settings.namespace else [])
    kopf.configure(verbose=verbose, log_prefix=True)
    logging.getLogger("edgeslim").setLevel(logging.INFO)
    # kopf posts per-object warnings as Events and everything reaches the pod
    # log: redact on the way out ('kopf.objects' is where per-object records start).
    logging.getLogger("kopf.objects").addFilter(RedactingFilter())
    # Text keeps kopf's [namespace/name] prefix; json (EDGESLIM_LOG_FORMAT) puts the
    # object under "object". Both redact on kopf's root handler.
    logs.install(settings.log_format)
    asyncio.run(kopf.operator(standalone=True, clusterwide=not watched, namespaces=watched))
    return 0
