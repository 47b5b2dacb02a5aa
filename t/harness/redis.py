"""A real redis-server on a free loopback port, nothing saved to disk."""

import shutil
import signal
import subprocess
from pathlib import Path

from .ports import free_port, wait_port
from .process import Served, stop_process

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer(Served):
    def __init__(self, workdir, port=None, extra_args=()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = list(extra_args)   # e.g. ["--unixsocket", path]
        self.proc = None

    def start(self, timeout=10):
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--bind", self.host, "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log"),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not wait_port(self.host, self.port, timeout,
                         alive=lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError("redis-server did not start")
        return self

    def stop(self):
        stop_process(self.proc)

    def kill(self):
        """An outage as it comes: SIGKILL, nothing flushed or closed."""
        stop_process(self.proc, signal.SIGKILL)

    def client(self):
        import redis
        return redis.Redis(host=self.host, port=self.port,
                           decode_responses=True)
