"""Case catalogue and process-memory helpers shared by compare_ray.py and _runner.py.

The case catalogue and workloads live in benchmarks/workloads.py (shared
with `zray microbenchmark`), loaded here by path.  Nothing here imports ray or
zray, and psutil is imported lazily, so both the orchestrator and the
per-backend runner processes can import this module whatever is installed in
their interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS_PATH = os.path.join(HERE, "workloads.py")


def _load_workloads():
    """benchmarks/workloads.py, loaded by path: it holds the case catalogue
    and the workloads (shared with `zray microbenchmark`) and imports neither
    ray nor zray, so this works under Ray's interpreter, where zray (and the
    benchmarks package) is not importable.  It is deliberately not registered
    in sys.modules, so that cloudpickle ships its workloads to workers by value
    under both runtimes."""
    spec = importlib.util.spec_from_file_location("_zray_bench_workloads", WORKLOADS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mb = _load_workloads()

# Each case: name (row in the table), title (`zray microbenchmark` row), unit,
# better ("higher" for rates, "lower" for times and memory), phase
# ("startup": measured in a fresh process per repeat; "steady": measured after
# one init() in a long-lived runner), the corresponding `ray microbenchmark`
# name where one exists, and a description.
CASES = mb.CASES
CASE_BY_NAME = mb.CASE_BY_NAME

# Marker that prefixes every machine-readable line a runner prints on stdout,
# so that anything the runtime itself prints there is ignored.
MARK = "@@ZRAYBENCH@@ "

# Environment variable set (to a fresh random value) on each runner process.
# Every process the runtime starts inherits it, which is how leftovers are
# found and how the memory scan avoids counting unrelated processes.
TAG_ENV = "ZRAY_BENCH_TAG"

# cmdline substrings that identify runtime processes started by each backend.
PROC_PATTERNS = {
    "ray": ("ray",),
    "zray": ("brokerd", "workerd", "zray"),
}


# --------------------------------------------------------------------------
# process inspection
#
# Linux: read /proc directly, so neither the orchestrator's nor the runner's
# interpreter needs psutil.  Elsewhere: psutil.  USS = Private_Clean +
# Private_Dirty from smaps_rollup, which is what psutil reports as uss.
# --------------------------------------------------------------------------

_PROC = "/proc"
_HAVE_PROCFS = os.path.exists("/proc/self/smaps_rollup") or os.path.exists("/proc/self/stat")


def _read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


class _ProcInfo:
    """What we need to know about one process, via /proc or psutil."""

    __slots__ = ("pid",)

    def __init__(self, pid):
        self.pid = pid

    # -- /proc readers --------------------------------------------------
    def _stat_fields(self):
        raw = _read("%s/%d/stat" % (_PROC, self.pid))
        if raw is None:
            return None
        # the comm field is parenthesised and may contain spaces
        return raw[raw.rindex(")") + 2:].split()

    def ppid(self):
        if _HAVE_PROCFS:
            f = self._stat_fields()
            return int(f[1]) if f else None
        import psutil
        try:
            return psutil.Process(self.pid).ppid()
        except psutil.Error:
            return None

    def state(self):
        if _HAVE_PROCFS:
            f = self._stat_fields()
            return f[0] if f else None
        import psutil
        try:
            return "Z" if psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE else "R"
        except psutil.Error:
            return None

    def create_time(self):
        if _HAVE_PROCFS:
            f = self._stat_fields()
            if not f:
                return None
            return _boot_time() + int(f[19]) / os.sysconf("SC_CLK_TCK")
        import psutil
        try:
            return psutil.Process(self.pid).create_time()
        except psutil.Error:
            return None

    def cmdline(self):
        if _HAVE_PROCFS:
            raw = _read("%s/%d/cmdline" % (_PROC, self.pid), "rb")
            if raw is None:
                return ""
            return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
        import psutil
        try:
            return " ".join(psutil.Process(self.pid).cmdline())
        except psutil.Error:
            return ""

    def env_tag(self):
        """Value of TAG_ENV in the process's environment: '' if absent,
        None if the environment cannot be read."""
        if _HAVE_PROCFS:
            raw = _read("%s/%d/environ" % (_PROC, self.pid), "rb")
            if raw is None:
                return None
            key = (TAG_ENV + "=").encode()
            for item in raw.split(b"\0"):
                if item.startswith(key):
                    return item[len(key):].decode("utf-8", "replace")
            return ""
        import psutil
        try:
            return psutil.Process(self.pid).environ().get(TAG_ENV, "")
        except psutil.Error:
            return None

    def name(self):
        if _HAVE_PROCFS:
            comm = (_read("%s/%d/comm" % (_PROC, self.pid)) or "").strip()
            cmd = self.cmdline().split(" ")[0]
            base = os.path.basename(cmd)
            if len(comm) >= 15 and base.startswith(comm):
                return base
            return comm or base
        import psutil
        try:
            return psutil.Process(self.pid).name()
        except psutil.Error:
            return "?"

    def memory(self):
        """(uss or None, rss) in bytes, or None if the process is gone."""
        if _HAVE_PROCFS:
            raw = _read("%s/%d/smaps_rollup" % (_PROC, self.pid))
            if raw is not None:
                vals = {}
                for line in raw.splitlines()[1:]:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].endswith(":"):
                        vals[parts[0][:-1]] = int(parts[1]) * 1024
                if "Rss" in vals:
                    uss = vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0)
                    return uss, vals["Rss"]
            status = _read("%s/%d/status" % (_PROC, self.pid))
            if status is None:
                return None
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    return None, int(line.split()[1]) * 1024
            return None, 0  # kernel thread or zombie
        import psutil
        try:
            p = psutil.Process(self.pid)
            rss = p.memory_info().rss
            try:
                uss = p.memory_full_info().uss
            except (psutil.AccessDenied, AttributeError, NotImplementedError):
                uss = None
            return uss, rss
        except psutil.Error:
            return None


_BOOT = []


def _boot_time():
    if not _BOOT:
        for line in (_read("/proc/stat") or "").splitlines():
            if line.startswith("btime"):
                _BOOT.append(float(line.split()[1]))
                break
        else:
            _BOOT.append(0.0)
    return _BOOT[0]


def _all_pids():
    if _HAVE_PROCFS:
        return [int(d) for d in os.listdir(_PROC) if d.isdigit()]
    import psutil
    return psutil.pids()


def _descendants(root_pid):
    children = {}
    for pid in _all_pids():
        ppid = _ProcInfo(pid).ppid()
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    out, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        for c in children.get(pid, ()):
            out.append(c)
            stack.append(c)
    return out


def runtime_processes(root_pid, since, tag, patterns, exclude=()):
    """Pids of the driver tree rooted at root_pid plus any process created
    after `since` whose cmdline contains one of `patterns` and, where its
    environment is readable, carries our tag (Ray may reparent its daemons;
    concurrent unrelated runs are skipped thanks to the tag)."""
    excluded = set(exclude)
    pids = set()
    if _ProcInfo(root_pid).ppid() is not None:
        pids.add(root_pid)
        pids.update(_descendants(root_pid))
    for pid in _all_pids():
        if pid in pids or pid in excluded:
            continue
        info = _ProcInfo(pid)
        ctime = info.create_time()
        if ctime is None or ctime < since - 1.0:
            continue
        cmd = info.cmdline()
        if not any(p in cmd for p in patterns):
            continue
        env_tag = info.env_tag()
        if env_tag is not None and env_tag != tag:
            continue  # someone else's process (e.g. a concurrent test run)
        pids.add(pid)
    return sorted(pids)


def measure_memory(root_pid, since, tag, patterns, exclude=()):
    """Summed memory of the runtime's processes, in MB (1e6 bytes): USS, or
    RSS if USS cannot be read for some process."""
    total_uss = total_rss = 0
    metric = "uss"
    names = []
    for pid in runtime_processes(root_pid, since, tag, patterns, exclude):
        info = _ProcInfo(pid)
        mem = info.memory()
        if mem is None:
            continue
        uss, rss = mem
        if uss is None:
            metric = "rss"
        total_rss += rss
        total_uss += uss if uss is not None else rss
        names.append(info.name())
    value = total_uss if metric == "uss" else total_rss
    return {
        "memory_mb": value / 1e6,
        "metric": metric,
        "rss_mb": total_rss / 1e6,
        "n_processes": len(names),
        "process_names": sorted(names),
    }


def tagged_pids(tag, exclude=()):
    """Live (non-zombie) processes whose environment carries `tag`."""
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me or pid in exclude:
            continue
        info = _ProcInfo(pid)
        if info.env_tag() == tag and info.state() not in (None, "Z"):
            found.append(pid)
    return found


def reap_tagged(tag, grace=5.0, exclude=()):
    """Wait up to `grace` seconds for processes carrying `tag` (all started by
    one of our runners) to exit, then SIGTERM and finally SIGKILL them.
    Returns the number of processes that had to be signalled."""
    deadline = time.monotonic() + grace
    pids = tagged_pids(tag, exclude)
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = tagged_pids(tag, exclude)
    if not pids:
        return 0
    n = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + 3.0
        while pids and time.monotonic() < end:
            time.sleep(0.1)
            pids = tagged_pids(tag, exclude)
        if not pids:
            break
    return n
