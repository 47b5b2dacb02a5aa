"""Launcher for sim/infer_sim.py (one simulated model replica per process).

    s = SimProcess("llama-3-8b", "llama-a", workdir, ttft_ms=5, split_writes=True)
    s.start(); ... s.url ... s.requests() ... s.stop()

Options become flags: ttft_ms=5 -> --ttft-ms 5; True -> bare flag; False or
None -> left out.  Standard library only.
"""

import http.client
import json
import os
import subprocess
import time
from pathlib import Path

from .process import Served, stop_process

REPO = Path(__file__).resolve().parents[2]
SIM = REPO / "sim" / "infer_sim.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


class SimProcess(Served):
    def __init__(self, model, replica, workdir, **opts):
        self.model = model
        self.replica = replica
        self.workdir = Path(workdir)
        self.opts = opts
        self.proc = None
        self.log_path = self.workdir / f"sim-{replica}.log"
        self.port_file = self.workdir / f"sim-{replica}.port"

    # ------------------------------------------------------------ lifecycle
    def argv(self):
        args = [PYTHON, str(SIM), "--listen", f"{self.host}:0",
                "--port-file", str(self.port_file),
                "--model", self.model, "--replica", self.replica]
        for k, v in self.opts.items():
            if v is None or v is False:
                continue
            flag = "--" + k.replace("_", "-")
            if v is True:
                args.append(flag)
            else:
                args += [flag, str(v)]
        return args

    def start(self, timeout=10):
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.port_file.unlink()
        except FileNotFoundError:
            pass
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail("exited with status %s" % self.proc.returncode)
            try:
                text = self.port_file.read_text().strip()
                if text:
                    self.port = int(text)
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
        else:
            self._fail("wrote no port file in %ss" % timeout)
        while time.monotonic() < deadline:
            try:
                status, _, _ = self._http("GET", "/health", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                self._fail("exited with status %s" % self.proc.returncode)
            time.sleep(0.02)
        self._fail("/health did not answer 200 in %ss" % timeout)

    def _fail(self, why):
        self.stop()
        raise RuntimeError(f"infer_sim {self.replica} {why}:\n{self.log_text()}")

    def stop(self):
        stop_process(self.proc, timeout=5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -------------------------------------------------------------- control
    def _http(self, method, path, body=None, timeout=10):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            hdrs = {}
            if body is not None:
                body = json.dumps(body).encode()
                hdrs["content-type"] = "application/json"
            c.request(method, path, body, hdrs)
            r = c.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            c.close()

    def _json(self, method, path, body=None):
        status, _, data = self._http(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {data[:500]!r}")
        return json.loads(data)

    def requests(self):
        """The recorded requests, oldest first (the last 1000)."""
        return self._json("GET", "/_sim/requests")

    def clear_requests(self):
        self._json("DELETE", "/_sim/requests")

    def configure(self, **opts):
        """Merge runtime options (ttft_ms=..., fail_ratio=...); returns the config."""
        return self._json("POST", "/_sim/config", opts)

    def config(self):
        return self._json("GET", "/_sim/config")

    def stats(self):
        """Counters: running, waiting, connections_total, status_counts, ..."""
        return self._json("GET", "/_sim/stats")

    def __repr__(self):
        return f"<SimProcess {self.replica} {self.model} {self.addr}>"
