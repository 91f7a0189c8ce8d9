"""Runtime environments: working_dir, py_modules, pip, the setup hook and config.

Every case runs real executors: a two-node cluster started with the CLI (the
second worker in another directory) for a project whose code lives only in the
driver's folder, and fresh local clusters (``run_driver``) for the rest. The
pip cases install a small pure-Python package (six) from the package index.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import psutil
import pytest
from conftest import describe, driver_env, kill_tree, wait_gone
from test_cli_cluster import _free_port, _zray_cmd

import zray
from zray.exceptions import RuntimeEnvSetupError
from zray.runtime_env import RuntimeEnv, RuntimeEnvConfig

PROJECT = {
    "main.py": """
        import json, os, sys
        import zray as ray
        from mypkg.tasks import compute, Accumulator

        ray.init(address=sys.argv[1],
                 runtime_env={"working_dir": ".", "excludes": ["*.log", "build/"],
                              "env_vars": {"PROJECT_MODE": "test"}})
        on_b = {"resources": {"nodeB": 0.1}}
        value, node, cwd, listing, mode = ray.get(compute.options(**on_b).remote(4), timeout=120)
        acc = Accumulator.options(**on_b).remote()
        ray.get([acc.add.remote(i) for i in range(5)], timeout=120)
        total = ray.get(acc.total.remote(), timeout=60)
        print("RESULT " + json.dumps({"value": value, "node": node, "cwd": cwd,
                                      "listing": listing, "mode": mode, "total": total}))
    """,
    "mypkg/__init__.py": "",
    "mypkg/util.py": """
        import json

        def scale():
            with open("data/config.json") as f:
                return json.load(f)["scale"]
    """,
    "mypkg/tasks.py": """
        import os
        import zray as ray
        from mypkg import util

        @ray.remote
        def leaf(x):
            return x * util.scale()

        @ray.remote
        def compute(x):
            # a nested task inherits the job's runtime_env
            value = ray.get(leaf.options(resources={"nodeB": 0.1}).remote(x))
            return (value, ray.get_runtime_context().get_node_id(), os.getcwd(),
                    sorted(os.listdir(".")), os.environ.get("PROJECT_MODE"))

        @ray.remote
        class Accumulator:
            def __init__(self):
                self.n = 0

            def add(self, x):
                self.n += x * util.scale()

            def total(self):
                return self.n
    """,
    "data/config.json": '{"scale": 10}',
    "debug.log": "excluded",
    "build/junk.txt": "excluded",
}


def write_tree(root, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def _start(procs: dict, tmp_path, name: str, args: list, env: dict, cwd) -> None:
    log = open(tmp_path / f"{name}.log", "wb")
    procs[name] = subprocess.Popen(_zray_cmd() + args, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=str(cwd),
                                   start_new_session=True)
    log.close()


def _logs(tmp_path, procs) -> str:
    return "\n".join(f"--- {n} ---\n{(tmp_path / f'{n}.log').read_text(errors='replace')[-3000:]}"
                     for n in procs)


@pytest.mark.timeout(240)
def test_project_in_drivers_folder_runs_on_a_worker_started_elsewhere(tmp_path):
    """A multi-module project that exists only in the driver's folder runs (tasks, a
    nested task, an actor) on a second `zray worker` started in another directory."""
    if zray.is_initialized():
        zray.shutdown()
    project = tmp_path / "project"
    write_tree(project, PROJECT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = driver_env(ZRAY_TMPDIR=str(tmp_path / "zray-tmp"))
    procs: dict = {}
    try:
        _start(procs, tmp_path, "broker", ["broker", "--host", "127.0.0.1", "--port", str(port)],
               env, tmp_path)
        _start(procs, tmp_path, "workerA", ["worker", "--address", address, "--num-cpus", "1",
                                            "--resources", '{"nodeA": 1}'], env, tmp_path)
        _start(procs, tmp_path, "workerB", ["worker", "--address", address, "--num-cpus", "2",
                                            "--resources", '{"nodeB": 1}'], env, elsewhere)
        out = subprocess.run([sys.executable, "main.py", address], cwd=str(project), env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, (out.stdout, out.stderr, _logs(tmp_path, procs))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert line, (out.stdout, out.stderr)
        res = json.loads(line[0][len("RESULT "):])
        assert res["value"] == 40
        assert res["total"] == 100  # the actor's module came from the working_dir too
        assert res["mode"] == "test"  # env_vars of the job, with its working_dir
        # the task's cwd is the unpacked working_dir in worker B's private cache
        assert "runtime_resources/pkgs/pkg_" in res["cwd"], res
        assert not res["cwd"].startswith(str(project)), res
        assert res["listing"] == ["data", "main.py", "mypkg"], res  # *.log and build/ left out
        status = subprocess.run(_zray_cmd() + ["status", "--address", address],
                                capture_output=True, text=True, timeout=60, env=env)
        assert res["node"][:8] in status.stdout, status.stdout
        everything = []
        for p in procs.values():
            root = psutil.Process(p.pid)
            everything += [root] + root.children(recursive=True)
        for name in ("workerA", "workerB", "broker"):
            procs[name].send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(30)
        left = wait_gone(everything, 15)
        assert not left, describe(left)
    finally:
        for p in procs.values():
            kill_tree(p.pid)


PIP_DRIVER = """
import json, os, time
import zray

zray.init(num_cpus=2)
ENV = {"pip": ["six==1.16.0"]}

@zray.remote(runtime_env=ENV)
def use_six():
    import six
    return six.__version__, six.__file__, os.getpid()

@zray.remote
def plain():
    try:
        import six  # noqa: F401
        found = True
    except ImportError:
        found = False
    return found, os.getpid()

@zray.remote
def install_log():
    path = os.path.join(os.environ["ZRAY_SESSION_DIR"], "runtime_resources", "install.log")
    with open(path) as f:
        return [json.loads(line) for line in f]

@zray.remote(runtime_env=ENV)
def in_subprocess():  # `python` on PATH is the environment's, over the worker's packages
    import subprocess
    out = subprocess.run(["python", "-c", "import six, zray; print(six.__version__)"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip(), out.stderr[-2000:]

t = time.monotonic()
first = zray.get([use_six.remote(), use_six.remote()], timeout=240)  # two first uses at once
t_first = time.monotonic() - t
t = time.monotonic()
again = zray.get(use_six.remote(), timeout=60)
t_again = time.monotonic() - t
base = [zray.get(plain.remote(), timeout=60) for _ in range(3)]
sub = zray.get(in_subprocess.remote(), timeout=120)
print("RESULT " + json.dumps({"first": first, "again": again, "base": base, "sub": sub,
                              "log": zray.get(install_log.remote(), timeout=60),
                              "t_first": t_first, "t_again": t_again}))
"""


@pytest.mark.timeout(300)
def test_pip_installs_once_per_node_and_is_reused(run_driver):
    out = run_driver(PIP_DRIVER, timeout=280)
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    print(f"pip: first task(s) {res['t_first']:.2f}s, repeated {res['t_again']:.3f}s")
    files = {f for _, f, _ in res["first"]} | {res["again"][1]}
    assert len(files) == 1, files
    (six_file,) = files
    assert "runtime_resources/venvs/venv_" in six_file, six_file
    assert [v for v, _, _ in res["first"]] == ["1.16.0", "1.16.0"]
    assert res["sub"][0] == "1.16.0", res["sub"]
    assert len(res["log"]) == 1, res["log"]  # concurrent first uses installed it once
    assert res["log"][0]["packages"] == ["six==1.16.0"]
    # tasks without the environment never see it and never share its processes
    env_pids = {p for _, _, p in res["first"]} | {res["again"][2]}
    assert all(found is False for found, _ in res["base"]), res["base"]
    assert not env_pids & {pid for _, pid in res["base"]}


FAILURES_DRIVER = """
import json, shutil, time
import zray
from zray.exceptions import RuntimeEnvSetupError

zray.init(num_cpus=2)

@zray.remote
def f():
    return "ran"

def outcome(ref, timeout=240):
    t = time.monotonic()
    try:
        return ["ok", zray.get(ref, timeout=timeout)]
    except RuntimeEnvSetupError as e:
        return ["RuntimeEnvSetupError", str(e)[:2000], round(time.monotonic() - t, 1)]
    except Exception as e:
        return [type(e).__name__, str(e)[:2000]]

def boom():
    raise RuntimeError("hook says no")

def slow():
    time.sleep(120)

res = {}
bad_pip = f.options(runtime_env={"pip": ["zray-no-such-package-xyz==9.9.9"]})
res["pip"] = outcome(bad_pip.remote())
res["pip_again"] = outcome(bad_pip.remote())
res["hook"] = outcome(f.options(runtime_env={"worker_process_setup_hook": boom}).remote())
res["hook_name"] = outcome(f.options(
    runtime_env={"worker_process_setup_hook": "no_such_module_xyz.setup"}).remote())
res["timeout"] = outcome(f.options(runtime_env={
    "worker_process_setup_hook": slow, "config": {"setup_timeout_seconds": 2}}).remote())
if shutil.which("uv") is None:
    res["uv"] = outcome(f.options(runtime_env={"uv": ["six"]}).remote())

@zray.remote(runtime_env={"worker_process_setup_hook": boom})
class A:
    def ping(self):
        return 1

res["actor"] = outcome(A.remote().ping.remote())
res["healthy"] = outcome(f.remote())
print("RESULT " + json.dumps(res))
"""


@pytest.mark.timeout(300)
def test_setup_failures_are_runtime_env_setup_errors(run_driver):
    out = run_driver(FAILURES_DRIVER, timeout=280)
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    for key in ("pip", "pip_again"):
        kind, text = res[key][:2]
        assert kind == "RuntimeEnvSetupError", res[key]
        assert "zray-no-such-package-xyz==9.9.9" in text and "pip install" in text, text
    assert res["hook"][0] == "RuntimeEnvSetupError" and "hook says no" in res["hook"][1]
    assert res["hook_name"][0] == "RuntimeEnvSetupError"
    assert "no_such_module_xyz" in res["hook_name"][1], res["hook_name"]
    kind, text, took = res["timeout"]
    assert kind == "RuntimeEnvSetupError" and "setup_timeout_seconds=2" in text, res["timeout"]
    assert took < 60, took  # not the hook's 120 s
    if "uv" in res:
        assert res["uv"][0] == "RuntimeEnvSetupError" and "uv command" in res["uv"][1]
    assert res["actor"][0] in ("ActorDiedError", "RuntimeEnvSetupError"), res["actor"]
    assert "hook says no" in res["actor"][1], res["actor"]
    assert res["healthy"] == ["ok", "ran"]


MERGE_DRIVER = """
import json, os, sys, time
import psutil
import zray
from zray.runtime_env import RuntimeEnv

base = sys.argv[1]
zray.init(num_cpus=2, runtime_env={"working_dir": os.path.join(base, "wd_job"),
                                   "env_vars": {"A": "job", "B": "job"}})

@zray.remote
def probe():
    import importlib
    mods = {}
    for name in ("job_mod", "task_mod", "extra", "single", "whl_mod", "zip_mod"):
        try:
            mods[name] = importlib.import_module(name).WHO
        except ImportError:
            mods[name] = None
    return {"cwd": os.path.basename(os.getcwd()), "mods": mods, "A": os.environ.get("A"),
            "B": os.environ.get("B"), "pid": os.getpid(),
            "env": json.loads(zray.get_runtime_context().get_runtime_env_string()),
            "env_obj": type(zray.get_runtime_context().runtime_env).__name__}

@zray.remote
def nested():
    return zray.get(probe.remote())

res = {}
res["job"] = zray.get(probe.remote(), timeout=120)
# a key set to None is not set: the job's working_dir stays (as in Ray)
res["none"] = zray.get(probe.options(runtime_env={"working_dir": None,
                                                  "env_vars": {"B": "x"}}).remote(), timeout=120)
res["nested"] = zray.get(nested.remote(), timeout=120)
task_env = RuntimeEnv(working_dir=os.path.join(base, "wd_task"), env_vars={"B": "task"},
                      py_modules=[os.path.join(base, "mods", "extra"),
                                  os.path.join(base, "mods", "single.py"),
                                  os.path.join(base, "whl_mod-1.0-py3-none-any.whl")])
res["task"] = zray.get(probe.options(runtime_env=task_env).remote(), timeout=120)
# a zip file as working_dir: its single top-level folder is the working directory
res["zip"] = zray.get(probe.options(runtime_env={"working_dir": os.path.join(base, "wd.zip")}
                                    ).remote(), timeout=120)
# a task's runtime_env is inherited by what it starts
res["task_nested"] = zray.get(nested.options(runtime_env=task_env).remote(), timeout=120)

@zray.remote
class Probe:
    def get(self):
        return zray.get(probe.remote())

res["actor"] = zray.get(Probe.options(runtime_env={"py_modules": [
    os.path.join(base, "mods", "extra")]}).remote().get.remote(), timeout=120)

# environments never share a process; idle ones are reaped
env_pids = {res[k]["pid"] for k in ("task", "task_nested")}
job_pids = {res[k]["pid"] for k in ("job", "nested")}
res["disjoint"] = not env_pids & job_pids
deadline = time.monotonic() + 60
while any(psutil.pid_exists(p) for p in env_pids) and time.monotonic() < deadline:
    time.sleep(0.2)
res["reaped"] = not any(psutil.pid_exists(p) for p in env_pids)
print("RESULT " + json.dumps(res))
"""


@pytest.mark.timeout(240)
def test_job_and_task_envs_merge_and_are_inherited(run_driver, tmp_path):
    write_tree(tmp_path / "envs", {
        "wd_job/job_mod.py": "WHO = 'job'",
        "wd_task/task_mod.py": "WHO = 'task'",
        "mods/extra/__init__.py": "WHO = 'extra'",
        "mods/single.py": "WHO = 'single'",
    })
    with zipfile.ZipFile(tmp_path / "envs" / "whl_mod-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("whl_mod/__init__.py", "WHO = 'wheel'\n")
        whl.writestr("whl_mod-1.0.dist-info/METADATA", "Name: whl_mod\nVersion: 1.0\n")
    with zipfile.ZipFile(tmp_path / "envs" / "wd.zip", "w") as wz:
        wz.writestr("wdzip/zip_mod.py", "WHO = 'zip'\n")
    script = MERGE_DRIVER.replace("sys.argv[1]", repr(str(tmp_path / "envs")))
    out = run_driver(script, timeout=220, ZRAY_IDLE_EXECUTOR_S="1")
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    none = {"job_mod": None, "task_mod": None, "extra": None, "single": None, "whl_mod": None,
            "zip_mod": None}
    assert res["zip"]["cwd"] == "wdzip" and res["zip"]["mods"] == {**none, "zip_mod": "zip"}
    assert res["none"]["mods"] == {**none, "job_mod": "job"}, res["none"]
    assert (res["none"]["A"], res["none"]["B"]) == ("job", "x")
    for key in ("job", "nested"):
        assert res[key]["cwd"].startswith("pkg_"), res[key]
        assert res[key]["mods"] == {**none, "job_mod": "job"}, res[key]
        assert (res[key]["A"], res[key]["B"]) == ("job", "job")
    for key in ("task", "task_nested"):
        # working_dir replaced, py_modules added, env_vars merged key by key
        assert res[key]["mods"] == {**none, "task_mod": "task", "extra": "extra",
                                    "single": "single", "whl_mod": "wheel"}, res[key]
        assert (res[key]["A"], res[key]["B"]) == ("job", "task"), res[key]
        assert "working_dir" in res[key]["env"] and len(res[key]["env"]["py_modules"]) == 3
        assert res[key]["env"]["env_vars"] == {"A": "job", "B": "task"}
        assert res[key]["env_obj"] == "RuntimeEnv"
    assert res["actor"]["mods"] == {**none, "job_mod": "job", "extra": "extra"}, res["actor"]
    assert res["disjoint"] and res["reaped"], res


def test_refused_and_bad_runtime_envs(tmp_path):
    f = lambda: None  # noqa: E731
    for key, value in (("conda", {"dependencies": ["x"]}), ("container", {"image": "x"}),
                       ("image_uri", "docker.io/x")):
        with pytest.raises(ValueError, match=key):
            zray.remote(runtime_env={key: value})(f)
    with pytest.raises(ValueError, match="does not exist"):
        zray.remote(runtime_env={"working_dir": str(tmp_path / "missing")})(f)
    with pytest.raises(ValueError, match="remote URIs"):
        zray.remote(runtime_env={"working_dir": "s3://bucket/x.zip"})(f)
    with pytest.raises(ValueError, match="'pip' and 'uv'"):
        zray.remote(runtime_env={"pip": ["a"], "uv": ["a"]})(f)
    with pytest.raises(ValueError, match="pip_version"):
        zray.remote(runtime_env={"pip": {"packages": ["a"], "pip_version": "==23"}})(f)
    with pytest.raises(ValueError, match="setup_timeout_seconds"):
        RuntimeEnvConfig(setup_timeout_seconds=0)
    with pytest.raises(ValueError, match="log_files"):
        RuntimeEnvConfig(log_files=["x"])
    with pytest.raises(ValueError, match="not supported"):
        zray.remote(runtime_env={"nsight": "default"})(f)
    env = RuntimeEnv(pip=["six"], config=RuntimeEnvConfig(setup_timeout_seconds=5))
    assert env["pip"] == {"packages": ["six"], "pip_check": False}
    assert env["config"]["setup_timeout_seconds"] == 5
    assert issubclass(RuntimeEnvSetupError, zray.exceptions.RayError)


SIZE_DRIVER = """
import os, sys
import zray
zray.init(num_cpus=1)
try:
    zray.init  # noqa
    @zray.remote
    def f():
        return 1
    zray.get(f.options(runtime_env={"working_dir": sys.argv[1]}).remote())
except ValueError as e:
    print("ERROR " + str(e))
"""

CACHE_DRIVER = """
import json, os, sys, time
import psutil
import zray

zray.init(num_cpus=1)

@zray.remote
def where():
    return os.getcwd(), os.getpid()

base = sys.argv[1]
first, pid = zray.get(where.options(runtime_env={"working_dir": os.path.join(base, "one")}).remote(), timeout=120)
deadline = time.monotonic() + 60
while psutil.pid_exists(pid) and time.monotonic() < deadline:  # reaped when idle
    time.sleep(0.2)
second, _ = zray.get(where.options(runtime_env={"working_dir": os.path.join(base, "two")}).remote(), timeout=120)
print("RESULT " + json.dumps({"first": first, "second": second,
                              "first_left": os.path.exists(first),
                              "second_left": os.path.exists(second)}))
"""


@pytest.mark.timeout(200)
def test_size_limit_and_bounded_cache(run_driver, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(os.urandom(3 * 2**20))
    out = run_driver(SIZE_DRIVER.replace("sys.argv[1]", repr(str(big))), timeout=90,
                     ZRAY_RUNTIME_ENV_MAX_PACKAGE_MB="2")
    assert "ERROR " in out.stdout, (out.stdout, out.stderr)
    err = out.stdout.split("ERROR ", 1)[1]
    assert "3.0 MiB" in err and "2 MiB limit" in err and str(big) in err, err

    for name in ("one", "two"):
        (tmp_path / "cache" / name).mkdir(parents=True)
        (tmp_path / "cache" / name / "data.bin").write_bytes(os.urandom(200_000))
    out = run_driver(CACHE_DRIVER.replace("sys.argv[1]", repr(str(tmp_path / "cache"))),
                     timeout=180, ZRAY_IDLE_EXECUTOR_S="1", ZRAY_RUNTIME_ENV_CACHE_MB="0.3")
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert res["first"] != res["second"]
    # the first package was evicted once no process used it; the one in use stays
    assert res["second_left"] and not res["first_left"], res


MIXED_DRIVER = """
import json, os, sys
import zray

zray.init(num_cpus=2)

@zray.remote
def who(i):
    try:
        import marker_mod  # only in the environment's py_modules
        has = True
    except ImportError:
        has = False
    return i, os.getpid(), has

env = {"py_modules": [sys.argv[1]]}
refs = [who.options(runtime_env=env).remote(i) if i % 2 else who.remote(i) for i in range(60)]
print("RESULT " + json.dumps(zray.get(refs, timeout=120)))
"""


@pytest.mark.timeout(180)
def test_environments_never_share_a_process(run_driver, tmp_path):
    """Interleaved tasks of an environment and of none, queued and prefetched together:
    each runs in a process of its own environment only."""
    (tmp_path / "mods").mkdir()  # not the driver's folder (executors start there)
    (tmp_path / "mods" / "marker_mod.py").write_text("X = 1\n")
    marker = str(tmp_path / "mods" / "marker_mod.py")
    out = run_driver(MIXED_DRIVER.replace("sys.argv[1]", repr(marker)),
                     timeout=160)
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert [has for i, _, has in res] == [bool(i % 2) for i, _, _ in res]
    env_pids = {pid for i, pid, _ in res if i % 2}
    plain_pids = {pid for i, pid, _ in res if not i % 2}
    assert env_pids and plain_pids and not env_pids & plain_pids, (env_pids, plain_pids)


def test_excludes_and_gitignore_decide_what_is_packed(tmp_path):
    """What a working_dir uploads: excludes (gitignore-style, from the root), and the
    folder's own .gitignore files, each for the folder it is in; same files, same id."""
    from zray import _renv

    files = {"a.py": "", "b.log": "", "keep/x.py": "", "keep/y.tmp": "", "sub/z.dat": "",
             "sub/w.py": "", "build/o.bin": "", "deep/build/q.py": "", "deep/n.log": "",
             ".gitignore": "*.tmp\n/build/\n", "sub/.gitignore": "*.dat\n"}
    write_tree(tmp_path / "wd", files)
    pkg = _renv.pack(tmp_path / "wd", "working_dir", ["*.log", "!deep/n.log"])
    with zipfile.ZipFile(io.BytesIO(pkg.data)) as zf:
        names = sorted(zf.namelist())
    assert names == [".gitignore", "a.py", "deep/build/q.py", "deep/n.log", "keep/x.py",
                     "sub/.gitignore", "sub/w.py"], names
    again = _renv.pack(tmp_path / "wd", "working_dir", ["*.log", "!deep/n.log"])
    assert again.sha == pkg.sha and len(pkg.sha) == 64
    # a node checks that what it fetched is the package it is named after
    assert _renv.package_matches(pkg.sha, pkg.data)
    assert not _renv.package_matches(pkg.sha, _renv.pack(tmp_path / "wd" / "keep",
                                                          "working_dir").data)
    (tmp_path / "wd" / "a.py").write_text("changed")
    assert _renv.pack(tmp_path / "wd", "working_dir", ["*.log"]).sha != pkg.sha


VENV_BOUND_DRIVER = """
import json, os, time
import psutil
import zray

zray.init(num_cpus=1)

@zray.remote
def six_venv():
    import six
    return six.__version__, os.environ["VIRTUAL_ENV"], os.getpid()

old = zray.get(six_venv.options(runtime_env={"pip": ["six==1.16.0"]}).remote(), timeout=240)
deadline = time.monotonic() + 60
while psutil.pid_exists(old[2]) and time.monotonic() < deadline:  # reaped when idle
    time.sleep(0.2)
new = zray.get(six_venv.options(runtime_env={"pip": ["six==1.15.0"]}).remote(), timeout=240)
print("RESULT " + json.dumps({"old": old, "new": new, "old_left": os.path.exists(old[1]),
                              "new_left": os.path.exists(new[1])}))
"""


@pytest.mark.timeout(300)
def test_pip_environments_are_bounded(run_driver):
    """Past ZRAY_RUNTIME_ENV_MAX_VENVS the least recently used environment no process
    uses is deleted."""
    out = run_driver(VENV_BOUND_DRIVER, timeout=280, ZRAY_IDLE_EXECUTOR_S="1",
                     ZRAY_RUNTIME_ENV_MAX_VENVS="1")
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert res["old"][0] == "1.16.0" and res["new"][0] == "1.15.0", res
    assert res["new_left"] and not res["old_left"], res


UV_DRIVER = """
import json, zray
zray.init(num_cpus=1)

@zray.remote(runtime_env={"uv": {"packages": ["six==1.16.0"]}})
def use_six():
    import six
    return six.__version__, six.__file__

print("RESULT " + json.dumps([zray.get(use_six.remote(), timeout=240) for _ in range(2)]))
"""


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH (its absence is "
                    "tested in test_setup_failures_are_runtime_env_setup_errors)")
@pytest.mark.timeout(300)
def test_uv_installs_into_a_cached_environment(run_driver):
    out = run_driver(UV_DRIVER, timeout=280)
    assert out.returncode == 0, (out.stdout, out.stderr)
    (v1, f1), (v2, f2) = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert v1 == v2 == "1.16.0" and f1 == f2 and "runtime_resources/venvs/venv_" in f1


BOMB_DRIVER = """
import sys
import zray
from zray import _renv

zray.init(num_cpus=1)
@zray.remote
def f():
    return 1

try:
    f.options(runtime_env={"py_modules": [sys.argv[1]]}).remote()
except ValueError as e:
    print("DRIVER_REFUSED " + str(e))
# A careless or hostile client that skips its own check: the node still refuses.
_renv.MAX_UNPACKED_MB = 10_000
try:
    zray.get(f.options(runtime_env={"py_modules": [sys.argv[1]]}).remote(), timeout=60)
    print("RAN")
except zray.exceptions.RuntimeEnvSetupError as e:
    print("NODE_REFUSED " + str(e).replace(chr(10), " "))
"""


@pytest.mark.timeout(120)
def test_a_zip_that_unpacks_too_large_is_refused_by_driver_and_node(run_driver, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb/__init__.py", "")
        zf.writestr("bomb/zeros.bin", bytes(8 * 2**20))  # 8 MiB, a few KiB compressed
    assert bomb.stat().st_size < 2**20
    out = run_driver(BOMB_DRIVER.replace("sys.argv[1]", repr(str(bomb))), timeout=90,
                     ZRAY_RUNTIME_ENV_MAX_UNPACKED_MB="1")
    assert "RAN" not in out.stdout, (out.stdout, out.stderr)
    refused = out.stdout.split("DRIVER_REFUSED ", 1)[1].split("\n", 1)[0]
    assert "8.0 MiB" in refused and "ZRAY_RUNTIME_ENV_MAX_UNPACKED_MB" in refused, refused
    node = out.stdout.split("NODE_REFUSED ", 1)[1]
    assert "8.0 MiB" in node and "ZRAY_RUNTIME_ENV_MAX_UNPACKED_MB" in node, node


DETACHED_CREATE = """
import json, sys
import zray

zray.init(address=sys.argv[1], namespace="renv", runtime_env={"working_dir": "."})

@zray.remote
class Holder:
    def value(self):
        import helper  # only in the working_dir
        return helper.VALUE, zray.get_runtime_context().get_node_id()

h = Holder.options(name="holder", lifetime="detached", max_restarts=1,
                   resources={"slot": 1}).remote()
print("FIRST " + json.dumps(zray.get(h.value.remote(), timeout=60)))
"""

DETACHED_USE = """
import json, sys, time
import zray

zray.init(address=sys.argv[1], namespace="renv")
h = zray.get_actor("holder")
deadline = time.monotonic() + 90
while True:
    try:
        print("RESULT " + json.dumps(zray.get(h.value.remote(), timeout=60)))
        break
    except zray.exceptions.ActorUnavailableError:  # restarting on the other node
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
zray.kill(h)
"""


@pytest.mark.timeout(240)
def test_detached_actor_restarts_elsewhere_after_its_driver_left(tmp_path):
    """The working_dir of a detached actor outlives the driver that uploaded it: the
    actor restarts on a node that never saw the package, after that driver exited."""
    if zray.is_initialized():
        zray.shutdown()
    project = tmp_path / "project"
    project.mkdir()
    (project / "helper.py").write_text("VALUE = 42\n")
    (project / "create.py").write_text(DETACHED_CREATE)
    (project / "use.py").write_text(DETACHED_USE)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = driver_env(ZRAY_TMPDIR=str(tmp_path / "zray-tmp"))
    procs: dict = {}
    try:
        _start(procs, tmp_path, "broker", ["broker", "--host", "127.0.0.1", "--port", str(port)],
               env, tmp_path)
        _start(procs, tmp_path, "workerA", ["worker", "--address", address, "--num-cpus", "1",
                                            "--resources", '{"slot": 1}'], env, tmp_path)
        out = subprocess.run([sys.executable, "create.py", address], cwd=str(project), env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "FIRST " in out.stdout, (
            out.stdout, out.stderr, _logs(tmp_path, procs))
        value, node_a = json.loads(out.stdout.split("FIRST ", 1)[1])
        assert value == 42
        # The driver is gone. A second node joins; the first dies with the actor's process.
        _start(procs, tmp_path, "workerB", ["worker", "--address", address, "--num-cpus", "1",
                                            "--resources", '{"slot": 1}'], env, tmp_path)
        os.killpg(procs["workerA"].pid, signal.SIGKILL)
        procs["workerA"].wait(30)
        out = subprocess.run([sys.executable, str(project / "use.py"), address],
                             cwd=str(tmp_path), env=env, capture_output=True, text=True,
                             timeout=150)
        assert out.returncode == 0, (out.stdout, out.stderr, _logs(tmp_path, procs))
        value, node = json.loads(out.stdout.split("RESULT ", 1)[1])
        assert value == 42 and node != node_a
    finally:
        for p in procs.values():
            kill_tree(p.pid)
