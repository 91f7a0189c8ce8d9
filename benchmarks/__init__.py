"""zray's benchmarks: Ray's microbenchmark cases, run on zray or side by side with Ray.

- ``workloads.py``: the cases (catalogue, workloads, timing), shared by both;
- ``microbenchmark.py``: ``zray microbenchmark``, the cases on zray alone;
- ``compare_ray.py``: the cases on Ray and zray, each in its own interpreter
  (``_runner.py``), with ``_cases.py`` loading workloads.py by path.
"""
