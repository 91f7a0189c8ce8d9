"""``JobSubmissionClient.submit_job`` with a 20 MB local working_dir: new content (pack,
GET 404, PUT, the dashboard checks and unpacks) against the same content again (pack,
GET 200, nothing uploaded), interleaved over 7 rounds on one CLI cluster with a
dashboard; medians (``python benchmarks/job_upload.py``, from the repository root)."""

import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dash_cluster import DashCluster  # noqa: E402

from zray.job_submission import JobSubmissionClient  # noqa: E402


def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="zray-job-upload-"))
    c = DashCluster(tmp, workers=0)
    try:
        c.start()
        client = JobSubmissionClient(c.url, headers={"Authorization": f"Bearer {c.token()}"})
        wd = tmp / "wd"
        wd.mkdir()
        for i in range(20):
            (wd / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
        new, same = [], []
        for r in range(7):
            (wd / "stamp.txt").write_text(str(r))  # new content: a new package
            for out in (new, same):
                t = time.perf_counter()
                client.submit_job(entrypoint="true", runtime_env={"working_dir": str(wd)})
                out.append(time.perf_counter() - t)
        mn, ms = statistics.median(new), statistics.median(same)
        print(f"submit_job, new 20 MB working_dir: median {mn * 1000:.0f} ms; same content "
              f"again: median {ms * 1000:.0f} ms; ratio {mn / ms:.2f}x")
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
