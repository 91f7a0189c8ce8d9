"""``python -m brokerd ADDRESS [SESSION_DIR]``: the broker, as the embedded cluster starts it."""

import os
import sys

from zray._procutil import die_with_parent, setup_logging


def main():
    address = sys.argv[1]
    session_dir = sys.argv[2] if len(sys.argv) > 2 else ""
    if os.environ.get("ZRAY_EXIT_WITH_PARENT"):
        die_with_parent(int(os.environ["ZRAY_EXIT_WITH_PARENT"]))
    setup_logging("broker", os.path.join(session_dir, "logs") if session_dir else None,
                  stderr=not os.environ.get("ZRAY_EXIT_WITH_PARENT"))
    from brokerd.broker import run

    run(address, session_dir)


if __name__ == "__main__":
    main()
