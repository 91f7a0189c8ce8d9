# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.3 "Objects" (ray.put snippet).
# Only change from the seed: `import ray` -> `import zray as ray`.
# It prints nothing; it must simply run and exit cleanly.
import zray as ray
ray.init()
y = 1
obj_ref = ray.put(y)
