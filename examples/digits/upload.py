"""Put the digits example where examples/digits/digits-s3.yaml expects it.

    python examples/digits/upload.py [--data out/demo/data]

Uses the AWS_* environment (e.g. what `make cluster` prints) and creates the
`models` and `datasets` buckets when missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeslim import storage

TARGETS = {
    "cnn.onnx": "s3://models/digits/cnn.onnx",
    "train.npz": "s3://datasets/digits/train.npz",
    "val.npz": "s3://datasets/digits/val.npz",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("out/demo/data"))
    args = parser.parse_args()
    client = storage.s3_client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in {uri.split("/")[2] for uri in TARGETS.values()} - existing:
        client.create_bucket(Bucket=bucket)
    for name, uri in TARGETS.items():
        storage.put_file(args.data / name, uri)
        print(f"{args.data / name} -> {uri}")


if __name__ == "__main__":
    main()
