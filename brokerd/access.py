"""Which client may use which object: SUB, REFS +1 and task arguments are bound to refs.

::

    SUB oids / REFS +1 / SUBMIT deps+nested --may_use(cid, oid)?--> yes: as before
                                                                   not yet: parked (PARK_S)
                                                                   no: "not known" error / ignored

A client may use an object (read it with SUB, pass it to a task, announce
that it holds a ref) when it holds a ref the cluster gave it:

* it owns the object (it put it, or submitted the task that returns it);
* it announced a ref it was given (``holders``, itself checked by this rule);
* it is an executor running a task (or hosting an actor, or running a call)
  that has the object among its arguments or the refs pickled inside them, or
  names it as a runtime_env package (working_dir, py_modules) to set up;
* the object's ref was pickled inside another object the client may use
  (``contained``: the nested refs of PUT, DONE and YIELD), to any depth;
* the ref escaped (pickled out of band, or captured by a function
  definition): whoever unpickles it may use it, as in Ray;
* an executor handed the ref to it inside an inline reply (REFS 2, ``handoffs``). Its
  take (REFS 3) may come first (another socket): it waits (parked) like a +1, even for
  an object the broker does not know yet (its PUT may still be on its way).

A client that got a value with refs inside straight from an executor on its
node (direct push) may ask before the broker has handled that executor's
DONE, which says what the value contains: such a request waits (parked) until
containment changes or PARK_S passes. After a broker restart, a SUB of an object
not known yet waits until the grace period ends if its owner may still put it again
(the SUB of a ``get`` sent before the restart can overtake the owner's replay). A SUB that is refused is answered as
for an object that does not exist (no oracle for which ids exist); a REFS +1
that is refused is ignored. Both are counted (``refused``).

Owns: the parked requests and the refusal counter. Reads: objects, executors
and clients.
"""

from __future__ import annotations

import logging
import time

from zray._protocol import ID_LEN

log = logging.getLogger("zray.broker")

PARK_S = 5.0  # how long a request may wait for the containment that allows it
MAX_DEPTH = 16  # containers followed upward (refs inside refs inside ...)
MAX_PARKED = 100_000
MAX_VISITED = 10_000  # objects looked at for one request


class RefAccess:
    def __init__(self, objects, executors: dict, clients: dict):
        self.objects = objects  # ObjectDirectory
        self.executors = executors  # cid -> Executor (the engine's)
        self.clients = clients
        self.parked: list = []  # (deadline, cid, op, oid, seq) waiting for containment
        self.refused = 0
        self.logged = 0
        # After a broker restart the containment that proved borrowed refs is gone:
        # until then (monotonic), a REFS +1 is taken as the client says (brokerd/restart.py).
        self.trust_until = 0.0
        # (cid, oid) of the takes (REFS 3) parked: a SUB from that client of that object
        # waits with them, even before the object's PUT has come (its SUB may overtake it)
        self.taking: set = set()
        # A -1 from a client for an object whose +1 or take from it is still parked: those
        # must not make it a holder when they settle (it let go after them: a holder for
        # good, the object kept for ever). (cid, oid) -> the last parked op's sequence
        # number the -1 came after; parked +1/take ops carry theirs (``seq``, None for a SUB).
        self.let_go: dict = {}
        self.seq = 0

    def may_use(self, cid: bytes, oid: bytes) -> bool:
        objects = self.objects.objects
        obj = objects.get(oid)
        if obj is None:
            return False
        if obj.owner == cid or cid in obj.holders or obj.escaped:  # the common case
            return True
        if obj.handoffs is not None and cid in obj.handoffs:  # handed to it (REFS 2)
            return True
        # Up through the values it was pickled inside, breadth first, each once.
        seen = {oid}
        level = [oid]
        for _ in range(MAX_DEPTH):
            up = []
            for o in level:
                x = objects.get(o)
                if x is None:
                    continue
                if (x.owner == cid or cid in x.holders or x.escaped
                        or (x.handoffs is not None and cid in x.handoffs)
                        or self._task_arg(cid, o)):
                    return True
                for c in x.containers or ():
                    if c not in seen and len(seen) < MAX_VISITED:
                        seen.add(c)
                        up.append(c)
            if not up:
                return False
            level = up
        return False

    def _task_arg(self, cid: bytes, oid: bytes) -> bool:
        ex = self.executors.get(cid)
        if ex is None:
            return False
        tasks = [ex.task, *ex.ahead]
        if ex.actor is not None:
            tasks.append(ex.actor.create)
            tasks.extend(ex.actor.inflight.values())
        for task in tasks:
            if task is not None and (oid in task.deps or oid in task.holds
                                     or _renv_package(task, oid)):
                return True
        return False

    # ------------------------------------------------------------ requests
    def subscribe(self, cid: bytes, oids: list) -> None:
        """SUB: the objects this client may use are subscribed; the others wait for
        containment (parked) or are answered as unknown."""
        ok = []
        for oid in oids:
            if self.may_use(cid, oid):
                ok.append(oid)
            else:
                self._park(cid, "sub", oid, None)
        if ok:
            self.objects.subscribe(cid, ok)

    def refs(self, cid: bytes, ops) -> None:
        """REFS: a +1 or a take (3) of an object the client may not use (yet: a hand-off
        may still be on its way) waits or is ignored; a keep (0) or a hand-off (2) of one
        it may not use is ignored; -1 is the client's own business (it only lets go)."""
        out = []
        trusted = self.trust_until and time.monotonic() < self.trust_until
        for op in ops:
            oid, delta = op[0], op[1]
            if trusted:
                if ((delta == 1 or delta == 3) and oid not in self.objects.objects
                        and len(self.objects.restart_holders) < 1 << 20):
                    # Its owner may not have put it again yet: a holder when it does.
                    self.objects.restart_holders.setdefault(oid, set()).add(cid)
                    continue
                out.append(op)
                continue
            if delta == -1 or self.may_use(cid, oid):
                if delta == -1 and self.parked:
                    self._note_let_go(cid, oid)
                out.append(op)
            elif delta == 1 or delta == 3:
                self.seq += 1
                self._park(cid, "ref" if delta == 1 else "take", oid, self.seq)
            else:
                self._refuse(cid, oid, f"REFS {delta}")
        if out:
            self.objects.refs(cid, out)

    def _park(self, cid, op, oid, seq) -> None:
        now = time.monotonic()
        deadline = now + PARK_S
        if oid not in self.objects.objects and not self._coming(cid, op, oid):
            if now < self.trust_until and self._may_come(cid, oid):
                deadline = self.trust_until  # its owner has until then to put it again
            else:
                self._settle(cid, op, oid, False, seq)
                return
        if len(self.parked) >= MAX_PARKED:
            self._settle(cid, op, oid, False, seq)
            return
        if op == "take":
            self.taking.add((cid, oid))
        self.parked.append((deadline, cid, op, oid, seq))

    def _coming(self, cid: bytes, op: str, oid: bytes) -> bool:
        """An object not known yet that ``cid`` says was handed to it (a take, or a SUB
        behind its take): its executor's PUT and hand-off may still be on their way."""
        return op == "take" or (cid, oid) in self.taking

    def _may_come(self, cid: bytes, oid: bytes) -> bool:
        """After a broker restart: may ``oid`` (not known yet) still be put again by its
        owner? A borrower said it holds it, or ``cid`` owns it: a SUB it sent before the
        restart may come in before its replay's PUT (another socket; zray/_reconnect.py)."""
        return oid in self.objects.restart_holders or oid[:ID_LEN] == cid

    def contained(self) -> None:
        """Containment changed (a DONE, YIELD or PUT with refs inside): parked requests
        that are now allowed go through."""
        if self.parked:
            self.retry(time.monotonic())

    def retry(self, now: float) -> None:
        parked, self.parked = self.parked, []
        for item in parked:
            deadline, cid, op, oid, seq = item  # (seq: a +1's or take's; None for a SUB)
            if self.may_use(cid, oid):
                self._settle(cid, op, oid, True, seq)
            elif now >= deadline or (oid not in self.objects.objects
                                     and not self._coming(cid, op, oid)
                                     and not self._may_come(cid, oid)):
                self._settle(cid, op, oid, False, seq)
            else:
                self.parked.append(item)

    def _note_let_go(self, cid: bytes, oid: bytes) -> None:
        """A -1 from ``cid`` for ``oid``: its +1s and takes parked before it are undone."""
        last = max((item[4] for item in self.parked
                    if item[1] == cid and item[3] == oid and item[2] in ("ref", "take")),
                   default=None)
        if last is not None:
            self.let_go[(cid, oid)] = last

    def _settle(self, cid, op, oid, allowed: bool, seq=None) -> None:
        if op == "take":
            self.taking.discard((cid, oid))
        undone = False
        if seq is not None and self.let_go:
            last = self.let_go.get((cid, oid))
            undone = last is not None and seq <= last
            if last is not None and seq >= last:
                del self.let_go[(cid, oid)]
        if allowed:
            if op == "sub":
                self.objects.subscribe(cid, [oid])
            elif undone:  # let go since: no holder; a take still ends its hand-off
                if op == "take":
                    obj = self.objects.objects.get(oid)
                    if obj is not None:
                        self.objects._hand_count(obj, cid, -1)
            else:
                self.objects.refs(cid, [(oid, 3 if op == "take" else 1)])
            return
        self._refuse(cid, oid, {"sub": "SUB", "ref": "REFS +1"}.get(op, "REFS 3"))
        if op == "sub":  # answered as for an id that does not exist
            self.objects.unknown(cid, oid)

    def _refuse(self, cid, oid, what) -> None:
        self.refused += 1
        if self.logged < 20:
            self.logged += 1
            log.warning("refused %s of object %s from client %s: it holds no ref to it",
                        what, oid.hex(), cid.hex())


def renv_packages(spec) -> list:
    """The object ids of the runtime_env packages (working_dir, py_modules) a spec names."""
    renv = spec.options.get("renv")
    if type(renv) is not dict:
        return []
    pkgs = [renv.get("working_dir")]
    mods = renv.get("py_modules")
    if type(mods) is list:
        pkgs.extend(mods)
    out = []
    for p in pkgs:
        if type(p) is list and len(p) >= 2 and type(p[1]) is str:
            try:
                out.append(bytes.fromhex(p[1]))
            except ValueError:
                continue
    return out


def _renv_package(task, oid: bytes) -> bool:
    """Is ``oid`` a runtime_env package (working_dir, py_modules) the task names? Its
    executor fetches it before the task runs (workerd/renv.py; wire form in zray/_renv.py:
    ``[sha256 hex, object id hex, single_root]``)."""
    renv = task.spec.options.get("renv")
    if type(renv) is not dict:
        return False
    want = oid.hex()
    pkgs = [renv.get("working_dir")]
    mods = renv.get("py_modules")
    if type(mods) is list:
        pkgs.extend(mods)
    return any(type(p) is list and len(p) >= 2 and p[1] == want for p in pkgs)
