# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.5.1 "Resources".
# Changes from the seed: `import ray` -> `import zray as ray`, and
# ray.init() -> ray.init(num_gpus=1): the seed reads
# ray.available_resources()["GPU"], which raises KeyError on a machine
# without a GPU, so one logical GPU is declared (no real GPU is used).
import zray as ray
ray.init(num_gpus=1)

if __name__ == '__main__':
    num_gpus = int(ray.available_resources()["GPU"])
    print(f"num_gpus: {num_gpus}")
    num_cpus = int(ray.available_resources()["CPU"])
    print(f"num_cpus: {num_cpus}")
