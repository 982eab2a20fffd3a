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
there is no free-port race. Run by hand::

    python tests/s3server.py --port 9000 --bucket models
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import subprocess
import sys
import tempfile
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

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port
        self.endpoint = ""
        self._proc: subprocess.Popen[str] | None = None
        self._log: Any = None

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
        ]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
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
        return self

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
            if proc.stdout is not None:
                proc.stdout.close()
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


def _serve(argv: list[str] | None = None) -> int:
    """The child side: run moto, print ``READY <endpoint>``, wait to be stopped."""
    import logging
    import signal

    parser = argparse.ArgumentParser(description="moto S3 server for edgeslim tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--bucket", action="append", default=[], help="create at start")
    parser.add_argument("--exit-with-parent", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    # moto binds 0.0.0.0 by default; an unauthenticated S3 stays on loopback.
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
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
