"""``zray list|get|summary|timeline``: the state API (``zray.util.state``) and the
timeline on the command line, as tables (``--format json`` for scripts).

    zray list tasks -f state=RUNNING -f "name!=f" --limit 50 --detail
    zray get actors 3b5eb7419b4f28130a000000
    zray summary tasks
    zray timeline --output trace.json      (Chrome trace: chrome://tracing, Perfetto)

Registered on the ``zray`` group by ``zray.cli`` through ``add_commands``.
"""

from __future__ import annotations

import json
import os
import warnings

import click

LIST_RESOURCES = ("tasks", "actors", "nodes", "objects", "jobs", "placement-groups", "workers",
                  "cluster-events", "runtime-envs")
GET_RESOURCES = ("tasks", "actors", "nodes", "objects", "workers", "jobs", "placement-groups")
SUMMARY_RESOURCES = ("tasks", "actors", "objects")
FORMATS = ("default", "table", "json")


def _parse_filter(text: str) -> tuple:
    """"key=value" or "key!=value" (Ray's ``--filter`` form)."""
    for op in ("!=", "="):
        key, sep, value = text.partition(op)
        if sep and key.strip():
            return key.strip(), op, value.strip()
    raise click.BadParameter(f"{text!r} is not key=value or key!=value", param_hint="--filter")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    return str(v)


def format_table(rows: list, width: int = 60) -> str:
    """Rows of dicts as aligned columns (cells cut at ``width`` characters)."""
    if not rows:
        return "(none)"
    cols = list(rows[0])
    cells = [[_cell(r.get(c))[:width] for c in cols] for r in rows]
    widths = [max([len(c.upper())] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def _call(fn, key_file, **kwargs):
    """Run a state API call; connection and argument errors are one line, warnings go to
    stderr as "WARNING: ..."."""
    from zray.util.state import RayStateApiException

    if key_file:
        if not os.path.isfile(key_file):
            raise click.BadParameter(f"no key file at {key_file}", param_hint="--key-file")
        os.environ["ZRAY_KEY_FILE"] = os.path.abspath(key_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(**kwargs)
        except (ConnectionError, PermissionError, ValueError, TypeError,
                RayStateApiException) as e:
            raise click.ClickException(str(e)) from None
    for w in caught:
        click.echo(f"WARNING: {w.message}", err=True)
    return result


def add_commands(main: click.Group, cluster_options) -> None:
    """Add list, get, summary and timeline to the ``zray`` command group."""

    @main.command("list")
    @click.argument("resource", type=click.Choice(LIST_RESOURCES))
    @cluster_options
    @click.option("--filter", "-f", "filters", multiple=True,
                  help='"key=value" or "key!=value"; repeat to require several.')
    @click.option("--limit", default=100, show_default=True, type=int,
                  help="At most this many rows.")
    @click.option("--detail", is_flag=True, help="Every column.")
    @click.option("--format", "fmt", default="default", type=click.Choice(FORMATS),
                  show_default=True)
    @click.option("--timeout", default=30, show_default=True, type=float,
                  help="Seconds to wait for the broker.")
    def list_cmd(resource, address, key_file, filters, limit, detail, fmt, timeout):
        """List tasks, actors, nodes, objects, jobs, placement groups, workers, cluster
        events or runtime envs of a running cluster."""
        from zray.util import state

        fn = getattr(state, "list_" + resource.replace("-", "_"))
        rows = _call(fn, key_file, address=address,
                     filters=[_parse_filter(f) for f in filters], limit=limit, detail=detail,
                     timeout=timeout, raise_on_missing_output=False)
        if fmt == "json":
            _echo_json(rows)
            return
        click.echo(format_table(rows))
        click.echo(f"\n{len(rows)} {resource} shown")

    @main.command("get")
    @click.argument("resource", type=click.Choice(GET_RESOURCES))
    @click.argument("id")
    @cluster_options
    @click.option("--format", "fmt", default="default", type=click.Choice(FORMATS),
                  show_default=True)
    @click.option("--timeout", default=30, show_default=True, type=float,
                  help="Seconds to wait for the broker.")
    def get_cmd(resource, id, address, key_file, fmt, timeout):
        """Every field of one task, actor, node, object, worker, job or placement group, by
        its hex id."""
        from zray.util import state

        if resource == "objects":
            rows = _call(state.list_objects, key_file, address=address,
                         filters=[("object_id", "=", id)], detail=True, timeout=timeout)
            found = rows[0] if rows else None
        else:
            found = _call(getattr(state, "get_" + resource[:-1].replace("-", "_")), key_file, id=id,
                          address=address, timeout=timeout)
        if found is None:
            raise click.ClickException(f"no {resource[:-1]} with id {id}")
        if fmt == "json":
            _echo_json(found)
            return
        width = max(len(k) for k in found)
        for k, v in found.items():
            click.echo(f"{k.ljust(width)}  {_cell(v)}")

    @main.command("summary")
    @click.argument("resource", type=click.Choice(SUMMARY_RESOURCES))
    @cluster_options
    @click.option("--format", "fmt", default="default", type=click.Choice(FORMATS),
                  show_default=True)
    @click.option("--timeout", default=30, show_default=True, type=float,
                  help="Seconds to wait for the broker.")
    def summary_cmd(resource, address, key_file, fmt, timeout):
        """Tasks by function, actors by class, objects by call site, with counts per state."""
        from zray.util import state

        out = _call(getattr(state, "summarize_" + resource), key_file,
                    address=address, timeout=timeout, raise_on_missing_output=False)
        if fmt == "json":
            _echo_json(out)
            return
        cluster = out["cluster"]
        rows = []
        for name, g in cluster["summary"].items():
            row = {"name": name}
            row.update({k: v for k, v in g.items() if k not in ("func_or_class_name",
                                                                "class_name")})
            rows.append(row)
        click.echo(format_table(rows, width=200))
        totals = {k: v for k, v in cluster.items() if k != "summary"}
        click.echo("\n" + "  ".join(f"{k}: {_cell(v)}" for k, v in totals.items()))

    @main.command("timeline")
    @cluster_options
    @click.option("--output", "-o", "output", default=None, type=click.Path(dir_okay=False),
                  help="File to write (default: zray-timeline-<time>.json here).")
    def timeline_cmd(address, key_file, output):
        """Write the task timeline as a Chrome trace (open it in chrome://tracing or
        https://ui.perfetto.dev)."""
        import time

        from zray._api import _trace_events

        moves = _call(_timeline_moves, key_file, address=address)
        events = _trace_events(moves)
        path = output or time.strftime("zray-timeline-%Y%m%d-%H%M%S.json")
        with open(path, "w") as f:
            json.dump(events, f)
        click.echo(f"{len(events)} task runs written to {path}")


def _timeline_moves(address=None):
    from zray.util.state.api import _request

    return _request(address, "timeline", {}, 30)
