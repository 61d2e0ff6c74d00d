"""A socket's whole message in one call: ``port(sock).recv(cap)`` and ``port(sock).send(*frames)``;
and a loop's wait on its sockets and file descriptors: ``poller(items).poll(timeout_ms)``.

The runtimes' loops read and write every message through a :class:`Port`. Two implementations
keep the same contract:

* ``zmqdist.transport._wire`` (C, built with the compiled modules): one call per message into the
  libzmq pyzmq loaded, where pyzmq takes a Python call and a ``zmq.Frame`` per frame (a 3-frame
  message read in about 1.2 us against 5.0 us, written in 0.7 against 2.5: docs/performance.md);
* :class:`PyPort` here, over pyzmq: what a pure-Python install uses, or one whose C module cannot
  find libzmq's functions.

Contract: ``recv(cap)`` returns the next message's frames as bytes, None if none waits (never
blocks). At most ``cap`` frames are kept: a longer message comes back as ``cap + 1`` items, the last
``b""``, its other frames read and dropped (a peer cannot make a loop hold an unbounded list).
``recv(cap, props)`` returns ``(frames, values)``: the metadata properties ``props`` of the second
frame (the ZAP handler's, on a CURVE connection); ``""`` for one the message does not carry (as
on a connection admitted while no ZAP handler ran: libzmq then checks no key).
``send(*frames)`` sends bytes frames as one message without blocking and returns 0, or the errno of
the frame that failed (EAGAIN, EHOSTUNREACH...): nothing of a message that failed went out.
A closed socket (its ``close()``, or its context's ``destroy()`` from any thread) raises
``zmq.ZMQError`` (ENOTSOCK) on a read or a send, as pyzmq does; ``detach()``, called before the socket closes, makes
every later call raise ValueError. A Port never touches a closed socket.

``poller(items)`` (each a socket or a file descriptor) waits with ``poll(timeout_ms)`` (-1: no
limit) and returns the indices of the items with input: empty at the timeout, and possibly when a
signal interrupted the wait (the C Poller returns then; pyzmq's waits on). The Python handlers of
signals caught meanwhile, by any thread, have run when it returns (an exception one raised
propagates): a compiled loop runs no bytecode that would run them later, and a signal that another
thread caught interrupts no wait. A closed socket raises ``zmq.ZMQError`` (ENOTSOCK). The C Poller
holds the items' handles, where pyzmq's ``zmq_poll`` takes a list of tuples, asks every socket for
its handle and builds a list of result tuples at every wake-up.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import types
from typing import Any, Final, Protocol

import zmq

log: Final = logging.getLogger(__name__)
WIRE_ENV = "ZMQDIST_WIRE"  # "0": use PyPort even where the C module is built (A/B runs, tests)


class Port(Protocol):
    def recv(self, cap: int, props: tuple[str, ...] | None = None) -> Any: ...

    def send(self, *frames: bytes) -> int: ...

    def detach(self) -> None: ...


class Poller(Protocol):
    def poll(self, timeout_ms: int, /) -> list[int]: ...


POLLIN: Final = int(zmq.POLLIN)
NB: Final = int(zmq.NOBLOCK)  # plain ints: IntEnum arithmetic costs about 0.45 us per operation
_SNDMORE_NB: Final = int(zmq.SNDMORE) | NB
# pyzmq's Python-level Socket.send wrapper handles options we never use (routing_id, group,
# tracking); calling the backend method directly halves the cost of a 3-frame send (measured
# 0.83 -> 0.44 us). Same semantics for bytes with copy=True.
_BACKEND_SEND = getattr(getattr(zmq, "backend", None), "Socket", zmq.Socket).send


def prop(frame: Any, name: str) -> str:
    """A metadata property of a received frame, ``""`` if the connection carries none by that name
    (pyzmq's ``Frame.get`` raises for it)."""
    try:
        return str(frame.get(name))
    except zmq.ZMQError:
        return ""


def fast_send(sock: zmq.Socket[Any]) -> Any:
    """Return ``sock.send`` without pyzmq's Python wrapper: ``send(data: bytes, flags: int)``."""
    return types.MethodType(_BACKEND_SEND, sock)


class PyPort:
    """The contract above over pyzmq calls (a frame at a time)."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._recv: Any = sock.recv
        self._send: Any = fast_send(sock)

    def recv(self, cap: int, props: tuple[str, ...] | None = None) -> Any:
        recv = self._recv
        if recv is None:
            raise ValueError("Port: its socket was detached (closed)")
        if cap < 1:
            raise ValueError("recv: cap must be at least 1")
        try:
            f = recv(NB, copy=False)
        except zmq.Again:
            return None
        frames = [f.bytes]
        meta = f
        n = 1
        while f.more:
            f = recv(0, copy=False)
            if n == 1:
                meta = f
            if n < cap:
                frames.append(f.bytes)
            elif n == cap:
                frames.append(b"")
            n += 1
        if props is None:
            return frames
        return frames, tuple(prop(meta, name) for name in props)

    def send(self, *frames: bytes) -> int:
        send = self._send
        if send is None:
            raise ValueError("Port: its socket was detached (closed)")
        if not frames:
            raise TypeError("send: at least one frame")
        for i, fr in enumerate(frames):  # all checked first: a message must not go out in part
            if type(fr) is not bytes:
                raise TypeError(f"send: frame {i} is {type(fr).__name__}, not bytes")
        last = len(frames) - 1
        try:
            for i in range(last):
                send(frames[i], _SNDMORE_NB)
            send(frames[last], NB)
        except zmq.ZMQError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise  # a closed socket raises, as a read does
            return exc.errno or errno.EIO
        return 0

    def detach(self) -> None:
        self._recv = self._send = None


class PyPoller:
    """The poller contract above over ``zmq.zmq_poll``."""

    def __init__(self, items: list[Any]) -> None:
        for i, it in enumerate(items):
            if type(it) is int:
                if it < 0:
                    raise ValueError(f"Poller: item {i} is not a file descriptor ({it})")
            elif not isinstance(it, zmq.Socket):
                raise TypeError(f"Poller: item {i} is {type(it).__name__}, not a socket or a file descriptor")
        self._items = [(it, POLLIN) for it in items]
        self._index = {(it if type(it) is int else id(it)): i for i, it in enumerate(items)}

    def poll(self, timeout_ms: int, /) -> list[int]:
        if timeout_ms < -1:
            raise ValueError("poll: timeout_ms must be -1 (no limit) or more")
        for it, _ in self._items:
            if type(it) is not int and it.closed:
                raise zmq.ZMQError(errno.ENOTSOCK)
        # zmq_poll runs signal handlers at every return and waits on after EINTR. (Typed here for every
        # pyzmq install_requires accepts: 25's stubs call every item a Socket.)
        ready: list[tuple[Any, int]] = zmq.zmq_poll(self._items, timeout_ms)
        index = self._index
        return [index[it if type(it) is int else id(it)] for it, _ in ready]


def _backend_path() -> str | None:
    """The file of pyzmq's compiled backend (the module its Socket comes from). Its functions are
    found through it (dlsym on its handle searches its own libzmq): never another libzmq that
    some other extension of the process may have loaded."""
    backend = getattr(zmq, "backend", None)
    module = sys.modules.get(getattr(getattr(backend, "Socket", None), "__module__", ""))
    path = getattr(module, "__file__", None)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _load_native() -> tuple[Any, Any, str]:
    """The C module's Port and Poller classes, or None, None and why not."""
    if os.environ.get(WIRE_ENV, "") == "0":
        return None, None, f"{WIRE_ENV}=0"
    from zmqdist import _native

    if _native.STATE != "compiled":
        return None, None, "the install is not compiled"
    try:
        from zmqdist.transport import _wire
    except ImportError as exc:  # compiled, but not this module (a platform without dlopen)
        return None, None, f"not built ({exc})"
    path = _backend_path()
    why = "pyzmq's compiled backend was not found"
    if path is not None:
        try:
            _wire.load(path, zmq.ZMQError)
            return _wire.Port, _wire.Poller, ""
        except OSError as exc:
            why = str(exc)
    log.warning("zmqdist: messages are read a frame at a time through pyzmq (slower): %s", why)
    return None, None, why


NativePort, NativePoller, WHY_NOT = _load_native()  # the C classes, or None and why not
NATIVE = NativePort is not None


def port(sock: zmq.Socket[Any]) -> Port:
    """A Port for ``sock``: the C one where it loaded, else :class:`PyPort`."""
    if NativePort is not None:
        # A ROUTER's routing ids are kept and read as the same objects (the broker's tables are
        # keyed by them); a DEALER's first frame is a head, most of them read once.
        p: Port = NativePort(sock, sock.type == zmq.ROUTER)
        return p
    return PyPort(sock)


def poller(items: list[Any]) -> Poller:
    """A Poller of ``items`` (sockets and file descriptors): the C one where it loaded, else
    :class:`PyPoller`."""
    if NativePoller is not None:
        p: Poller = NativePoller(items)
        return p
    return PyPoller(items)
