"""TCP clusters are closed by default: CURVE keys from a 0600 key file."""

import os
import subprocess
import sys
import textwrap

import psutil
import pytest
from test_cli_cluster import _free_port, _zray_cmd

from zray._security import create_key_file

DRIVER = textwrap.dedent("""
    import sys, zray
    try:
        zray.init(address=sys.argv[1])
    except ConnectionError as e:
        print("REFUSED", e)
        sys.exit(3)
    print("NODES", len(zray.nodes()))
""")


def _broker(tmp_path, port, *extra, env=None):
    log = open(tmp_path / f"broker-{port}.log", "wb")
    return subprocess.Popen(_zray_cmd() + ["broker", "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _driver(address, key_file, tmp_path, insecure=False):
    env = dict(os.environ, ZRAY_KEY_FILE=str(key_file))
    env.pop("ZRAY_ADDRESS", None)
    if insecure:
        env["ZRAY_INSECURE"] = "1"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, str(script), address], env=env, capture_output=True,
                          text=True, timeout=60)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"


@pytest.mark.timeout(90)
def test_key_file_is_private_and_wrong_key_is_refused(tmp_path):
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    create_key_file(str(bad))
    port = _free_port()
    broker = _broker(tmp_path, port, "--key-file", str(good))
    try:
        address = f"tcp://127.0.0.1:{port}"
        ok = _driver(address, good, tmp_path)  # waits for the broker to write the key
        assert "NODES 0" in ok.stdout, ok.stdout + ok.stderr
        assert oct(os.stat(good).st_mode & 0o777) == "0o600"
        refused = _driver(address, bad, tmp_path)
        assert refused.returncode == 3 and "REFUSED" in refused.stdout, refused.stdout + refused.stderr
        missing = _driver(address, tmp_path / "none.key", tmp_path)
        assert missing.returncode == 3 and "no key file" in missing.stdout, missing.stdout
    finally:
        _stop(broker)


@pytest.mark.timeout(60)
def test_insecure_broker_needs_no_key(tmp_path):
    port = _free_port()
    broker = _broker(tmp_path, port, "--insecure")
    try:
        res = _driver(f"tcp://127.0.0.1:{port}", tmp_path / "none.key", tmp_path, insecure=True)
        assert "NODES 0" in res.stdout, res.stdout + res.stderr
    finally:
        _stop(broker)
