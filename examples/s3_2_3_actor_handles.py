# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.2.3 "传递Actor句柄".
# Only change from the seed: `import ray` -> `import zray as ray`.
# The printed values depend on timing (the seed shows 0 6 9 ... 30); they are
# always non-decreasing and never above 30.
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray
import time
ray.init()
@ray.remote
class Counter:
    def __init__(self):
        self.value = 0

    def increment(self):
        self.value += 1
        return self.value

    def get_counter(self):
        return self.value

@ray.remote
def f(counter):
    for i in range(10):
        time.sleep(0.1)
        counter.increment.remote()

if __name__ == '__main__':
    counter = Counter.remote()
    [f.remote(counter) for _ in range(3)]
    for _ in range(10):
        time.sleep(0.1)
        print(ray.get(counter.get_counter.remote()))
