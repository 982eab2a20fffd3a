"""Shared pydantic configuration for every resource model.

Fields are snake_case in Python and camelCase on the wire, exactly like the
Kubernetes API; unknown keys are errors so a typo in a spec is caught instead
of silently ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

API_GROUP = "edgeslim.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
KIND = "CompressedModel"
PLURAL = "compressedmodels"


class WireModel(BaseModel):
    """Base for spec and status models: camelCase aliases, strict keys."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def wire(self) -> dict:
        """The model as it appears in YAML / the Kubernetes API."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class OpenWireModel(WireModel):
    """Like WireModel, but tolerant of keys it does not know (results written
    by a newer compressor must still be readable by an older operator)."""

    model_config = ConfigDict(extra="ignore")
