"""Starts a job's entrypoint so that it, and every process it starts, dies with the
dashboard that started it.

The shim leads the job's process group (the dashboard starts it in a new session)
and runs ``/bin/sh -c ENTRYPOINT`` as its child. The kernel sends the shim SIGUSR1
when the dashboard dies (PR_SET_PDEATHSIG); the shim then SIGKILLs its whole group,
so a shell's children die too (a death signal on the shell alone left them running).
SIGTERM/SIGINT sent to the group (stop_job) reach the entrypoint; the shim outlives
them, waits for the shell, and exits as it did (the same code, or the same signal).
"""

import os
import signal
import subprocess
import sys

from zray._procutil import die_with_parent


def _kill_group(signum, frame):
    os.killpg(0, signal.SIGKILL)


def _outlive(signum, frame):
    """(the group's SIGTERM/SIGINT are for the entrypoint; a handler, not SIG_IGN, so
    the shell starts with the default disposition)"""


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _kill_group)
    die_with_parent(int(sys.argv[1]), sig=signal.SIGUSR1)
    signal.signal(signal.SIGTERM, _outlive)
    signal.signal(signal.SIGINT, _outlive)
    child = subprocess.Popen(["/bin/sh", "-c", sys.argv[2]], restore_signals=True)
    code = child.wait()
    if code < 0:  # killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)
