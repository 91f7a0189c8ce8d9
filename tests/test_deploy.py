"""deploy/: the systemd units verify, carry the settings a long-running cluster needs, and
their own command lines (with deploy/zray.env's settings) start a working cluster; the
broker raises its descriptor limit and says loudly when it runs out.
"""

import os
import re
import resource
import shutil
import signal
import socket
import subprocess

import psutil
import pytest
from conftest import REPO_ROOT, driver_env, kill_tree, poll_until, wait_gone
from test_cli_cluster import _free_port, _zray_cmd

pytestmark = pytest.mark.timeout(180)

DEPLOY = os.path.join(REPO_ROOT, "deploy")
UNITS = ("zray-broker.service", "zray-worker.service", "zray-dashboard.service")


def _unit(name: str) -> dict:
    """{key: [values]} of a unit file (sections flattened: the keys do not repeat)."""
    out: dict = {}
    with open(os.path.join(DEPLOY, name)) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", "[")):
                continue
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _env_file() -> dict:
    env = {}
    with open(os.path.join(DEPLOY, "zray.env")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    return env


def _zray_exe() -> str:
    exe = _zray_cmd()
    if len(exe) != 1:
        pytest.skip("no zray executable (console script) in this environment")
    return exe[0]


def test_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs Debian's systemd)")
    for name in UNITS:  # the units' binary, as installed, is this environment's
        text = open(os.path.join(DEPLOY, name)).read()
        (tmp_path / name).write_text(text.replace("/opt/zray/venv/bin/zray", _zray_exe()))
    res = subprocess.run(["systemd-analyze", "verify"] + [str(tmp_path / n) for n in UNITS],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ours = [line for line in res.stderr.splitlines() if "zray" in line]
    assert not ours, ours


def test_units_are_sandboxed_restartable_and_have_descriptors():
    for name in UNITS:
        u = _unit(name)
        assert u["User"] == ["zray"] and u["Group"] == ["zray"], name
        assert u["EnvironmentFile"] == ["/etc/zray/zray.env"], name
        assert u["Restart"] == ["on-failure"], name
        assert int(u["LimitNOFILE"][0]) >= 65536, name  # 2 connections a client
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                           ("PrivateTmp", "yes"), ("ProtectHome", "yes"),
                           ("StateDirectory", "zray"), ("UMask", "0077"),
                           ("CapabilityBoundingSet", "")):
            assert u.get(key) == [value], (name, key, u.get(key))
        assert u["ExecStart"][0].startswith("/opt/zray/venv/bin/zray "), name
        assert "WantedBy" in u
    # the worker keeps /dev: GPUs and the shared-memory object store live there
    assert "PrivateDevices" not in _unit("zray-worker.service")
    users = open(os.path.join(DEPLOY, "zray.sysusers")).read()
    assert re.search(r"^u zray - .* /var/lib/zray$", users, re.M), users
    env = _env_file()
    for key in ("ZRAY_ADDRESS", "ZRAY_KEY_FILE", "ZRAY_TMPDIR", "ZRAY_BROKER_PORT"):
        assert env.get(key), key


def _exec_start(name: str, env: dict, state_dir: str) -> list:
    """A unit's ExecStart as systemd would run it: ${VAR} kept whole, $VAR split on
    whitespace; /var/lib/zray moved to ``state_dir``."""
    line = _unit(name)["ExecStart"][0].replace("/var/lib/zray", state_dir)
    argv = []
    for word in line.split():
        m = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if m:
            argv += env.get(m.group(1), "").split()
            continue
        argv.append(re.sub(r"\$\{(\w+)\}", lambda g: env.get(g.group(1), ""), word))
    argv[0] = _zray_exe()
    return argv


def test_unit_command_lines_start_a_cluster(tmp_path):
    state = str(tmp_path / "state")
    os.makedirs(state, mode=0o700)
    port = _free_port()
    env = driver_env(**_env_file())
    env.update(ZRAY_TMPDIR=state, ZRAY_KEY_FILE=os.path.join(state, "cluster.key"),
               ZRAY_BROKER_HOST="127.0.0.1", ZRAY_BROKER_PORT=str(port),
               ZRAY_ADDRESS=f"tcp://127.0.0.1:{port}", ZRAY_WORKER_OPTS="--num-cpus 1",
               ZRAY_DASHBOARD_PORT=str(_free_port()))
    names = ["zray-broker.service", "zray-worker.service"]
    try:
        import zray.dashboard  # noqa: F401
        names.append("zray-dashboard.service")
    except ImportError:
        pass
    procs = {}
    try:
        for name in names:
            log = open(tmp_path / f"{name}.log", "wb")
            procs[name] = subprocess.Popen(_exec_start(name, env, state), env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            log.close()

        def one_node():
            for name, p in procs.items():
                assert p.poll() is None, (name, (tmp_path / f"{name}.log").read_text())
            res = subprocess.run(_zray_cmd() + ["list", "nodes", "--format", "json"],
                                 capture_output=True, text=True, env=env, timeout=60)
            return res.returncode == 0 and '"ALIVE"' in res.stdout
        poll_until(one_node, 90, interval=0.3, what="the unit-started worker to join")
        if "zray-dashboard.service" in procs:
            import urllib.request

            def page():
                try:
                    url = f"http://127.0.0.1:{env['ZRAY_DASHBOARD_PORT']}/"
                    with urllib.request.urlopen(url, timeout=5) as r:
                        return r.status == 200
                except OSError:
                    return False
            poll_until(page, 60, interval=0.3, what="the dashboard to answer")
        everything = []
        for p in procs.values():
            everything.append(psutil.Process(p.pid))
            everything += psutil.Process(p.pid).children(recursive=True)
        for name in reversed(names):  # systemctl stop: SIGTERM (KillSignal=)
            procs[name].send_signal(signal.SIGTERM)
            procs[name].wait(30)
        assert not wait_gone(everything, 20)
    finally:
        for p in procs.values():
            kill_tree(p.pid)


def _broker(tmp_path, soft: int, hard: int):
    port = _free_port()
    env = driver_env(ZRAY_TMPDIR=str(tmp_path / "zt"))

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    log = open(tmp_path / "broker.log", "wb")
    p = subprocess.Popen(_zray_cmd() + ["broker", "--port", str(port), "--session-dir",
                                        str(tmp_path / "session")],
                         env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit,
                         start_new_session=True)
    log.close()
    return p, port, env


def _status(port, env):
    return subprocess.run(_zray_cmd() + ["status", "--address", f"tcp://127.0.0.1:{port}"],
                          capture_output=True, text=True, env=env, timeout=60)


def test_broker_raises_its_descriptor_limit(tmp_path):
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096)
    p, port, env = _broker(tmp_path, 256, hard)
    try:
        st = poll_until(lambda: (r := _status(port, env)).returncode == 0 and r, 60,
                        interval=0.2, what="the broker to answer")
        assert f"open of {hard} (broker)" in st.stdout, st.stdout
        assert psutil.Process(p.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
        assert "WARNING" not in st.stdout
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        finally:
            kill_tree(p.pid)


def test_broker_out_of_descriptors_is_loud(tmp_path):
    p, port, env = _broker(tmp_path, 64, 64)
    conns = []
    try:
        poll_until(lambda: _status(port, env).returncode == 0, 60, interval=0.2,
                   what="the broker to answer")

        # Plain TCP connections never finish the CURVE handshake: each holds a descriptor
        # of the broker's until it gives up on them (30 s), like a crowd of clients.
        def exhausted():
            for _ in range(10):
                try:
                    conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            return "OUT OF FILE DESCRIPTORS" in (tmp_path / "broker.log").read_text()
        poll_until(exhausted, 60, interval=0.2, what="the broker to log running out")
        for c in conns:
            c.close()
        conns.clear()
        st = poll_until(lambda: (r := _status(port, env)).returncode == 0 and r, 60,
                        interval=0.5, what="the broker to accept again")
        assert "WARNING: the broker ran out of file descriptors" in st.stdout, st.stdout
        assert "LimitNOFILE" in st.stdout
        text = (tmp_path / "broker.log").read_text()
        assert "file descriptor limit is 64" in text, text
    finally:
        for c in conns:
            c.close()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        finally:
            kill_tree(p.pid)

