"""A throwaway Redis under Sentinel, for the tests and for trying failover by hand: a master,
a replica and three Sentinels on loopback, all from the embedded Redis binary.

    with SentinelGroup(tmp_path) as group:
        group.url, group.master_name      # sentinel://127.0.0.1:p1;...  and  "llmw"
        group.kill_master()               # SIGKILL; the Sentinels promote the replica
        group.wait_for_failover(30)
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from worker.dev.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    Source,
    find_redis_server,
    free_port,
)

#: Quick enough for a test, slow enough that a busy machine is not taken for a dead one.
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 10_000


class SentinelGroup:
    def __init__(
        self,
        base_dir: Path,
        *,
        master_name: str = "llmw",
        sentinels: int = 3,
        source: Source = "auto",
    ) -> None:
        self.base_dir = base_dir
        self.master_name = master_name
        self.source: Source = source
        self.binary = find_redis_server(source)
        self.servers: list[EmbeddedRedis] = []
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    def _server(self, name: str, *extra: str) -> EmbeddedRedis:
        folder = self.base_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        return EmbeddedRedis(source=self.source, data_dir=folder, extra_args=extra)

    def start(self, timeout_s: float = 60.0) -> SentinelGroup:
        master = self._server("master").start()
        self.servers.append(master)
        replica = self._server("replica", "--replicaof", "127.0.0.1", str(master.port)).start()
        self.servers.append(replica)
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            folder = self.base_dir / f"sentinel-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"  # Sentinel rewrites its file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            with (folder / "sentinel.log").open("ab") as log:
                self.sentinels.append(
                    subprocess.Popen(
                        [str(self.binary), str(conf), "--sentinel"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        self._wait(
            self._settled, timeout_s, "the Sentinels to see the master, replica and each other"
        )
        return self

    def sentinel(self, index: int = 0) -> redis.Redis[str]:
        return redis.Redis(port=self.sentinel_ports[index], socket_timeout=2, decode_responses=True)

    def master_port(self) -> int:
        """The master's port, as the first Sentinel names it."""
        with self.sentinel() as client:
            _host, port = client.execute_command(
                "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name
            )
        return int(port)

    def server_on(self, port: int) -> EmbeddedRedis:
        return next(s for s in self.servers if s.port == port)

    def _settled(self) -> bool:
        for proc, port in zip(self.sentinels, self.sentinel_ports, strict=True):
            if proc.poll() is not None:  # e.g. its port was taken meanwhile: say so now
                log = self.base_dir / f"sentinel-{port}" / "sentinel.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise EmbeddedRedisError(f"the Sentinel on port {port} exited:\n{tail}")
        others = len(self.sentinel_ports) - 1
        for index in range(len(self.sentinel_ports)):
            with self.sentinel(index) as client:
                state = client.execute_command("SENTINEL MASTER", self.master_name)
            if int(state["num-other-sentinels"]) < others or int(state["num-slaves"]) < 1:
                return False
        # Synced, not only connected: a replica still loading the first copy has nothing.
        master_port = self.master_port()
        for server in self.servers:
            if server.port == master_port or server.process is None:
                continue
            with redis.Redis(port=server.port, socket_timeout=2) as client:
                if client.info("replication").get("master_link_status") != "up":
                    return False
        return True

    def kill_master(self) -> int:
        """SIGKILL the master (no chance to sync anything more); its old port."""
        port = self.master_port()
        server = self.server_on(port)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        return port

    def wait_for_failover(self, old_port: int, timeout_s: float = 60.0) -> int:
        """Wait until every Sentinel names a new master; its port."""

        def moved() -> bool:
            for index in range(len(self.sentinel_ports)):
                with self.sentinel(index) as client:
                    _host, port = client.execute_command(
                        "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
                if int(port) == old_port:
                    return False
            return True

        self._wait(moved, timeout_s, "the Sentinels to promote the replica")
        return self.master_port()

    def restart(self, port: int) -> None:
        """Start the server of ``port`` again (empty); the Sentinels make it a replica."""
        self.server_on(port).start()

    def _wait(self, check: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if callable(check) and check():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"timed out after {timeout_s} s waiting for {what}; {self._states()}"
                )
            time.sleep(0.1)

    def _states(self) -> str:
        """What each Sentinel sees of the master, for an error message."""
        seen = []
        for index, port in enumerate(self.sentinel_ports):
            try:
                with self.sentinel(index) as client:
                    state = client.execute_command("SENTINEL MASTER", self.master_name)
                seen.append(
                    f"{port}: flags={state.get('flags')} "
                    f"others={state.get('num-other-sentinels')} replicas={state.get('num-slaves')}"
                )
            except (redis.RedisError, OSError) as exc:
                seen.append(f"{port}: {type(exc).__name__}")
        return "; ".join(seen)

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.sentinels.clear()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
