"""Watched objects without `metadata.managedFields`.

kopf keeps every watch event's object as parsed JSON until its handlers have
run, and under a burst (a policy edit over 1,000 models) hundreds of them wait
at once. managedFields (server-side apply's field ownership) is about half of
a CompressedModel's JSON and most of its Python objects (a nested dict per
field), and neither kopf nor a handler reads it. The API server cannot leave
it out of a watch, so it is dropped as each event is parsed: kopf's stream
and list calls (`kopf._cogs.clients.api.stream` / `.get`, module attributes
its watcher and lister look up at call time) are wrapped once at startup.

kopf internals: when a kopf version lacks them, nothing is wrapped and the
operator works as before (only its memory differs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("edgeslim.operator")
_WRAPPED = "_edgeslim_slim"


def strip(obj: Any) -> Any:
    """`obj` (an event, a list or an object) with managedFields dropped in place."""
    if not isinstance(obj, dict):
        return obj
    inner = obj.get("object")
    if isinstance(inner, dict):  # a watch event
        strip(inner)
    for item in obj.get("items") or ():  # a list
        strip(item)
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def _stream(original: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for event in original(*args, **kwargs):
            yield strip(event)

    setattr(stream, _WRAPPED, True)
    return stream


def _get(original: Callable[..., Any]) -> Callable[..., Any]:
    async def get(*args: Any, **kwargs: Any) -> Any:
        return strip(await original(*args, **kwargs))

    setattr(get, _WRAPPED, True)
    return get


def install() -> bool:
    """Wraps kopf's stream and get (once); False where this kopf lacks them."""
    try:
        from kopf._cogs.clients import api
    except ImportError:
        log.debug("kopf internals moved: watched objects keep their managedFields")
        return False
    if not (callable(getattr(api, "stream", None)) and callable(getattr(api, "get", None))):
        return False
    if not getattr(api.stream, _WRAPPED, False):
        api.stream = _stream(api.stream)
    if not getattr(api.get, _WRAPPED, False):
        api.get = _get(api.get)
    return True
