# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.2.2 "调用Actor", full example.
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
    # 1.创建十个Counter的actor对象
    counters = [Counter.remote() for i in range(10)]
    # 2.调用每一个actor对象的increment方法,并打印返回值
    results = ray.get([c.increment.remote() for c in counters])
    print(results) # [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    # 3.调用第一个actor对象的increment方法五次,任务被串行执行,并且共享状态
    results = ray.get([counters[0].increment.remote() for i in range(5)])
    print(results) # [1, 2, 3, 4, 5]
