"""kopf's login: the operator's own credentials (`credentials.load`), so kopf's
watches and our calls (`rest`) are one identity, and kopf never reaches for
the kubernetes client (its default login when that is installed)."""

from __future__ import annotations

from typing import Any

import kopf

from edgeslim.operator import credentials


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    # Called again whenever the API server answers 401: a rotated token is re-read.
    try:
        return credentials.connection_info(credentials.load())
    except credentials.NoCredentials as exc:
        raise kopf.LoginError(str(exc)) from exc
