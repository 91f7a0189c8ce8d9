"""TCP clusters are closed by default: CURVE keys from a 0600 key file."""

import json
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


TIMED_DRIVER = textwrap.dedent("""
    import sys, time, zray
    t0 = time.monotonic()
    try:
        zray.init(address=sys.argv[1])
    except ConnectionError as e:
        print("REFUSED %.2f" % (time.monotonic() - t0), e)
        sys.exit(3)
    print("NODES", len(zray.nodes()))
""")


def _timed_driver(address, tmp_path, **env):
    env = dict(os.environ, **env)
    env.pop("ZRAY_ADDRESS", None)
    script = tmp_path / "timed_driver.py"
    script.write_text(TIMED_DRIVER)
    res = subprocess.run([sys.executable, str(script), address], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 3 and "REFUSED" in res.stdout, res.stdout + res.stderr
    seconds = float(res.stdout.split()[1])
    assert seconds < 2.0, res.stdout  # not the 10 s "no zray broker answered"
    return res.stdout


def _mixed_key(tmp_path, good, bad):
    """The cluster's server key with another cluster's client key pair."""
    keys = json.loads(good.read_text())
    other = json.loads(bad.read_text())
    keys.update(client_public=other["client_public"], client_secret=other["client_secret"])
    path = tmp_path / "mixed.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    return path


# It times how soon a refused driver gives up (< 2 s, not the 10 s of "no broker answered"):
# alone, not beside other tests of a parallel run (2.3 s once on a busy 2-core machine).
@pytest.mark.serial
@pytest.mark.timeout(120)
def test_refused_key_fails_fast_with_a_hint(tmp_path):
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    create_key_file(str(good))
    create_key_file(str(bad))
    mixed = _mixed_key(tmp_path, good, bad)
    port = _free_port()
    broker = _broker(tmp_path, port, "--key-file", str(good))
    insecure_port = _free_port()
    insecure = _broker(tmp_path, insecure_port, "--insecure")
    try:
        address = f"tcp://127.0.0.1:{port}"
        ok = _driver(address, good, tmp_path)
        assert "NODES 0" in ok.stdout, ok.stdout + ok.stderr

        # Another cluster's key file: the broker cannot read our hello at all.
        out = _timed_driver(address, tmp_path, ZRAY_KEY_FILE=str(bad))
        assert "authentication failed" in out and str(bad) in out, out
        # The right server key but a client key the broker does not admit (ZAP: 400).
        out = _timed_driver(address, tmp_path, ZRAY_KEY_FILE=str(mixed))
        assert "authentication failed" in out and "refused this client's key" in out, out
        assert str(mixed) in out, out
        # A plaintext client.
        out = _timed_driver(address, tmp_path, ZRAY_KEY_FILE=str(good), ZRAY_INSECURE="1")
        assert "authentication failed" in out and "ZRAY_INSECURE" in out, out
        # A CURVE client of an --insecure broker.
        out = _timed_driver(f"tcp://127.0.0.1:{insecure_port}", tmp_path,
                            ZRAY_KEY_FILE=str(good))
        # (libzmq reports this as a mechanism mismatch or, racing the broker's close,
        # as handshakes dropped without detail: either way the hint names --insecure)
        assert "authentication failed" in out or "does not use CURVE" in out, out
        assert "--insecure" in out, out

        # A worker daemon with the wrong key says so and exits instead of waiting forever.
        env = dict(os.environ, ZRAY_KEY_FILE=str(bad), ZRAY_TMPDIR=str(tmp_path / "zt"))
        worker = subprocess.run(_zray_cmd() + ["worker", "--address", address, "--num-cpus", "1"],
                                env=env, capture_output=True, text=True, timeout=30)
        assert worker.returncode != 0, worker.stderr
        assert "authentication failed" in worker.stderr and str(bad) in worker.stderr, worker.stderr
    finally:
        _stop(broker)
        _stop(insecure)
    log = (tmp_path / f"broker-{port}.log").read_text()
    assert "refused a connection whose CURVE key is not this cluster's" in log, log


def _cli(args, key_env, tmp_path):
    env = dict(os.environ, ZRAY_KEY_FILE=str(key_env))
    env.pop("ZRAY_ADDRESS", None)
    return subprocess.run(_zray_cmd() + args, env=env, capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))


@pytest.mark.timeout(120)
def test_cluster_commands_take_key_file(tmp_path):
    key = tmp_path / "cluster.key"
    nowhere = tmp_path / "no-such.key"
    port = _free_port()
    broker = _broker(tmp_path, port, "--key-file", str(key))
    try:
        address = f"tcp://127.0.0.1:{port}"
        assert "NODES 0" in _driver(address, key, tmp_path).stdout  # the broker is up
        for command in (["status"], ["memory", "--top", "3"]):
            ok = _cli(command + ["--address", address, "--key-file", str(key)], nowhere, tmp_path)
            assert ok.returncode == 0, (command, ok.stdout, ok.stderr)
            assert ("Nodes: 0" if command[0] == "status" else "Largest objects") in ok.stdout
            # without --key-file the CLI looks where ZRAY_KEY_FILE points: a clear refusal
            no_key = _cli(command + ["--address", address], nowhere, tmp_path)
            assert no_key.returncode != 0 and "Traceback" not in no_key.stderr, no_key.stderr
            assert f"no key file at {nowhere}" in no_key.stderr, no_key.stderr
            bad = _cli(command + ["--address", address, "--key-file", str(nowhere)], key,
                       tmp_path)
            assert bad.returncode == 2 and "--key-file" in bad.stderr, bad.stderr
            assert f"no key file at {nowhere}" in bad.stderr, bad.stderr
    finally:
        _stop(broker)


def test_every_command_with_an_address_takes_a_key_file():
    from zray.cli import main

    for name, command in main.commands.items():
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        if "--address" in options:
            assert "--key-file" in options, f"zray {name} has --address but no --key-file"
