"""Working-dir packages that job clients upload to the dashboard, as Ray's
``/api/packages`` routes do.

::

    client: pack(working_dir) (zray/_renv.py: excludes, .gitignore, size limit, sha256)
        GET  /api/packages/gcs/_ray_pkg_<sha>.zip   200: already here -> upload nothing
                                                   404: PUT it
        PUT  /api/packages/gcs/_ray_pkg_<sha>.zip   body: the zip (at most the package limit)
      --> PackageStore.put: the zip must be the package its name says (its sha256, or that
          of the files in it), then it is unpacked into <state dir>/packages/<sha>/
        submit_job(runtime_env={"working_dir": "gcs://_ray_pkg_<sha>.zip"})
      --> PackageStore.resolve: the job's entrypoint runs in that folder

Unpacking trusts nothing in the zip: names must be relative paths without ``..``,
empty parts or backslashes; symbolic links and other non-regular entries are
refused; the sizes the entries declare count against the package limit (the zip
reader never yields more than an entry declares). Everything is written into a
fresh 0700 temporary folder with ``O_EXCL | O_NOFOLLOW`` (files 0600, or 0700 if
executable) and renamed into place whole, so a package folder is complete or absent.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import zipfile

from zray._procutil import private_dir

log = logging.getLogger("zray.dashboard")

_NAME = re.compile(r"_ray_pkg_([0-9a-f]{64})\.zip\Z")
_URI = re.compile(r"gcs://(_ray_pkg_[0-9a-f]{64}\.zip)\Z")
PROTOCOL = "gcs"


class PackageError(ValueError):
    """A bad package or package name (HTTP 400)."""


def max_bytes() -> int:
    from zray._renv import MAX_PACKAGE_MB

    return int(MAX_PACKAGE_MB * 2**20)


def package_uri(sha: str) -> str:
    """The URI a job's runtime_env names an uploaded working_dir by (Ray's form)."""
    return f"{PROTOCOL}://_ray_pkg_{sha}.zip"


def is_package_uri(value) -> bool:
    return isinstance(value, str) and _URI.match(value) is not None


def sha_of_name(name: str) -> str:
    m = _NAME.match(name or "")
    if m is None:
        raise PackageError(f"bad package name {name!r:.100}: expected _ray_pkg_<sha256>.zip")
    return m.group(1)


def cache_limit_bytes() -> int:
    text = os.environ.get("ZRAY_DASHBOARD_PACKAGES_MB", "10240")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"ZRAY_DASHBOARD_PACKAGES_MB must be a number >= 0, got {text!r}")
    return int(mb * 2**20)


class PackageStore:
    """Unpacked packages by sha256, under an owner-only folder, at most
    ``ZRAY_DASHBOARD_PACKAGES_MB`` (10 GiB) of them: past that, storing one evicts the
    least recently used (stored or submitted with) that ``in_use()`` does not name
    (the packages of PENDING and RUNNING jobs) and that is not the one just stored."""

    def __init__(self, root: str, in_use=lambda: set()):
        self.root = private_dir(root)
        self.lock = threading.Lock()
        self.in_use = in_use
        self.limit = cache_limit_bytes()

    def path(self, sha: str) -> str:
        return os.path.join(self.root, sha)

    def has(self, sha: str) -> bool:
        return os.path.isdir(self.path(sha))

    def put(self, sha: str, data: bytes) -> bool:
        """Check and unpack the package ``sha``; False if it was here already."""
        from zray._renv import package_matches

        if len(data) > max_bytes():
            raise PackageError(f"package is {len(data)} bytes, over the {max_bytes()} byte "
                               "limit (ZRAY_RUNTIME_ENV_MAX_PACKAGE_MB)")
        if self.has(sha):
            return False
        if not package_matches(sha, data):
            raise PackageError(f"the uploaded data is not package {sha[:16]}... (its "
                               "content hash differs)")
        tmp = tempfile.mkdtemp(prefix=".unpack-", dir=self.root)  # 0700
        try:
            unpack(data, tmp)
            with self.lock:
                if self.has(sha):
                    return False
                os.rename(tmp, self.path(sha))
                tmp = None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("package %s stored (%d bytes)", sha[:16], len(data))
        self.evict(keep={sha})
        return True

    def evict(self, keep: set) -> None:
        """Remove least recently used packages until the rest fit the limit."""
        with self.lock:
            entries = []
            for name in os.listdir(self.root):
                if len(name) != 64 or name.startswith("."):
                    continue
                path = os.path.join(self.root, name)
                size = 0
                for dirpath, _dirs, files in os.walk(path):
                    size += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
                entries.append((os.lstat(path).st_mtime_ns, name, size))
            total = sum(e[2] for e in entries)
            if total <= self.limit:
                return
            keep = set(keep) | set(self.in_use())
            for _mtime, name, size in sorted(entries):
                if total <= self.limit:
                    break
                if name in keep:
                    continue
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                total -= size
                log.info("package %s evicted (%d bytes; the cache is over %d bytes)",
                         name[:16], size, self.limit)

    def resolve(self, uri: str) -> str:
        """The local folder of an uploaded package's URI."""
        m = _URI.match(uri)
        if m is None:
            raise PackageError(f"bad package URI {uri!r:.100}")
        sha = sha_of_name(m.group(1))
        with self.lock:  # not evicted between here and the touch
            if not self.has(sha):
                raise PackageError(f"runtime_env working_dir {uri}: no such package on the "
                                   "dashboard; upload it first (JobSubmissionClient does)")
            os.utime(self.path(sha))  # recently used
        return self.path(sha)

    def resolve_module(self, uri: str) -> str:
        """The local path of an uploaded py_modules entry: the one folder or file at the
        root of its package."""
        root = self.resolve(uri)
        names = os.listdir(root)
        if len(names) != 1:
            raise PackageError(f"runtime_env py_modules {uri}: the package holds "
                               f"{len(names)} entries at its root, not one module")
        return os.path.join(root, names[0])


def _parts(name: str) -> list:
    bad = (not name or name.startswith("/") or "\\" in name or "\0" in name)
    parts = name.rstrip("/").split("/") if not bad else []
    if bad or not parts or any(p in ("", ".", "..") for p in parts):
        raise PackageError(f"package entry {name!r:.100} is not a plain relative path")
    return parts


def unpack(data: bytes, dest: str) -> None:
    """Unpack the zip ``data`` into the (empty, private) folder ``dest``; see the module."""
    limit = max_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise PackageError("the package is not a zip file") from None
    with zf:
        try:
            _unpack_all(zf, dest, limit)
        except (zipfile.BadZipFile, FileExistsError, NotImplementedError, EOFError) as e:
            raise PackageError(f"the package cannot be unpacked: {e}") from None


def _unpack_all(zf: zipfile.ZipFile, dest: str, limit: int) -> None:
    total = 0
    for info in zf.infolist():
        parts = _parts(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if info.is_dir():
            _mkdirs(dest, parts)
            continue
        if kind not in (0, stat.S_IFREG):  # 0: a zip made without unix modes
            raise PackageError(f"package entry {info.filename!r:.100} is not a regular "
                               "file (symbolic links are not accepted)")
        total += info.file_size
        if total > limit:
            raise PackageError(f"package unpacks to over {limit} bytes "
                               "(ZRAY_RUNTIME_ENV_MAX_PACKAGE_MB)")
        parent = _mkdirs(dest, parts[:-1])
        fd = os.open(os.path.join(parent, parts[-1]),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o700 if mode & 0o100 else 0o600)
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            shutil.copyfileobj(src, out, 1 << 20)


def _mkdirs(dest: str, parts: list) -> str:
    path = dest
    for p in parts:
        path = os.path.join(path, p)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if os.path.islink(path) or not os.path.isdir(path):
                raise PackageError(f"package entry {p!r:.100} is both a file and a "
                                   "folder") from None
    return path
