# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.2.1 "指定需要资源".
# WRAPPED FRAGMENT: the seed shows only the decorated class. Added to make it
# runnable: the import, ray.init(...), and the lines marked below that create
# the actor and wait (with a deadline) until its resources are reserved.
#
# RESOURCES: num_gpus=0.5 cannot be satisfied on a machine without a GPU, so
# ray.init() declares logical resources (2 CPUs, 1 GPU); no real GPU is used.
# An actor with explicit resources holds them for its whole lifetime, so after
# it is placed Ray reports 0.5 GPU still available.
import time

import zray as ray

ray.init(num_cpus=2, num_gpus=1)

# Specify required resources for an actor.
@ray.remote(num_cpus=2, num_gpus=0.5)
class Actor:
    pass

# 包装补充 / added by the wrapper: create the actor and show that its
# resource request was granted.
actor = Actor.remote()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if ray.available_resources().get("GPU", 0) == 0.5:
        break
    time.sleep(0.05)
print("GPU available:", ray.available_resources().get("GPU", 0))
