"""A stand-in for `edgeslim serve` in the chaos runs (EDGESLIM_SERVING_COMMAND):
ready at once, a few MB instead of onnxruntime's hundred, so dozens of serving
pods fit on a small machine. It answers the probes and the model metadata
(`versions` = the sha256 prefix it was started with); nothing else.

    python tests/operator/stub_serving.py serve --model URI --sha256 SHA --name N \
        --port 8080 --host 127.0.0.5
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--model", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--health-port", type=int, help="the probes' own port, when there is one")
    args, _ = p.parse_known_args()
    answers = {
        "/v2/health/ready": {"ready": True},
        "/v2/health/live": {"live": True},
        f"/v2/models/{args.name}": {"name": args.name, "versions": [args.sha256[:12]]},
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answers.get(self.path)
            data = json.dumps(body or {"error": "not found"}).encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    if args.health_port:
        health = ThreadingHTTPServer((args.host, args.health_port), Handler)
        threading.Thread(target=health.serve_forever, daemon=True).start()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
