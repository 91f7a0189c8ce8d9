"""User metrics (zray.util.metrics, Ray's API) from tasks, actors and the driver,
and the built-in cluster metrics, as Prometheus text on the dashboard's /metrics.

    zray broker / zray worker x2 / zray dashboard      (tests/dash_cluster.py)
    tasks and an actor record Counter / Gauge / Histogram with tags
    GET /metrics  ->  ray_<name>{tags} values summed over the processes
"""

import importlib
import os
import re

import pytest
from conftest import poll_until
from dash_cluster import DashCluster

import zray
from zray.util.metrics import Counter, Gauge, Histogram

BACKEND = os.environ.get("ZRAY_TEST_BACKEND", "zray")


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    c = DashCluster(tmp_path_factory.mktemp("metrics"))
    try:
        c.start()
        c.connect()
        yield c
    finally:
        c.stop()


def sample(text: str, name: str, **labels):
    """The value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == {k: str(v) for k, v in labels.items()}:
            return float(m.group(3))
    return None


@zray.remote
def work(n, queue):
    done = Counter("items_done", description="Items processed", tag_keys=("queue",))
    done.inc(n, tags={"queue": queue})
    lat = Histogram("item_seconds", description="Time per item", boundaries=[0.1, 1.0],
                    tag_keys=("queue",)).set_default_tags({"queue": queue})
    for v in (0.05, 0.5, 5.0):
        lat.observe(v)
    return os.getpid()


@zray.remote
class Pool:
    def __init__(self):
        self.size = Gauge("pool_size", description="Workers in the pool", tag_keys=("pool",))

    def resize(self, n):
        self.size.set(n, tags={"pool": "main"})
        return n


@pytest.mark.timeout(120)
def test_user_metrics_from_tasks_and_actors_reach_metrics(dash):
    zray.get([work.remote(3, "a"), work.remote(4, "a"), work.remote(1, "b")], timeout=60)
    pool = Pool.remote()
    assert zray.get(pool.resize.remote(7), timeout=60) == 7
    Counter("driver_events").inc()

    def scraped():
        text = dash.text("/metrics")
        ok = (sample(text, "ray_items_done_total", queue="a") == 7
              and sample(text, "ray_items_done_total", queue="b") == 1
              and sample(text, "ray_pool_size", pool="main") == 7
              and sample(text, "ray_item_seconds_count", queue="a") == 6
              and sample(text, "ray_driver_events_total") == 1)
        return text if ok else None

    text = poll_until(scraped, 60, interval=0.3, what="user metrics on /metrics")
    assert "# HELP ray_items_done_total Items processed" in text
    assert sample(text, "ray_item_seconds_bucket", queue="a", le="0.1") == 2
    assert sample(text, "ray_item_seconds_bucket", queue="a", le="1.0") == 4
    assert sample(text, "ray_item_seconds_bucket", queue="a", le="+Inf") == 6
    assert sample(text, "ray_item_seconds_sum", queue="a") == pytest.approx(2 * 5.55)
    assert zray.get(pool.resize.remote(2), timeout=60) == 2
    poll_until(lambda: sample(dash.text("/metrics"), "ray_pool_size", pool="main") == 2, 60,
               interval=0.3, what="the gauge's new value")
    zray.kill(pool)


@zray.remote
def noop():
    return None


@zray.remote
def hold(path):
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_builtin_cluster_metrics(dash, tmp_path):
    assert zray.get([noop.remote() for _ in range(3)], timeout=60) == [None] * 3
    flag = str(tmp_path / "go")
    ref = hold.remote(flag)
    try:
        def running():
            text = dash.text("/metrics")
            return text if sample(text, "ray_tasks", State="RUNNING") == 1 else None

        text = poll_until(running, 60, interval=0.2, what="a RUNNING task on /metrics")
        assert sample(text, "ray_cluster_active_nodes") == 2
        nodes = [n["NodeID"] for n in zray.nodes()]
        for node in nodes:
            assert sample(text, "ray_executors", NodeId=node) >= 1
            assert sample(text, "ray_object_store_memory", NodeId=node) is not None
            assert sample(text, "ray_spill_manager_spilled_bytes", NodeId=node) == 0
        assert sample(text, "ray_scheduler_queue_depth") is not None
        assert sample(text, "ray_tasks", State="FINISHED") >= 3
    finally:
        open(flag, "w").close()
    zray.get(ref, timeout=60)


@pytest.mark.timeout(60)
def test_broker_checks_metric_reports(dash):
    from zray import _runtime
    from zray._client import Client

    client = _runtime.client
    bad = [
        ([["bad name", "counter", "", [], [], []]], "bad metric name"),
        ([["m", "summary", "", [], [], []]], "kind"),
        ([["m", "counter", "", ["k"], [[["a", "b"], 1]], []]], "tag values"),
        ([["m", "counter", "", [], [[[], "one"]], []]], "number"),
        ([["h", "histogram", "", [], [[[], [[1], 0.5]]], [1.0]]], "histogram"),
        ("nope", "list"),
    ]
    for series, why in bad:
        with pytest.raises(ValueError, match=why):
            client.request("metrics_report", {"series": series})
    cli = Client(dash.address, kind="cli", connect_timeout=10)
    try:
        with pytest.raises(ValueError, match="only drivers and executors"):
            cli.request("metrics_report", {"series": []})
    finally:
        cli.close()
    assert "ray_tasks" in dash.text("/metrics")  # the dashboard still serves


def test_metric_api_errors_as_in_ray():
    """The errors Ray raises, by type and message (ZRAY_TEST_BACKEND=ray checks them on
    Ray: ``python -m pytest tests/test_metrics.py -k as_in_ray``)."""
    m = importlib.import_module(f"{BACKEND}.util.metrics")
    with pytest.raises(TypeError, match="tuple"):
        m.Counter("c1", tag_keys=["a"])
    with pytest.raises(ValueError, match="Empty name"):
        m.Gauge("")
    c = m.Counter("c2", tag_keys=("a",))
    with pytest.raises(ValueError, match=">0"):
        c.inc(0, tags={"a": "x"})
    with pytest.raises(ValueError, match="Missing value for tag key"):
        c.inc(1)
    with pytest.raises(TypeError, match="Tag values must be str"):
        c.inc(1, tags={"a": 3})
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        c.set_default_tags({"zz": "1"})
    with pytest.raises(ValueError, match="boundaries argument should be provided"):
        m.Histogram("h1")
    with pytest.raises(ValueError, match="positive"):
        m.Histogram("h2", boundaries=[0, 1])
    assert c.set_default_tags({"a": "x"}) is c


@pytest.mark.skipif(BACKEND == "ray", reason="Ray warns and drops these")
def test_zray_refuses_what_ray_would_drop():
    # Ray warns and discards a metric with a bad name, records a tag it was not told
    # of, and lets a name be defined again as another kind: zray says so instead.
    with pytest.raises(ValueError, match="Invalid metric name"):
        Gauge("no spaces")
    c = Counter("c3", tag_keys=("a",))
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        c.inc(1, tags={"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="already defined"):
        Gauge("c3")
    assert c.info["tag_keys"] == ("a",)
