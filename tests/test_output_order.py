"""A line an actor method prints before it returns reaches the driver before the
method's result: on the driver's terminal it comes before what the driver prints on
getting that result, and a driver that exits right after its last get() still shows
it. Direct calls, that is: a handle's first call goes through the broker, and its
line may still come after its result. (Direct calls' results come on the lane the call went on; their output came on
another socket and was printed after the driver's own line in 5 of 8 runs; an async
actor's lines all came at the driver's exit: its coroutines' output was filed under a
stale call.)"""

import subprocess
import sys

SCRIPT = """
import zray

zray.init(num_cpus=2)


@zray.remote
class Talker:
    def say(self, i):
        print("line", i)
        return i


@zray.remote(max_concurrency=4)
class ThreadedTalker:
    def say(self, i):
        print("threaded line", i)
        return i


@zray.remote
class AsyncTalker:
    async def say(self, i):
        print("async line", i)
        return i


for cls, word in ((Talker, "line"), (ThreadedTalker, "threaded line"),
                  (AsyncTalker, "async line")):
    a = cls.remote()
    zray.get(a.say.remote(-1))  # (a handle's first call goes through the broker)
    for i in range(15):
        print("got", word, zray.get(a.say.remote(i)), flush=True)
"""


def test_an_actors_line_comes_before_the_result_it_printed_ahead_of(tmp_path):
    script = tmp_path / "talk.py"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    late = []
    for word in ("line", "threaded line", "async line"):
        for i in range(15):
            said = [n for n, x in enumerate(lines) if x.endswith(f") {word} {i}")]
            got = [n for n, x in enumerate(lines) if x == f"got {word} {i}"]
            if not (said and got and said[0] < got[0]):
                late.append((word, i))
    assert late == [], (late, lines)
