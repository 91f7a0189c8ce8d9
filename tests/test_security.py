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
