"""A local user must not be able to run code as the cluster's user.

zray unpickles what it finds in its object store, listens on sockets in its
session dirs and trusts the address and key files it keeps. So every such
directory must be private: these tests play the other user (uid 65534,
``nobody``) by pre-creating the directories zray will use, owned by them and
open to all, or by planting a symlink where a node's store dir goes, with a
pickle in it that creates a marker file when unpickled. zray must refuse
with an error naming the path and never unpickle the planted file.

Each test points zray at its own roots (``ZRAY_SHM_DIR``, ``ZRAY_TMPDIR``) so
it never touches the real /dev/shm/zray-UID of other tests.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import msgpack
import pytest
from conftest import driver_env, kill_tree

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")


class _Planted:
    """Unpickling this opens (creates) the marker file: stands for any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_object(path, marker) -> None:
    """Write an object file in the store's format whose value runs code when read."""
    import pickle

    frame = pickle.dumps(_Planted(str(marker)), protocol=5)
    header = msgpack.packb([0, [len(frame)]])
    head = struct.pack("<4sI", b"ZRO1", len(header)) + header
    pad = (-len(head)) % 64
    with open(path, "wb") as f:
        f.write(head + b"\0" * pad + frame)


def roots(tmp_path):
    """Store and tmp roots for one test (short: socket paths must fit in 107 bytes)."""
    short = tempfile.mkdtemp(prefix="zp-")
    _short_dirs.append(short)
    shm, tmp = Path(short) / "shm", Path(short) / "tmp"
    shm.mkdir()
    return shm, tmp, driver_env(ZRAY_SHM_DIR=str(shm), ZRAY_TMPDIR=str(tmp))


_short_dirs: list = []


@pytest.fixture(autouse=True)
def _remove_short_dirs():
    yield
    while _short_dirs:
        shutil.rmtree(_short_dirs.pop(), ignore_errors=True)


def run_py(source: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh interpreter; its whole process tree is killed after."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(source)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"overran {timeout}s\n{out}\n{err}")
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


INIT = """
    import psutil, zray
    try:
        zray.init(num_cpus=1)
    except PermissionError as e:
        print("REFUSED", e)
    else:
        print("STARTED")
        zray.shutdown()
    print("CHILDREN", len(psutil.Process().children(recursive=True)))
"""


@needs_root
@pytest.mark.timeout(60)
def test_store_dir_of_another_user_is_refused(tmp_path):
    shm, _, env = roots(tmp_path)
    base = shm / f"zray-{os.getuid()}"
    base.mkdir()
    node = base / "00112233aabbccdd"  # a node dir the other user prepared, with an object
    node.mkdir()
    marker = tmp_path / "ran-planted-code"
    plant_object(node / ("ab" * 16), marker)
    for p in (base, node):
        os.chown(p, NOBODY, NOBODY)
        os.chmod(p, 0o777)

    res = run_py(INIT, env)
    assert "REFUSED" in res.stdout, res.stdout + res.stderr
    assert str(base) in res.stdout and f"uid {NOBODY}" in res.stdout, res.stdout
    assert "CHILDREN 0" in res.stdout, res.stdout  # nothing was started
    assert not marker.exists()
    assert (node / ("ab" * 16)).exists()  # and nothing of theirs was touched
    assert os.stat(base).st_uid == NOBODY and os.stat(base).st_mode & 0o777 == 0o777


@pytest.mark.timeout(60)
def test_store_dir_writable_by_others_is_refused(tmp_path):
    shm, _, env = roots(tmp_path)
    base = shm / f"zray-{os.getuid()}"
    base.mkdir()
    os.chmod(base, 0o777)  # ours, but anyone may have put files in it
    res = run_py(INIT, env)
    assert "REFUSED" in res.stdout and str(base) in res.stdout, res.stdout + res.stderr
    assert "writable by group or others" in res.stdout, res.stdout


@needs_root
@pytest.mark.timeout(60)
def test_session_dir_of_another_user_is_refused(tmp_path):
    _, tmp, env = roots(tmp_path)
    tmp.mkdir()
    os.chown(tmp, NOBODY, NOBODY)
    os.chmod(tmp, 0o777)
    res = run_py(INIT, env)
    assert "REFUSED" in res.stdout and str(tmp) in res.stdout, res.stdout + res.stderr
    assert f"uid {NOBODY}" in res.stdout and "CHILDREN 0" in res.stdout, res.stdout
    assert os.listdir(tmp) == []  # no session dir, socket or address file went there


@pytest.mark.timeout(60)
def test_dirs_are_created_private_whatever_the_umask(tmp_path):
    shm, tmp, env = roots(tmp_path)
    res = run_py("""
        import os, zray
        os.umask(0)
        ctx = zray.init(num_cpus=1)
        ref = zray.put(b"x" * 300_000)  # large: goes to the store
        assert zray.get(ref) == b"x" * 300_000
        print("SESSION", ctx["session_dir"])
        zray.shutdown()
    """, env)
    assert res.returncode == 0, res.stdout + res.stderr
    session = res.stdout.split("SESSION ", 1)[1].split()[0]
    for d in (shm / f"zray-{os.getuid()}", tmp, tmp / "spill", session,
              os.path.join(session, "logs")):
        st = os.lstat(d)
        assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700, (d, oct(st.st_mode))


@pytest.mark.timeout(60)
def test_symlink_in_place_of_a_node_dir_is_refused(tmp_path):
    """The node agent (and any reader) refuses a node dir that is a symlink, and
    the planted object behind it is never unpickled."""
    shm, _, env = roots(tmp_path)
    node_id = "a1b2c3d4e5f60718"
    oid = "cd" * 16
    base = shm / f"zray-{os.getuid()}"
    base.mkdir(mode=0o700)
    theirs = shm / "theirs"
    theirs.mkdir()
    marker = tmp_path / "ran-planted-code"
    plant_object(theirs / oid, marker)
    os.symlink(theirs, base / node_id)

    agent_env = dict(env, ZRAY_ADDRESS="ipc://" + str(tmp_path / "no-broker.sock"),
                     ZRAY_NODE_CONFIG='{"num_cpus": 1, "gpu_ids": [], "resources": {}, '
                                      f'"node_id": "{node_id}"}}')
    agent = run_py("from workerd.__main__ import main; main()", agent_env, timeout=30)
    assert agent.returncode != 0
    assert f"refusing to use {base / node_id}: it is a symlink" in agent.stderr, agent.stderr

    read = f"""
        from zray._store import ObjectStore
        from zray._serialization import deserialize
        try:
            kind, frames = ObjectStore(bytes.fromhex("{node_id}")).read(bytes.fromhex("{oid}"))
            deserialize(frames)
            print("READ")
        except PermissionError as e:
            print("REFUSED", e)
    """
    reader = run_py(read, env)
    assert "REFUSED" in reader.stdout and "symlink" in reader.stdout, reader.stdout + reader.stderr
    assert not marker.exists()

    # Control: the same planted file in a real private dir is read (and runs), so
    # the refusal above is what protected the reader.
    os.unlink(base / node_id)
    os.rename(theirs, base / node_id)
    os.chmod(base / node_id, 0o700)
    control = run_py(read, env)
    assert "READ" in control.stdout and marker.exists(), control.stdout + control.stderr


@needs_root
@pytest.mark.timeout(60)
def test_key_file_and_key_dir_must_be_private(tmp_path):
    """~/.zray is private, and a key file that is a symlink, another user's or
    readable by others is refused."""
    from zray._security import create_key_file

    home = tmp_path / "home"
    home.mkdir()
    env = driver_env(HOME=str(home))
    env.pop("ZRAY_KEY_FILE", None)
    check = """
        from zray._security import create_key_file, load_key_file
        try:
            create_key_file()
            load_key_file()
            print("OK")
        except PermissionError as e:
            print("REFUSED", e)
    """
    ok = run_py(check, env)
    assert "OK" in ok.stdout, ok.stdout + ok.stderr
    assert os.stat(home / ".zray").st_mode & 0o777 == 0o700
    assert os.stat(home / ".zray" / "cluster.key").st_mode & 0o777 == 0o600

    os.chmod(home / ".zray", 0o777)
    res = run_py(check, env)
    assert "REFUSED" in res.stdout and "writable by group or others" in res.stdout, res.stdout
    os.chmod(home / ".zray", 0o700)

    other = tmp_path / "other.key"
    create_key_file(str(other))
    os.chown(other, NOBODY, NOBODY)
    res = run_py(check, dict(env, ZRAY_KEY_FILE=str(other)))
    assert "REFUSED" in res.stdout and f"uid {NOBODY}" in res.stdout, res.stdout

    link = tmp_path / "link.key"
    os.symlink(home / ".zray" / "cluster.key", link)
    res = run_py(check, dict(env, ZRAY_KEY_FILE=str(link)))
    assert "REFUSED" in res.stdout and "symlink" in res.stdout, res.stdout

