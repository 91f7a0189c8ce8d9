"""The broker's records: nodes, executors, tasks, objects and actors, with named states.

The legal moves between task, actor and executor states are the tables in
``transitions.py``; only ``Transitions.move`` changes those states.

Task states::

    WAITING_ARGS --deps ready--> QUEUED --placed--> RUNNING --DONE--> FINISHED
                                   |  \\--prefetched--> ASSIGNED --previous DONE--> RUNNING
         |                         |                  |  \\--crash, retries left--> QUEUED
         +--------- cancel --------+------------------+--> CANCELLED / FAILED

Object states: PENDING (its task has not finished) -> READY (value or error
stored here) -> FREED (owner released it and nothing pins it).

Actor states: PENDING (creation queued) -> ALIVE -> RESTARTING -> ALIVE ... -> DEAD.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional


class TaskState(enum.Enum):
    WAITING_ARGS = "waiting_args"
    QUEUED = "queued"
    ASSIGNED = "assigned"  # sent ahead to a busy executor; holds no resources yet
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ObjState(enum.Enum):
    PENDING = "pending"
    READY = "ready"


class ActorState(enum.Enum):
    PENDING = "pending"
    ALIVE = "alive"
    RESTARTING = "restarting"
    DEAD = "dead"


class ExecState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    ACTOR = "actor"
    DEAD = "dead"


@dataclass(eq=False)
class Node:
    node_id: bytes
    ident: bytes
    total: dict
    avail: dict
    gpus: list  # [[gpu_id, free_units], ...]
    hostname: str = ""
    pid: int = 0
    labels: dict = field(default_factory=dict)
    address: str = ""
    idle: list = field(default_factory=list)  # idle pool executors (a stack: warm first)
    executors: dict = field(default_factory=dict)  # cid -> Executor
    spawning: int = 0
    last_seen: float = 0.0
    alive: bool = True
    running: int = 0  # tasks running here, for SPREAD
    store_limit: int = 0
    store_used: int = 0  # bytes of objects in its store's memory
    spilled: int = 0  # bytes it moved to disk
    lru: "OrderedDict" = field(default_factory=OrderedDict)  # oid -> size, in memory, oldest first
    actor_spawns: deque = field(default_factory=deque)  # actor creations awaiting a fresh process
    spawn_failures: int = 0
    vouched: dict = field(default_factory=dict)  # cid -> spawn token, until its HELLO
    log_dir: str = ""  # its log directory, on its host (zray logs)
    reconnecting: bool = False  # loaded after a broker restart; its agent has not said hello
    peer: tuple = ()  # (peer socket address, ticket secret): other nodes pull blobs there


@dataclass(eq=False)
class Executor:
    cid: bytes
    node: Node
    pid: int = 0
    state: ExecState = ExecState.STARTING
    task: Optional["Task"] = None
    actor: Optional["Actor"] = None
    fns: set = field(default_factory=set)  # function ids this process has loaded
    # tasks sent ahead, in the order sent (ASSIGNED): the first starts when `task` is
    # DONE. How many: brokerd/window.py (one; several behind a short function's call)
    ahead: deque = field(default_factory=deque)
    blocked: bool = False  # its task waits in get(): no prefetching
    idle_since: float = 0.0
    # The runtime_env key (zray/_renv.py) of the tasks it runs: None until its first
    # task binds it ("" for none); it never runs another environment's tasks.
    env: Optional[str] = None
    # results it pushed straight to their owners lately: sent again if it dies (pushed.py)
    pushed: deque = field(default_factory=lambda: deque(maxlen=64))


@dataclass(eq=False)
class Task:
    task_id: bytes
    kind: int
    spec: list
    frames: list
    resources: dict  # units needed to place it
    hold: dict  # units held while it runs (differs for actors)
    shape: tuple
    returns: list  # oids
    state: TaskState = TaskState.WAITING_ARGS
    pending: int = 0  # dependencies not yet ready
    retries_left: int = 0
    executor: Optional[Executor] = None
    node: Optional[Node] = None
    gpu_alloc: list = field(default_factory=list)  # [(gpu index in node.gpus, units)]
    blocked: bool = False
    cancel_requested: bool = False
    force_cancel: bool = False
    streamed: int = 0
    actor: Optional["Actor"] = None
    spec_bytes: Optional[bytes] = None  # the spec as packed in SUBMIT, forwarded in EXEC
    deps: list = field(default_factory=list)  # top-level argument oids, pinned by this task
    holds: list = field(default_factory=list)  # oids pickled inside its arguments, pinned too
    # > 0: its lineage is kept (spec, frames, deps and holds stay pinned) for this many
    # of its store-resident returns that still live, to rebuild them if their node dies
    lineage: int = 0
    lineage_cost: int = 0  # its bytes in ObjectDirectory.lineage_bytes
    started: float = 0.0  # the broker's clock (moves.now) when it last began RUNNING


@dataclass(eq=False)
class Obj:
    oid: bytes
    owner: bytes
    state: ObjState = ObjState.PENDING
    kind: int = 0
    frames: list = field(default_factory=list)
    size: int = 0
    released: bool = False
    escaped: bool = False  # captured by a function definition: kept for good
    pins: int = 0  # unfinished tasks using it + stored objects containing it
    holders: set = field(default_factory=set)  # clients (not the owner) holding a ref
    # cid -> refs handed to it inside inline replies (REFS 2) it has not taken (REFS 3)
    # yet; a take that came first counts below 0. Kept while any is left.
    handoffs: Optional[dict] = None
    contained: list = field(default_factory=list)  # oids pickled inside this value, pinned
    containers: Optional[list] = None  # oids of values this ref was pickled inside
    waiting: list = field(default_factory=list)  # tasks waiting on it
    subscribers: list = field(default_factory=list)  # cids to push it to
    locations: dict = field(default_factory=dict)  # node_id -> size: stores holding it
    inflight: dict = field(default_factory=dict)  # transfer dest -> [cids waiting]
    inflight_src: dict = field(default_factory=dict)  # transfer dest -> source node id
    lost: bool = False
    actor: bytes = b""  # the handle object of this (non-detached) actor: freed -> actor ends
    lineage: Optional["Task"] = None  # the finished task that can rebuild it (store objects)
    no_lineage: str = ""  # a task's result that cannot be rebuilt: why ("" for put objects)


@dataclass(eq=False)
class Actor:
    actor_id: bytes
    create: Task
    owner: bytes
    job_id: bytes
    name: str = ""
    namespace: str = ""
    detached: bool = False
    max_restarts: int = 0
    max_task_retries: int = 0
    restarts: int = 0
    no_restart: bool = False
    state: ActorState = ActorState.PENDING
    executor: Optional[Executor] = None
    queue: deque = field(default_factory=deque)  # calls not yet sent
    inflight: dict = field(default_factory=dict)  # task_id -> Task sent to the executor
    death: str = ""
    handle_meta: bytes = b""
    class_name: str = ""
    exit_when_idle: bool = False  # every handle is gone: it ends once its calls are done
    # A detached actor's runtime_env packages, pinned until it is dead for good (its
    # driver, which uploaded them, may be long gone when it restarts elsewhere).
    packages: list = field(default_factory=list)


@dataclass(eq=False)
class ClientInfo:
    cid: bytes
    kind: str
    node_id: bytes
    pid: int
    job_id: bytes
    last_seen: float = 0.0
    holds: set = field(default_factory=set)  # oids it borrowed (holds refs it does not own)
    handed: set = field(default_factory=set)  # oids handed to it (REFS 2), not all taken yet
    logs: bool = True  # a driver that wants its job's remote output (init log_to_driver)
