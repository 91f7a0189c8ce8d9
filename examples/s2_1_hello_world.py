# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 2.1 "运行一个Task".
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
# 2.定义一个远程函数
@ray.remote
def greet(name):
    return "Hello, {}!".format(name)

if __name__ == "__main__":
    # 3.启动远程任务
    remote_greet = greet.remote("World")
    # 4.获取远程任务结果
    result = ray.get(remote_greet)
    # 5.打印结果
    print(result)
