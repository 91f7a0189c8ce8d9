"""``python -m workerd``: the node agent, configured by environment (embedded cluster)."""

import json
import os

from zray._procutil import die_with_parent, setup_logging


def main():
    env = os.environ
    if env.get("ZRAY_EXIT_WITH_PARENT"):
        die_with_parent(int(env["ZRAY_EXIT_WITH_PARENT"]))
    session_dir = env.get("ZRAY_SESSION_DIR", "")
    setup_logging("node", os.path.join(session_dir, "logs") if session_dir else None,
                  stderr=not env.get("ZRAY_EXIT_WITH_PARENT"))
    from workerd.node import run

    cfg = json.loads(env["ZRAY_NODE_CONFIG"])
    run(env["ZRAY_ADDRESS"], cfg["num_cpus"], cfg["gpu_ids"], cfg["resources"], session_dir,
        node_id=bytes.fromhex(cfg["node_id"]) if cfg.get("node_id") else None,
        prestart=cfg.get("prestart"), labels=cfg.get("labels"), memory=cfg.get("memory"),
        object_store_memory=cfg.get("object_store_memory"))


if __name__ == "__main__":
    main()
