"""A socket's whole message in one call: ``port(sock).recv(cap)`` and ``port(sock).send(*frames)``.

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
frame (the ZAP handler's, on a CURVE connection); a missing one raises ``zmq.ZMQError``.
``send(*frames)`` sends bytes frames as one message without blocking and returns 0, or the errno of
the frame that failed (EAGAIN, EHOSTUNREACH...): nothing of a message that failed went out.
A closed socket (its ``close()``, or its context's ``destroy()`` from any thread) raises
``zmq.ZMQError`` (ENOTSOCK) on a read or a send, as pyzmq does; ``detach()``, called before the socket closes, makes
every later call raise ValueError. A Port never touches a closed socket.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import types
from typing import Any, Protocol

import zmq

log = logging.getLogger(__name__)
WIRE_ENV = "ZMQDIST_WIRE"  # "0": use PyPort even where the C module is built (A/B runs, tests)


class Port(Protocol):
    def recv(self, cap: int, props: tuple[str, ...] | None = None) -> Any: ...

    def send(self, *frames: bytes) -> int: ...

    def detach(self) -> None: ...


NB = int(zmq.NOBLOCK)  # plain ints: IntEnum arithmetic costs about 0.45 us per operation
_SNDMORE_NB = int(zmq.SNDMORE) | NB
# pyzmq's Python-level Socket.send wrapper handles options we never use (routing_id, group,
# tracking); calling the backend method directly halves the cost of a 3-frame send (measured
# 0.83 -> 0.44 us). Same semantics for bytes with copy=True.
_BACKEND_SEND = getattr(getattr(zmq, "backend", None), "Socket", zmq.Socket).send


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
        return frames, tuple(str(meta.get(name)) for name in props)

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


def _backend_path() -> str | None:
    """The file of pyzmq's compiled backend (the module its Socket comes from). Its functions are
    found through it (dlsym on its handle searches its own libzmq): never another libzmq that
    some other extension of the process may have loaded."""
    backend = getattr(zmq, "backend", None)
    module = sys.modules.get(getattr(getattr(backend, "Socket", None), "__module__", ""))
    path = getattr(module, "__file__", None)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _load_native() -> tuple[Any, str]:
    """The C module's Port class, or None and why not."""
    if os.environ.get(WIRE_ENV, "") == "0":
        return None, f"{WIRE_ENV}=0"
    from zmqdist import _native

    if _native.STATE != "compiled":
        return None, "the install is not compiled"
    try:
        from zmqdist.transport import _wire
    except ImportError as exc:  # compiled, but not this module (a platform without dlopen)
        return None, f"not built ({exc})"
    path = _backend_path()
    why = "pyzmq's compiled backend was not found"
    if path is not None:
        try:
            _wire.load(path, zmq.ZMQError)
            return _wire.Port, ""
        except OSError as exc:
            why = str(exc)
    log.warning("zmqdist: messages are read a frame at a time through pyzmq (slower): %s", why)
    return None, why


NativePort, WHY_NOT = _load_native()  # the C Port class, or None and why not
NATIVE = NativePort is not None


def port(sock: zmq.Socket[Any]) -> Port:
    """A Port for ``sock``: the C one where it loaded, else :class:`PyPort`."""
    if NativePort is not None:
        p: Port = NativePort(sock)
        return p
    return PyPort(sock)
