"""Free loopback ports for the servers a test starts."""

import socket


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago on host (loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=10.0, alive=None):
    """Wait until host:port accepts a connection; alive() may say the
    process behind it died, which ends the wait at once."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False
