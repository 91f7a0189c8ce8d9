"""The zray wire protocol (ZRP/2): every frame that crosses a socket is built here.

Sockets


The broker binds one ROUTER. Everything else connects to it with DEALERs, and
each identity names its role by construction (``role_of``):

* a worker daemon (node agent) holds one DEALER, identity ``N<node_id>``;
* every *client* (a driver, or an executor process that runs tasks and actors)
  holds two DEALERs with identities ``C<cid>o`` (the *out* socket: send-only,
  used from any thread under a lock) and ``C<cid>i`` (the *inbox*: owned by the
  client's I/O thread, which receives everything the broker sends that client).
  Every reply and push from the broker goes to the inbox; requests and
  submissions go out on the out socket so that they keep their order.

Ids: node ids and cids are ``ID_LEN`` random bytes; a task id is its submitter's
cid plus a 4-byte counter; an object id is its task's id plus a 4-byte index
(``object_id``/``task_of``).

The broker sets ``ROUTER_MANDATORY``: a message to a peer that is gone raises
instead of vanishing, and the broker treats that peer as dead. High-water marks
are set to 0 (unbounded) on every socket: zray's flow control is the broker's
own queues, never a silent drop.

Frames
======
A message is ``[header, *payload]``. ``header`` is msgpack of an array whose
first item is the message type (``Msg``) followed by that type's fields, every
field always present, in the order of the message's class below (``encode``
builds it, ``decode`` checks every field and builds the class). Payload frames
are opaque bytes (pickled values and their out-of-band buffers) that the broker
stores and forwards without decoding or copying them.

A stored *object* is ``(kind, frames)``: kind ``VALUE`` or ``ERROR``; frames are
``[pickle_bytes, *buffers]`` (pickle protocol 5, buffers out of band).

Messages (C = client, B = broker, N = node agent, E = executor; fields after the type)
===============================================================================

C->B  HELLO      version, kind, node_id, pid, job_id, token    on the inbox; first message.
                 An executor's token is the one its node announced (EXEC_SPAWNED): a
                 HELLO as an executor with an unknown cid or token is refused
B->C  WELCOME    info {session_dir, address, store_limit} or {error}: a mismatched
                 VERSION is answered with an error naming both versions
B->*  WELCOME    also {epoch, nodes}: the broker's incarnation and the node ids it knows;
                 {rehello: epoch}: the answer to a HEARTBEAT from a client or node this
                 broker does not know (it restarted): say HELLO / NODE_HELLO again (a node
                 then re-sends EXEC_SPAWNED for its live executors; a client whose
                 welcoming epoch it is was dropped and leaves). See brokerd/restart.py
C->B  READY      -                                              executor: started and idle
C->B  FN         fid, nested + [blob]                           register a pickled function/class
C->B  SUBMIT     spec (TaskSpec) + arg frames                   a task, actor creation or call
C->B  PUT        oid, kind, nested, node_id, size + object frames; node_id not nil: the value
                 was written to that node's store (no frames)
C->B  LINEAGE    spec (TaskSpec) + arg frames   after a broker restart, right after the PUT
                 of a stored result: the finished task that returned it, kept to rebuild
                 it if its node dies (brokerd/relineage.py); only from the task's owner
C->B  SUB        oids                                           push me these objects when ready
C->B  RELEASE    oids                                           my last reference is gone
C->B  REFS       [[oid, +1 | -1 | 0 | 3] | [oid, 2, cid], ...]   in order: I now hold a ref I
                 was given (+1, sent before anything that could end the task that gave it) /
                 my last ref is gone (-1) / a ref was pickled out of band: keep the object
                 for good (0) / I hand this ref to client cid inside an inline reply (2, sent
                 before the DDONE: the object stays until cid takes it or leaves) / I took a
                 ref handed to me and hold it (3: a +1 that ends the hand-off)
C->B  CANCEL     oid, force, recursive
B->C  INTERRUPT  task_id, force                                 cancel this running task
C->B  BLOCK      task_id, returned / UNBLOCK task_id
                 the task waits in get(): lend its CPU, and hand back the task ids
                 that were prefetched to this executor and have not started
C->B  REJECT     task_id   a prefetched EXEC arrived while blocked: queue it elsewhere;
                 also the answer to RECALL for each task taken out of the queue unstarted
B->E  RECALL     task_ids   hand back these tasks sent ahead (EXEC) if they have not started
                 (their executor runs a task that takes long, another one is idle): the
                 executor takes each out of its queue and answers REJECT for it; one that
                 started runs and ends in DONE as usual. At most RECALL_MAX ids
C->B  DONE       task_id, returns [[kind, nframes, node_id, size]...], nested, retryable,
                 pushed, error text + frames.  A return with a node_id was written to that store;
                 pushed[i]: the executor already sent return i to its owner (below)
E->C  OBJ        on PUSH -> the owner's PULL at ipc://<node store dir>/c-<cid>: an executor
                 hands a result straight to an owner on its node (3 hops instead of 4);
                 several OBJs for one owner may come as one BATCH (the layout below)
C->B  YIELD      task_id, index, kind, nframes, nested + frames   a streamed item (index 1..);
                 the stream ends with a DONE without returns (or with the error it raised)
C->B  LOG        driver_cid, prefix, text                       remote stdout/stderr
B->C  PRINT      prefix, text                                   ... forwarded to the driver
C->B  REQ        req_id, op, args                               a query (cluster info, actors...)
B->C  REPLY      req_id, ok, result
B->C  OBJ        oid, kind, node_id, codec + frames: an object is ready. node_id and codec
                 nil: the value is in the frames; node_id set: it is in that node's store
                 (read it if that is yours); codec set: one frame, a store blob, for a
                 client without a local store
B->C  EXEC       spec, fn_included, n_args, deps [[nframes, node_id|nil]...], gpu_ids
                 + ([blob] if fn_included) + arg frames + dep frames (inline deps);
                 may arrive while the previous task runs: a prefetch
B->C  STREAM_END task_id, count   after the stream's items and its completion object (OBJ)
B->C  EXIT       -   (C->B EXIT: a driver or CLI leaves; an executor retires after
                 max_calls: sent after its last DONE; the broker queues again what it had
                 sent it ahead and answers EXIT, after which the executor exits)
N->B  NODE_HELLO version, node_id, info {resources, gpu_ids, hostname, pid, labels,
                 address, prestart, store_limit, log_dir}
B->N  WELCOME    info   the node starts its executors only after this
B->N  SPAWN      count                                          start more executor processes
N->B  EXEC_SPAWNED cid, token   a process it starts: the only executor HELLO to accept for cid
N->B  EXEC_DIED  cid, exit_code
B->N  KILL_EXEC  cid
B->N  FETCH      oid, dest      send me this object's blob (dest: node_ident or client_dest)
N->B  BLOB       oid, dest, codec + [blob]   codec RAW/LZ4; -1 (no frame): not here
B->N  STORE      oid, codec + [blob]            write this blob into your store
N->B  STORED     oid, size                      (size -1: failed)
B->N  PULL       oid, src_node, address, ticket, size   fetch this object straight from
                 node src_node's peer socket at address (zray/_peer.py), then STORED
N->B  PULL_FAILED oid, src_node, unreachable   it could not: the broker moves it
                 (FETCH/STORE); unreachable: src's peer socket did not answer at all
N->N  PEER_GET   oid, node_id, ticket, offset, length   on a node's peer socket: a chunk
                 of an object; ticket: the broker's grant for node_id (HMAC, _peer.py)
N->N  PEER_CHUNK oid, offset, total, codec + [chunk]   codec RAW/LZ4; -1 (no frame):
                 not here. A bad or forged PEER_GET is dropped and counted, unanswered
B->E  LEASE      lease_id, holder, active, fid, running   (leased executors, zray/_lease.py): active, the
                 idle pool executor is leased to client ``holder`` (+ [fn blob] when it has
                 not loaded the lease's function); it takes DCALLs of plain tasks on its
                 lane <node store>/t-<cid> until it ends the lease (REQ lease_end)
C->E  LEASE      the same, on that lane: the holder's first message (active true)
E->C  LEASE      active false, on the lane: the executor ends the lease; it read nothing
                 after it, so calls sent and not answered before it never ran, but for
                 ``running`` (b"" or the task id of the call it still runs, whose task
                 waits in get(): its DDONE follows on the lane). A holder may have several
                 calls in flight on a lease (a window); the executor runs them in order
C->E  DCALL      also a plain TASK spec (no ObjectRef arguments, num_returns 1) on a lease's lane
B->N  FREE       oids  /  SPILL oids            delete / move to disk
B->N  LOG_READ   req_id, op, args   read this node's log files for a client's REQ node_logs
                 (op list | tail | read | task; zray._logfiles.serve says what args hold)
N->B  LOG_DATA   req_id, ok, result   the answer: the broker forwards it as that REQ's REPLY
                 (only to the client that asked, only from the node it asked)
B->C  BATCH      counts, sizes + the frames of len(counts) messages, message i being the next
                 counts[i] frames (its header first): what the broker sends a client in one
                 turn of its loop, as one ZeroMQ message (one wake-up, not one per message).
                 sizes not nil: those frames are packed into one frame, sizes[j] being the
                 length of frame j (a batch of at most PACK_MAX bytes: one frame to move
                 and box instead of two or more per message)
C->B  BATCH      the same layout on a client's out socket: a driver's SUBMITs of one burst
                 (zray._client SUBMIT_BATCH), an executor's DONEs of short tasks that ran
                 back to back (workerd/held.py). The broker handles each message in order as if
                 it had come alone; one that does not decode, is not allowed from an out
                 socket or is a BATCH itself is dropped and counted, the others still count
C->B  NEED_SPACE nbytes   a put waits for room in its node's store (over its limit): spill
                 at least this many more bytes there (sent at most every NEED_SPACE_S)
B->C  ROUTE      actor_id, state, address, host, ordered, incarnation, reason, tcp_address  where an
                 actor's executor takes direct calls (state "alive", address ipc://...), or
                 that it is "restarting" / "dead" (reason): the answer to REQ actor_route,
                 pushed again to every client that asked whenever the actor moves or dies
C->E  DCALL      spec, n_args, reply_to + arg frames   a direct actor call (no ObjectRef
                 arguments), on the executor's PULL at ipc://<node store>/a-<cid>;
                 reply_to: the caller's PULL (ipc://...). See zray/_direct.py. Across
                 hosts: ROUTE's tcp_address (last field) and a tcp:// reply_to, both
                 CURVE with the cluster key (zray/_xhost.py)
E->C  DDONE      task_id, returns [[kind, nframes]...], retryable, handed + frames   its
                 result; handed: [] or, per return, the oids of the refs inside it that
                 the executor handed to the caller (REFS 2): the caller takes each (REFS 3)
C->E  DCANCEL    task_id, force   cancel a direct call (callers send REQ direct_cancel to
                 the broker instead, which INTERRUPTs the executor: a busy main thread
                 reads its direct socket only between calls)
*<->B HEARTBEAT  -   every HEARTBEAT_S from nodes and clients, answered by the broker
                 (at most every few seconds per peer: brokerd.broker.HEARTBEAT_REPLY_S);
                 a node silent for NODE_TIMEOUT_S is dead; a client that hears nothing
                 for BROKER_TIMEOUT_S fails its waiters (executors exit)
B->*  SHUTDOWN   -

A header that does not decode, names an unknown type, has the wrong number of
fields or a field of the wrong type raises ``ProtocolError`` in ``decode``: the
receiver drops the message and logs it.
"""

from __future__ import annotations

import enum
import os
from typing import Any, NamedTuple, Optional

import msgpack

# 2: role-prefixed identities, one layout per message, CANCEL/INTERRUPT, LOG/PRINT split
# 3: a streaming task has a completion object (index 0); num_returns DYNAMIC
# 4: executors prove they were spawned by a node (HELLO token, EXEC_SPAWNED)
# 5: B->C BATCH (a client must split it), C->B NEED_SPACE
# 6: C->B BATCH (a driver's SUBMITs of one burst)
# 7: ROUTE/DCALL/DDONE/DCANCEL (direct actor calls), PULL/PEER_* (node blobs)
# 8: ROUTE tcp_address, tcp reply_to (cross-host direct calls)
VERSION = 14  # 14: LEASE running (pipelined leases: the end mark names the call still running); 13: REFS 2/3 (refs handed over in an inline reply), DDONE handed; 12: lease_books events carry the parent task id and the retry flag (8 fields); 11: LEASE, DCALL of a plain task (leased executors); 10: C->B LINEAGE (a replayed result's finished task after a broker restart); 9: B->E RECALL; E->C BATCH of OBJs; an executor's DONEs in a C->B BATCH
HEARTBEAT_S = 1.0
# A node silent this long is declared dead (its store's objects are lost, or rebuilt
# from lineage); ZRAY_NODE_TIMEOUT_S overrides it, read here only (the broker's copy counts).
NODE_TIMEOUT_S = float(os.environ.get("ZRAY_NODE_TIMEOUT_S") or 5.0)
# A driver silent this long is gone (its job released): not tied to a short node timeout.
DRIVER_TIMEOUT_S = max(60.0, 6 * NODE_TIMEOUT_S)
BROKER_TIMEOUT_S = 15.0  # a client that hears nothing for this long gives the broker up
ACTOR_EXIT_CODE = 13  # an executor leaving through exit_actor(): the actor is not restarted

# Object kinds.
VALUE = 0
ERROR = 1

# Task kinds inside a task spec.
TASK = 0
ACTOR_CREATE = 1
ACTOR_CALL = 2

# Limits (one place; the broker enforces them at decode or on receipt):
# the largest message the broker's socket accepts (libzmq drops bigger ones before
# they cost memory); blobs moved between nodes ride in one message, so this bounds
# an object that must cross nodes: ZRAY_MAX_MSG_BYTES overrides it.
MAX_MESSAGE_BYTES = 4 << 30
MAX_RETURNS_LIMIT = 10000  # num_returns of one task (each return is a directory entry)
# TaskSpec.num_returns of a generator task: STREAMING sends each item as a YIELD and
# ends with an empty DONE; its one return is the completion object at index 0 (None, or
# the error of a task that failed other than by raising: a crash, a cancel, a dead actor).
# DYNAMIC runs the generator to its end, stores each item as an object of its own and
# returns one value, a DynamicObjectRefGenerator of their refs (Ray's num_returns="dynamic").
STREAMING = -1
DYNAMIC = -2
UNIT = 10000  # resources travel as integers of 1/10000 unit

# Ids. A client id (cid) and a node id are 8 random bytes; a task id is its
# submitter's cid and a 4-byte counter; an object id is its task's id and a
# 4-byte index: 1..n for returns and stream items, 0 for put(), large arguments, an
# actor's handle object and a streaming task's completion object.
ID_LEN = 8
TASK_ID_LEN = 12
OBJECT_ID_LEN = 16


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
    INTERRUPT = 35
    PRINT = 36
    EXEC_SPAWNED = 37
    LOG_READ = 38
    LOG_DATA = 39
    NEED_SPACE = 60  # numbered apart from the others' additions
    BATCH = 61
    ROUTE = 70  # direct actor calls (zray/_direct.py, workerd/direct.py)
    DCALL = 71
    DDONE = 72
    DCANCEL = 73
    PULL = 80  # node-to-node blobs (zray/_peer.py), numbered apart too
    PULL_FAILED = 81
    PEER_GET = 82
    PEER_CHUNK = 83
    RECALL = 90  # tasks sent ahead in a window (brokerd/window.py), numbered apart too
    LINEAGE = 91  # after a broker restart: the finished task behind a stored result
    LEASE = 92  # leased executors (zray/_lease.py, workerd/lease.py, brokerd/leases.py)


class ProtocolError(ValueError):
    """A message that does not follow this spec; the receiver drops it."""


# ------------------------------------------------------------------ ids
def object_id(task_id: bytes, index: int) -> bytes:
    """The id of return (or stream item) ``index`` of ``task_id``; 0 names a put (or a
    streaming task's completion object)."""
    return task_id + index.to_bytes(4, "little")


def task_of(oid: bytes) -> bytes:
    """The task that produced object ``oid``."""
    return oid[:TASK_ID_LEN]


def node_ident(node_id: bytes) -> bytes:
    return b"N" + node_id


def out_ident(cid: bytes) -> bytes:
    return b"C" + cid + b"o"


def inbox_ident(cid: bytes) -> bytes:
    return b"C" + cid + b"i"


def client_dest(cid: bytes) -> bytes:
    """A transfer destination that is a client without a store (FETCH/BLOB ``dest``)."""
    return b"C" + cid


# Roles of a socket identity, from its first and last bytes (unambiguous by construction).
ROLE_NODE = "node"
ROLE_OUT = "out"
ROLE_INBOX = "inbox"


def role_of(ident: bytes) -> tuple[Optional[str], bytes]:
    """(role, id) of a ROUTER identity: a node's id or a client's cid; (None, b"") if
    the identity is not one of ours."""
    if len(ident) == ID_LEN + 1 and ident[:1] == b"N":
        return ROLE_NODE, ident[1:]
    if len(ident) == ID_LEN + 2 and ident[:1] == b"C":
        last = ident[-1:]
        if last == b"o":
            return ROLE_OUT, ident[1:-1]
        if last == b"i":
            return ROLE_INBOX, ident[1:-1]
    return None, b""


# ------------------------------------------------------------- resources
def to_units(resources: dict) -> dict:
    return {k: int(round(v * UNIT)) for k, v in resources.items() if v}


def from_units(units: dict) -> dict:
    return {k: v / UNIT for k, v in units.items()}


# ------------------------------------------------------------ field checks
# A check takes a decoded value and returns it (possibly converted) or raises
# ProtocolError. Keep them cheap: the broker runs them on every message.
def _fail(what: str, v) -> None:
    raise ProtocolError(f"{what} expected, got {type(v).__name__}")


def _exactly(t: type, what: str):
    """A check that accepts values of type ``t`` (not subclasses: bool is not an int)."""
    def check(v):
        if type(v) is not t:
            _fail(what, v)
        return v
    check.exact_type = t
    return check


def _or_nil(t: type, what: str):
    def check(v):
        if v is not None and type(v) is not t:
            _fail(what + " or nil", v)
        return v
    check.exact_type, check.nil = t, True
    return check


_bytes = _exactly(bytes, "bytes")
_int = _exactly(int, "int")
_bool = _exactly(bool, "bool")
_str = _exactly(str, "str")
_list = _exactly(list, "array")
_dict = _exactly(dict, "map")
_opt_bytes = _or_nil(bytes, "bytes")
_opt_int = _or_nil(int, "int")


def _any(v):
    return v


def _oid(v):
    if type(v) is not bytes or len(v) != OBJECT_ID_LEN:
        raise ProtocolError(f"object id of {OBJECT_ID_LEN} bytes expected, got {v!r:.40}")
    return v


def _task_id(v):
    if type(v) is not bytes or len(v) != TASK_ID_LEN:
        raise ProtocolError(f"task id of {TASK_ID_LEN} bytes expected, got {v!r:.40}")
    return v


def _oids(v):
    if type(v) is not list:
        _fail("array of object ids", v)
    for oid in v:
        _oid(oid)
    return v


def _task_ids(v):
    if type(v) is not list:
        _fail("array of task ids", v)
    for t in v:
        _task_id(t)
    return v


def _ref_ops(v):
    if type(v) is not list:
        _fail("array of [oid, +1|-1]", v)
    for op in v:
        if type(op) is not list or not (
                (len(op) == 2 and op[1] in (1, -1, 0, 3))
                or (len(op) == 3 and op[1] == 2 and type(op[2]) is bytes
                    and len(op[2]) == ID_LEN)):
            raise ProtocolError(f"[oid, +1|-1|0|3] or [oid, 2, cid] expected, got {op!r:.60}")
        _oid(op[0])
    return v


def _returns(v):
    """DONE's layout: one [kind, nframes, node_id|nil, size] per return."""
    if type(v) is not list:
        _fail("array of returns", v)
    for item in v:
        if (type(item) is not list or len(item) != 4 or item[0] not in (VALUE, ERROR)
                or type(item[1]) is not int or item[1] < 0 or type(item[3]) is not int):
            raise ProtocolError(f"[kind, nframes, node_id, size] expected, got {item!r:.60}")
        _opt_bytes(item[2])
    return v


def _dep_layout(v):
    """EXEC's layout of dependency values: one [nframes, node_id|nil] per dep."""
    if type(v) is not list:
        _fail("array of dep layouts", v)
    for item in v:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not int:
            raise ProtocolError(f"[nframes, node_id] expected, got {item!r:.60}")
        _opt_bytes(item[1])
    return v


def _version(v):
    if v != VERSION:
        raise VersionMismatch(v)
    return v


class VersionMismatch(ProtocolError):
    def __init__(self, peer_version):
        self.peer_version = peer_version
        super().__init__(f"peer speaks zray protocol version {peer_version!r}, "
                         f"this side speaks {VERSION}")


# --------------------------------------------------------------- task spec
class TaskSpec(NamedTuple):
    """What a task, actor creation or actor call is; travels in SUBMIT and EXEC as an
    array in this field order."""

    task_id: bytes
    kind: int  # TASK, ACTOR_CREATE, ACTOR_CALL
    fid: Any  # function id (TASK), class id (ACTOR_CREATE): bytes; method name (ACTOR_CALL): str
    name: str  # function, class or method name, for logs and errors
    num_returns: int  # or STREAMING, DYNAMIC
    resources: dict  # {name: units}, units in 1/UNIT
    deps: list  # [[arg index | kwarg name | -1 (all args, stored), oid], ...]
    nested: list  # oids of refs pickled inside the arguments
    options: dict  # max_retries, retry_exceptions, strategy, env_vars, renv (zray/_renv.py), ...
    actor_id: bytes  # b"" for plain tasks
    owner: bytes  # cid that owns the returns
    driver: bytes  # cid of the driver at the root of the call tree (for logs)
    job: bytes
    parent: bytes  # task id of the submitting task, or b""

    @classmethod
    def decode(cls, v) -> "TaskSpec":
        if type(v) is not list or len(v) != _SPEC_LEN:
            raise ProtocolError("task spec: array of %d expected" % _SPEC_LEN)
        # Fast path (every SUBMIT and EXEC): all scalar fields in one expression; the
        # field-by-field checks below run only to say what is wrong.
        (task_id, kind, fid, name, nret, resources, deps, nested, options, actor_id, owner,
         driver, job, parent) = v
        if (type(task_id) is bytes and len(task_id) == TASK_ID_LEN
                and type(fid) is (str if kind == ACTOR_CALL else bytes)
                and (kind == TASK or kind == ACTOR_CREATE or kind == ACTOR_CALL)
                and type(name) is str and type(nret) is int and DYNAMIC <= nret <= MAX_RETURNS
                and type(resources) is dict and type(deps) is list and type(nested) is list
                and type(options) is dict and type(actor_id) is bytes and type(owner) is bytes
                and type(driver) is bytes and type(job) is bytes and type(parent) is bytes):
            for r, u in resources.items():
                if type(r) is not str or type(u) is not int or u < 0:
                    raise ProtocolError(f"task spec: resource {r!r}: {u!r}")
            for dep in deps:
                if (type(dep) is not list or len(dep) != 2 or type(dep[0]) not in (int, str)
                        or type(dep[1]) is not bytes or len(dep[1]) != OBJECT_ID_LEN):
                    raise ProtocolError(f"task spec: dep {dep!r:.60}")
            for oid in nested:
                if type(oid) is not bytes or len(oid) != OBJECT_ID_LEN:
                    raise ProtocolError(f"task spec: nested ref {oid!r:.40}")
            return _tuple_new(cls, v)  # (its length checked above: _make checks it again)
        spec = cls._make(v)
        _task_id(spec.task_id)
        if spec.kind not in (TASK, ACTOR_CREATE, ACTOR_CALL):
            raise ProtocolError(f"task spec: unknown kind {spec.kind!r}")
        if spec.kind == ACTOR_CALL:
            _str(spec.fid)
        else:
            _bytes(spec.fid)
        _str(spec.name)
        nret = spec.num_returns
        if type(nret) is not int or not (DYNAMIC <= nret <= MAX_RETURNS):
            raise ProtocolError(f"task spec: num_returns {nret!r} out of range")
        _dict(spec.resources)
        for r, u in spec.resources.items():
            if type(r) is not str or type(u) is not int or u < 0:
                raise ProtocolError(f"task spec: resource {r!r}: {u!r}")
        _list(spec.deps)
        for dep in spec.deps:
            if type(dep) is not list or len(dep) != 2 or type(dep[0]) not in (int, str):
                raise ProtocolError(f"task spec: dep {dep!r:.60}")
            _oid(dep[1])
        _oids(spec.nested)
        _dict(spec.options)
        _bytes(spec.actor_id)
        _bytes(spec.owner)
        _bytes(spec.driver)
        _bytes(spec.job)
        _bytes(spec.parent)
        return spec

    def return_ids(self) -> list:
        """Object ids of this task's returns (see ``object_id``): 1..n; DYNAMIC: 1;
        STREAMING: the completion object, 0 (its items get ids as they come)."""
        tid = self.task_id
        n = self.num_returns
        if n < 0:
            return [tid + (b"\1\0\0\0" if n == DYNAMIC else b"\0\0\0\0")]
        return [tid + i.to_bytes(4, "little") for i in range(1, n + 1)]


_SPEC_LEN = len(TaskSpec._fields)
_tuple_new = tuple.__new__
MAX_RETURNS = MAX_RETURNS_LIMIT


def _spec(v):
    return TaskSpec.decode(v)


# ----------------------------------------------------------------- messages
# One class per message type: its fields in wire order. ``encode()`` gives the
# header frame; ``decode(buf)`` below checks and builds the right class. Every
# field is always sent (no optional trailing fields): a change of layout is a
# change of VERSION.
class Hello(NamedTuple):
    version: int
    kind: str  # "driver", "executor", "cli"
    node_id: bytes  # the node whose store this client shares, or b""
    pid: int
    job_id: bytes
    token: bytes = b""  # an executor's spawn token, vouched for by its node (EXEC_SPAWNED)
    TYPE = Msg.HELLO
    CHECKS = (_version, _str, _bytes, _int, _bytes, _bytes)


class Welcome(NamedTuple):
    info: dict  # session_dir, address, store_limit; or {"error": text}
    TYPE = Msg.WELCOME
    CHECKS = (_dict,)


class Ready(NamedTuple):
    TYPE = Msg.READY
    CHECKS = ()


class Fn(NamedTuple):
    fid: bytes
    nested: list  # refs captured in the function's closure: kept for the cluster's life
    TYPE = Msg.FN
    CHECKS = (_bytes, _oids)


class Submit(NamedTuple):
    spec: TaskSpec
    TYPE = Msg.SUBMIT
    CHECKS = (_spec,)


class Put(NamedTuple):
    oid: bytes
    kind: int
    nested: list
    node_id: Optional[bytes] = None  # the value is in this node's store (no frames); nil: inline
    size: int = 0
    TYPE = Msg.PUT
    CHECKS = (_oid, _int, _oids, _opt_bytes, _int)


class Sub(NamedTuple):
    oids: list
    TYPE = Msg.SUB
    CHECKS = (_oids,)


class Release(NamedTuple):
    oids: list
    TYPE = Msg.RELEASE
    CHECKS = (_oids,)


class Refs(NamedTuple):
    ops: list  # [[oid, +1 | -1 | 0 | 3] | [oid, 2, cid], ...] in order (module doc)
    TYPE = Msg.REFS
    CHECKS = (_ref_ops,)


class Cancel(NamedTuple):
    oid: bytes
    force: bool
    recursive: bool
    TYPE = Msg.CANCEL
    CHECKS = (_oid, _bool, _bool)


class Interrupt(NamedTuple):
    task_id: bytes
    force: bool
    TYPE = Msg.INTERRUPT
    CHECKS = (_task_id, _bool)


class Block(NamedTuple):
    task_id: bytes
    returned: list  # prefetched task ids handed back
    TYPE = Msg.BLOCK
    CHECKS = (_bytes, _task_ids)


class Unblock(NamedTuple):
    task_id: bytes
    TYPE = Msg.UNBLOCK
    CHECKS = (_bytes,)


class Reject(NamedTuple):
    task_id: bytes
    TYPE = Msg.REJECT
    CHECKS = (_task_id,)


RECALL_MAX = 64  # task ids in one RECALL (a window is far smaller)


def _recall_ids(v):
    if type(v) is not list or not 0 < len(v) <= RECALL_MAX:
        _fail(f"array of 1 to {RECALL_MAX} task ids", v)
    return _task_ids(v)


class Recall(NamedTuple):
    task_ids: list  # sent ahead to this executor: hand back those not started (REJECT)
    TYPE = Msg.RECALL
    CHECKS = (_recall_ids,)


class Done(NamedTuple):
    task_id: bytes
    returns: list  # [[kind, nframes, node_id|nil, size], ...]; an error: one item
    nested: list  # oids of refs inside the results
    retryable: bool  # an application error that retry_exceptions covers
    pushed: list  # pushed[i]: the executor already handed return i to its owner
    error: str  # the error's text when the task raised ("" otherwise): the broker never unpickles
    TYPE = Msg.DONE
    CHECKS = (_task_id, _returns, _oids, _bool, _list, _str)


class Yield(NamedTuple):
    task_id: bytes
    index: int
    kind: int
    nframes: int
    nested: list
    TYPE = Msg.YIELD
    CHECKS = (_task_id, _int, _int, _int, _oids)


class Log(NamedTuple):
    driver: bytes
    prefix: str  # "(name pid=N)", "!" appended for stderr
    text: str
    TYPE = Msg.LOG
    CHECKS = (_bytes, _str, _str)


class Print(NamedTuple):
    prefix: str
    text: str
    TYPE = Msg.PRINT
    CHECKS = (_str, _str)


class Req(NamedTuple):
    req_id: int
    op: str
    args: Any
    TYPE = Msg.REQ
    CHECKS = (_int, _str, _any)


class Reply(NamedTuple):
    req_id: int
    ok: bool
    result: Any
    TYPE = Msg.REPLY
    CHECKS = (_int, _bool, _any)


class Obj(NamedTuple):
    oid: bytes
    kind: int
    node_id: Optional[bytes] = None  # nil: the value is in the frames (or the blob)
    codec: Optional[int] = None  # not nil: one frame, a store blob in this codec
    TYPE = Msg.OBJ
    CHECKS = (_oid, _int, _opt_bytes, _opt_int)


class Exec(NamedTuple):
    spec: TaskSpec
    fn_included: bool  # the first frame is the function's blob
    n_args: int  # frames of the pickled (args, kwargs)
    deps: list  # [[nframes, node_id|nil], ...] one per spec.deps
    gpu_ids: list
    TYPE = Msg.EXEC
    CHECKS = (_spec, _bool, _int, _dep_layout, _list)


class StreamEnd(NamedTuple):
    task_id: bytes
    count: int
    TYPE = Msg.STREAM_END
    CHECKS = (_task_id, _int)


class Exit(NamedTuple):
    TYPE = Msg.EXIT
    CHECKS = ()


class NodeHello(NamedTuple):
    version: int
    node_id: bytes
    info: dict  # resources, gpu_ids, hostname, pid, labels, address, prestart, store_limit, log_dir
    TYPE = Msg.NODE_HELLO
    CHECKS = (_version, _bytes, _dict)


class Spawn(NamedTuple):
    count: int
    TYPE = Msg.SPAWN
    CHECKS = (_int,)


class ExecDied(NamedTuple):
    cid: bytes
    code: int
    TYPE = Msg.EXEC_DIED
    CHECKS = (_bytes, _int)


class ExecSpawned(NamedTuple):
    cid: bytes
    token: bytes  # the executor must say it in its HELLO: only then is it one of ours
    TYPE = Msg.EXEC_SPAWNED
    CHECKS = (_bytes, _bytes)


class KillExec(NamedTuple):
    cid: bytes
    TYPE = Msg.KILL_EXEC
    CHECKS = (_bytes,)


class Heartbeat(NamedTuple):
    TYPE = Msg.HEARTBEAT
    CHECKS = ()


class Shutdown(NamedTuple):
    TYPE = Msg.SHUTDOWN
    CHECKS = ()


class Fetch(NamedTuple):
    oid: bytes
    dest: bytes  # node_ident(node) or client_dest(cid)
    TYPE = Msg.FETCH
    CHECKS = (_oid, _bytes)


class Blob(NamedTuple):
    oid: bytes
    dest: bytes
    codec: int  # RAW / LZ4; -1 (no frame): the object is not here
    TYPE = Msg.BLOB
    CHECKS = (_oid, _bytes, _int)


class Store(NamedTuple):
    oid: bytes
    codec: int
    TYPE = Msg.STORE
    CHECKS = (_oid, _int)


class Stored(NamedTuple):
    oid: bytes
    size: int  # -1: failed
    TYPE = Msg.STORED
    CHECKS = (_oid, _int)


class Free(NamedTuple):
    oids: list
    TYPE = Msg.FREE
    CHECKS = (_oids,)


class Spill(NamedTuple):
    oids: list
    TYPE = Msg.SPILL
    CHECKS = (_oids,)


class LogRead(NamedTuple):
    req_id: int  # the broker's relay id (not the client's)
    op: str
    args: dict
    TYPE = Msg.LOG_READ
    CHECKS = (_int, _str, _dict)


class LogData(NamedTuple):
    req_id: int
    ok: bool
    result: Any  # plain data (msgpack): never unpickled
    TYPE = Msg.LOG_DATA
    CHECKS = (_int, _bool, _any)
def _nbytes(v):
    if type(v) is not int or not 0 <= v < 1 << 62:
        raise ProtocolError(f"a byte count expected, got {v!r:.40}")
    return v


class NeedSpace(NamedTuple):
    nbytes: int
    TYPE = Msg.NEED_SPACE
    CHECKS = (_nbytes,)


NEED_SPACE_S = 0.2
BATCH_MAX = 1024  # messages in one BATCH


def _batch_counts(v):
    if type(v) is not list or not 1 <= len(v) <= BATCH_MAX:
        raise ProtocolError("BATCH: a list of 1..BATCH_MAX frame counts expected")
    for n in v:
        if type(n) is not int or not 1 <= n <= 1 << 20:
            raise ProtocolError(f"BATCH: a frame count of 1 or more expected, got {n!r:.20}")
    return v


def _batch_sizes(v):
    if v is None:
        return v
    if type(v) is not list or len(v) > BATCH_MAX * 64:
        raise ProtocolError("BATCH: nil or a list of frame sizes expected")
    for n in v:
        if type(n) is not int or n < 0:
            raise ProtocolError(f"BATCH: a frame size expected, got {n!r:.20}")
    return v


class Batch(NamedTuple):
    counts: list
    # nil: the messages' frames follow as frames of their own; a list: they are packed
    # into one frame, these its frames' sizes in order (small batches: PACK_MAX)
    sizes: Optional[list] = None
    TYPE = Msg.BATCH
    CHECKS = (_batch_counts, _batch_sizes)


class Route(NamedTuple):
    actor_id: bytes
    state: str  # "alive", "restarting", "dead"
    address: str  # ipc://... where the actor's executor takes DCALLs ("" if none)
    host: str  # the hostname of that executor (ipc reaches it only from the same host)
    ordered: bool  # one call at a time in arrival order (a plain actor): see zray/_direct.py
    incarnation: int  # the actor's restart count
    reason: str  # why it is restarting or dead
    # tcp://... where callers on other hosts reach that executor ("" if none): zray/_xhost.py
    tcp_address: str = ""
    TYPE = Msg.ROUTE
    CHECKS = (_bytes, _str, _str, _str, _bool, _int, _str, lambda v: _tcp_address(v))


def _reply_to(v):
    if (type(v) is not str or len(v) > 200
            or not (v.startswith("ipc://") or _is_tcp_endpoint(v))):
        raise ProtocolError(f"an ipc:// or tcp://host:port address expected, got {v!r:.40}")
    return v


def _tcp_address(v):
    if type(v) is not str or len(v) > 200 or (v and not _is_tcp_endpoint(v)):
        raise ProtocolError(f"a tcp://host:port address or nothing expected, got {v!r:.40}")
    return v


def _is_tcp_endpoint(v: str) -> bool:
    """tcp://host:port (IPv6 hosts bracketed), nothing else (no wildcard, no source)."""
    if not v.startswith("tcp://"):
        return False
    host, _, port = v[6:].rpartition(":")
    return (port.isdigit() and 0 < int(port) < 65536 and host != "" and host != "*"
            and ";" not in host and (host[0] != "[" or host[-1] == "]"))


def _direct_spec(v):
    spec = TaskSpec.decode(v)
    if spec.kind not in (ACTOR_CALL, TASK) or spec.deps or spec.num_returns < 0 or (
            spec.kind == TASK and (spec.num_returns != 1 or spec.nested)):
        raise ProtocolError("DCALL: an actor call without ObjectRef arguments, or a plain "
                            "task with one return and none, expected")
    return spec


class DCall(NamedTuple):
    spec: TaskSpec
    n_args: int  # frames of the pickled (args, kwargs)
    reply_to: str  # the caller's PULL
    TYPE = Msg.DCALL
    CHECKS = (_direct_spec, _int, _reply_to)


def _direct_returns(v):
    if type(v) is not list:
        _fail("array of returns", v)
    for item in v:
        if (type(item) is not list or len(item) != 2 or item[0] not in (VALUE, ERROR)
                or type(item[1]) is not int or item[1] < 0):
            raise ProtocolError(f"[kind, nframes] expected, got {item!r:.60}")
    return v


def _handed(v):
    """DDONE handed: [] or one array of object ids per return."""
    if type(v) is not list:
        _fail("array of arrays of object ids", v)
    n = 0
    for oids in v:
        _oids(oids)
        n += len(oids)
    if n > MAX_HANDED:
        raise ProtocolError(f"{n} handed refs (at most {MAX_HANDED})")
    return v


MAX_HANDED = 1 << 20  # refs handed over in one inline reply


class DDone(NamedTuple):
    task_id: bytes
    returns: list  # [[kind, nframes], ...]: one per return; an error: one ERROR per return
    retryable: bool  # an application error that retry_exceptions covers
    handed: list  # [] or [[oid, ...] per return]: refs handed over with it (REFS 2 / 3)
    TYPE = Msg.DDONE
    CHECKS = (_task_id, _direct_returns, _bool, _handed)


def _lease_id(v):
    if type(v) is not bytes or len(v) != LEASE_ID_LEN:
        raise ProtocolError(f"lease id of {LEASE_ID_LEN} bytes expected, got {v!r:.40}")
    return v


def _cid(v):
    if type(v) is not bytes or len(v) != ID_LEN:
        raise ProtocolError(f"client id of {ID_LEN} bytes expected, got {v!r:.40}")
    return v


LEASE_ID_LEN = 16


def _fid(v):
    if type(v) is not bytes or len(v) > 64:
        raise ProtocolError(f"function id of at most 64 bytes expected, got {v!r:.40}")
    return v


def _task_id_or_none(v):
    if type(v) is not bytes or (v and len(v) != TASK_ID_LEN):
        raise ProtocolError(f"empty or a task id of {TASK_ID_LEN} bytes expected, got {v!r:.40}")
    return v


class Lease(NamedTuple):
    lease_id: bytes  # random: only the broker, the executor and the holder know it
    holder: bytes  # the cid of the client the executor is leased to
    active: bool  # True: leased (B->E, C->E); False: ended (E->C on the lane; B->C when the
    # executor ended it before taking the holder's lane: brokerd/leases.py)
    fid: bytes  # the function the lease runs (B->E: its blob follows if not loaded there)
    running: bytes = b""  # E->C end mark: the call still running (its DDONE follows), or b""
    TYPE = Msg.LEASE
    CHECKS = (_lease_id, _cid, _bool, _fid, _task_id_or_none)


class DCancel(NamedTuple):
    task_id: bytes
    force: bool
    TYPE = Msg.DCANCEL
    CHECKS = (_task_id, _bool)


MESSAGES = (Hello, Welcome, Ready, Fn, Submit, Put, Sub, Release, Refs, Cancel, Interrupt,
            Block, Unblock, Reject, Done, Yield, Log, Print, Req, Reply, Obj, Exec, StreamEnd,
            Exit, NodeHello, Spawn, ExecSpawned, ExecDied, KillExec, Heartbeat, Shutdown, Fetch, Blob,
            Store, Stored, Free, Spill, LogRead, LogData, NeedSpace, Batch,
            Route, DCall, DDone, DCancel, Recall, Lease)
_BY_TYPE = {cls.TYPE: cls for cls in MESSAGES}
_packb = msgpack.packb  # a Packer object is not thread-safe; clients send from any thread


_SUBMIT_PREFIX = _packb((Msg.SUBMIT, None))[:2]  # fixarray(2), SUBMIT
_EXEC_PREFIX = _packb((Msg.EXEC, None, None, None, None, None))[:2]  # fixarray(6), EXEC


def submit_spec_bytes(header) -> Optional[bytes]:
    """The packed TaskSpec inside a SUBMIT header frame (already checked by ``decode``),
    so that the broker can forward it in EXEC without packing it again."""
    buf = memoryview(header)
    if buf[:2] != _SUBMIT_PREFIX:
        return None
    return bytes(buf[2:])


def encode_exec(spec_bytes: bytes, fn_included: bool, n_args: int, deps: list,
                gpu_ids: list) -> bytes:
    """``encode(Exec(spec, ...))`` for a spec that is still packed (see
    ``submit_spec_bytes``): the same bytes, without re-packing the spec."""
    return _EXEC_PREFIX + spec_bytes + _packb((fn_included, n_args, deps, gpu_ids))[1:]


def encode(msg) -> bytes:
    """The header frame of message ``msg`` (an instance of one of ``MESSAGES``)."""
    return _packb((msg.TYPE, *msg))


def _fast_decoder(cls):
    """A decoder for ``cls`` with its plain type checks inlined (the broker decodes every
    message: a function call per field was most of the cost). It returns None where a
    check fails; ``decode`` then runs the checks one by one to say which."""
    n = len(cls.CHECKS)
    names = [f"v{i}" for i in range(n)]
    conds, calls, env = [], [], {"cls": cls}
    for i, check in enumerate(cls.CHECKS):
        t = getattr(check, "exact_type", None)
        if t is not None:
            env[f"T{i}"] = t
            cond = f"type(v{i}) is T{i}"
            conds.append(f"(v{i} is None or {cond})" if getattr(check, "nil", False) else cond)
        elif check is not _any:
            env[f"C{i}"] = check
            calls.append(f"    v{i} = C{i}(v{i})")
    unpack = ", ".join(names) + ("," if n == 1 else "")
    src = ["def fast(h):", f"    if len(h) != {n + 1}:", "        return None"]
    if n:
        src.append(f"    _, {unpack} = h")
    if conds:
        src += [f"    if not ({' and '.join(conds)}):", "        return None"]
    src += calls + [f"    return cls({', '.join(names)})"]
    exec("\n".join(src), env)  # noqa: S102 - source built above from our own tables
    return env["fast"]


_FAST = {cls.TYPE: _fast_decoder(cls) for cls in MESSAGES if cls is not Hello
         and cls is not NodeHello}  # HELLOs are rare and must report a version first


def decode_from_broker(buf):
    """A header a client got from its broker: the layout is checked (type, field count),
    the field types are not. A client's sockets reach only the broker, whose messages
    were built by ``encode`` from checked input, and an executor runs what the broker
    sends it anyway; the full checks of ``decode`` are for the broker and node agents,
    which anyone holding the key can reach. Saves ~2 us per EXEC."""
    try:
        h = msgpack.unpackb(buf, raw=False, use_list=True, strict_map_key=False)
        cls = _BY_TYPE[h[0]]
    except Exception:
        raise ProtocolError("not a zray message") from None
    if len(h) != len(cls.CHECKS) + 1:
        raise ProtocolError(f"{cls.TYPE.name}: {len(cls.CHECKS)} fields expected")
    if cls is Exec or cls is Submit or cls is DCall or h[0] == Msg.LINEAGE:
        spec = h[1]
        if type(spec) is not list or len(spec) != _SPEC_LEN:
            raise ProtocolError(f"{cls.TYPE.name}: bad task spec")
        h[1] = TaskSpec._make(spec)
    return cls._make(h[1:])


def decode(buf):
    """Check a header frame and return its message; ProtocolError if it is not one."""
    try:
        h = msgpack.unpackb(buf, raw=False, use_list=True, strict_map_key=False)
    except Exception as e:
        raise ProtocolError(f"header is not msgpack: {e}") from None
    if type(h) is not list or not h:
        raise ProtocolError("header is not a non-empty array")
    fast = _FAST.get(h[0])
    if fast is not None:
        try:
            msg = fast(h)
        except ProtocolError as e:
            raise ProtocolError(f"{Msg(h[0]).name}: {e}") from None
        if msg is not None:
            return msg
    cls = _BY_TYPE.get(h[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {h[0]!r:.20}")
    checks = cls.CHECKS
    if len(h) != len(checks) + 1:
        if cls is Hello or cls is NodeHello:  # say which version first, whatever the layout
            _version(h[1] if len(h) > 1 else None)
        raise ProtocolError(f"{cls.TYPE.name}: {len(checks)} fields expected, got {len(h) - 1}")
    try:
        return cls._make([check(v) for check, v in zip(checks, h[1:], strict=False)])
    except ProtocolError as e:
        if isinstance(e, VersionMismatch):
            raise
        raise ProtocolError(f"{cls.TYPE.name}: {e}") from None



_BATCH_PREFIX = _packb((Msg.BATCH, None, None))[:2]  # fixarray(3), BATCH


# A BATCH whose frames come to at most this many bytes travels as two frames (header,
# and its messages' frames packed in one): one frame for libzmq to move and CURVE to
# box instead of two or more per message. Bigger ones keep their frames (zero-copy).
PACK_MAX = 64 << 10


def encode_batch(msgs: list) -> list:
    """[header, *frames] of one BATCH carrying ``msgs`` [(header, frames)...]."""
    counts, out = [], [b""]
    for header, frames in msgs:
        counts.append(1 + len(frames))
        out.append(header)
        out.extend(frames)
    sizes = [len(f) for f in out[1:]]
    if sum(sizes) <= PACK_MAX:
        return [encode(Batch(counts, sizes)), b"".join(out[1:])]
    out[0] = encode(Batch(counts))
    return out


def batch_messages(m: Batch, frames: list) -> list:
    """The messages [[header, *frames]...] a decoded BATCH ``m`` carries in ``frames``
    (the frames after its header). Packed frames come back as memoryviews of the one
    frame (``buffer_of`` reads either). ProtocolError if the counts or sizes do not add up."""
    counts, sizes = m.counts, m.sizes
    if sizes is not None:
        if len(frames) != 1 or len(sizes) != sum(counts):
            raise ProtocolError("BATCH: a packed batch is one frame of len(sizes) frames")
        buf = buffer_of(frames[0])
        if sum(sizes) != len(buf):
            raise ProtocolError("BATCH: frame sizes do not add up to the packed frame")
        unpacked, pos = [], 0
        for n in sizes:
            unpacked.append(buf[pos:pos + n])
            pos += n
        frames = unpacked
    elif sum(counts) != len(frames):
        raise ProtocolError("BATCH: frame counts do not add up to the frames")
    out, i = [], 0
    for n in counts:
        out.append(frames[i:i + n])
        i += n
    return out


def buffer_of(frame) -> memoryview:
    """The bytes of a received frame: a zmq.Frame's buffer, or the frame itself (a
    memoryview out of a packed BATCH, or bytes)."""
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def unbatch(parts: list) -> list:
    """The messages [[header, *frames]...] in ``parts`` (one received message, Frames or
    bytes): itself if it is not a BATCH. Raises ProtocolError for a bad BATCH."""
    head = parts[0]
    buf = head.buffer if hasattr(head, "buffer") else memoryview(head)
    if buf[:2] != _BATCH_PREFIX:
        return [parts]
    return batch_messages(decode(buf), parts[1:])


# ------------------------------------------------ node-to-node blobs (zray/_peer.py)
def _node_id(v):
    if type(v) is not bytes or len(v) != ID_LEN:
        raise ProtocolError(f"node id of {ID_LEN} bytes expected, got {v!r:.40}")
    return v


def _ticket(v):
    if type(v) is not bytes or len(v) != 32:
        raise ProtocolError("a ticket of 32 bytes expected")
    return v


def _peer_address(v):
    if type(v) is not str or len(v) > 1024 or not v.startswith(("tcp://", "ipc://")):
        raise ProtocolError(f"a tcp:// or ipc:// address expected, got {v!r:.60}")
    return v


def _codec(v):
    if type(v) is not int or v not in (-1, 0, 1):
        raise ProtocolError(f"codec -1, 0 or 1 expected, got {v!r:.20}")
    return v


class Pull(NamedTuple):
    oid: bytes
    src: bytes  # the node that holds it
    address: str  # that node's peer socket
    ticket: bytes  # the holder checks it: the broker let this node fetch this object
    size: int  # the object's file size
    TYPE = Msg.PULL
    CHECKS = (_oid, _node_id, _peer_address, _ticket, _nbytes)


class PullFailed(NamedTuple):
    oid: bytes
    src: bytes
    unreachable: bool  # src did not answer at all (not: it answered that it had no copy)
    TYPE = Msg.PULL_FAILED
    CHECKS = (_oid, _node_id, _bool)


class PeerGet(NamedTuple):
    oid: bytes
    node_id: bytes  # who asks (the ticket names it)
    ticket: bytes
    offset: int
    length: int
    TYPE = Msg.PEER_GET
    CHECKS = (_oid, _node_id, _ticket, _nbytes, _nbytes)


class PeerChunk(NamedTuple):
    oid: bytes
    offset: int
    total: int  # the object's file size
    codec: int  # RAW / LZ4; -1 (no frame): not here
    TYPE = Msg.PEER_CHUNK
    CHECKS = (_oid, _nbytes, _nbytes, _codec)


MESSAGES += (Pull, PullFailed, PeerGet, PeerChunk)
for _cls in (Pull, PullFailed, PeerGet, PeerChunk):
    _BY_TYPE[_cls.TYPE] = _cls
    _FAST[_cls.TYPE] = _fast_decoder(_cls)


class Lineage(NamedTuple):
    spec: TaskSpec
    TYPE = Msg.LINEAGE
    CHECKS = (_spec,)


MESSAGES += (Lineage,)
_BY_TYPE[Lineage.TYPE] = Lineage
_FAST[Lineage.TYPE] = _fast_decoder(Lineage)


# ------------------------------------------- the broker's per-task encodes, prebuilt
# encode(Obj(oid, kind)) for a value that travels inline (node_id and codec nil): the
# broker sends one per result. Built from the header's packed prefix and suffix instead
# of a NamedTuple and a packb (0.9 -> 0.2 us); the bytes are the same (tests check).
_OBJ_HEAD = _packb((Msg.OBJ, b"\0" * OBJECT_ID_LEN, VALUE, None, None))
_OBJ_PREFIX = _OBJ_HEAD[:-(OBJECT_ID_LEN + 3)]  # fixarray(5), OBJ, bin8 header of 16 bytes
_OBJ_TAILS = {VALUE: _packb(VALUE) + b"\xc0\xc0", ERROR: _packb(ERROR) + b"\xc0\xc0"}


def encode_obj(oid: bytes, kind: int) -> bytes:
    """``encode(Obj(oid, kind))``: the header of an object sent inline (an id the broker
    checked at decode: OBJECT_ID_LEN bytes; kind VALUE or ERROR)."""
    if len(oid) != OBJECT_ID_LEN or kind not in _OBJ_TAILS:
        return encode(Obj(oid, kind))
    return _OBJ_PREFIX + oid + _OBJ_TAILS[kind]


_EXEC_TAILS: dict = {}  # (fn_included, n_args) -> packed tail of an EXEC without deps or GPUs


def encode_exec_plain(spec_bytes: bytes, fn_included: bool, n_args: int) -> bytes:
    """``encode_exec(spec_bytes, fn_included, n_args, [], [])``: a task without ObjectRef
    arguments or GPUs (most tasks), its header's tail packed once per argument count."""
    key = (fn_included, n_args)
    tail = _EXEC_TAILS.get(key)
    if tail is None:
        tail = _packb((fn_included, n_args, [], []))[1:]
        if len(_EXEC_TAILS) < 256:
            _EXEC_TAILS[key] = tail
    return _EXEC_PREFIX + spec_bytes + tail


def _fast_submit(h):
    """SUBMIT's decoder in ``decode`` (the broker decodes one per task): TaskSpec.decode's
    checks, one call and one NamedTuple constructor fewer than the generated decoder
    (2.04 -> 1.79 us a SUBMIT); None for a layout ``decode`` reports field by field."""
    if len(h) != 2:
        return None
    return _tuple_new(Submit, (TaskSpec.decode(h[1]),))


_FAST[Msg.SUBMIT] = _fast_submit
