"""Where PYTHONDONTWRITEBYTECODE is set (Docker images often set it), zray's own
processes still keep their bytecode, in a private cache of the user's: before, each
executor compiled every module it imported at each start (1.3-2.4 s to import the
executor's and the broker's modules without bytecode, 0.35-0.55 s with it, on a 2-core
machine). The user's setting is kept for the driver and never writes into the tree."""

import json
import os
import stat
import subprocess
import sys

SCRIPT = """
import json, os, sys
import zray

zray.init(num_cpus=1)


@zray.remote
def where():
    return [os.environ.get("PYTHONPYCACHEPREFIX"), sys.dont_write_bytecode]


print(json.dumps({"driver": [os.environ.get("PYTHONPYCACHEPREFIX"), sys.dont_write_bytecode],
                  "executor": zray.get(where.remote(), timeout=60)}))
"""


def _run(tmp_path, **env):
    script = tmp_path / "where.py"
    script.write_text(SCRIPT)
    full = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), **env)
    full.pop("PYTHONPYCACHEPREFIX", None)
    res = subprocess.run([sys.executable, str(script)], env=full, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_executors_keep_bytecode_in_a_private_cache(tmp_path):
    out = _run(tmp_path, PYTHONDONTWRITEBYTECODE="1")
    assert out["driver"] == [None, True]  # the user's process as they set it
    prefix, dont_write = out["executor"]
    assert dont_write is False
    assert prefix == str(tmp_path / "cache" / "zray" / "pycache")
    st = os.stat(prefix)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    # the executor's modules were compiled into it, not next to their sources
    cached = [f for _, _, files in os.walk(prefix) for f in files if f.endswith(".pyc")]
    assert any(f.startswith("executor.") for f in cached), cached[:20]


def test_nothing_changes_where_bytecode_is_written_anyway(tmp_path):
    env = {"PYTHONDONTWRITEBYTECODE": ""}
    out = _run(tmp_path, **env)
    assert out["executor"][0] is None
    assert not (tmp_path / "cache" / "zray").exists()
