"""Runtime environments, driver side: check, merge, pack and upload a ``runtime_env``.

::

    runtime_env (init / @remote / .options)
        --check()--> keys Ray knows; conda/container/image_uri refused
        --merge(parent wire, child)--> per key the child's wins; env_vars merged
        --pack()--> working_dir / py_modules: a zip (content hash = its id), put once
                    per driver as an object the driver owns
        --> wire form in the task spec: options["renv"] (msgpack, never pickled
            except the setup hook, which only executors load)

The wire form (``options["renv"]``) names what an executor must set up before
it runs a call of that environment (workerd/renv.py does it, once per process):

* ``key``: sha256 hex of everything below but ``timeout``; the broker keys its
  executor pools by it, so that executors of different environments never share
  a process (a fresh executor is bound to the environment of its first task);
* ``working_dir``: ``[sha256 hex, object id, single_root]``; ``py_modules``: a list
  of those; a node unpacks each once into its cache, by sha256;
* ``pip``: ``{"packages": [...], "pip_check": bool, "installer": "pip" | "uv"}``;
* ``hook``: ``worker_process_setup_hook``, a ``"module.function"`` name or the
  function pickled; ``timeout``: ``config.setup_timeout_seconds``.

``env_vars`` are not part of it: they travel as ``options["env_vars"]`` and are set
per call (zray/_options.py). A runtime_env of env_vars (and config) only needs no
process of its own.

A package is the folder's files (``excludes`` are gitignore-style patterns
relative to it) in a zip without compression (transfers between nodes are lz4
compressed already), named by the sha256 of its paths and contents, so the
same files give the same id on every driver. Each driver uploads a package
once (``_uploaded``) and keeps the object alive while it is connected.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import types
import zipfile
from typing import Optional

import cloudpickle

log = logging.getLogger("zray.runtime_env")

KNOWN_KEYS = {"working_dir", "py_modules", "pip", "uv", "env_vars", "excludes",
              "worker_process_setup_hook", "config"}
REFUSED_KEYS = {
    "conda": "conda environments are not supported by zray; use 'pip' or 'uv'",
    "container": "containers are not supported by zray",
    "image_uri": "image_uri (containers) is not supported by zray",
}
CONFIG_KEYS = {"setup_timeout_seconds", "eager_install"}
DEFAULT_SETUP_TIMEOUT_S = 600  # Ray's default
MAX_PACKAGE_MB = float(os.environ.get("ZRAY_RUNTIME_ENV_MAX_PACKAGE_MB", "500"))
# What a node agrees to unpack from one package (a user's .zip/.whl may be compressed, and
# a package may come from any cluster peer): declared sizes are summed before anything is
# decompressed, so a zip bomb is refused by its directory, not discovered on disk.
MAX_UNPACKED_MB = float(os.environ.get("ZRAY_RUNTIME_ENV_MAX_UNPACKED_MB")
                        or 4 * MAX_PACKAGE_MB)
MAX_PACKAGE_FILES = int(os.environ.get("ZRAY_RUNTIME_ENV_MAX_FILES") or 200_000)


def _is_remote_uri(path: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


# ------------------------------------------------------------------ checks
def check(renv) -> dict:
    """``renv`` as a plain dict with its values checked (paths must exist); raises
    ValueError naming the key at fault. Does not pack anything."""
    if renv is None:
        return {}
    if not isinstance(renv, dict):
        raise ValueError(f"runtime_env must be a dict or a RuntimeEnv, got {type(renv).__name__}")
    # A key set to None is not set (as in Ray): the parent's value is inherited.
    renv = {k: v for k, v in renv.items() if v is not None}
    for key in renv:
        if key in REFUSED_KEYS:
            raise ValueError(f"runtime_env[{key!r}]: {REFUSED_KEYS[key]}")
        if key not in KNOWN_KEYS:
            raise ValueError(f"runtime_env key {key!r} is not supported by zray (supported: "
                             f"{sorted(KNOWN_KEYS)})")
    if "pip" in renv and "uv" in renv and renv["pip"] is not None and renv["uv"] is not None:
        raise ValueError("runtime_env: 'pip' and 'uv' cannot both be given")
    ev = renv.get("env_vars")
    if ev is not None and (not isinstance(ev, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ev.items())):
        raise ValueError("runtime_env['env_vars'] must map str to str")
    wd = renv.get("working_dir")
    if wd is not None:
        _check_local_path(wd, "working_dir", allow_file=(".zip",))
    ex = renv.get("excludes")
    if ex is not None:
        if not isinstance(ex, (list, tuple)) or not all(isinstance(p, str) for p in ex):
            raise ValueError("runtime_env['excludes'] must be a list of str patterns")
        compile_excludes(ex)
    mods = renv.get("py_modules")
    if mods is not None:
        if not isinstance(mods, (list, tuple)):
            raise ValueError("runtime_env['py_modules'] must be a list of local paths or "
                             "modules")
        for m in mods:
            _check_local_path(_module_path(m), "py_modules", allow_file=(".py", ".zip", ".whl"))
    for key in ("pip", "uv"):
        if renv.get(key) is not None:
            renv[key] = _check_pip(renv[key], key)
    hook = renv.get("worker_process_setup_hook")
    if hook is not None and not (callable(hook) or (isinstance(hook, str) and hook)):
        raise ValueError("runtime_env['worker_process_setup_hook'] must be a callable or a "
                         "'module.function' name")
    cfg = renv.get("config")
    if cfg is not None:
        renv["config"] = _check_config(cfg)
    return renv


def _check_local_path(path, key: str, allow_file: tuple) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"runtime_env[{key!r}] must be a local path, got {path!r}")
    path = os.fspath(path)
    if _is_remote_uri(path):
        raise ValueError(f"runtime_env[{key!r}]: remote URIs ({path!r}) are not supported by "
                         f"zray; give a local path, zray uploads it")
    if os.path.isdir(path):
        return
    if os.path.isfile(path) and path.endswith(allow_file):
        return
    if os.path.exists(path):
        raise ValueError(f"runtime_env[{key!r}]: {path!r} must be a directory or a "
                         f"{' / '.join(allow_file)} file")
    raise ValueError(f"runtime_env[{key!r}]: {path!r} does not exist")


def _module_path(m):
    """A py_modules entry as a path: a module object becomes its package folder or file."""
    if isinstance(m, types.ModuleType):
        f = getattr(m, "__file__", None)
        if not f:
            raise ValueError(f"runtime_env['py_modules']: module {m.__name__!r} has no file")
        return os.path.dirname(f) if os.path.basename(f) == "__init__.py" else f
    return m


def _check_pip(spec, key: str) -> dict:
    """A pip/uv spec as ``{"packages": [...], "pip_check": bool}``."""
    if isinstance(spec, str):  # a requirements file, as in Ray
        if not os.path.isfile(spec):
            raise ValueError(f"runtime_env[{key!r}]: requirements file {spec!r} does not exist")
        with open(spec) as f:
            lines = [ln.split("#", 1)[0].strip() for ln in f]
        spec = {"packages": [ln for ln in lines if ln]}
    elif isinstance(spec, (list, tuple)):
        spec = {"packages": list(spec)}
    elif not isinstance(spec, dict):
        raise ValueError(f"runtime_env[{key!r}] must be a list of packages, a requirements "
                         f"file or {{'packages': [...]}}, got {type(spec).__name__}")
    allowed = {"packages", "pip_check"} if key == "pip" else {"packages"}
    spec = dict(spec)
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"runtime_env[{key!r}]: keys {sorted(unknown)} are not supported by "
                         f"zray (supported: {sorted(allowed)})")
    pkgs = spec.get("packages")
    if not isinstance(pkgs, (list, tuple)) or not all(isinstance(p, str) and p.strip()
                                                      for p in pkgs):
        raise ValueError(f"runtime_env[{key!r}]['packages'] must be a list of requirement "
                         f"strings")
    for p in pkgs:
        if p.strip().startswith("-"):
            raise ValueError(f"runtime_env[{key!r}]: pip options ({p!r}) are not supported, "
                             "only requirements")
    check_flag = spec.get("pip_check", False)
    if not isinstance(check_flag, bool):
        raise ValueError(f"runtime_env[{key!r}]['pip_check'] must be a bool")
    out = {"packages": [p.strip() for p in pkgs]}
    if key == "pip":
        out["pip_check"] = check_flag
    return out


def _check_config(cfg) -> dict:
    to_dict = getattr(cfg, "to_dict", None)
    if to_dict is not None:
        cfg = to_dict()
    if not isinstance(cfg, dict):
        raise ValueError("runtime_env['config'] must be a dict or a RuntimeEnvConfig")
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"runtime_env['config']: keys {sorted(unknown)} are not supported "
                         f"(supported: {sorted(CONFIG_KEYS)})")
    t = cfg.get("setup_timeout_seconds", DEFAULT_SETUP_TIMEOUT_S)
    if type(t) is not int or (t <= 0 and t != -1):
        raise ValueError("runtime_env['config']['setup_timeout_seconds'] must be an int > 0 "
                         f"or -1 (no limit), got {t!r}")
    eager = cfg.get("eager_install", True)
    if not isinstance(eager, bool):
        raise ValueError(f"runtime_env['config']['eager_install'] must be a bool, got {eager!r}")
    return {"setup_timeout_seconds": t, "eager_install": eager}


# --------------------------------------------------------------- excludes
def compile_excludes(patterns) -> list:
    """gitignore-style patterns as [(negated, dir_only, regex)]: a pattern with a ``/``
    (other than at its end) is anchored at the folder's root, one without matches at any
    depth; ``*`` and ``?`` stay within a path segment, ``**`` spans segments; a trailing
    ``/`` matches directories only; ``!`` re-includes."""
    out = []
    for pat in patterns:
        p = pat.strip()
        if not p or p.startswith("#"):
            continue
        neg = p.startswith("!")
        if neg:
            p = p[1:]
        dir_only = p.endswith("/")
        p = p.rstrip("/")
        anchored = "/" in p
        p = p.lstrip("/")
        if not p:
            continue
        rx, i = [], 0
        while i < len(p):
            c = p[i]
            if p.startswith("**/", i):
                rx.append("(?:.*/)?")
                i += 3
            elif p.startswith("**", i):
                rx.append(".*")
                i += 2
            elif c == "*":
                rx.append("[^/]*")
                i += 1
            elif c == "?":
                rx.append("[^/]")
                i += 1
            elif c == "[":
                j = p.find("]", i + 1)
                if j < 0:
                    rx.append(re.escape(c))
                    i += 1
                else:
                    body = p[i + 1:j].replace("\\", "\\\\")
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    rx.append(f"[{body}]")
                    i = j + 1
            else:
                rx.append(re.escape(c))
                i += 1
        prefix = "" if anchored else "(?:.*/)?"
        try:
            out.append((neg, dir_only, re.compile(prefix + "".join(rx) + r"\Z")))
        except re.error as e:
            raise ValueError(f"runtime_env['excludes']: bad pattern {pat!r}: {e}") from None
    return out


def excluded(rules: list, rel: str, is_dir: bool) -> bool:
    """Whether the path ``rel`` (posix, relative to the packed folder) is excluded."""
    out = False
    for neg, dir_only, rx in rules:
        if dir_only and not is_dir:
            continue
        if rx.match(rel):
            out = not neg
    return out


# ------------------------------------------------------------------ packing
class Package:
    """A packed folder or file: its sha256 (hex), zip bytes, and how a node lays it out."""

    __slots__ = ("sha", "data", "single_root")

    def __init__(self, sha: str, data: bytes, single_root: bool):
        self.sha, self.data, self.single_root = sha, data, single_root


def _limit_error(what: str, path: str, size: int) -> ValueError:
    return ValueError(
        f"runtime_env[{what!r}]: {path!r} packs to {size / 2**20:.1f} MiB, over the "
        f"{MAX_PACKAGE_MB:g} MiB limit (ZRAY_RUNTIME_ENV_MAX_PACKAGE_MB); leave large files "
        f"out with 'excludes' or put them in object storage")


def _walk(root: str, rules: list, top: str = "") -> list:
    """[(relative posix path, absolute path)] of the files to pack, sorted. ``rules``
    (the user's excludes) apply from the root; as in Ray, the ``.gitignore`` and
    ``.rayignore`` files in the folder apply too, each to the folder it is in
    (``ZRAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``: not the .gitignore files)."""
    names = [".rayignore"]
    if os.environ.get("ZRAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") in ("", "0"):
        names.insert(0, ".gitignore")
    scoped = {"": [("", rules)]}  # relative dir -> [(prefix, rules)] in force below it

    def out(rel: str, is_dir: bool, in_force: list) -> bool:
        return any(excluded(r, rel[len(prefix):], is_dir) for prefix, r in in_force)

    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        in_force = list(scoped.pop(rel_dir, None) or [("", rules)])
        for name in names:
            if name in filenames:
                try:
                    with open(os.path.join(dirpath, name)) as f:
                        in_force.append((rel_dir, compile_excludes(f.read().splitlines())))
                except (OSError, UnicodeDecodeError, ValueError):
                    log.warning("runtime_env: ignoring unreadable %s in %s", name, dirpath)
        keep = []
        for d in sorted(dirnames):
            if d == "__pycache__" or out(rel_dir + d, True, in_force):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                continue
            keep.append(d)
            scoped[rel_dir + d + "/"] = in_force
        dirnames[:] = keep
        for f in filenames:
            rel = rel_dir + f
            full = os.path.join(dirpath, f)
            if out(rel, False, in_force) or f.endswith(".pyc"):
                continue
            try:
                st = os.stat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((top + rel, full))
    files.sort()
    return files


def _hash_file(h, rel: str, mode: int, data: bytes) -> None:
    h.update(rel.encode() + b"\0" + str(mode).encode() + b"\0" + str(len(data)).encode()
             + b"\0")
    h.update(data)


def unpack_problem(data: bytes) -> Optional[str]:
    """Why a node must not unpack this package (None: it may): not a zip, too many
    entries, or more than MAX_UNPACKED_MB declared. zipfile never writes more than an
    entry's declared size, so the sum bounds what extraction can put on disk."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"is not a readable zip file ({e})"
    if len(infos) > MAX_PACKAGE_FILES:
        return (f"holds {len(infos):,} entries, over the limit of {MAX_PACKAGE_FILES:,} "
                "(ZRAY_RUNTIME_ENV_MAX_FILES)")
    total = sum(max(0, i.file_size) for i in infos)
    if total > MAX_UNPACKED_MB * 2**20:
        return (f"would unpack to {total / 2**20:,.1f} MiB, over the limit of "
                f"{MAX_UNPACKED_MB:g} MiB (ZRAY_RUNTIME_ENV_MAX_UNPACKED_MB)")
    return None


def package_matches(sha: str, data: bytes) -> bool:
    """Whether ``data`` (a package's zip) is the package named ``sha``: the sha256 of
    the file (a user's .zip or .whl) or of the files packed in it (``pack``)."""
    if hashlib.sha256(data).hexdigest() == sha:
        return True
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                _hash_file(h, info.filename, (info.external_attr >> 16) & 0o777,
                           zf.read(info))
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return h.hexdigest() == sha


def _zip_files(files: list, what: str, shown: str) -> Package:
    limit = MAX_PACKAGE_MB * 2**20
    h = hashlib.sha256()
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for rel, full in files:
            with open(full, "rb") as f:
                data = f.read()
            total += len(data)
            if total > limit:
                raise _limit_error(what, shown, total)
            mode = os.stat(full).st_mode & 0o777
            _hash_file(h, rel, mode, data)
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, data)
    data = buf.getvalue()
    if len(data) > limit:
        raise _limit_error(what, shown, len(data))
    return Package(h.hexdigest(), data, False)


def pack(path, what: str, excludes=()) -> Package:
    """Pack a working_dir (its contents at the root) or a py_modules entry (the folder
    or file itself at the root; a .whl or .zip as it is)."""
    path = os.path.abspath(os.fspath(path))
    rules = compile_excludes(excludes or ())
    if os.path.isfile(path):
        if path.endswith((".zip", ".whl")):
            size = os.path.getsize(path)
            if size > MAX_PACKAGE_MB * 2**20:
                raise _limit_error(what, path, size)
            with open(path, "rb") as f:
                data = f.read()
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    names = zf.namelist()
            except zipfile.BadZipFile:
                raise ValueError(f"runtime_env[{what!r}]: {path!r} is not a zip file") from None
            problem = unpack_problem(data)
            if problem is not None:
                raise ValueError(f"runtime_env[{what!r}]: {path!r} {problem}")
            tops = {n.split("/", 1)[0] for n in names}
            single = (path.endswith(".zip") and len(tops) == 1
                      and all("/" in n for n in names))
            return Package(hashlib.sha256(data).hexdigest(), data, single)
        return _zip_files([(os.path.basename(path), path)], what, path)
    if what == "working_dir":
        return _zip_files(_walk(path, rules), what, path)
    top = os.path.basename(path.rstrip(os.sep))
    return _zip_files(_walk(path, rules, top + "/"), what, path)


# -------------------------------------------------------------- to the wire
# Per driver (or executor) process: packages already put, by sha -> ObjectRef (kept
# alive while this process is connected), and packed folders by (path, excludes) ->
# (stat signature, Package sha).
_uploaded: dict = {}
_packed: dict = {}


def _signature(path: str, excludes) -> tuple:
    """Cheap fingerprint of what ``pack`` would read: paths, sizes, mtimes."""
    if os.path.isfile(path):
        st = os.stat(path)
        return ((path, st.st_size, st.st_mtime_ns),)
    rules = compile_excludes(excludes or ())
    out = []
    for rel, full in _walk(path, rules):
        try:
            st = os.stat(full)
        except OSError:
            continue
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_mode))
    return tuple(out)


def _upload(path, what: str, excludes, client) -> list:
    """``[sha, object id hex, single_root]`` of a local path, packed and put once."""
    path = os.path.abspath(os.fspath(path))
    cache_key = (what, path, tuple(excludes or ()))
    sig = _signature(path, excludes)
    hit = _packed.get(cache_key)
    ref = _uploaded.get(hit[1]) if hit is not None and hit[0] == sig else None
    if ref is not None and ref._client is client:
        sha, single = hit[1], hit[2]
    else:
        pkg = pack(path, what, excludes)
        sha, single = pkg.sha, pkg.single_root
        _packed[cache_key] = (sig, sha, single)
        ref = _uploaded.get(sha)
        if ref is None or ref._client is not client:
            from zray._refs import ObjectRef

            ref = client.put(pkg.data, ObjectRef)
            _uploaded[sha] = ref
            log.info("uploaded %s %s as pkg_%s (%d bytes)", what, path, sha[:16], len(pkg.data))
    return [sha, _uploaded[sha].id.hex(), single]


def forget_uploads() -> None:
    """At shutdown: the packages' objects die with the connection."""
    _uploaded.clear()
    _packed.clear()


def to_wire(renv: dict, parent: Optional[dict], client) -> Optional[dict]:
    """The wire form of a checked runtime_env ``renv`` merged over the ``parent``'s wire
    form (the job's, or the running task's), or None when it needs no process of its own.

    Ray's merge: each key the child gives (not None) replaces the parent's (``env_vars``
    are merged elsewhere, key by key)."""
    out = {k: v for k, v in (parent or {}).items() if k != "key"}
    if renv.get("working_dir") is not None:
        out["working_dir"] = _upload(renv["working_dir"], "working_dir", renv.get("excludes"),
                                     client)
    if renv.get("py_modules") is not None:
        out["py_modules"] = [_upload(_module_path(m), "py_modules", renv.get("excludes"),
                                     client) for m in renv["py_modules"]]
        if not out["py_modules"]:
            del out["py_modules"]
    for key in ("pip", "uv"):
        if renv.get(key) is not None:
            out["pip"] = {"packages": list(renv[key]["packages"]),
                          "pip_check": renv[key].get("pip_check", False), "installer": key}
    hook = renv.get("worker_process_setup_hook")
    if hook is not None:
        out["hook"] = hook if isinstance(hook, str) else cloudpickle.dumps(hook)
    if renv.get("config") is not None:
        out["timeout"] = renv["config"]["setup_timeout_seconds"]
    if not any(k in out for k in ("working_dir", "py_modules", "pip", "hook")):
        return None
    out["key"] = env_key(out)
    return out


def env_key(wire: dict) -> str:
    """What makes two environments the same process: everything but the timeout."""
    h = hashlib.sha256()
    for k in sorted(wire):
        if k in ("key", "timeout"):
            continue
        v = wire[k]
        if k == "working_dir":
            v = [v[0], v[2]]
        elif k == "py_modules":
            v = [[m[0], m[2]] for m in v]
        elif k == "hook" and isinstance(v, bytes):
            v = hashlib.sha256(v).hexdigest()
        h.update(json.dumps([k, v], sort_keys=True).encode())
    return h.hexdigest()


def user_view(wire: Optional[dict]) -> dict:
    """A JSON-able view of a wire form (get_runtime_env_string)."""
    if not wire:
        return {}
    out = {}
    if "working_dir" in wire:
        out["working_dir"] = f"pkg_{wire['working_dir'][0]}.zip"
    if "py_modules" in wire:
        out["py_modules"] = [f"pkg_{m[0]}.zip" for m in wire["py_modules"]]
    if "pip" in wire:
        p = wire["pip"]
        out[p["installer"]] = {"packages": list(p["packages"]), "pip_check": p["pip_check"]}
    if "hook" in wire:
        out["worker_process_setup_hook"] = (wire["hook"] if isinstance(wire["hook"], str)
                                            else "<function>")
    if "timeout" in wire:
        out["config"] = {"setup_timeout_seconds": wire["timeout"]}
    return out

