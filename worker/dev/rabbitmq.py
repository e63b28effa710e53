"""A RabbitMQ node of one's own, for the test suite and the benchmarks: Debian's
``rabbitmq-server``, started under a given folder on free ports, never the machine's node
(``rabbit@…`` on 5672).

Everything the node writes (its database, logs, config, the Erlang cookie in ``HOME``) is under
the folder; ``stop()`` ends the node and leaves nothing running but ``epmd``, the port mapper
that every Erlang node of the machine shares.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from worker.dev.embedded import free_port

#: The server script of Debian's package (``/usr/sbin/rabbitmq-server`` is a wrapper that
#: switches to the ``rabbitmq`` user and the system's database).
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0


def unavailable_reason() -> str | None:
    """Why no node can be started here (None when one can)."""
    if not SERVER.exists():
        return "rabbitmq-server is not installed (`make tools` installs Debian's package as root)"
    if shutil.which("erl") is None:
        return "Erlang (erl) is not on PATH"
    return None


class RabbitServer:
    """One private RabbitMQ node under ``folder``: ``start()``, ``stop()``, ``restart()``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.name = f"llmw-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "server.log"
        for sub in ("home", "mnesia", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n",
            encoding="utf-8",
        )
        (folder / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        (folder / "rabbitmq-env.conf").write_text("", encoding="utf-8")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        f = self.folder
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(f / "home"),
                # The machine's rabbitmq-env.conf names its own node: read an empty one.
                "RABBITMQ_CONF_ENV_FILE": str(f / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(f / "mnesia"),
                "RABBITMQ_LOG_BASE": str(f / "log"),
                "RABBITMQ_CONFIG_FILE": str(f / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(f / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(f / "rabbitmq.pid"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    def start(self) -> RabbitServer:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(SERVER)],
            cwd=self.folder,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._accepts_amqp():
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rabbitmq-server did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def _accepts_amqp(self) -> bool:
        """The node answers an AMQP protocol header with its connection.start."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return len(sock.recv(8)) > 0
        except OSError:
            return False

    def stop(self) -> None:
        """End the node (SIGTERM: a clean shutdown, its queues kept on disk) and wait until
        none of its processes (the script, the VM, its helpers: one session) is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        if not _group_gone(proc, STOP_TIMEOUT_S):
            _signal_group(proc.pid, signal.SIGKILL)
            _group_gone(proc, 10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_gone(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the script once it exits
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
