# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 2.3 "传递object".
# Only change from the seed: `import ray` -> `import zray as ray`.
# Needs numpy: pip install numpy (or pip install -e '.[examples]').
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray
# 1.初始化Ray
ray.init()
import numpy as np
# 2.定义一个远程函数
@ray.remote
def sum_matrix(matrix):
    return np.sum(matrix)

if __name__ == '__main__':
    # 3.调用远程函数使用字面量值
    print(ray.get(sum_matrix.remote(np.ones((100, 100))))) # 10000.0
    # 4.将一个大矩阵放入对象存储中,并调用远程函数
    matrix_ref = ray.put(np.ones((1000, 1000)))
    print(ray.get(sum_matrix.remote(matrix_ref))) # 1000000.0
