# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.1.3 "等待部分结果".
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
def slow_function():
    time.sleep(10)
    return 1

if __name__ == '__main__':
    object_refs = [slow_function.remote() for _ in range(2)]
    ready_refs, remaining_refs = ray.wait(object_refs, num_returns=1, timeout=None)
    print(ray.get(ready_refs[0]))
