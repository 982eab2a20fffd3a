"""The Dockerfile cannot be built here (no Docker engine, no registry access),
so its structure is checked instead: three targets, non-root final images, and
an edge image without torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = ("operator", "compressor", "serving")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
        logical = ""
    return out


def stages(text: str) -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+ )?(\S+)(?: AS (\S+))?", args, re.IGNORECASE)
            assert m, f"unparsed FROM {args}"
            current = Stage(base=m[1], name=m[2] or str(len(found)))
            found[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, args))
    return found


def chain(all_stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it is built FROM, nearest first."""
    out = [all_stages[name]]
    while out[-1].base in all_stages:
        out.append(all_stages[out[-1].base])
    return out


@pytest.fixture(scope="module")
def parsed() -> dict[str, Stage]:
    return stages(DOCKERFILE.read_text())


def test_header_says_it_is_not_built_here() -> None:
    head = DOCKERFILE.read_text().splitlines()[:8]
    assert any("never built" in line for line in head)


def test_three_targets_on_python_slim(parsed: dict[str, Stage]) -> None:
    assert set(TARGETS) <= set(parsed)
    arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg and arg[1] == "python:3.11-slim"
    for target in TARGETS:
        assert chain(parsed, target)[-1].base == "${PYTHON_IMAGE}"


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_runs_as_non_root(parsed: dict[str, Stage], target: str) -> None:
    users = parsed[target].all("USER")
    assert users, f"{target} sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user == "65532", f"{target} runs as {users[-1]}"


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_installs_only_its_extra(parsed: dict[str, Stage], target: str) -> None:
    runs = " ".join(args for stage in chain(parsed, target) for args in stage.all("RUN"))
    assert f"[{target}]" in runs
    for other in set(TARGETS) - {target}:
        assert f"[{other}]" not in runs, f"{target} installs the {other} extra"
    assert "builder" in parsed and "from=builder" in runs  # the wheel comes from the builder


def test_serving_image_has_no_torch(parsed: dict[str, Stage]) -> None:
    for stage in chain(parsed, "serving"):
        for args in stage.all("RUN"):
            assert "torch" not in args.lower(), f"{stage.name}: {args}"
            assert "compressor" not in args, f"{stage.name}: {args}"


def test_compressor_takes_cpu_torch_from_the_pytorch_index(parsed: dict[str, Stage]) -> None:
    runs = parsed["compressor"].all("RUN")
    torch_runs = [r for r in runs if "torch" in r.lower() or "TORCH" in r]
    assert torch_runs and "--index-url" in torch_runs[0]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    # torch first, so the extra's `torch>=2.4` is already satisfied by the CPU wheel
    assert runs.index(torch_runs[0]) < next(i for i, r in enumerate(runs) if "[compressor]" in r)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"  # deny by default: no .venv, models, data or credentials
    assert {"!pyproject.toml", "!README.md", "!edgeslim/"} <= set(rules)
