# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.3.1 "获取对象数据".
# Only changes from the seed: `import ray` -> `import zray as ray` and
# `from ray.exceptions import ...` -> `from zray.exceptions import ...`.
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray
import time
from zray.exceptions import GetTimeoutError
ray.init()
@ray.remote
def long_running_function():
    time.sleep(8)

if __name__ == '__main__':
    obj_ref = ray.put(1)
    assert ray.get(obj_ref) == 1
    assert ray.get([ray.put(i) for i in range(3)]) == [0, 1, 2]
    obj_ref = long_running_function.remote()
    try:
        ray.get(obj_ref, timeout=4)
    except GetTimeoutError:
        print("`get` time out.")
