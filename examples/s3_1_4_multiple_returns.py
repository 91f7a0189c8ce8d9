# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.1.4 "多个返回值".
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
def return_sigle():
    return 0, 1, 2

@ray.remote(num_returns=3)
def return_multiple():
    return 0, 1, 2

# 迭代器
@ray.remote(num_returns=3)
def return_multiple_as_generator():
    for i in range(3):
        yield i

if __name__ == '__main__':
    object_ref = return_sigle.remote()
    assert ray.get(object_ref) == (0, 1, 2)
    print(ray.get(object_ref)) # Output: (0, 1, 2)
    object_ref0, object_ref1, object_ref2 = return_multiple.remote()
    print(ray.get(object_ref0))
    print(ray.get(object_ref1))
    print(ray.get(object_ref2))
    assert ray.get(object_ref0) == 0 # Output: 0
    assert ray.get(object_ref1) == 1 # Output: 1
    assert ray.get(object_ref2) == 2 # Output: 2
    a, b, c = return_multiple_as_generator.remote()
    print(ray.get(a))
    print(ray.get(b))
    print(ray.get(c))
    assert ray.get(a) == 0 # Output: 0
    assert ray.get(b) == 1 # Output: 1
    assert ray.get(c) == 2 # Output: 2
