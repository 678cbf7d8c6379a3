"""A real PgBouncer in front of the test server, for the tests of loads through a pooler.

Debian's `pgbouncer` (scripts/setup installs it) refuses to run as root, so when we are root it
runs as the postgres system user, as the test cluster does; its config, socket, log and pid
file live in a temp dir, it listens on a free loopback port, and it is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    return cmd if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *cmd]


@dataclass
class PgBouncer:
    """PgBouncer in `mode` (transaction or session) forwarding every database to `server_dsn`."""

    server_dsn: str
    mode: str
    pool_size: int = 20
    port: int = 0
    root: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str) -> str:
        """The URL a client uses to reach `database` through this PgBouncer."""
        parts = urlsplit(self.server_dsn)
        netloc = f"{parts.username}@127.0.0.1:{self.port}" if parts.username else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, path="/" + database))

    @property
    def log(self) -> Path:
        return self.root / "pgbouncer.log"

    def start(self) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(binary):
            raise RuntimeError("pgbouncer not found: scripts/setup installs Debian's pgbouncer package")
        server = urlsplit(self.server_dsn)
        self.root = Path(tempfile.mkdtemp(prefix="loader-pgbouncer-"))
        self.port = _free_port()
        users = self.root / "users.txt"
        users.write_text(f'"{server.username or "postgres"}" ""\n')
        config = self.root / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={server.hostname} port={server.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.root}\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            f"pool_mode = {self.mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
        )
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            for path in (users, config):
                shutil.chown(path, "postgres", "postgres")
        with open(self.root / "stderr.txt", "wb") as err:
            self.proc = subprocess.Popen(_as_postgres([binary, str(config)]), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = (self.root / "stderr.txt").read_text(errors="replace")
                    log = self.log.read_text(errors="replace") if self.log.exists() else ""
                    raise RuntimeError(f"pgbouncer did not start: {err} {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
