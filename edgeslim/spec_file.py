"""Reading a CompressedModel YAML file someone else wrote, with its cost bounded.

YAML can cost far more than its size: aliases let 1 KiB describe a billion
nodes ("billion laughs"), which PyYAML builds as shared references but pydantic
then walks one by one; deep nesting exhausts the parser's recursion; a huge
integer or a non-UTF-8 byte raises errors that are not `yaml.YAMLError`. Here
the file's size is checked before it is read, each document's node graph is
measured with aliases expanded (and cycles refused) before anything is
constructed from it, and every failure is BadInput naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgeslim.errors import BadInput
from edgeslim.storage import limits

#: A CompressedModel nests about six levels deep; far deeper is not a spec.
MAX_DEPTH = 32
#: Nodes per document with aliases expanded; a spec has hundreds (a long
#: excludeNodes list thousands). Bounds what pydantic would have to walk.
MAX_NODES = 100_000


def read_spec_document(path: Path) -> dict[str, Any]:
    """The one mapping the file holds, or BadInput saying why it is not one."""
    docs = [d for d in parse(read_text(path), str(path)) if d is not None]
    if len(docs) != 1:
        raise BadInput(
            f"{path}: expected exactly one CompressedModel object, found {len(docs)} documents"
        )
    if not isinstance(docs[0], dict):
        raise BadInput(
            f"{path}: expected a CompressedModel mapping (apiVersion, kind, metadata, spec), "
            f"found a YAML {type(docs[0]).__name__}"
        )
    return docs[0]


def read_text(path: Path) -> str:
    """The file as UTF-8 text, refused unread when larger than the spec limit."""
    limit = limits.max_spec_bytes()
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the spec ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise BadInput(
            f"{path}: larger than {limits.human_bytes(limit)}, which no spec needs; "
            f"set {limits.MAX_SPEC_BYTES_ENV} to raise the limit"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse(text: str, where: str) -> list[Any]:
    """Every document of `text`, each measured before it is constructed."""
    docs: list[Any] = []
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses unprintable characters here
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                _measure(node, where)
            docs.append(loader.construct_document(node))
    except RecursionError as exc:
        raise BadInput(f"{where}: not valid YAML (nested too deeply)") from exc
    # ValueError/OverflowError: scalars yaml cannot convert (an integer of
    # 5,000 digits, a date like 2024-13-45).
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        raise BadInput(f"{where}: not valid YAML ({exc})".replace("\n", " ")) from exc
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def _measure(root: yaml.Node, where: str) -> int:
    """Nodes under `root` with every alias expanded; BadInput past the limits.

    Aliases are the same node object wherever they appear, so sizes are
    memoised per object: a billion laughs is measured in a few steps.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:
            raise BadInput(f"{where}: YAML nested deeper than {MAX_DEPTH} levels")
        if key in open_nodes:
            raise BadInput(f"{where}: a YAML alias refers to a node that contains it")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        for child in children:
            total += walk(child, depth + 1)
            if total > MAX_NODES:
                raise BadInput(
                    f"{where}: the YAML expands to more than {MAX_NODES} nodes "
                    "(aliases counted where they are used)"
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return walk(root, 0)
