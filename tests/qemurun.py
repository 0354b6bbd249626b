"""Running QEMU for keel's test runners (tests/run.py, tests/linux/run.py):
one boot with its console on a pipe, killed with its process group on a
timeout, and the console's last lines for a failure report."""

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

TAIL_LINES = 40


@dataclass
class Boot:
    """One QEMU run: its exit code (None on timeout) and console lines."""

    cmd: list
    rc: object
    lines: list
    seconds: float

    @property
    def timed_out(self):
        return self.rc is None


def run_qemu(cmd, timeout, echo=None):
    """Runs QEMU with the console on stdout; kills its process group on
    timeout (None: wait for ever). echo: None, "plain" or "prefixed" (each
    console line as it comes, as is or after "  | ")."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines = []

    def reader():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            lines.append(line)
            if echo == "plain":
                print(line, flush=True)
            elif echo:
                print(f"  | {line}", flush=True)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        rc = None
    t.join(timeout=5)
    return Boot(cmd, rc, lines, time.monotonic() - start)


def show_tail(boot, what="UART"):
    """Prints the last TAIL_LINES console lines of `boot` (`what` names the
    console in the heading)."""
    print(f"---- last {TAIL_LINES} {what} lines of: {shlex.join(boot.cmd)}")
    for line in boot.lines[-TAIL_LINES:]:
        print(f"  | {line}")
    print("----", flush=True)
