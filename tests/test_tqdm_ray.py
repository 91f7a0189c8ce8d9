"""Progress bars from remote tasks, drawn by the driver (zray.experimental.tqdm_ray):
three tasks run bars at once and print lines meanwhile; the driver shows one bar
per task that reaches its total, the printed lines intact, and none of the
bars' state lines."""

import re
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import time
    import zray
    from zray.experimental.tqdm_ray import tqdm

    zray.init(num_cpus=3)

    @zray.remote
    def work(i):
        for k in tqdm(range(40), desc=f"task{i}", flush_interval_s=0):
            time.sleep(0.01)
            if k == 20:
                print(f"halfway in task {i}")
        return i

    @zray.remote
    class Loader:
        def load(self):
            bar = tqdm(total=5, desc="loader", unit="file")
            for _ in range(5):
                bar.update(1)
            bar.close()
            return "loaded"

    assert sorted(zray.get([work.remote(i) for i in range(3)], timeout=120)) == [0, 1, 2]
    assert zray.get(Loader.remote().load.remote(), timeout=60) == "loaded"
    local = tqdm(range(7), desc="driver-bar")
    assert sum(local) == 21
    print("DONE", flush=True)
""")


@pytest.mark.timeout(180)
def test_bars_from_parallel_tasks_render_on_the_driver(run_driver):
    out = run_driver(SCRIPT, timeout=150)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "__zray_tqdm__" not in out.stdout + out.stderr
    for i in range(3):
        assert re.search(rf"\(work pid=\d+\) task{i}: 100%.*40/40", out.stderr), out.stderr[-3000:]
    assert re.search(r"loader: 100%.*5/5", out.stderr), out.stderr[-3000:]
    assert re.search(r"driver-bar: 100%.*7/7", out.stderr), out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if "halfway" in ln]
    assert len(lines) == 3, out.stdout
    for ln in lines:  # whole lines, not cut by a bar's redraw
        assert re.fullmatch(r"\(work pid=\d+\) halfway in task \d", ln), repr(ln)
    assert out.stdout.rstrip().endswith("DONE")


def test_bad_arguments_are_refused():
    from zray.experimental.tqdm_ray import tqdm

    with pytest.raises(ValueError, match="total"):
        tqdm(total=-1)
    with pytest.raises(ValueError, match="flush_interval_s"):
        tqdm(total=1, flush_interval_s=-2)
    bar = tqdm(total=3, desc="no-iterable")
    with pytest.raises(ValueError, match="No iterable"):
        list(bar)
    bar.close()
