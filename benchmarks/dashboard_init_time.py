"""init() time with and without include_dashboard=True: 7 fresh driver processes
each, interleaved, medians (``python benchmarks/dashboard_init_time.py``)."""

import statistics
import subprocess
import sys

code = r'''
import time, sys, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
import zray
t = time.perf_counter()
zray.init(num_cpus=1, **({"include_dashboard": True, "dashboard_port": port} if sys.argv[1] == "1" else {}))
dt = time.perf_counter() - t
zray.shutdown()
print(dt)
'''
res = {"0": [], "1": []}
for i in range(7):
    for mode in (("0", "1") if i % 2 else ("1", "0")):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        res[mode].append(float(out.stdout.strip().splitlines()[-1]))
for m, name in (("0", "without"), ("1", "include_dashboard=True")):
    print(name, "median init() %.3f s" % statistics.median(res[m]), [round(x, 3) for x in res[m]])
print("ratio %.2f" % (statistics.median(res["1"]) / statistics.median(res["0"])))
