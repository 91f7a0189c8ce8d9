# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.2.2 "调用Actor", first snippet.
# WRAPPED FRAGMENT: the seed's two lines use the `counter` actor from
# section 3.2; the import, ray.init(), the Counter class and
# `counter = Counter.remote()` are copied from section 3.2 to make it runnable.
import zray as ray

ray.init()

@ray.remote
class Counter:
    def __init__(self):
        self.value = 0

    def increment(self):
        self.value += 1
        return self.value

    def get_counter(self):
        return self.value

counter = Counter.remote()

# 调用actor
obj_ref = counter.increment.remote()
print(ray.get(obj_ref))
