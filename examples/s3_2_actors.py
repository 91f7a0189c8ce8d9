# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.2 "Actors".
# Only change from the seed: `import ray` -> `import zray as ray`.
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

if __name__ == '__main__':
    counter = Counter.remote()
    for i in range(10):
        counter.increment.remote()
    print(ray.get(counter.get_counter.remote())) # Output: 10
