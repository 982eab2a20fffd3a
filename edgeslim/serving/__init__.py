"""The edge model server: ONNX Runtime behind the Open Inference Protocol v2 (REST).

Deliberately light: onnxruntime, numpy, uvicorn, prometheus-client and
:mod:`edgeslim.storage` only. No torch and no onnx package, so the serving
image stays small (``tests/test_serving.py`` checks this in a subprocess).
Nothing is imported here, so ``import edgeslim.serving`` costs nothing.

Modules: :mod:`.protocol` (JSON <-> tensors), :mod:`.model` (fetch, load,
validate, run), :mod:`.cpus` (default thread count), :mod:`.metrics`,
:mod:`.limits` (what a client may cost: the settings, fitted to the open-file
limit), :mod:`.connections` (connection caps and timeouts in front of uvicorn's
HTTP protocol), :mod:`.app` (the ASGI app), :mod:`.server` (uvicorn, listeners,
signals, ``edgeslim serve``).
"""
