# ruff: noqa
# (lint disabled: the tutorial code below is kept verbatim from the seed.)
# 来源 / Source: seed tutorial section 3.5.2 "Scheduling Strategies"
# (the "DEFAULT" and "SPREAD" snippets, concatenated).
# WRAPPED FRAGMENT: added the import, ray.init(...) and the two print lines
# marked at the end.
#
# RESOURCES: the snippets keep ten 1-CPU SpreadActors alive at once, more
# than a 2-CPU laptop has. With only 2 CPUs, whether the wrapper's final
# tasks run depends on whether they get a CPU before two actors take both
# (Ray 2.60 happened to finish; an actor holds its CPU until it dies, so the
# other order would wait forever). ray.init() therefore declares 16 logical
# CPUs, so every actor and task fits.
import zray as ray

ray.init(num_cpus=16)

@ray.remote
def func():
    return 1

@ray.remote(num_cpus=1)
class Actor:
    pass

# If unspecified, "DEFAULT" scheduling strategy is used.
func.remote()
actor = Actor.remote()

# Explicitly set scheduling strategy to "DEFAULT".
func.options(scheduling_strategy="DEFAULT").remote()
actor = Actor.options(scheduling_strategy="DEFAULT").remote()

# Zero-CPU (and no other resources) actors are randomly assigned to nodes.
actor = Actor.options(num_cpus=0).remote()

@ray.remote(scheduling_strategy="SPREAD")
def spread_func():
    return 2

@ray.remote(num_cpus=1)
class SpreadActor:
    pass

# Spread tasks across the cluster.
[spread_func.remote() for _ in range(10)]
# Spread actors across the cluster.
actors = [SpreadActor.options(scheduling_strategy="SPREAD").remote() for _ in range(10)]

# 包装补充 / added by the wrapper: fetch one result of each strategy.
print(ray.get(func.options(scheduling_strategy="DEFAULT").remote()))
print(ray.get(spread_func.remote()))
