"""Ports for, waiting for and stopping the processes the CLI runs (MLServer, Prometheus, the registry
server); the tests and the benchmark start, wait for and stop theirs the same way."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence

from runtimes.contract import LOOPBACK

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this process handed out before: binding port 0
    twice in a row may give the same port, and two listeners of one server told to share it collide."""
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_until(done: Callable[[], bool], timeout: float, procs: Sequence[subprocess.Popen] = (), interval: float = 0.5) -> bool:
    """True once `done()` is; False if one of `procs` exits or `timeout` seconds pass first.

    `done` is asked before each wait and once after the last one, while every process runs.
    """
    deadline = time.monotonic() + timeout
    while all(p.poll() is None for p in procs):
        if done():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return False


def answers(url: str) -> bool:
    """`url` answers 2xx (anything else raises HTTPError, an OSError)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def wait_for(url: str, proc: subprocess.Popen, timeout: float, interval: float = 0.5) -> bool:
    """True once `url` answers 200; False if `proc` exits or `timeout` seconds pass first."""
    return wait_until(lambda: answers(url), timeout, [proc], interval)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
