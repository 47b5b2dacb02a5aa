"""A private PostgreSQL cluster on a free loopback port, for one test
session: initdb into a fresh directory, postgres in the foreground with
TCP on 127.0.0.1 only and its unix socket in that directory, trust
authentication (nothing but this machine can reach it), durability off
(a test's data is thrown away).

    pg = PostgresServer(workdir).start()
    dsn = pg.create_database("t1")   # a libpq DSN for psycopg2 or psql
    ... pg.stop()

PostgreSQL refuses to run as root: as root, initdb and postgres run as
the user `postgres` (which Debian's package creates) in a directory of
theirs under the system's temp directory, since a test's own tmp_path is
private to root.  The binaries are found with a glob over Debian's
/usr/lib/postgresql/<version>/bin, the newest version first, or in
$INFER_PG_BIN; bindir() is None when PostgreSQL is not installed."""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port, wait_port
from .process import Served, stop_process

RUN_AS = "postgres"


def bindir():
    """The directory holding initdb, postgres and psql, or None."""
    env = os.environ.get("INFER_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "postgres").exists() else None

    def version(path):
        v = Path(path).parts[-3]             # /usr/lib/postgresql/<v>/bin
        return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=version, reverse=True)
    return Path(found[0]).parent if found else None


class PostgresServer(Served):
    def __init__(self, workdir, port=None):
        self.workdir = Path(workdir)             # logs, readable by the test
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.bin = bindir()
        self.proc = None
        self.root = None                         # data and socket, ours
        self.user = None

    # ------------------------------------------------------------ lifecycle
    def _as_user(self):
        """Popen arguments that drop root for the postgres user."""
        if os.geteuid() != 0:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid,
                "extra_groups": []}

    def _env(self):
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "LC_ALL": "C",
                "HOME": str(self.root), "TZ": "UTC"}

    def start(self, timeout=30):
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed")
        if os.geteuid() == 0:
            self.user = pwd.getpwnam(RUN_AS)
        self.root = Path(tempfile.mkdtemp(prefix="infer-pg-"))
        if self.user:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        data = self.root / "data"
        log = open(self.workdir / "postgres.log", "ab")
        try:
            r = subprocess.run(
                [str(self.bin / "initdb"), "-D", str(data), "-U", "postgres",
                 "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                cwd=self.root, timeout=timeout, **self._as_user())
            if r.returncode != 0:
                raise RuntimeError(f"initdb exited with {r.returncode}; see "
                                   f"{self.workdir / 'postgres.log'}")
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(data),
                 "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=50",
                 "-c", "TimeZone=UTC"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(), cwd=self.root, **self._as_user())
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        alive = lambda: self.proc.poll() is None  # noqa: E731
        if not wait_port(self.host, self.port, timeout, alive=alive):
            self.stop()
            raise RuntimeError("postgres did not start:\n" + self.log_text())
        # the port opens before recovery ends ("the database system is
        # starting up"): wait for a connection that works
        while True:
            r = self.psql("SELECT 1", check=False, timeout=5)
            if r.returncode == 0:
                return self
            if time.monotonic() > deadline or not alive():
                self.stop()
                raise RuntimeError("postgres refused connections:\n"
                                   + r.stderr + self.log_text())
            time.sleep(0.05)

    def stop(self):
        """Fast shutdown (SIGINT: clients are disconnected; SIGTERM would
        wait for them), then the directory goes."""
        stop_process(self.proc, signal.SIGINT)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def log_text(self):
        try:
            return (self.workdir / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""

    # -------------------------------------------------------------- clients
    def dsn(self, dbname="postgres"):
        return (f"host={self.host} port={self.port} user=postgres "
                f"dbname={dbname} connect_timeout=5")

    def connect(self, dbname="postgres"):
        import psycopg2
        return psycopg2.connect(self.dsn(dbname))

    def psql(self, sql=None, dbname="postgres", file=None, variables=None,
             csv=False, check=True, timeout=30):
        """Run psql (the client a billing job would use): the text of
        sql, or file; variables become -v name=value."""
        cmd = [str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
               "-d", self.dsn(dbname)]
        if csv:
            cmd.append("--csv")
        for k, v in (variables or {}).items():
            cmd += ["-v", f"{k}={v}"]
        cmd += ["-f", str(file)] if file else ["-c", sql]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "TZ": "UTC"})
        if check and r.returncode != 0:
            raise RuntimeError(f"psql exited with {r.returncode}:\n{r.stderr}")
        return r

    def create_database(self, name):
        """A fresh, empty database; its DSN."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)
