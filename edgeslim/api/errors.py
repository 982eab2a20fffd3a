"""One line from a pydantic ValidationError, naming the field at fault.

Used wherever a spec is validated (the CLI's error line, the operator's
InvalidSpec reason), so both say the same thing in the same words.
"""

from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(exc: ValidationError) -> str:
    """'spec.pipeline[0].prune.sparsity: Input should be less than 1' for the first error."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ""
        for item in err["loc"]:
            if isinstance(item, int):
                loc += f"[{item}]"
            elif not str(item).startswith(("function-", "model-")):
                loc += f".{item}" if loc else str(item)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
