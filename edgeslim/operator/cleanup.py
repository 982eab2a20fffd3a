"""Deletion: a model's artifacts leave storage with it when it asks for that
(the cleanup annotation)."""

from __future__ import annotations

import logging

from edgeslim import storage
from edgeslim.operator.runtime import Obj, Runtime, model_key, parse_model, storage_credentials

log = logging.getLogger("edgeslim.operator")


def cleanup_artifacts(rt: Runtime, body: Obj) -> int:
    """Deletes `<output>/<namespace>/<name>/` from storage; returns how many objects went.

    The namespace is part of the prefix (storage.model_prefix), so deleting one
    object never touches a same-named object's artifacts in another namespace.
    """
    model = parse_model(body)
    if model.spec.output is None:
        return 0
    prefix = storage.model_prefix(
        model.spec.output.uri, model.metadata.namespace, model.metadata.name
    )
    with storage_credentials(rt, model):
        count = storage.delete_prefix(prefix)
    log.info("%s/%s: deleted %d artifact objects under %s", *model_key(body), count, prefix)
    return count
