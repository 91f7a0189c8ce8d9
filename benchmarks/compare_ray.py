#!/usr/bin/env python3
"""Compare zray with Ray on the same Ray Core workloads.

Each backend runs in its own fresh subprocess (benchmarks/_runner.py), never
in this process and never in the same process as the other backend:

  * startup, startup_init_only, idle_memory_mb: one fresh process per repeat
    (and per backend, alternating ray/zray);
  * every other case: one runner process per backend that calls init() once
    and runs the selected cases one after another, each as a warm-up followed
    by --repeat timed trials of --duration seconds.  If a case hangs past
    --timeout, its runner is killed and a new one continues with the rest.

Examples:
    python benchmarks/compare_ray.py                       # both, all cases
    python benchmarks/compare_ray.py --backend ray --large-mb 200
    python benchmarks/compare_ray.py --filter actor --repeat 5 --json out.json
    python benchmarks/compare_ray.py --list

Ratio column: > 1 always means zray is better.  It is zray/Ray for rates
(higher is better) and Ray/zray for startup times and memory (lower is better).
Ray itself is optional: if it cannot be imported by --ray-python only zray is
shown.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _cases  # noqa: E402
from _cases import (  # noqa: E402
    CASES,
    MARK,
    PROC_PATTERNS,
    TAG_ENV,
    measure_memory,
    reap_tagged,
)

REPO_ROOT = os.path.dirname(HERE)
RUNNER = os.path.join(HERE, "_runner.py")
DEFAULT_RAY_PYTHON = "/work/rayvenv/bin/python"
LABEL = {"ray": "Ray", "zray": "zray"}

def _can_measure_here():
    """Memory is measured from this process (no perturbation of the driver)
    via /proc on Linux or psutil elsewhere; failing both, the runner measures
    itself."""
    if _cases._HAVE_PROCFS:
        return True
    try:
        import psutil  # noqa: F401
        return True
    except ImportError:
        return False


MEASURE_HERE = _can_measure_here()


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------
# runner subprocess handling
# --------------------------------------------------------------------------

class RunnerTimeout(Exception):
    pass


class Runner:
    """One _runner.py subprocess, in its own session, with a tagged env."""

    def __init__(self, python, backend, extra):
        self.backend = backend
        self.tag = uuid.uuid4().hex
        self.since = time.time()
        env = dict(os.environ)
        env[TAG_ENV] = self.tag
        env["ZRAY_BENCH_SINCE"] = repr(self.since)
        env["PYTHONUNBUFFERED"] = "1"
        # init() without an address must start a private local cluster, not
        # join one named by the caller's environment.
        env.pop("RAY_ADDRESS", None)
        self.stderr = tempfile.TemporaryFile()
        self.noise = []  # last non-marker stdout lines
        self.proc = subprocess.Popen(
            [python, RUNNER, "--backend", backend] + extra,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env=env, cwd=REPO_ROOT, start_new_session=True,
            text=True, bufsize=1,
        )
        self.events = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                if line.startswith(MARK):
                    try:
                        self.events.put(json.loads(line[len(MARK):]))
                    except ValueError:
                        pass
                else:
                    self.noise = (self.noise + [line.rstrip()])[-20:]
        finally:
            self.events.put(None)  # EOF

    def next_event(self, timeout):
        """Next JSON event; None at EOF; raises RunnerTimeout."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise RunnerTimeout() from None

    def send(self, line):
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def why_dead(self):
        """A short reason for an unexpected exit: return code + stderr tail."""
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
        # the last line that looks like an error, if any (runtimes log a lot)
        last = next((t.strip() for t in reversed(text[-50:])
                     if "Error" in t or "Exception" in t or "Killed" in t), "")
        return "runner died (exit code %s)%s" % (rc, ": " + last[:200] if last else "")

    def close(self, kill=False):
        if kill and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        # Anything the runtime left behind (it carries our tag) goes too, so
        # it cannot disturb the next measurement.
        n = reap_tagged(self.tag, grace=5.0, exclude=(os.getpid(),))
        if n:
            log("  (reaped %d leftover %s process(es))" % (n, self.backend))
        self.stderr.close()


def check_backend(python, backend):
    """(ok, info-dict or error string)."""
    if not python or not os.path.exists(python):
        return False, "python not found: %s" % python
    try:
        r = Runner(python, backend, ["--check"])
    except OSError as exc:
        return False, "cannot start %s: %s" % (python, exc)
    try:
        ev = r.next_event(120)
    except RunnerTimeout:
        r.close(kill=True)
        return False, "import %s timed out after 120 s" % backend
    if ev is None:
        err = r.why_dead()
        r.close()
        return False, err
    r.close()
    if ev.get("ok"):
        return True, ev
    return False, ev.get("error", "unknown error")


def run_startup_once(python, backend, args, want_memory):
    """One fresh process: startup figures and (optionally) idle memory."""
    extra = ["--startup", "--num-cpus", str(args.num_cpus)]
    if want_memory:
        extra += ["--hold", "--settle", str(args.settle)]
    r = Runner(python, backend, extra)
    out = {}
    kill = False
    try:
        ev = r.next_event(args.init_timeout)
        if ev is None:
            return {"error": r.why_dead(), "fatal": True}
        if ev.get("event") == "fatal":
            return {"error": ev["error"], "fatal": True}
        out.update({k: ev[k] for k in ("startup_s", "init_s", "import_s", "first_task_s")})
        if want_memory:
            ev = r.next_event(args.settle + args.timeout)
            if ev is None or ev.get("event") != "ready":
                out["memory_error"] = r.why_dead() if ev is None else "unexpected %s" % ev
                return out
            if MEASURE_HERE:
                try:
                    out["memory"] = measure_memory(r.proc.pid, r.since, r.tag,
                                                   PROC_PATTERNS[backend],
                                                   exclude=(os.getpid(),))
                except Exception as exc:
                    out["memory_error"] = "%s: %s" % (type(exc).__name__, exc)
                r.send("go")
            else:
                r.send("measure")
                ev = r.next_event(args.timeout)
                if ev and ev.get("event") == "memory" and "error" not in ev:
                    out["memory"] = {k: v for k, v in ev.items() if k != "event"}
                else:
                    out["memory_error"] = (ev or {}).get("error", "no memory report")
        ev = r.next_event(args.timeout)
        if ev and ev.get("event") == "done":
            out["shutdown_s"] = ev["shutdown_s"]
    except RunnerTimeout:
        kill = True
        if "startup_s" not in out:
            out["error"] = "no first task result within %g s" % args.init_timeout
            out["fatal"] = True
        elif want_memory and "memory" not in out:
            out["memory_error"] = "timeout after %g s" % args.timeout
    finally:
        r.close(kill=kill)
    return out


def run_steady(python, backend, names, args):
    """Run steady-state cases; returns {case: {"values": [...]} | {"error": str}}."""
    results = {}
    remaining = list(names)
    common = ["--num-cpus", str(args.num_cpus), "--repeat", str(args.repeat),
              "--duration", str(args.duration), "--warmup", str(args.warmup),
              "--large-mb", str(args.large_mb)]
    while remaining:
        r = Runner(python, backend, common + ["--cases", ",".join(remaining)])
        kill = False
        current = None
        inited = False
        try:
            ev = r.next_event(args.init_timeout)
            if ev is None or ev.get("event") == "fatal":
                err = r.why_dead() if ev is None else ev["error"]
                err = "init failed: " + err
                for n in remaining:
                    results[n] = {"error": err}
                log("  %s: %s" % (backend, err))
                remaining = []
                break
            inited = True
            case_t0 = time.monotonic()
            limit = args.timeout
            while remaining:
                if current is None:
                    ev = r.next_event(args.timeout)
                else:
                    ev = r.next_event(max(0.0, case_t0 + limit - time.monotonic()))
                if ev is None:
                    if current is not None:
                        results[current] = {"error": r.why_dead()}
                        log("  %-40s error: %s" % (current, results[current]["error"]))
                        remaining.remove(current)
                    else:
                        err = r.why_dead()
                        for n in remaining:
                            results[n] = {"error": err}
                        remaining = []
                    break
                kind = ev.get("event")
                if kind == "start":
                    current = ev["case"]
                    case_t0 = time.monotonic()
                    # setup + first call must finish sooner than the whole case,
                    # so that an unimplemented feature that hangs costs little
                    limit = min(args.first_call_timeout, args.timeout)
                elif kind == "warm":
                    limit = args.timeout
                elif kind in ("result", "error"):
                    name = ev["case"]
                    if kind == "result":
                        results[name] = {"values": ev["values"], "setup_s": ev.get("setup_s")}
                        log("  %-40s %s" % (name, fmt_cell(summary(ev["values"]))))
                    else:
                        results[name] = {"error": ev["error"], "trace": ev.get("trace")}
                        log("  %-40s error: %s" % (name, ev["error"]))
                    if name in remaining:
                        remaining.remove(name)
                    current = None
                elif kind == "finished":
                    break
        except RunnerTimeout:
            kill = True
            if current is None:
                # a hang in init() or between cases: give up on the rest
                err = ("timeout after %g s between cases" % args.timeout if inited
                       else "init() + first task timed out after %g s" % args.init_timeout)
                for n in remaining:
                    results[n] = {"error": err}
                log("  %s: %s" % (backend, err))
                remaining = []
            else:
                if limit < args.timeout:
                    err = "setup + first call timed out after %g s" % limit
                else:
                    err = "timeout after %g s" % limit
                results[current] = {"error": err}
                log("  %-40s error: %s" % (current, err))
                remaining.remove(current)
        finally:
            r.close(kill=kill)
    return results


# --------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------

def fmt3(x):
    """x with 3 significant digits, never in exponent notation."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    digits = 2 - int(math.floor(math.log10(abs(x))))
    r = round(x, digits)
    if digits > 0:
        return "%.*f" % (digits, r)
    return "%d" % int(r)


def summary(values):
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def fmt_cell(s):
    if s is None:
        return "-"
    if s["n"] == 1:
        return fmt3(s["median"])
    return "%s [%s-%s]" % (fmt3(s["median"]), fmt3(s["min"]), fmt3(s["max"]))


def short(err, width=48):
    err = " ".join(str(err).split())
    text = "error: " + err
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(rows, backends, with_ratio):
    head = ["case", "unit"] + [LABEL[b] + " median [min-max]" for b in backends]
    if with_ratio:
        head.append("ratio (>1 = zray better)")
    lines = [head] + rows
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        cells = [str(c).ljust(widths[j]) if j < 2 else str(c).rjust(widths[j])
                 for j, c in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def _loadavg():
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def select_cases(filt):
    if not filt:
        return list(CASES)
    subs = [s.strip() for s in filt.split(",") if s.strip()]
    return [c for c in CASES if any(s in c["name"] for s in subs)]


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark zray against Ray, each in its own subprocess.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="ratio > 1 means zray is better: zray/Ray for rates, "
               "Ray/zray for startup times and memory.")
    p.add_argument("--backend", choices=("ray", "zray", "both"), default="both")
    p.add_argument("--ray-python",
                   default=DEFAULT_RAY_PYTHON if os.path.exists(DEFAULT_RAY_PYTHON)
                   else sys.executable,
                   help="interpreter with Ray installed (default: %(default)s)")
    p.add_argument("--zray-python", default=sys.executable,
                   help="interpreter for zray (default: %(default)s)")
    p.add_argument("--filter", default="",
                   help="only cases whose name contains this substring "
                        "(comma-separated alternatives allowed)")
    p.add_argument("--repeat", type=int, default=3,
                   help="fresh processes for startup cases / timed trials for the "
                        "others; the median and min-max are reported (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the steady cases this many times, alternating the backends "
                        "(ray, zray, zray, ray, ...), each round a fresh runner; medians "
                        "are over every trial of every round, so load that drifts during "
                        "the run hits both backends alike (default 1)")
    p.add_argument("--duration", type=float, default=1.0,
                   help="seconds per timed trial (default 1.0)")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="warm-up seconds per case, after at least one call (default 0.5)")
    p.add_argument("--large-mb", type=int, default=800,
                   help="size in MiB of the array for put/get_gigabytes (default 800)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds allowed for a whole case (default 120)")
    p.add_argument("--init-timeout", type=float, default=60.0,
                   help="seconds allowed for import + init() + one tiny task (default 60)")
    p.add_argument("--first-call-timeout", type=float, default=30.0,
                   help="seconds allowed for a case's setup and first call (default 30)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="idle seconds after the first task before measuring memory")
    p.add_argument("--num-cpus", type=int, default=2, help="init(num_cpus=N) (default 2)")
    p.add_argument("--json", metavar="OUT", help="also write all results to this file")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for c in CASES:
            ray_name = "  [ray: %s]" % c["ray_name"] if c["ray_name"] else ""
            print("%-40s %-9s %s%s" % (c["name"], c["unit"], c["desc"], ray_name))
        return 0
    cases = select_cases(args.filter)
    if not cases:
        log("no case matches --filter %r (see --list)" % args.filter)
        return 2

    pythons = {"ray": shutil.which(args.ray_python) or args.ray_python,
               "zray": shutil.which(args.zray_python) or args.zray_python}
    wanted = ["ray", "zray"] if args.backend == "both" else [args.backend]
    t_start = time.time()
    load_start = _loadavg()
    status = 0
    checks, unavailable = {}, {}
    for b in wanted:
        ok, info = check_backend(pythons[b], b)
        if ok:
            checks[b] = info
            log("%s %s (%s, python %s)" % (LABEL[b], info["version"], info["file"],
                                           info["python"]))
        else:
            unavailable[b] = info
            if b == "ray" and args.backend == "both":
                log("note: Ray is not importable with %s (%s); showing zray only."
                    % (pythons[b], info))
            else:
                log("error: %s is not usable with %s: %s" % (b, pythons[b], info))
                status = 1
    if args.backend == "both" and "ray" in unavailable:
        backends = ["zray"]
    else:
        backends = wanted
    runnable = [b for b in backends if b in checks]
    if not runnable:
        return status or 1

    results = {b: {} for b in backends}
    for b in backends:
        if b in unavailable:
            for c in cases:
                results[b][c["name"]] = {"error": "not importable (see note above)",
                                         "detail": unavailable[b]}

    startup_rows = [c["name"] for c in cases if c["phase"] == "startup"]
    steady_rows = [c["name"] for c in cases if c["phase"] == "steady"]
    startup_raw = {b: [] for b in runnable}

    if startup_rows:
        want_memory = "idle_memory_mb" in startup_rows
        gave_up = set()
        for i in range(args.repeat):
            for b in runnable:
                if b in gave_up:
                    continue
                log("[startup %d/%d] %s" % (i + 1, args.repeat, LABEL[b]))
                rec = run_startup_once(pythons[b], b, args, want_memory)
                startup_raw[b].append(rec)
                if "error" in rec:
                    log("  error: %s" % rec["error"])
                    if rec.get("fatal"):
                        gave_up.add(b)  # deterministic failure or hang: skip repeats
                else:
                    mem = rec.get("memory", {}).get("memory_mb")
                    log("  startup %.3f s, init %.3f s%s" % (
                        rec["startup_s"], rec["init_s"],
                        ", idle memory %.1f MB" % mem if mem is not None else ""))
        for b in runnable:
            recs = startup_raw[b]
            errors = [r["error"] for r in recs if "error" in r]
            ok = [r for r in recs if "error" not in r]
            for row, key in (("startup", "startup_s"), ("startup_init_only", "init_s")):
                if row in startup_rows:
                    vals = [r[key] for r in ok]
                    results[b][row] = {"values": vals} if vals else {"error": errors[0]}
            if "idle_memory_mb" in startup_rows:
                vals = [r["memory"]["memory_mb"] for r in ok if "memory" in r]
                merrs = [r.get("memory_error") for r in ok if "memory" not in r] + errors
                results[b]["idle_memory_mb"] = (
                    {"values": vals, "detail": [r["memory"] for r in ok if "memory" in r]}
                    if vals else {"error": merrs[0] if merrs else "not measured"})

    if steady_rows:
        for rnd in range(max(1, args.rounds)):
            for b in (runnable if rnd % 2 == 0 else runnable[::-1]):
                log("[steady cases, round %d/%d] %s" % (rnd + 1, max(1, args.rounds), LABEL[b]))
                for name, res in run_steady(pythons[b], b, steady_rows, args).items():
                    prev = results[b].get(name)
                    if prev is not None and prev.get("values") and res.get("values"):
                        prev["values"] = prev["values"] + res["values"]
                    elif prev is None or not prev.get("values"):
                        results[b][name] = res

    # ---- table ----
    with_ratio = len(backends) == 2
    rows = []
    for c in cases:
        name = c["name"]
        row = [name, c["unit"]]
        sums = {}
        for b in backends:
            res = results[b].get(name, {"error": "not run"})
            if res.get("values"):
                sums[b] = summary(res["values"])
                res["summary"] = sums[b]
                row.append(fmt_cell(sums[b]))
            else:
                row.append(short(res.get("error", "no data")))
        if with_ratio:
            if "ray" in sums and "zray" in sums and sums["ray"]["median"] and sums["zray"]["median"]:
                r, z = sums["ray"]["median"], sums["zray"]["median"]
                if c["better"] == "higher":
                    row.append("%s (zray/Ray)" % fmt3(z / r))
                else:
                    row.append("%s (Ray/zray)" % fmt3(r / z))
            else:
                row.append("-")
        rows.append(row)

    elapsed = time.time() - t_start
    load_end = _loadavg()
    print()
    print("zray vs Ray - %d CPU(s), %s, init(num_cpus=%d), repeat=%d, trial=%gs, "
          "large object=%d MiB" % (os.cpu_count() or 0, platform.machine(), args.num_cpus,
                                   args.repeat, args.duration, args.large_mb))
    for b in backends:
        if b in checks:
            print("  %-4s %s  python %s (%s)" % (LABEL[b], checks[b]["version"],
                                                 checks[b]["python"], pythons[b]))
    print()
    print(render_table(rows, backends, with_ratio))
    print()
    if args.rounds > 1:
        print("median [min-max] over %d fresh processes (startup rows) or %d timed trials "
              "in each of %d rounds alternating the backends (other rows)."
              % (args.repeat, args.repeat, args.rounds))
    else:
        print("median [min-max] over %d fresh processes (startup rows) or %d timed trials "
              "in one process (other rows)." % (args.repeat, args.repeat))
    if with_ratio:
        print("ratio > 1 means zray is better: zray/Ray for rates, Ray/zray for "
              "startup times and memory.")
    if "idle_memory_mb" in startup_rows:
        metric = "USS"
        for b in runnable:
            for d in results[b].get("idle_memory_mb", {}).get("detail", []):
                if d.get("metric") == "rss":
                    metric = "RSS (USS unavailable)"
        print("idle_memory_mb: summed %s of the driver's process tree plus runtime "
              "processes it started (MB = 1e6 bytes)." % metric)
        for b in runnable:
            det = results[b].get("idle_memory_mb", {}).get("detail")
            if det:
                counts = collections.Counter(det[-1]["process_names"])
                print("  %s: %d processes: %s" % (
                    LABEL[b], det[-1]["n_processes"],
                    ", ".join(n if k == 1 else "%s x%d" % (n, k)
                              for n, k in sorted(counts.items()))))
    print("total wall time %.0f s; 1-min load average %s at start, %s at end "
          "(other work on the machine skews the figures)"
          % (elapsed, fmt3(load_start), fmt3(load_end)))

    if args.json:
        doc = {
            "meta": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cpu_count": os.cpu_count(), "machine": platform.machine(),
                "platform": platform.platform(), "args": vars(args),
                "backends": {b: checks.get(b, {"error": unavailable.get(b)})
                             for b in backends},
                "elapsed_s": elapsed, "loadavg_start": load_start, "loadavg_end": load_end,
            },
            "cases": {c["name"]: {k: c[k] for k in ("unit", "better", "ray_name", "desc")}
                      for c in cases},
            "results": results,
            "startup_runs": startup_raw,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        log("results written to %s" % args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
