"""Running a model's own code (TorchScript -> ONNX) in a confined child process.

A TorchScript archive is a program: `torch.jit.load` runs its `__setstate__`
methods, and `torch.onnx.export` evaluates its ops while folding constants. Ops
such as `torch.from_file(path, shared=True)` read and write arbitrary files, and
a bug in the deserializer hands a crafted archive native code execution. So
edgeslim only runs that code when the spec opts in (`source.allowModelCode`),
and then only here: in a fresh Python process that confines itself *after*
importing torch (our code) and *before* opening the archive (theirs).

Layers, what each protects against, and what happens when it is unavailable:

* Clean environment (always): the child gets PATH, LANG, HOME/TMPDIR pointing
  at its scratch folder and thread counts, nothing else, so no AWS_*, KUBE*,
  tokens or proxies are inherited; `/proc/self/environ` holds only that.
* Private scratch folder as cwd (always): the example input goes in, the ONNX
  file and a one-line error come out; the parent removes it afterwards.
* rlimits (always; lowering a limit needs no privilege): CPU seconds, address
  space, largest file written, open files, no core dumps.
* Own process group + wall-clock timeout (always): the parent kills the whole
  group when the time is up; `setsid`/`setpgid` are denied by the seccomp layer
  below so the code cannot leave the group.
* Landlock (Linux >= 5.13, unprivileged, works in a restricted pod): reads only
  beneath the Python install, its site-packages, the system libraries and the
  model file; writes only in the scratch folder. Secrets in $HOME, the pod's
  service-account token and other processes' `/proc/<pid>/environ` are out of
  reach (Landlock also denies ptrace-mode access to processes outside the
  domain). ABI >= 4 additionally denies TCP bind/connect, ABI >= 6 denies
  signals and abstract unix sockets outside the domain. **Required**: when it
  cannot be established the child refuses to run the model's code (BadInput
  naming the reason) unless EDGESLIM_MODEL_CODE_ALLOW_UNCONFINED=1 is set, which
  accepts running it with only the other layers.
* seccomp filter (unprivileged once no_new_privs is set; allowed under the
  RuntimeDefault profile): `socket()` fails, so no network of any family;
  io_uring (which bypasses syscall filters), ptrace, process_vm_*, kernel
  keyrings, bpf, perf_event_open, userfaultfd, setsid and setpgid fail too;
  syscalls of a foreign ABI (i386/x32 on x86_64) kill the process.
* Network namespace (best effort: root, or an unprivileged user namespace
  where the kernel and the pod's seccomp profile allow it): no interfaces but
  loopback. Network access must be denied by seccomp or the namespace; with
  neither the child refuses, like for Landlock.

Settings (environment variables of the compressor, read on every conversion):
EDGESLIM_MODEL_CODE_TIMEOUT_SECONDS (wall clock and CPU seconds, default 300),
EDGESLIM_MODEL_CODE_MAX_MEMORY_BYTES (address space, default 16 GiB: torch alone
maps ~3 GiB of virtual memory) and EDGESLIM_MODEL_CODE_ALLOW_UNCONFINED (see
Landlock above). The ONNX file the child writes is capped at 2 GiB, protobuf's
own limit; 256 open files.

The parent (:func:`torchscript_to_onnx`) maps every failure — a non-zero exit,
a signal (SIGXCPU, SIGXFSZ, SIGKILL, SIGSEGV...), the timeout, an oversized or
non-regular output file — to BadInput naming the cause, and treats the ONNX
that comes back as untrusted input (size-checked before reading, then checked
by onnx's checker like any other source model).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from edgeslim.errors import BadInput

TIMEOUT_ENV = "EDGESLIM_MODEL_CODE_TIMEOUT_SECONDS"
#: Wall-clock seconds a TorchScript load + export may take (also its CPU-time limit).
DEFAULT_TIMEOUT_SECONDS = 300
MEMORY_ENV = "EDGESLIM_MODEL_CODE_MAX_MEMORY_BYTES"
#: Address-space limit of the child. torch alone maps ~3 GiB of virtual memory.
DEFAULT_MAX_MEMORY_BYTES = 16 * 1024**3
UNCONFINED_ENV = "EDGESLIM_MODEL_CODE_ALLOW_UNCONFINED"
#: Largest ONNX file the child may write (protobuf's own limit is 2 GiB).
MAX_OUTPUT_BYTES = 2 * 1024**3 - 1
MAX_OPEN_FILES = 256
_MAX_ERROR_BYTES = 4096

REQUEST_FILE = "request.json"
OUTPUT_FILE = "model.onnx"
ERROR_FILE = "error.txt"
_EXIT_REPORTED = 3  # the child wrote ERROR_FILE


def _positive_setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise BadInput(f"{name}={raw!r}: expected a positive whole number")
    return value


def timeout_seconds() -> int:
    """EDGESLIM_MODEL_CODE_TIMEOUT_SECONDS or the default; read on every call."""
    return _positive_setting(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS)


# --------------------------------------------------------------------- parent


def _clean_env(scratch: Path) -> dict[str, str]:
    """The child's whole environment: nothing inherited that could be a secret."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def _read_paths() -> list[str]:
    """What the child may read once confined: the interpreter, its packages, system libs."""
    import site

    import torch

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sysconfig.get_paths().values() if p)
    paths.update(site.getsitepackages())
    # Packages installed in place (pip install -e) live outside site-packages.
    paths.add(str(Path(__file__).resolve().parent.parent))
    paths.add(str(Path(torch.__file__).resolve().parent))
    paths.update(["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"])
    paths.update(["/etc/ld.so.cache", "/dev/null", "/dev/urandom", "/sys/devices/system/cpu"])
    return sorted(p for p in paths if os.path.exists(p))


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    line = re.sub(r"[^\x20-\x7e]", "?", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_regular(path: Path, max_bytes: int, what: str, where: str) -> bytes | None:
    """The bytes of a file the child wrote, refusing links, devices and oversize files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadInput(f"{where}: the model's code left an unreadable {what} ({exc})") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{where}: the model's code left a {what} that is not a regular file")
        if st.st_size > max_bytes:
            raise BadInput(
                f"{where}: the {what} is {st.st_size} bytes, over the limit of {max_bytes}"
            )
        return f.read(max_bytes + 1)[:max_bytes]


def _signal_cause(sig: int) -> str:
    causes = {
        signal.SIGXCPU: "it used up its CPU-time limit",
        signal.SIGXFSZ: f"it wrote a file over the {MAX_OUTPUT_BYTES}-byte limit",
        signal.SIGKILL: "it was killed (out of memory?)",
        signal.SIGSYS: "it made a forbidden system call",
        signal.SIGSEGV: "it crashed (segmentation fault)",
    }
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = str(sig)
    return f"{causes.get(sig, 'it was stopped')} (signal {name})"


def torchscript_to_onnx(path: Path, where: str, example: dict[str, np.ndarray]) -> bytes:
    """ONNX bytes converted from a TorchScript archive by a confined child process.

    BadInput for every way the conversion can fail, including the model's code
    trying what the confinement forbids.
    """
    timeout = timeout_seconds()
    max_memory = _positive_setting(MEMORY_ENV, DEFAULT_MAX_MEMORY_BYTES)
    scratch = Path(tempfile.mkdtemp(prefix="edgeslim-model-code-"))
    try:
        names = list(example)
        for i, name in enumerate(names):
            np.save(scratch / f"input-{i}.npy", np.ascontiguousarray(example[name]))
        request = {
            "model": str(path.resolve()),
            "inputs": names,
            "read": _read_paths(),
            "timeout": timeout,
            "maxMemory": max_memory,
            "allowUnconfined": os.environ.get(UNCONFINED_ENV, "").strip() == "1",
        }
        (scratch / REQUEST_FILE).write_text(json.dumps(request))
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "edgeslim.compressor.sandbox", str(scratch)],
            cwd=scratch,
            env=_clean_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also anything it left running
            proc.wait()
        if rc is None:
            raise BadInput(
                f"{where}: loading and converting the TorchScript model took longer than "
                f"{timeout} s and was stopped ({TIMEOUT_ENV} sets the limit)"
            )
        if rc < 0:
            raise BadInput(f"{where}: the TorchScript conversion was stopped: {_signal_cause(-rc)}")
        if rc != 0:
            raw = _read_regular(scratch / ERROR_FILE, _MAX_ERROR_BYTES, "error message", where)
            reason = _one_line(raw.decode("utf-8", "replace")) if raw else f"exit code {rc}"
            raise BadInput(f"{where}: {reason}")
        data = _read_regular(scratch / OUTPUT_FILE, MAX_OUTPUT_BYTES, "converted model", where)
        if not data:
            raise BadInput(f"{where}: the TorchScript conversion produced no model")
        return data
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------- confinement
# Everything below runs in the child. Constants are the kernel's UAPI values.

_SYS_LANDLOCK_CREATE_RULESET = 444  # same number on x86_64 and aarch64
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# (audit arch, syscalls to deny) per machine; numbers from the kernel's tables.
_SECCOMP_TABLES = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41, "ptrace": 101, "setpgid": 109, "setsid": 112, "add_key": 248,
            "request_key": 249, "keyctl": 250, "perf_event_open": 298,
            "process_vm_readv": 310, "process_vm_writev": 311, "bpf": 321,
            "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
            "io_uring_register": 427,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "socket": 198, "ptrace": 117, "setpgid": 154, "setsid": 157, "add_key": 217,
            "request_key": 218, "keyctl": 219, "perf_event_open": 241,
            "process_vm_readv": 270, "process_vm_writev": 271, "bpf": 280,
            "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
            "io_uring_register": 427,
        },
    ),
}  # fmt: skip


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    if sys.platform != "linux":
        return 0
    libc = _libc()
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))  # fmt: skip
    return max(int(abi), 0)


def _landlock(read: list[str], read_write: list[str]) -> str:
    """Confine this process with Landlock; '' on success, else why not."""
    abi = landlock_abi()
    if abi < 1:
        return "Landlock is not available in this kernel (or disabled by its boot options)"
    libc = _libc()
    dir_read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    handled = (1 << 13) - 1  # every ABI 1 right
    if abi >= 2:
        handled |= _FS_REFER  # handled and never granted: no links or renames across folders
    if abi >= 3:
        handled |= _FS_TRUNCATE
    if abi >= 5:
        handled |= _FS_IOCTL_DEV
    write_all = handled & ~_FS_REFER
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buf = ctypes.create_string_buffer(attr, 24)
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(size),
                           ctypes.c_uint32(0))  # fmt: skip
    if ruleset < 0:
        return f"Landlock ruleset could not be created ({_errno_text()})"
    try:
        rules = [(p, dir_read) for p in read] + [(p, write_all) for p in read_write]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path that does not exist grants nothing
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _FILE_RIGHTS
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access & handled, fd), 12)
                if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                                ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), rule,
                                ctypes.c_uint32(0)) < 0:  # fmt: skip
                    return f"Landlock rule for {path} was refused ({_errno_text()})"
            finally:
                os.close(fd)
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset),
                        ctypes.c_uint32(0)) < 0:  # fmt: skip
            return f"Landlock could not be enforced ({_errno_text()})"
    finally:
        os.close(ruleset)
    return ""


def _seccomp() -> str:
    """Deny network sockets and escape hatches with a seccomp filter; '' on success."""
    table = _SECCOMP_TABLES.get(platform.machine())
    if table is None:
        return f"no seccomp syscall table for {platform.machine()}"
    arch, denied = table
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm = 0x00050000 | 1
    prog = [
        (ld_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, kill),
        (ld_abs, 0, 0, 0),  # seccomp_data.nr
        (jge, 0, 1, 0x40000000),  # x32 syscalls on x86_64
        (ret, 0, 0, kill),
    ]
    for nr in sorted(denied.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog.append((ret, 0, 0, allow))
    filt = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in prog))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(filt))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    if _libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fbuf, 0, 0) != 0:
        return f"seccomp filter refused ({_errno_text()})"
    return ""


def _new_netns() -> str:
    """Move into an empty network namespace; '' on success. Must run single-threaded."""
    libc = _libc()
    if libc.unshare(_CLONE_NEWNET) == 0:
        return ""
    first = _errno_text()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return ""
    return f"no network namespace ({first}; with a user namespace: {_errno_text()})"


def _rlimits(timeout: int, max_memory: int) -> None:
    import resource

    def lower(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    lower(resource.RLIMIT_CPU, timeout)
    lower(resource.RLIMIT_AS, max_memory)
    lower(resource.RLIMIT_FSIZE, MAX_OUTPUT_BYTES)
    lower(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    lower(resource.RLIMIT_CORE, 0)


def confine(
    read: list[str],
    scratch: Path,
    *,
    timeout: int,
    max_memory: int,
    allow_unconfined: bool = False,
    netns: str = "",
) -> list[str]:
    """Apply every layer to this process; the layers that could not be applied.

    Raises RuntimeError (with the message for the user) when a required layer
    is missing and `allow_unconfined` is false. `netns` is the outcome of
    :func:`_new_netns`, which has to run before any thread starts.
    """
    _rlimits(timeout, max_memory)
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise RuntimeError(f"no_new_privs could not be set ({_errno_text()})")
    missing = []
    seccomp = _seccomp()
    if seccomp:
        missing.append(seccomp)
    if seccomp and netns:
        missing.append(netns)
        if not allow_unconfined:
            raise RuntimeError(
                f"refusing to run the model's code: its network access cannot be denied "
                f"({seccomp}; {netns}); set {UNCONFINED_ENV}=1 to run it anyway"
            )
    landlock = _landlock(read, [str(scratch)])
    if landlock:
        missing.append(landlock)
        if not allow_unconfined:
            raise RuntimeError(
                f"refusing to run the model's code: its file access cannot be confined "
                f"({landlock}); set {UNCONFINED_ENV}=1 to run it anyway, or export the "
                "model to ONNX"
            )
    return missing


# ---------------------------------------------------------------------- child


def _child(scratch: Path) -> None:
    netns = _new_netns()  # before torch starts threads
    request = json.loads((scratch / REQUEST_FILE).read_text())
    import io
    import warnings

    import torch
    import torch.onnx  # imported (and its lazy modules with it) before confinement

    torch.set_num_threads(1)
    names: list[str] = request["inputs"]
    args = tuple(
        torch.from_numpy(np.load(scratch / f"input-{i}.npy", allow_pickle=False))
        for i in range(len(names))
    )
    confine(
        request["read"] + [request["model"]],
        scratch,
        timeout=request["timeout"],
        max_memory=request["maxMemory"],
        allow_unconfined=request["allowUnconfined"],
        netns=netns,
    )
    # From here on the model's code runs.
    try:
        module = torch.jit.load(request["model"], map_location="cpu").eval()
    except Exception as exc:
        raise RuntimeError(f"not a loadable TorchScript archive: {_summary(exc)}") from exc
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                args,
                buffer,
                input_names=names,
                output_names=["output"],
                dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as exc:
            raise RuntimeError(
                f"TorchScript model could not be converted to ONNX: {_summary(exc)}"
            ) from exc
    (scratch / OUTPUT_FILE).write_bytes(buffer.getvalue())


def _summary(exc: BaseException) -> str:
    """One line for the user. The TorchScript interpreter puts a preamble and the
    script's traceback first and the actual error last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "TorchScript interpreter" in lines[0]:
        hint = " (the sandbox lets it touch only its scratch folder)" * ("denied" in lines[-1])
        return f"the model's code failed: {lines[-1]}{hint}"
    return lines[0]


def _main(argv: list[str]) -> int:
    scratch = Path(argv[1])
    try:
        _child(scratch)
    except BaseException as exc:  # everything, even SystemExit, becomes one line for the parent
        message = _summary(exc)
        if not isinstance(exc, RuntimeError) and message != type(exc).__name__:
            message = f"{type(exc).__name__}: {message}"
        with contextlib.suppress(OSError):
            (scratch / ERROR_FILE).write_text(message[:_MAX_ERROR_BYTES])
        return _EXIT_REPORTED
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
