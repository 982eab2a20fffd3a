"""A model's own code never runs with the caller's rights: attacks through the real CLI.

Each hostile TorchScript model below does what TorchScript can do to its host
(`torch.from_file` reads and writes files, `__setstate__` runs at load time,
export folds constants by running ops, loops run forever). Without
`allowModelCode` the CLI refuses them before any of their code runs; with it,
their code runs in `edgeslim.compressor.sandbox`'s confined child and none
succeeds. TorchScript has no socket op, so a model's only way to the network
is through native code (a deserializer bug); the probe tests run Python in
exactly the confinement the child applies and try what such code would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from edgeslim.cli import EXIT_BAD_INPUT, EXIT_OK
from edgeslim.compressor import sandbox

CANARY = "canary-7f3e1c9a-do-not-leak"
CREDENTIALS = f"[default]\naws_secret_access_key = {CANARY}\n".encode()

# Without Landlock the sandbox refuses to run model code at all (the hostile tests
# still hold: exit 2); a conversion and the probe need it.
needs_landlock = pytest.mark.skipif(
    sandbox.landlock_abi() < 1, reason="the kernel has no Landlock; the sandbox refuses to run"
)


class _Benign(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _WritesAtLoad(torch.nn.Module):
    """Writes `path` from `__setstate__`, i.e. inside torch.jit.load."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.k = torch.zeros(4, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor]:
        return (self.path, self.k)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor]) -> None:
        self.training = False
        self.path = state[0]
        t = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
        t.copy_(torch.tensor([112, 119, 110, 10], dtype=torch.uint8))  # "pwn\n"
        self.k = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * 2


class _WritesAtExport(torch.nn.Module):
    """Creates `path` while torch.onnx.export folds the constant from_file call."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=4096, dtype=torch.uint8)
        return x.flatten(1)[:, :10] + t.float().sum() * 0


class _SmugglesAFile(torch.nn.Module):
    """Reads `path` at load time and carries its bytes, raw, into the converted model."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path = path
        self.size = size
        self.k = torch.zeros(size, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, torch.Tensor]:
        return (self.path, self.size, self.k)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, torch.Tensor]) -> None:
        self.training = False
        self.path = state[0]
        self.size = state[1]
        self.k = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An index that depends on the input keeps the uint8 bytes an initializer.
        idx = (x.flatten(1)[:, 0] * 0).long()
        return x.flatten(1)[:, :10] + torch.index_select(self.k, 0, idx).float().unsqueeze(1)


class _TouchesASocket(torch.nn.Module):
    """The closest TorchScript gets to the network: opening a unix socket's path."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
        t.copy_(torch.ones(16, dtype=torch.uint8))
        return x.flatten(1)[:, :10] + t.float().sum()


class _LoopsForever(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> torch.Tensor:
        return self.k

    @torch.jit.export
    def __setstate__(self, state: torch.Tensor) -> None:
        self.training = False
        k = state
        while bool(k.sum() >= 0):
            k = k + 1
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] + self.k


class Env:
    """A fake $HOME holding credentials, a place the models must not write, and the env
    (with credentials) the CLI runs under."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        (self.home / ".aws").mkdir(parents=True)
        self.credentials = self.home / ".aws" / "credentials"
        self.credentials.write_bytes(CREDENTIALS)
        self.outside = root / "outside"
        self.outside.mkdir()
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "AWS_SECRET_ACCESS_KEY": CANARY,
            "EDGESLIM_TEST_CANARY": CANARY,
            "OMP_NUM_THREADS": "1",
        }


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


def _spec(digits, tmp_path: Path, model: Path, allow: bool) -> Path:
    source: dict[str, Any] = {"uri": str(model)}
    if allow:
        source["allowModelCode"] = True
    doc = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "scripted"},
        "spec": {
            "source": source,
            "evaluation": {
                "dataset": str(digits.val),
                "metric": "agreement",
                "samples": 64,
                "latencyRuns": 5,
            },
            "pipeline": [{"simplify": {}}],
            "output": {"uri": str(tmp_path / "out")},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _compress(spec: Path, env: Env, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "compress", str(spec), "--quiet"],
        capture_output=True,
        text=True,
        env={**env.env, **extra_env},
        cwd=env.root,
        timeout=300,
    )


def _no_canary_anywhere(proc: subprocess.CompletedProcess[str], out: Path) -> None:
    assert CANARY not in proc.stdout + proc.stderr
    for path in out.rglob("*") if out.exists() else []:
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def _one_line_bad_input(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


ATTACKS = ["writes-at-load", "writes-at-export", "smuggles-credentials", "socket", "loops"]


def _attack(name: str, env: Env) -> tuple[Path, Path | None]:
    """The hostile model and the file it would create if it got its way."""
    target = env.outside / f"{name}.out"
    model = env.root / f"{name}.pt"
    if name == "writes-at-load":
        return _save(_WritesAtLoad(str(target)), model), target
    if name == "writes-at-export":
        return _save(_WritesAtExport(str(target)), model), target
    if name == "smuggles-credentials":
        return _save(_SmugglesAFile(str(env.credentials), len(CREDENTIALS)), model), None
    if name == "socket":
        return _save(_TouchesASocket(str(env.outside / "agent.sock")), model), None
    return _save(_LoopsForever(), model), None


@pytest.mark.parametrize("name", ATTACKS)
def test_hostile_torchscript_without_the_opt_in_is_refused_and_nothing_runs(
    digits, env: Env, name: str
) -> None:
    model, target = _attack(name, env)
    proc = _compress(_spec(digits, env.root, model, allow=False), env)
    line = _one_line_bad_input(proc)
    assert "allowModelCode: true" in line and "export it to onnx" in line.lower()
    assert target is None or not target.exists()
    assert not (env.root / "out").exists()
    _no_canary_anywhere(proc, env.root / "out")


@pytest.mark.parametrize("name", ATTACKS)
def test_hostile_torchscript_with_the_opt_in_gets_nothing_it_tries(
    digits, env: Env, name: str
) -> None:
    model, target = _attack(name, env)
    listener = None
    if name == "socket":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(env.outside / "agent.sock"))
        listener.listen(1)
        listener.setblocking(False)
    # A short limit keeps the endless loop's test quick; the others finish well within it.
    extra = {sandbox.TIMEOUT_ENV: "8"} if name == "loops" else {}
    try:
        proc = _compress(_spec(digits, env.root, model, allow=True), env, **extra)
        if listener is not None:
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected
    finally:
        if listener is not None:
            listener.close()
    assert proc.returncode in (EXIT_OK, EXIT_BAD_INPUT), proc.stderr[-2000:]
    if proc.returncode == EXIT_BAD_INPUT:
        line = _one_line_bad_input(proc)
        if name == "loops":
            assert sandbox.TIMEOUT_ENV in line or "CPU-time" in line, line
        else:
            assert any(
                why in line for why in ("Permission denied", "not supported", "refusing to run")
            ), line
    assert target is None or not target.exists()
    assert env.credentials.read_bytes() == CREDENTIALS
    assert sorted(p.name for p in env.outside.iterdir()) == (
        ["agent.sock"] if name == "socket" else []
    )
    _no_canary_anywhere(proc, env.root / "out")


@needs_landlock
def test_benign_torchscript_with_the_opt_in_converts_to_the_same_outputs(digits, env: Env) -> None:
    module = _Benign().eval()
    model = _save(module, env.root / "benign.pt")
    proc = _compress(_spec(digits, env.root, model, allow=True), env)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    manifest_path = next((env.root / "out").rglob("manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["evaluation"]["drop"] == 0.0
    x = np.load(digits.val)["x"][:32]
    sess = ort.InferenceSession(
        str(manifest_path.parent / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------ the confinement, probed directly

PROBE = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path
    from edgeslim.compressor import sandbox

    scratch, outside, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    netns = sandbox._new_netns()
    import torch  # noqa: F401  (what the real child has loaded when it confines itself)
    missing = sandbox.confine(
        sandbox._read_paths(), scratch, timeout=60, max_memory=16 * 1024**3, netns=netns
    )

    def attempt(fn):
        try:
            return repr(fn())
        except OSError as exc:
            return f"denied: {exc.errno}"

    def connect():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        s.sendall(os.environ.get("EDGESLIM_TEST_CANARY", "no canary").encode())

    ppid = os.getppid()
    found = {
        "missing": missing,
        "self_environ": attempt(lambda: open("/proc/self/environ", "rb").read().decode()),
        "env": dict(os.environ),
        "parent_environ": attempt(lambda: open(f"/proc/{ppid}/environ", "rb").read().decode()),
        "init_environ": attempt(lambda: open("/proc/1/environ", "rb").read().decode()),
        "credentials": attempt(lambda: open(sys.argv[4]).read()),
        "write_outside": attempt(lambda: (outside / "probe.out").write_text("x")),
        "write_scratch": attempt(lambda: (scratch / "ok").write_text("x")),
        "tcp": attempt(connect),
        "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
        "unix": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
        "setsid": attempt(os.setsid),
        "signal_parent": attempt(lambda: os.kill(ppid, 0)),
    }
    (scratch / "found.json").write_text(json.dumps(found))
    """
)
# Starts the probe exactly as torchscript_to_onnx starts its child; the launcher
# itself runs with the credentials in its environment, like the CLI in the attacks.
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    from pathlib import Path
    from edgeslim.compressor import sandbox

    scratch = Path(sys.argv[2])
    done = subprocess.run(
        [sys.executable, "-I", "-c", sys.argv[1], *sys.argv[2:]],
        cwd=scratch, env=sandbox._clean_env(scratch),
    )
    sys.exit(done.returncode)
    """
)


@needs_landlock
def test_confined_code_sees_no_environment_secrets_network_or_outside_files(
    env: Env, tmp_path: Path
) -> None:
    """What native code (a deserializer exploit) would try, in the child's confinement."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                PROBE,
                str(scratch),
                str(env.outside),
                str(port),
                str(env.credentials),
            ],
            env=env.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the listener
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads((scratch / "found.json").read_text())
    assert found["missing"] == []
    assert CANARY not in json.dumps(found)
    assert not any(k.startswith(("AWS_", "KUBE", "EDGESLIM_")) for k in found["env"])
    assert found["env"]["HOME"] == str(scratch)
    for key in ("self_environ", "parent_environ", "init_environ", "credentials"):
        assert found[key] == "denied: 13", (key, found[key])  # EACCES: Landlock
    assert found["write_outside"] == "denied: 13"
    assert found["write_scratch"] == "1"
    for key in ("tcp", "udp", "unix", "setsid"):
        assert found[key] == "denied: 1", (key, found[key])  # EPERM: seccomp
    if sandbox.landlock_abi() >= 6:  # signals scoped to the sandbox
        assert found["signal_parent"] == "denied: 1"
    assert not (env.outside / "probe.out").exists()


def test_the_opt_in_is_part_of_the_spec_hash(digits, tmp_path: Path) -> None:
    from edgeslim.api.spec import CompressedModel

    model = tmp_path / "m.pt"
    hashes = {
        CompressedModel.model_validate(
            yaml.safe_load(_spec(digits, tmp_path, model, allow=allow).read_text())
        ).spec.spec_hash()
        for allow in (False, True)
    }
    assert len(hashes) == 2
