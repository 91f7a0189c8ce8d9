# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.1 "Tasks".
# Only change from the seed: `import ray` -> `import zray as ray`.
# Note: the script prints nothing and exits while four 10-second
# slow_function tasks are still running; the runtime must clean them up.
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray
import time
ray.init()
# 1.一个常规的python函数
def normal_function():
    return 1
# 2.通过添加装饰器`@ray.remote`,一个常规的函数就
# 变成了一个Ray远程函数
@ray.remote
def my_function():
    return 1
# 3.定义另外一个远程函数,该函数会等待10秒钟
@ray.remote
def slow_function():
    time.sleep(10)
    return 1

if __name__ == '__main__':
    # 4.使用remote方法调用远程函数,这将立即返回一个对象引用(a future)
    # 然后创建一个将被执行在worker进程中的任务
    obj_ref = my_function.remote()
    # 5.使用ray.get()方法获取结果
    assert ray.get(obj_ref) == 1
    # 6.Ray任务被并行执行了,所有计算都在后台进行,
    # 由ray的内部事件循环驱动
    for _ in range(4):
        slow_function.remote()
