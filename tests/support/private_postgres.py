"""A private PostgreSQL server for the database fault tests: restarted, stopped and
its backends terminated, without touching the shared server other tests run on.

``initdb`` makes a cluster in a temporary directory; ``pg_ctl`` runs it on a free port
below the ephemeral range (so no client connection can take the port while the server
is down) with its Unix socket in the same directory. PostgreSQL refuses to run as
root, so as root every command runs as the ``postgres`` OS user (``runuser``), which
owns the directory. Trust authentication on 127.0.0.1 only; ``fsync`` off (the data
is thrown away, and the machine is shared).

    with private_postgres() as pg:
        url = pg.store_url("pgf_x")        # postgresql://…?schema=pgf_x, schema created
        pg.restart()                         # pg_ctl restart -m fast
        pg.terminate_backends()              # pg_terminate_backend of every client
        pg.stop(); pg.start()
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

__all__ = ["PrivatePostgres", "postgres_binaries", "private_postgres"]

_CANDIDATES = (
    Path("/usr/lib/postgresql/15/bin"),
    *sorted(Path("/usr/lib/postgresql").glob("*/bin")),
)


def postgres_binaries() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``; FileNotFoundError if none."""
    for directory in _CANDIDATES:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).parent
    raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port() -> int:
    for _ in range(200):
        port = random.randrange(15000, 17000)
        if _free(port):
            return port
    raise RuntimeError("no free port for a private PostgreSQL server")


@dataclass
class PrivatePostgres:
    directory: Path
    port: int
    bin: Path
    user: str | None  # the OS user to run the server as (None: this one)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def store_url(self, schema: str) -> str:
        """A store URL on this server with ``schema`` (created if missing)."""
        self.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        return f"{self.url}?schema={schema}"

    def _run(self, *argv: str, timeout: float = 90.0) -> str:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                f"{self.log_tail()}"
            )
        return done.stdout

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> None:
        self._run(
            *("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> float:
        """Start the server and wait until it accepts connections; returns the
        ``time.monotonic()`` at which it did."""
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60")
        return self._wait_accepting()

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``: every connection is dropped, the port closes."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def restart(self, mode: str = "fast") -> float:
        """``pg_ctl restart -m mode``; returns when it accepts connections again."""
        self._run(
            *("pg_ctl", "restart", "-D", str(self.data), "-l", str(self.log)),
            *("-m", mode, "-w", "-t", "60"),
        )
        return self._wait_accepting()

    def _wait_accepting(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return time.monotonic()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def execute(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def terminate_backends(self) -> int:
        """``pg_terminate_backend`` of every client session but this one (what a
        failover proxy or an ``idle_session_timeout`` does); how many."""
        rows = self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return sum(1 for (ok,) in rows if ok)

    def sessions(self) -> int:
        """Client sessions open now (this one not counted)."""
        rows = self.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return int(rows[0][0])  # type: ignore[call-overload]


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private server, started; stopped (immediate) and its directory removed at the
    end. Raises (never skips) when it cannot be started."""
    binaries = postgres_binaries()
    user = "postgres" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="sessionbus-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    server = PrivatePostgres(directory=directory, port=_port(), bin=binaries, user=user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
