"""Ray parity of runtime environments: what a task sees of the job's runtime_env, of its
own and of its parent's. Each case is a fresh driver script; ``ZRAY_TEST_BACKEND=ray``
runs the same scripts on Ray (its pip environments need ``virtualenv`` importable).

Ray takes local folders (working_dir, py_modules) only at the job level, so these
scripts give them to ``init``; zray also takes them per task (tests/test_runtime_env.py).
"""

import json
import os
import textwrap

import pytest

BACKEND = os.environ.get("ZRAY_TEST_BACKEND", "zray")

BODY = """
import json, os

@ray.remote
def probe():
    import importlib
    mods = {}
    for name in ("job_mod", "lib_mod"):
        try:
            mods[name] = importlib.import_module(name).WHO
        except ImportError:
            mods[name] = None
    try:
        import six
        six_version = six.__version__
    except ImportError:
        six_version = None
    return {"mods": mods, "A": os.environ.get("A"), "B": os.environ.get("B"),
            "cwd_has_job_mod": os.path.exists("job_mod.py"), "six": six_version}

@ray.remote
def nested():
    return ray.get(probe.remote())

@ray.remote
class Actor:
    def probe(self):
        return ray.get(probe.remote())

res = {
    "job": ray.get(probe.remote(), timeout=120),
    "none_inherits": ray.get(probe.options(runtime_env={"working_dir": None}).remote(),
                             timeout=120),
    "env_vars": ray.get(nested.options(runtime_env={"env_vars": {"B": "task"}}).remote(),
                        timeout=120),
    "actor": ray.get(Actor.options(runtime_env={"env_vars": {"A": "actor"}}).remote()
                     .probe.remote(), timeout=120),
    "pip": ray.get(nested.options(runtime_env={"pip": ["six==1.16.0"]}).remote(),
                   timeout=300),
}
try:
    ray.get(probe.options(runtime_env={"pip": ["zray-no-such-package-xyz==9.9.9"]}).remote(),
            timeout=300)
    res["bad_pip"] = "no error"
except Exception as e:
    res["bad_pip"] = [c.__name__ for c in type(e).__mro__]
print("RESULT " + json.dumps(res))
"""


@pytest.mark.timeout(600)
def test_job_env_merges_with_task_envs_as_in_ray(run_driver, tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "job_mod.py").write_text("WHO = 'job'\n")
    (tmp_path / "lib" / "lib_mod").mkdir(parents=True)
    (tmp_path / "lib" / "lib_mod" / "__init__.py").write_text("WHO = 'lib'\n")
    init = (f"runtime_env={{'working_dir': {str(tmp_path / 'wd')!r}, "
            f"'py_modules': [{str(tmp_path / 'lib' / 'lib_mod')!r}], "
            f"'env_vars': {{'A': 'job', 'B': 'job'}}}}")
    extra = {"include_dashboard": "False"} if BACKEND == "ray" else {}
    init += "".join(f", {k}={v}" for k, v in extra.items())
    source = f"import {BACKEND} as ray\nray.init(num_cpus=2, {init})\n" + textwrap.dedent(BODY)
    out = run_driver(source, timeout=580)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    both = {"job_mod": "job", "lib_mod": "lib"}
    for key in ("job", "none_inherits", "env_vars", "actor", "pip"):
        assert res[key]["mods"] == both, (key, res[key])
        assert res[key]["cwd_has_job_mod"], (key, res[key])
    assert (res["job"]["A"], res["job"]["B"]) == ("job", "job")
    assert (res["env_vars"]["A"], res["env_vars"]["B"]) == ("job", "task")
    assert (res["actor"]["A"], res["actor"]["B"]) == ("actor", "job")
    assert res["pip"]["six"] == "1.16.0" and res["job"]["six"] is None
    assert "RuntimeEnvSetupError" in res["bad_pip"], res["bad_pip"]
