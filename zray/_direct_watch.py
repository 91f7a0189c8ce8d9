"""Direct actor calls: a caller notices its actor's death when the direct connection breaks.

::

    route.sock (PUSH to the actor's executor) --socket monitor: DISCONNECTED-->
        zray-direct-watch thread --broken()--> under DirectCalls.lock: the route stops
        taking direct calls (state "asking", the dead address remembered), REQ
        actor_route asks the broker now
    DEATH_INFO_S later, each call that was in flight on it and is still unanswered
        --DDONE (ERROR; retryable while it has max_task_retries left)--> our own reply
        inbox --> the I/O thread's DirectCalls.done(), as if the executor had answered:
        a retryable call is resubmitted through the broker, the others fail with
        ActorUnavailableError
    a lane (zray/_lane.py) that ends --DirectCalls._lane_broke--> the same steps, from
        the thread that read the EOF (settle_later); its calls fail with ActorDiedError:
        only the executor's process held the other end of that Unix socket, so the
        process is gone (the broker's ROUTE may still say "restarting" first)

The broker learns of a dead executor from its node agent within moments, but
of a dead node (agent and executors together, or a host gone) only after
NODE_TIMEOUT_S without heartbeats; a caller on another host that waited for
the broker's ROUTE waited as long. The executor's process holds the other end
of the caller's connection, so its death (or its host's, once TCP notices)
closes it at once. As in Ray (which waits ``timeout_ms_task_wait_for_death_info``
for the GCS's word before it fails a call), the broker's answer is waited for
a little: a ROUTE "restarting" / "dead" within DEATH_INFO_S settles the calls
with the error the broker path gives (ActorDiedError for a dead actor), and the
calls are failed here only if it does not come in time.

While the route is broken, a ROUTE "alive" at the address that broke (the
broker has not noticed yet) sends nothing direct: new calls go through the
broker until the actor is somewhere else, or dead.

``ZRAY_DIRECT_DEATH_INFO_S`` (default 3) sets the wait. The thread starts with
the first direct connection (or broken lane) and polls every 0.2 s; its monitor
sockets and its PUSH to the reply inbox are its own.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from zray import _protocol as P
from zray import exceptions
from zray._procutil import env_number
from zray._serialization import serialize_error
from zray._transport import send_parts

log = logging.getLogger("zray.direct")


DEATH_INFO_S = env_number("ZRAY_DIRECT_DEATH_INFO_S", 3.0, 0, 3600, what="seconds")
TICK_S = 0.2
_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED


class DeathWatch:
    """The monitors of one client's direct connections (module doc)."""

    def __init__(self, direct):
        self.direct = direct
        self.new: list = []  # (monitor PAIR, route, sock) handed over to the thread
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="zray-direct-watch", daemon=True)
        self.thread.start()

    def watch(self, route, sock: zmq.Socket) -> None:
        """(under DirectCalls.lock) Watch the new direct connection ``sock`` of ``route``."""
        pair = sock.get_monitor_socket(_EVENTS)
        self.new.append((pair, route, sock))

    def settle_later(self, route, lost: list, died: bool = False) -> None:
        """(under DirectCalls.lock) Settle the calls ``lost`` of ``route`` DEATH_INFO_S from
        now unless the broker's ROUTE does first; ``died``: the executor's process is known
        to be gone (its lane ended), so they fail with ActorDiedError."""
        self.new.append((None, route, (time.monotonic() + DEATH_INFO_S, lost, died)))

    def close(self) -> None:
        self.closing = True
        self.thread.join(5)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        direct = self.direct
        poller = zmq.Poller()
        watched: dict = {}  # monitor PAIR -> (route, sock)
        broken: list = []  # (deadline, route, task ids in flight when it broke)
        inbox = None  # PUSH to our own reply inbox
        try:
            while not self.closing:
                with direct.lock:
                    new, self.new = self.new, []
                for pair, route, sock in new:
                    if pair is None:  # settle_later: (deadline, lost, died)
                        broken.append((sock[0], route, sock[1], sock[2]))
                        broken.sort(key=lambda b: b[0])
                        continue
                    poller.register(pair, zmq.POLLIN)
                    watched[pair] = (route, sock)
                if not watched:  # (zmq_poll with nothing to poll returns at once: a spin)
                    time.sleep(TICK_S)
                    ready = []
                else:
                    ready = poller.poll(int(TICK_S * 1000))
                for pair, _ in ready:
                    try:
                        ev = recv_monitor_message(pair, zmq.NOBLOCK)
                    except zmq.ZMQError as e:
                        # readable yet nothing whole to read: a monitor whose socket was
                        # closed under it. Dropped, else it stays readable and we spin.
                        watched_sock = watched.get(pair, (None, None))[1]
                        if not isinstance(e, zmq.Again) or watched_sock is None or \
                                watched_sock.closed:
                            poller.unregister(pair)
                            pair.close(0)
                            watched.pop(pair, None)
                        continue
                    route, sock = watched[pair]
                    if ev["event"] == zmq.EVENT_DISCONNECTED:
                        lost = self._broken(route, sock)
                        if lost is not None:
                            broken.append((time.monotonic() + DEATH_INFO_S, route, lost, False))
                            broken.sort(key=lambda b: b[0])
                    else:  # the socket was closed: nothing more to watch on it
                        poller.unregister(pair)
                        pair.close(0)
                        del watched[pair]
                now = time.monotonic()
                while broken and broken[0][0] <= now:
                    _, route, lost, died = broken.pop(0)
                    if inbox is None:
                        inbox = direct.client._ctx.socket(zmq.PUSH)
                        inbox.setsockopt(zmq.LINGER, 0)
                        inbox.setsockopt(zmq.SNDHWM, 0)
                        inbox.connect(direct.reply_to)
                    self._settle(route, lost, inbox, died)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("direct-call watch thread error")
        finally:
            for pair in watched:
                pair.close(0)
            with direct.lock:
                for pair, _, _ in self.new:
                    if pair is not None:  # (None: a settle_later entry)
                        pair.close(0)
                self.new = []
            if inbox is not None:
                inbox.close(0)

    def _broken(self, route, sock):
        """The connection ``sock`` of ``route`` broke: the task ids in flight on it, or
        None if the route has moved on (a new socket, or closed) since."""
        direct = self.direct
        with direct.lock:
            if route.sock is not sock or direct.client.closed:
                return None  # (moved on, or our own shutdown closed it)
            log.info("the direct connection to actor %s (%s) broke: asking the broker",
                     route.actor_id.hex(), route.address)
            route.sock.close(0)
            route.sock = None
            route.broken = route.address
            route.state = "asking"
            lost = list(route.inflight)
            direct.client.request_nowait("actor_route", {"actor_id": route.actor_id})
        return lost

    def _settle(self, route, lost: list, inbox: zmq.Socket, died: bool = False) -> None:
        """The broker said nothing that settled these calls in time: answer them
        (``died``: their executor's process is gone: ActorDiedError)."""
        direct = self.direct
        answers = []
        with direct.lock:
            for task_id in lost:
                call = route.inflight.get(task_id)
                if call is None:
                    continue  # answered, or settled by a ROUTE
                spec = call.spec
                n = max(spec.num_returns, 1) if spec.num_returns else 0
                retry = call.retries != 0 and call.frames is not None
                if died:
                    err = exceptions.ActorDiedError(
                        f"The actor's process died while it ran {spec.name} (its lane on "
                        f"this host closed) and the cluster did not say within "
                        f"{DEATH_INFO_S:g}s whether it restarts. The call may or may not "
                        f"have run.", route.actor_id.hex())
                else:
                    err = exceptions.ActorUnavailableError(
                        f"The connection to the actor broke while it ran {spec.name} (its "
                        f"process or host died, or the network failed) and the cluster did "
                        f"not say within {DEATH_INFO_S:g}s whether it is restarting. The "
                        f"call may or may not have run.", route.actor_id.hex())
                answers.append((task_id, n, retry, serialize_error(err)))
        for task_id, n, retry, frames in answers:
            header = P.encode(P.DDone(task_id, [[P.ERROR, len(frames)]] * n, retry, []))
            send_parts(inbox, header, None, list(frames) * n)
        if answers:
            log.warning("%d direct calls to actor %s were in flight when its connection "
                        "broke: %s", len(answers), route.actor_id.hex(),
                        "retried through the broker or failed")
