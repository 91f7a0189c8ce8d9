# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.1.5 "取消任务".
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
def blocking_operation():
    time.sleep(10e6)

if __name__ == '__main__':
    obj_ref = blocking_operation.remote()
    ray.cancel(obj_ref)
    try:
        ray.get(obj_ref)
    except ray.exceptions.TaskCancelledError:
        print("Task cancelled successfully.")
