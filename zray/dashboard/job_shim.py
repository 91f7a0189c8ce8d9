"""Starts a job's entrypoint so that it dies with the dashboard that started it:
asks the kernel for SIGKILL on the dashboard's death, then execs ``/bin/sh -c``
(the death signal survives exec; a shell with one simple command execs it too)."""

import os
import sys

from zray._procutil import die_with_parent

if __name__ == "__main__":
    die_with_parent(int(sys.argv[1]))
    os.execv("/bin/sh", ["/bin/sh", "-c", sys.argv[2]])
