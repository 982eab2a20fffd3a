"""`operator.slim`: kopf's watch and list answers reach the operator without
managedFields; everything else (and kopf's own calls) unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

from kopf._cogs.clients import api

from edgeslim.operator import slim


def _obj(name: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "resourceVersion": "7",
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"x": 1},
    }


def test_strip_drops_managed_fields_from_events_lists_and_objects() -> None:
    event = slim.strip({"type": "MODIFIED", "object": _obj("a")})
    assert event == {
        "type": "MODIFIED",
        "object": {"metadata": {"name": "a", "resourceVersion": "7"}, "spec": {"x": 1}},
    }
    listed = slim.strip({"metadata": {"resourceVersion": "9"}, "items": [_obj("a"), _obj("b")]})
    assert [i["metadata"] for i in listed["items"]] == [
        {"name": "a", "resourceVersion": "7"},
        {"name": "b", "resourceVersion": "7"},
    ]
    assert slim.strip([1, 2]) == [1, 2]  # not an object: as it was


def test_install_wraps_kopfs_stream_and_get_once(monkeypatch: Any) -> None:
    async def stream(*_a: Any, **_k: Any) -> Any:
        yield {"type": "ADDED", "object": _obj("a")}
        yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "8"}}}

    async def get(*_a: Any, **_k: Any) -> Any:
        return {"items": [_obj("b")]}

    monkeypatch.setattr(api, "stream", stream)
    monkeypatch.setattr(api, "get", get)
    assert slim.install()
    wrapped = api.stream
    assert slim.install() and api.stream is wrapped  # twice: still wrapped once

    async def read() -> tuple[list[Any], Any]:
        return [e async for e in api.stream(url="/x")], await api.get(url="/x")

    events, listed = asyncio.run(read())
    assert events[0]["object"]["metadata"] == {"name": "a", "resourceVersion": "7"}
    assert events[1]["type"] == "BOOKMARK"
    assert listed["items"][0]["metadata"] == {"name": "b", "resourceVersion": "7"}
