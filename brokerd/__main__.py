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

    prof = os.environ.get("ZRAY_PROFILE_BROKER")
    if prof:  # cProfile the broker loop; stats land in this file at exit
        import cProfile

        cProfile.runctx("run(address, session_dir)", globals(), {"run": run, "address": address,
                        "session_dir": session_dir}, prof)
    else:
        run(address, session_dir)


if __name__ == "__main__":
    main()
