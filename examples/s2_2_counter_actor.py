# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 2.2 "调用Actor".
# Only change from the seed: `import ray` -> `import zray as ray`.
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray
# 1.初始化Ray
ray.init()
# 2.定义一个Counter actor
@ray.remote
class Counter:
    def __init__(self):
        self.i = 0

    def get(self):
        return self.i

    def incr(self, value):
        self.i += value

if __name__ == '__main__':
    # 3.创建一个Counter actor
    c = Counter.remote()
    # 4.调用actor的方法
    for _ in range(10):
        c.incr.remote(1)
    # 5.获取actor的状态
    print(ray.get(c.get.remote())) # Output: 10
