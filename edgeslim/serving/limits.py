"""What a client may cost the edge server: connections, bytes, time.

Every limit is a setting: an ``edgeslim serve`` flag whose default comes from an
environment variable (``EDGESLIM_SERVE_<FLAG>``), then from :data:`SETTINGS`.
The README's serving section lists them with their defaults.

The open-file limit is the one resource a flood exhausts first: every
connection, accepted or still waiting in the kernel's accept queue to be
accepted in one batch, is a file descriptor. :func:`fit_to_open_files` lowers
the connection cap and the listen backlog so that, with the probe listener and
headroom for the model file, storage downloads and /proc reads, the server
can never reach the limit.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, replace

from edgeslim.errors import BadInput

MiB = 1024 * 1024

#: Open files kept free beyond what listeners and connections may use: the
#: model file, S3 download sockets while loading, /proc reads of the metrics
#: collector, log files, the event loop's own descriptors.
FD_HEADROOM = 32

#: The probe listener is for the kubelet (a probe every few seconds, each on its
#: own connection): a small fixed cap is plenty. (Its listen queue is the main
#: port's: uvicorn listens on every socket with one backlog.)
HEALTH_MAX_CONNECTIONS = 16

# The fewest connections worth serving with; below it the open-file limit is a mistake.
_MIN_CONNECTIONS = 8


@dataclass(frozen=True)
class Setting:
    flag: str
    default: int | float
    help: str

    @property
    def env(self) -> str:
        return "EDGESLIM_SERVE_" + self.flag.upper().replace("-", "_")

    @property
    def field(self) -> str:
        return self.flag.replace("-", "_")


#: The limits' flags, defaults and help, in the order ``--help`` lists them.
SETTINGS: tuple[Setting, ...] = (
    Setting("max-body-bytes", 16 * MiB, "larger request bodies get 413"),
    Setting(
        "max-inflight-body-bytes",
        64 * MiB,
        "budget for the bodies of all requests in progress together; a request whose "
        "Content-Length does not fit what is left gets 503 before anything is read",
    ),
    Setting("body-timeout", 60.0, "seconds a request body may take to arrive, else 408"),
    Setting(
        "header-timeout",
        10.0,
        "seconds from a connection's first byte (or its opening) to complete request headers",
    ),
    Setting("max-header-bytes", 64 * 1024, "request line plus headers; larger gets 431"),
    Setting("keep-alive-timeout", 75.0, "seconds an idle keep-alive connection stays open"),
    Setting(
        "max-connections",
        1024,
        "open connections on the main port; lowered to fit the open-file limit",
    ),
    Setting("backlog", 128, "listen queue; lowered to fit the open-file limit"),
    Setting(
        "health-port",
        0,
        "a second listener answering only /v2/health/live and /v2/health/ready with its "
        "own connection cap, for the kubelet's probes; the operator's Deployment uses 8081 "
        "(0: none)",
    ),
)


@dataclass(frozen=True)
class ServingLimits:
    max_body_bytes: int = 16 * MiB
    max_inflight_body_bytes: int = 64 * MiB
    body_timeout: float = 60.0
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    keep_alive_timeout: float = 75.0
    max_connections: int = 1024
    backlog: int = 128
    health_port: int = 0

    def check(self, port: int) -> None:
        """BadInput naming the first setting that cannot work."""
        positive = [
            s.flag for s in SETTINGS if s.flag != "health-port" and not getattr(self, s.field) > 0
        ]
        if positive:
            raise BadInput(f"--{positive[0]} must be > 0")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise BadInput(
                f"--max-inflight-body-bytes {self.max_inflight_body_bytes} is below "
                f"--max-body-bytes {self.max_body_bytes}: no full-size request could ever run"
            )
        if not 0 <= self.health_port < 65536 or (self.health_port and self.health_port == port):
            raise BadInput("--health-port must be 0 (none) or a port in 1..65535 other than --port")


def env_default(setting: Setting) -> str:
    """The flag's default as argparse parses it (so a bad value is a usage error, exit 2)."""
    return os.environ.get(setting.env, str(setting.default))


def raise_open_file_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one (as Go's runtime does); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a sandbox may forbid it; the soft limit then stands
            pass
    return soft


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a typical interpreter's handful
        return 16


def fit_to_open_files(limits: ServingLimits, nofile: int, in_use: int) -> ServingLimits:
    """``limits`` with max_connections and backlog lowered so descriptors never run out.

    Worst case in descriptors: those open now, the headroom, and per listener its
    listening socket, its open connections and a full accept queue taken in one
    batch (the event loop accepts what is queued before it runs any protocol code
    that could close the excess).
    """
    listeners = 2 if limits.health_port else 1
    spare = nofile - in_use - FD_HEADROOM - listeners
    if limits.health_port:
        spare -= HEALTH_MAX_CONNECTIONS
    # At most a fifth for each queue, the rest for connections, unless asked for less.
    backlog = max(1, min(limits.backlog, spare // 5))
    connections = min(limits.max_connections, spare - listeners * backlog)
    if connections < _MIN_CONNECTIONS:
        raise BadInput(
            f"the open-file limit ({nofile}) leaves room for {max(connections, 0)} connections; "
            f"raise it (ulimit -n) to at least {nofile - connections + _MIN_CONNECTIONS}"
        )
    return replace(limits, max_connections=connections, backlog=backlog)
