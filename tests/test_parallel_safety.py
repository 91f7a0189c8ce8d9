"""What goes wrong when zray processes start at the same moment on a fresh host (as the
test suite's parallel workers do on a fresh CI machine).

Brokers create the default cluster key file ``~/.zray/cluster.key`` when it is missing;
node agents and drivers read it. Several brokers starting at once on a host that has no
key file yet must all come up, agree on one key, and no reader may see a half-written
file.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import driver_env, kill_tree, poll_until

pytestmark = pytest.mark.timeout(120)

RACER = textwrap.dedent("""
    import json, os, sys, time
    from zray._security import create_key_file, load_key_file

    go = sys.argv[1]
    open(go + "." + str(os.getpid()), "w").close()  # imported, ready
    while not os.path.exists(go):  # start together, as nearly as processes can
        time.sleep(0.001)
    try:
        if sys.argv[2] == "create":
            keys = create_key_file()
        else:
            keys = load_key_file(wait=30)
        print(json.dumps({"ok": keys["client_public"]}))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
""")


def test_brokers_and_readers_starting_at_once_share_one_new_key_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = driver_env(HOME=str(home))
    env.pop("ZRAY_KEY_FILE", None)
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    go = tmp_path / "go"
    roles = ["create"] * 6 + ["load"] * 4
    procs = [subprocess.Popen([sys.executable, str(script), str(go), role], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for role in roles]
    try:
        poll_until(lambda: len(list(tmp_path.glob("go.*"))) == len(procs), 60,
                   what="every racer to be ready")
        go.write_text("")
        results = []
        for p in procs:
            out, err = p.communicate(timeout=90)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait(10)
    errors = [r["error"] for r in results if "error" in r]
    assert errors == [], errors
    assert len({r["ok"] for r in results}) == 1, results  # one key, used by all
    key_file = home / ".zray" / "cluster.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(key_file.read_text())["client_public"] == results[0]["ok"]
    assert [p.name for p in (home / ".zray").iterdir()] == ["cluster.key"]  # no temp files
