"""How the code is put together: which module imports which.

The import graph of zray, brokerd and workerd is read from the source (every
``import``, including those inside functions, which is where a cycle usually
hides), and must have no cycle. Every module must also import on its own in a
fresh interpreter, and the benchmark cases must load where zray cannot be
imported (as compare_ray.py loads them under Ray's interpreter).
"""

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, driver_env

PACKAGES = ("zray", "brokerd", "workerd")


def _modules() -> dict:
    """Module name -> source path, for every module of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _dirs, files in os.walk(os.path.join(REPO_ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), REPO_ROOT)[:-3]
                name = rel.replace(os.sep, ".").removesuffix(".__init__")
                out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set:
    """The modules of MODULES that module `name` imports, anywhere in its source.

    ``from zray import _runtime`` counts as importing zray._runtime, not the
    zray package (whose __init__ Python has always run by then); ``import
    zray`` and ``from zray import init`` count as importing the package."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    # Imports under `if TYPE_CHECKING:` never run: they are for type checkers only.
    typing_only = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def _graph() -> dict:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _reachable(graph: dict, start: str) -> set:
    seen, stack = set(), [start]
    while stack:
        for dep in graph[stack.pop()]:
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_the_graph_sees_lazy_imports():
    # A guard on the reader itself: zray._api imports the actor module inside functions.
    assert "zray.actor" in _graph()["zray._api"]


def test_runtime_and_refs_do_not_import_the_api():
    # The runtime reaches the API only through the auto_init hook that zray._api registers.
    graph = _graph()
    for name in ("zray._runtime", "zray._refs", "zray._remote", "zray.actor"):
        assert "zray._api" not in _reachable(graph, name), name
        assert "zray" not in _reachable(graph, name), name


def test_no_import_cycles():
    graph = _graph()
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith("__main__"))
                         + ["benchmarks.microbenchmark"])
def test_module_imports_alone(name):
    res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                         text=True, cwd=REPO_ROOT, env=driver_env(), timeout=60)
    assert res.returncode == 0, res.stderr


def test_require_client_without_a_hook_says_what_to_do():
    code = ("from zray import _runtime\n"
            "_runtime.auto_init = None\n"
            "_runtime.require_client()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=driver_env(), timeout=60)
    assert res.returncode != 0
    assert "RuntimeError" in res.stderr and "zray.init()" in res.stderr, res.stderr


def test_benchmark_cases_load_by_path_without_zray(tmp_path):
    # compare_ray.py runs the cases under Ray's interpreter, where zray is not
    # importable: -S leaves site-packages (and so the installed zray) out.
    code = ("import sys\n"
            f"sys.path.insert(0, {os.path.join(REPO_ROOT, 'benchmarks')!r})\n"
            "import _cases\n"
            "loaded = {m.split('.')[0] for m in sys.modules}\n"
            "assert not loaded & {'zray', 'ray', 'benchmarks', 'numpy'}, loaded\n"
            "assert '_zray_bench_workloads' not in sys.modules  # cloudpickle: by value\n"
            "steady = {c['name'] for c in _cases.CASES if c['phase'] == 'steady'}\n"
            "assert set(_cases.mb.build_cases(object())) == steady\n")
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), env=driver_env(PYTHONPATH=""), timeout=60)
    assert res.returncode == 0, res.stderr
