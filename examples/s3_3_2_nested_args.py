# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.3.2 "传递对象", part (2): objects
# passed as nested arguments.
# Only change from the seed: `import ray` -> `import zray as ray`.
# Note: the seed calls no ray.init(); Ray initialises itself on first use
# (ray.put).
import zray as ray

@ray.remote
def echo(a: int, b: int, c: int):
    print(a, b, c)

@ray.remote
def echo_and_get(x_list):
    print("args: ", x_list)
    print("values: ", ray.get(x_list))

if __name__ == '__main__':
    a, b, c = ray.put(1), ray.put(2), ray.put(3)
    echo_and_get.remote([a, b, c])
