"""A real S3 endpoint over HTTP (moto) for tests and ``make cluster``.

Why a subprocess and not moto's in-process ``ThreadedMotoServer``: the
operator, the node agent and the pods it starts are separate processes that
must all reach the same endpoint, and a server thread inside pytest would share
the test process's GIL, signal handling and import state (moto patches
botocore when imported in-process). A child process is just an HTTP server on
a port, like MinIO in production. To make sure it never outlives the tests,
the child exits when its parent dies (``--exit-with-parent``), and ``stop``
escalates SIGTERM to SIGKILL.

The child binds port 0 unless told a port and reports the port it got, so
there is no free-port race.

With ``faults=True`` the endpoint is a small TCP gate in front of moto, in the
same child, that the parent can take down and bring back (``down``, ``up``,
``down_on_upload``): clients see connection refused and reset connections, as
when MinIO restarts, while the stored objects survive (moto keeps them in
memory, so stopping the process itself would lose them). Run by hand::

    python tests/s3server.py --port 9000 --bucket models
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
_READY = "READY "


class S3Server:
    """A moto S3 server in a child process; use as a context manager."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, faults: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.faults = faults
        self.endpoint = ""
        self._proc: subprocess.Popen[str] | None = None
        self._log: Any = None
        self._notices: list[str] = []
        self._notice = threading.Condition()

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (and edgeslim.storage) at this server."""
        if not self.endpoint:
            raise RuntimeError("S3Server is not started")
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        """Starts the server and returns once it answers HTTP."""
        if self._proc is not None:
            return self
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="edgeslim-s3server-", suffix=".log", delete=False
        )
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--host",
            self.host,
            "--port",
            str(self.port or 0),
            "--exit-with-parent",
            *(["--faults"] if self.faults else []),
        ]
        self._proc = subprocess.Popen(
            argv,
            # The fault gate's commands (see `down`) go down stdin.
            stdin=subprocess.PIPE if self.faults else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C in the terminal goes to pytest, which stops us
        )
        deadline = time.monotonic() + timeout
        try:
            port = self._read_port(deadline)
            self.endpoint = f"http://{self.host}:{port}"
            self.port = port
            self._wait_http(deadline)
        except BaseException:
            self.stop()
            raise
        if self.faults:
            threading.Thread(target=self._read_notices, name="s3-notices", daemon=True).start()
        return self

    # -- faults (``faults=True`` only) ------------------------------------

    def _command(self, line: str) -> None:
        if not self.faults or self._proc is None or self._proc.stdin is None:
            raise RuntimeError("S3Server was not started with faults=True")
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def _read_notices(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):  # closed by stop()
            for line in proc.stdout:
                with self._notice:
                    self._notices.append(line.strip())
                    self._notice.notify_all()

    def _await(self, notice: str, count: int, timeout: float) -> None:
        with self._notice:
            if not self._notice.wait_for(lambda: self._notices.count(notice) >= count, timeout):
                raise TimeoutError(f"S3 gate did not report {notice!r} in {timeout:.0f} s")

    def down(self, timeout: float = 10.0) -> None:
        """Stops answering: the port refuses connections and open ones are reset."""
        n = self._notices.count("DOWN")
        self._command("down")
        self._await("DOWN", n + 1, timeout)

    def up(self, timeout: float = 10.0) -> None:
        """Answers again on the same port, with every object stored before."""
        n = self._notices.count("UP")
        self._command("up")
        self._await("UP", n + 1, timeout)

    def down_on_upload(self, key_part: str, nth: int = 1) -> None:
        """Goes down (as `down`) the moment the `nth` PUT whose path contains
        `key_part` arrives: that upload is cut off mid-request. `wait_down` tells
        when it happened; `up` brings the server back."""
        if any(c in key_part for c in " \n"):
            raise ValueError(f"key_part {key_part!r} must not contain spaces or newlines")
        self._command(f"arm {nth} {key_part}")

    def wait_down(self, count: int = 1, timeout: float = 300.0) -> None:
        """Waits until the gate has gone down `count` times in all."""
        self._await("DOWN", count, timeout)

    @property
    def is_down(self) -> bool:
        with self._notice:
            return self._notices.count("DOWN") > self._notices.count("UP")

    def _read_port(self, deadline: float) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"S3 server did not start in time; log: {self._tail()}")
                if sel.select(timeout=min(left, 0.5)):
                    line = self._proc.stdout.readline()
                    if line.startswith(_READY):
                        return int(line[len(_READY) :].strip().rsplit(":", 1)[1])
                    if not line:  # EOF: the child died
                        self._proc.wait(timeout=5)
                        raise RuntimeError(
                            f"S3 server exited with {self._proc.returncode}: {self._tail()}"
                        )

    def _wait_http(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3 server does not answer; log: {self._tail()}") from None
                time.sleep(0.05)

    def _tail(self) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError):
            return Path(self._log.name).read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log is not None:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)
            self._log = None
        self.endpoint = ""

    def client(self) -> Any:
        """A plain boto3 S3 client for this server (test setup, independent of edgeslim)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        """Creates a bucket (us-east-1 needs no location constraint)."""
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Gate:
    """The child side of ``faults=True``: a TCP relay on the public port in front
    of moto that can go down (listener closed, open connections reset) and come
    back on the same port, while moto and its objects stay up behind it."""

    def __init__(self, host: str, port: int, backend: tuple[str, int]) -> None:
        self.host, self.port, self.backend = host, port, backend
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._trap: tuple[re.Pattern[bytes], int] | None = None

    def up(self, announce: bool = True) -> int:
        with self._lock:
            if self._listener is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(128)
                self.port = sock.getsockname()[1]
                self._listener = sock
                threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        if announce:  # not before READY: the parent reads that line with select()
            print("UP", flush=True)
        return self.port

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            # RST, not FIN: the peer's request dies mid-flight, as on a crash.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        print("DOWN", flush=True)

    def arm(self, nth: int, key_part: str) -> None:
        pattern = re.compile(rb"(?m)^PUT [^ ]*" + re.escape(key_part.encode()))
        with self._lock:
            self._trap = (pattern, nth)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                backend = socket.create_connection(self.backend)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    backend.close()
                    return
                self._conns |= {client, backend}
            threading.Thread(target=self._pump, args=(client, backend, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(backend, client, False), daemon=True).start()

    def _tripped(self, chunk: bytes) -> bool:
        with self._lock:
            if self._trap is None:
                return False
            pattern, nth = self._trap
            hits = len(pattern.findall(chunk))
            if hits < nth:
                self._trap = (pattern, nth - hits)
                return False
            self._trap = None
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if upstream and self._tripped(chunk):
                    self.down()  # the upload never reaches moto
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._conns -= {src, dst}


def _control(gate: _Gate) -> None:
    """Commands from the parent, one a line: `down`, `up`, `arm <nth> <key part>`."""
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "down":
            gate.down()
        elif cmd == "up":
            gate.up()
        elif cmd == "arm":
            gate.arm(int(args[0]), args[1])


def _serve(argv: list[str] | None = None) -> int:
    """The child side: run moto, print ``READY <endpoint>``, wait to be stopped."""
    import logging

    parser = argparse.ArgumentParser(description="moto S3 server for edgeslim tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--bucket", action="append", default=[], help="create at start")
    parser.add_argument("--exit-with-parent", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument(
        "--faults", action="store_true", help="serve through a gate stdin commands take down"
    )
    args = parser.parse_args(argv)

    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    # moto binds 0.0.0.0 by default; an unauthenticated S3 stays on loopback.
    server = ThreadedMotoServer(
        ip_address=args.host, port=0 if args.faults else args.port, verbose=False
    )
    server.start()
    _, port = server.get_host_and_port()
    if args.faults:
        gate = _Gate(args.host, args.port, (args.host, port))
        port = gate.up(announce=False)
        threading.Thread(target=_control, args=(gate,), daemon=True).start()
    endpoint = f"http://{args.host}:{port}"
    if args.bucket:
        s3 = S3Server(args.host, port)
        s3.endpoint = endpoint
        for bucket in args.bucket:
            s3.create_bucket(bucket)
    print(f"{_READY}{endpoint}", flush=True)
    if not args.exit_with_parent:
        print(f"export AWS_ENDPOINT_URL={endpoint}", flush=True)
        print(f"export AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY}")
        print(f"export AWS_REGION={REGION}", flush=True)

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    while not stop:
        time.sleep(0.5)
        if args.exit_with_parent and os.getppid() != parent:
            break  # parent died; we were re-parented
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
