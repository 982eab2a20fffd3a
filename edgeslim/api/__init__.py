"""The CompressedModel resource as pydantic models (spec, status, results)."""
