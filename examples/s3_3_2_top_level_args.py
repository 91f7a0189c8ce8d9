# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.3.2 "传递对象", part (1): objects
# passed as top-level arguments.
# Only change from the seed: `import ray` -> `import zray as ray`.
# Note: the seed calls no ray.init(); Ray initialises itself on first use
# (echo.remote). The driver never waits for the tasks; their prints are
# expected to reach the driver's stdout before it exits.
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray

@ray.remote
def echo(a: int, b: int, c: int):
    print(a, b, c)

if __name__ == '__main__':
    # 1.传字面量参数(1, 2, 3)给echo函数
    echo.remote(1, 2, 3)
    # 2.将值(1, 2, 3)放入ray的对象存储中,再传给echo函数
    a, b, c = ray.put(1), ray.put(2), ray.put(3)
    echo.remote(a, b, c)
