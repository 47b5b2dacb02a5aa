"""What every server the harness starts has in common."""

import signal
import subprocess


class Served:
    """A server on host:port (loopback)."""

    host = "127.0.0.1"
    port = None

    @property
    def addr(self):
        return f"{self.host}:{self.port}"

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Send sig, wait up to timeout seconds, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
