"""A throwaway PostgreSQL for the tests, the benchmark and the demo; not part of the installed
package (it trusts every local connection and makes a superuser with a known password).

Where the server comes from, in order:
1. testcontainers' PostgreSQL, when a Docker engine answers;
2. `LOADER_TEST_DSN`, when set;
3. a local cluster from the PostgreSQL server binaries (`initdb`, `pg_ctl`) on PATH or
   under /usr/lib/postgresql/*/bin: data and socket in a temp dir, a free port, run as
   the `postgres` system user when we are root (initdb refuses root), removed at stop.
If none can be had, `start_server` raises: callers fail loudly rather than skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Roles the local cluster creates for tests of authentication.
PASSWORD_USER = "loader_pw"
PASSWORD = "s3cret-Pa55"


class NoServerError(RuntimeError):
    pass


def pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise NoServerError("running as root needs runuser to start PostgreSQL as the postgres user")
    return [runuser, "-u", "postgres", "--", *cmd]


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in a temp dir, owned by the postgres user when we are root."""

    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    root: Path = field(default_factory=Path)
    kind: str = "local cluster"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = pg_binary(args[0])
        if binary is None:
            raise NoServerError(f"{args[0]} not found (install the distribution's postgresql package)")
        return subprocess.run(
            _as_postgres([binary, *args[1:]]), capture_output=True, text=True, check=check, timeout=120
        )

    def start(self) -> LocalCluster:
        self.root = Path(tempfile.mkdtemp(prefix="loader-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = self.port or _free_port()
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
        except subprocess.CalledProcessError as exc:
            raise NoServerError(f"initdb failed: {exc.stderr.strip()}") from None
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "100",
            **self.settings,
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("".join(f"{key} = {value}\n" for key, value in conf.items()))
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        self.start_server()
        self.psql(
            f"CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'",
        )
        return self

    def start_server(self) -> None:
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise NoServerError(f"pg_ctl start failed: {result.stderr.strip()} {tail}")

    def stop_server(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop_server(mode)
        self.start_server()

    def psql(self, command: str, database: str = "postgres") -> str:
        binary = pg_binary("psql")
        if binary is None:
            raise NoServerError("psql not found")
        out = subprocess.run(
            [binary, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.dsn.rsplit("/", 1)[0] + "/" + database, "-c", command],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return out.stdout

    def stop(self) -> None:
        if self.root and self.data.exists():
            self.stop_server("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class ExternalServer:
    dsn: str
    kind: str
    container: object | None = None

    def stop(self) -> None:
        if self.container is not None:
            self.container.stop()  # type: ignore[attr-defined]


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_server(settings: dict[str, str] | None = None, *, local_only: bool = False) -> LocalCluster | ExternalServer:
    """Provide a PostgreSQL; `local_only` (or server settings) asks for a cluster we control."""
    if not local_only and not settings:
        if _docker_answers():
            from testcontainers.postgres import PostgresContainer

            container = PostgresContainer("postgres:15", driver=None).start()
            return ExternalServer(container.get_connection_url(), "testcontainers", container)
        if os.environ.get("LOADER_TEST_DSN"):
            return ExternalServer(os.environ["LOADER_TEST_DSN"], "LOADER_TEST_DSN")
    return LocalCluster(settings=dict(settings or {})).start()


def main() -> None:
    """`python devserver.py`: start a throwaway server, print its DSN, stop on Enter/Ctrl-C."""
    server = start_server(local_only=True)
    print(server.dsn, flush=True)
    try:
        input()
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
