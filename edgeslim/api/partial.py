"""Partial versions of spec models: every field optional, no defaults.

A CompressionPolicy supplies defaults that a CompressedModel overrides per key
(edgeslim/api/merge.py), so both the policy's defaults and the model's own
fields can be partial: a policy sets the gate (`evaluation.maxMetricDrop`), each
model its dataset (`evaluation.dataset`). Their schemas must then neither
require a key nor *default* one: a default filled in by the API server would
look like the model's own choice and silently override the policy's. The full
model (with its required keys, defaults and cross-field validators) is applied
to the merged spec only.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Union

from pydantic import Field, create_model

from edgeslim.api.base import WireModel

_cache: dict[tuple[type[WireModel], frozenset[str] | None, str], type[WireModel]] = {}


def _wire_model(annotation: Any) -> type[WireModel] | None:
    """The WireModel inside `annotation` (`X` or `X | None`), if that is all it is."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        return _wire_model(non_null[0]) if len(non_null) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, WireModel):
        return annotation
    return None


def partial(
    cls: type[WireModel], fields: set[str] | None = None, name: str | None = None
) -> type[WireModel]:
    """`cls` with `fields` (all of them when None) optional and without defaults.

    A nested model in such a field is made partial too (mappings merge per key);
    lists keep their full item models (a list is replaced whole). Field
    descriptions, bounds and patterns stay. Validators across fields do not:
    they hold for the merged spec, not for one side of it.
    """
    name = name or f"{cls.__name__}Partial"
    key = (cls, frozenset(fields) if fields is not None else None, name)
    if key in _cache:
        return _cache[key]
    definitions: dict[str, Any] = {}
    for field_name, info in cls.model_fields.items():
        if fields is not None and field_name not in fields:
            definitions[field_name] = (info.annotation, info)
            continue
        inner = _wire_model(info.annotation)
        annotation: Any = partial(inner) if inner is not None else info.annotation
        if info.metadata:
            annotation = Annotated[annotation, *info.metadata]
        definitions[field_name] = (
            annotation | None,
            Field(default=None, description=info.description),
        )
    model = create_model(  # type: ignore[call-overload]
        name,
        __base__=WireModel,
        __doc__=cls.__doc__,
        __module__=cls.__module__,
        **definitions,
    )
    if "json_schema_extra" in cls.model_config:
        model.model_config["json_schema_extra"] = cls.model_config["json_schema_extra"]
    _cache[key] = model
    return model
