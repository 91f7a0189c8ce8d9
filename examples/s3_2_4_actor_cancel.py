# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.2.4 "取消Actor".
# Only change from the seed: `import ray` -> `import zray as ray`.
'''
Author: chenjingyu
Date: 2024-12-11 16:49:46
Contact: 2458006466@qq.com
Description: hello world
'''
import zray as ray
import time
import asyncio
ray.init()
@ray.remote
class Actor:
    async def f(self):
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            print("actor cancelled")

if __name__ == '__main__':
    actor = Actor.remote()
    ref = actor.f.remote()
    time.sleep(1)
    ray.cancel(ref)
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError:
        print("Object reference was cancelled.")
