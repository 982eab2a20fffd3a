"""kopf's login: the operator's own credentials (`credentials.load`), so kopf's
watches and our calls (`rest`) are one identity, and kopf never reaches for
the kubernetes client (its default login when that is installed).

kopf's own HTTP session is replaced by one with a bounded connection pool:
kopf builds its session with `TCPConnector(limit=0)`, so every PATCH it has in
flight opens its own TLS connection. When a few hundred handlers finish at
once (the 1,000-model bench, ~2 minutes into the create phase), their PATCHes
opened ~230 connections in one second (the process's open files 82 -> 310)
and RSS rose by ~60 MB within that second, held until the connections closed
and `malloc_trim` returned it: the peak of the whole run.

With an exec credential plugin, the session expires for kopf when the plugin
should run again (kopf then logs in anew), and a login after a 401 never hands
back the credential the previous session was refused with.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import kopf

from edgeslim.operator import credentials, exec_credential

# Kinds the operator watches (CompressedModels, CompressionPolicies, Jobs,
# Deployments): each holds one connection per namespace watched (one when
# cluster-wide) for as long as the watch lasts.
WATCHED_KINDS = 4
# kopf's own discovery watches (CRDs, namespaces), whatever the namespaces.
SCANNING_WATCHES = 2
# Connections left for kopf's requests (its patches, Events, the initial
# lists): as many as the handler threads that make work for them.
REQUEST_CONNECTIONS = 16

_namespaces = 0
# The exec plugin's credential kopf's current session carries: kopf only logs in
# again at its expiration or after a 401, so the next login asks for a newer one.
_handed: exec_credential.Issued | None = None


def watch(namespaces: int) -> None:
    """How many namespaces the operator watches (0: cluster-wide); before kopf starts."""
    global _namespaces
    _namespaces = namespaces


def connection_limit(namespaces: int) -> int:
    """kopf's connection pool: every watch keeps one connection open, so the pool
    holds one per watched kind and namespace, kopf's scanning watches, and
    REQUEST_CONNECTIONS for requests (which queue for a free one beyond that)."""
    return WATCHED_KINDS * max(1, namespaces) + SCANNING_WATCHES + REQUEST_CONNECTIONS


@kopf.on.login()
async def login(**_: Any) -> kopf.AiohttpSession:
    # Called again whenever the API server answers 401: a rotated token is re-read
    # (kopf closes the session it replaces). Async: the session belongs to kopf's loop;
    # the credentials on a thread, as an exec plugin may take seconds to answer.
    try:
        info = await asyncio.to_thread(_connection_info)
    except credentials.NoCredentials as exc:
        raise kopf.LoginError(str(exc)) from exc
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=connection_limit(_namespaces), ssl=info.as_ssl_context()
        ),
        headers=info.as_http_headers(),
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        aiohttp_session=session,
    )


def _connection_info() -> Any:
    global _handed
    creds = credentials.load()
    source = credentials.TokenSource(creds)
    source.invalidate(_handed)  # refused or expired: not that one again
    issued = source.issued()
    _handed = issued
    return credentials.connection_info(creds, issued)
