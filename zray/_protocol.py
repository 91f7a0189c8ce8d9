"""The zray wire protocol (ZRP/1): every frame that crosses a socket is built here.

Sockets
=======
The broker binds one ROUTER. Everything else connects to it with DEALERs:

* a worker daemon (node agent) holds one DEALER, identity ``N<node_id>``;
* every *client* (a driver, or an executor process that runs tasks and actors)
  holds two DEALERs with identities ``<cid>o`` (the *out* socket: send-only,
  used from any thread under a lock) and ``<cid>i`` (the *inbox*: owned by the
  client's I/O thread, which receives everything the broker sends that client).
  Every reply and push from the broker goes to ``<cid>i``; requests and
  submissions go out on ``<cid>o`` so that they keep their order.

The broker sets ``ROUTER_MANDATORY``: a message to a peer that is gone raises
instead of vanishing, and the broker treats that peer as dead. High-water marks
are set to 0 (unbounded) on every socket: zray's flow control is the broker's
own queues, never a silent drop.

Frames
======
A message is ``[header, *payload]``. ``header`` is msgpack of a list whose first
item is the message type (``Msg``); payload frames are opaque bytes (pickled
values and their out-of-band buffers) that the broker stores and forwards
without decoding or copying them.

A stored *object* is ``(kind, frames)``: kind ``VALUE`` or ``ERROR``; frames are
``[pickle_bytes, *buffers]`` (pickle protocol 5, buffers out of band).

Messages (C = client, B = broker, N = node agent)
=================================================
C->B  HELLO      [HELLO, version, kind, node_id, pid, job_id]      on the inbox
B->C  WELCOME    [WELCOME, info dict]
C->B  READY      [READY]                                           executor on its out socket: idle
C->B  FN         [FN, fid] + [blob]                                 register a pickled function/class
C->B  SUBMIT     [SUBMIT, spec] + arg frames                        a task, actor creation or actor call
C->B  PUT        [PUT, oid, kind, nested_oids] + object frames, or
                 [PUT, oid, kind, nested_oids, node_id]  a large value written to that node's store
C->B  SUB        [SUB, oids]                                        push me these objects when ready
C->B  RELEASE    [RELEASE, oids]                                    my last reference is gone
C->B  REFS       [REFS, [[oid, +1 | -1], ...]]   in order: I now hold a ref I was given
                 (+1, sent before anything that could end the task that gave it) /
                 my last ref is gone (-1)
C->B  CANCEL     [CANCEL, oid, force, recursive]
C->B  BLOCK      [BLOCK, task_id, returned] / UNBLOCK [UNBLOCK, task_id]
                 the task waits in get(): lend its CPU, and hand back the task ids
                 that were prefetched to this executor and have not started
C->B  REJECT     [REJECT, task_id]  a prefetched EXEC arrived while blocked: queue it elsewhere
C->B  DONE       [DONE, task_id, [(kind, nframes[, node_id, size])...], nested, retryable,
                  pushed] + frames
                 executor finished a task; a return with node_id was written to that store;
                 pushed[i]: the executor already sent result i to its owner (see below)
E->C  OBJ        on PUSH -> the owner's PULL at ipc://<node store dir>/c-<cid>: an executor
                 hands a result straight to an owner on its node (3 hops instead of 4);
                 same frames as the broker's OBJ
C->B  YIELD      [YIELD, task_id, index, kind, nframes, nested] + frames    streaming item
C->B  LOG        [LOG, driver_cid, prefix, text]                    remote stdout/stderr
C->B  REQ        [REQ, req_id, op, args]                            a query (cluster info, actors...)
B->C  REPLY      [REPLY, req_id, ok, result]
B->C  OBJ        [OBJ, oid, kind] + frames                           an object's value, or
                 [OBJ, oid, kind, node_id]   it is in that node's store (read it if that is yours)
                 [OBJ, oid, kind, None, codec] + [blob]   a stored object's blob, for a driver
                 without a local store
B->C  EXEC       dep layout: [[nframes, node_id|None]...]: inline frames or a store to read
                 (may arrive while the previous task runs: a prefetch)
                 [EXEC, spec, fn_included] + ([blob] if fn_included) + arg frames + dep frames
B->C  CANCEL     [CANCEL, task_id, force]                            interrupt a running task
B->C  STREAM_END [STREAM_END, task_id, count]
B->C  LOG        [LOG, prefix, text]
B->C  EXIT       [EXIT]
N->B  NODE_HELLO [NODE_HELLO, version, node_id, info dict]
B->N  WELCOME    [WELCOME, info]  the node starts its executors only after this
B->N  SPAWN      [SPAWN, count]                                      start more executor processes
N->B  EXEC_DIED  [EXEC_DIED, cid, exit_code]
B->N  KILL_EXEC  [KILL_EXEC, cid]
B->N  FETCH      [FETCH, oid, dest]             send me this object's blob (dest: b"N"+node or b"C"+cid)
N->B  BLOB       [BLOB, oid, dest, codec] + [blob]   codec RAW/LZ4; -1 (no frame): not here
B->N  STORE      [STORE, oid, codec] + [blob]    write this blob into your store
N->B  STORED     [STORED, oid, size]            (size -1: failed)
B->N  FREE       [FREE, oids]  /  SPILL [SPILL, oids]   delete / move to disk
*<->B HEARTBEAT  [HEARTBEAT]  every HEARTBEAT_S from nodes and clients, answered by the broker;
                 a node silent for NODE_TIMEOUT_S is dead; a client that hears nothing
                 for BROKER_TIMEOUT_S fails its waiters (executors exit)
B->*  SHUTDOWN   [SHUTDOWN]

A header that does not decode, or names an unknown type, is logged and dropped.
"""

from __future__ import annotations

import enum

import msgpack

VERSION = 1
HEARTBEAT_S = 1.0
NODE_TIMEOUT_S = 10.0
BROKER_TIMEOUT_S = 15.0  # a client that hears nothing for this long gives the broker up

# Object kinds.
VALUE = 0
ERROR = 1


class Msg(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    READY = 3
    FN = 4
    SUBMIT = 5
    PUT = 6
    SUB = 7
    RELEASE = 8
    CANCEL = 9
    BLOCK = 10
    UNBLOCK = 11
    DONE = 12
    YIELD = 13
    LOG = 14
    REQ = 15
    REPLY = 16
    OBJ = 17
    EXEC = 18
    STREAM_END = 19
    EXIT = 20
    NODE_HELLO = 21
    SPAWN = 22
    EXEC_DIED = 23
    KILL_EXEC = 24
    HEARTBEAT = 25
    SHUTDOWN = 26
    REJECT = 27
    FETCH = 28
    BLOB = 29
    STORE = 30
    STORED = 31
    FREE = 32
    SPILL = 33
    REFS = 34


# Task kinds inside a SUBMIT spec.
TASK = 0
ACTOR_CREATE = 1
ACTOR_CALL = 2

# Indexes into a SUBMIT/EXEC spec list (a list, not a dict: cheaper to pack).
S_TASK_ID = 0
S_KIND = 1
S_FID = 2  # function id (TASK), class id (ACTOR_CREATE), method name (ACTOR_CALL)
S_NAME = 3  # function name for logs and errors
S_NUM_RETURNS = 4  # int, or -1 for "streaming"
S_RESOURCES = 5  # {name: units} in 1/10000ths
S_DEPS = 6  # [[arg_index, oid], ...] top-level ObjectRef arguments
S_NESTED = 7  # oids of refs pickled inside the arguments
S_OPTIONS = 8  # dict: max_retries, retry_exceptions, strategy, env_vars, ...
S_ACTOR_ID = 9
S_OWNER = 10  # cid that owns the returns
S_DRIVER = 11  # cid of the driver at the root of the call tree (for logs)
S_JOB = 12
S_PARENT = 13  # task id of the submitting task, or b""
S_SPEC_LEN = 14

STREAMING = -1
UNIT = 10000  # resources travel as integers of 1/10000 unit


def pack(*fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def unpack(buf) -> list:
    return msgpack.unpackb(buf, raw=False, use_list=True, strict_map_key=False)


def to_units(resources: dict) -> dict:
    return {k: int(round(v * UNIT)) for k, v in resources.items() if v}


def from_units(units: dict) -> dict:
    return {k: v / UNIT for k, v in units.items()}
