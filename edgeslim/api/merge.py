"""The merge rule: a CompressedModel's spec over its CompressionPolicy's defaults.

1. Each default the policy gives applies unless the model sets that key itself.
2. Mappings merge key by key, at every depth: a policy's
   `evaluation: {metric: accuracy, maxMetricDrop: 0.01}` and a model's
   `evaluation: {dataset: s3://..., maxMetricDrop: 0.02}` give the model's
   dataset, the model's 0.02 and the policy's metric.
3. Lists are replaced whole (`deployment.tolerations`, `pipeline`): merging two
   step lists item by item would build a pipeline nobody wrote.
4. `pipeline` and `optimize` are one choice, the recipe: a model that sets
   either ignores both of the policy's.
5. An explicit null counts as not set.

Works on the wire form (camelCase dicts) as written, before defaults are
filled in: a default would otherwise look like the model's own choice and
override the policy. The result is validated as a full CompressedModelSpec.
"""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]
RECIPE = ("pipeline", "optimize")


def deep_merge(base: Obj, override: Obj) -> Obj:
    """`override` over `base`: mappings merge per key, anything else (lists,
    scalars) from `override` replaces; None in `override` is absent."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            continue
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = deep_merge(below, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_spec(defaults: Obj, spec: Obj) -> Obj:
    """The effective spec (wire form) of a model `spec` under policy `defaults`."""
    base = {k: v for k, v in defaults.items() if v is not None}
    if any(spec.get(k) is not None for k in RECIPE):
        for key in RECIPE:
            base.pop(key, None)
    return deep_merge(base, spec)
