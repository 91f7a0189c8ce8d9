# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.3.3 "对象的闭包捕获".
# Only change from the seed: `import ray` -> `import zray as ray`.
# Note: the seed calls no ray.init(); Ray initialises itself on first use
# (ray.put at module level).
import zray as ray
a, b, c = ray.put(1), ray.put(2), ray.put(3)

@ray.remote
def print_via_capture():
    print(ray.get([a, b, c]))

if __name__ == '__main__':
    print_via_capture.remote()
