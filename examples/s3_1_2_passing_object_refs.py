# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.1.2 "传递对象引用".
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
def my_function():
    return 1

@ray.remote
def function_with_an_arguement(value):
    return value + 1

if __name__ == '__main__':
    obj_ref1 = my_function.remote()
    print(ray.get(obj_ref1))
    assert ray.get(obj_ref1) == 1
    obj_ref2 = function_with_an_arguement.remote(obj_ref1)
    print(ray.get(obj_ref2))
    assert ray.get(obj_ref2) == 2
