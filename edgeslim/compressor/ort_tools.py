"""onnxruntime's `tools` package, imported without the torch it would drag in.

Simplifying and quantizing must not load torch: a compressor pod that only
does those stays about 500 MB smaller.
"""

from __future__ import annotations


def import_without_torch() -> None:
    """Imports `onnxruntime.tools` without torch (quantize's `quant_pre_process` and
    simplify's symbolic shape inference load it).

    Its `__init__` imports torch whenever torch is installed, for an export helper
    neither calls: ~500 MB of memory and 2 s in every quantizing
    compressor pod, measured. While it runs, `find_spec("torch")` answers None;
    should onnxruntime change, the worst case is torch imported as before."""
    import importlib.util
    import sys

    if "onnxruntime.tools" in sys.modules or "torch" in sys.modules:
        return
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # type: ignore[no-untyped-def]
        return None if name == "torch" else real(name, package)

    importlib.util.find_spec = find_spec
    try:
        import onnxruntime.tools  # noqa: F401
    finally:
        importlib.util.find_spec = real
