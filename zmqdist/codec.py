"""Application values as payloads: msgpack, with the application's own types (:class:`Codec`).

This module is pure Python on purpose (not compiled with the per-request path): a codec goes to
the handler processes of ``isolation="process"`` by pickling, as an ordinary object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from zmqdist.errors import ConfigError


class Codec:
    """How application values become payloads and back: msgpack, with hooks for the application's
    own types. Give the same codec to the :class:`~zmqdist.Client` and the :class:`~zmqdist.Worker`.

    ``register(cls, code, encode, decode)`` maps a type to a msgpack extension type (``code``
    0 to 127, ``encode(obj) -> bytes``, ``decode(bytes) -> obj``): datetimes, dataclasses, numpy
    arrays need no conversion by hand (docs/semantics.md shows each). ``default`` and
    ``ext_hook`` are msgpack's own hooks, for full control (they run after the registered types).
    ``tuples=True`` gives tuples back as tuples (msgpack has one array type: lists by default).
    With ``isolation="process"`` the codec goes to the child processes: its functions must be
    importable (module level, not lambdas).
    """

    def __init__(
        self,
        *,
        default: Callable[[Any], Any] | None = None,
        ext_hook: Callable[[int, bytes], Any] | None = None,
        tuples: bool = False,
    ) -> None:
        for what, fn in (("default", default), ("ext_hook", ext_hook)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"Codec's {what} must be a function, got {fn!r}")
        if not isinstance(tuples, bool):
            raise ConfigError(f"Codec's tuples must be True or False, got {tuples!r}")
        self.default = default
        self.ext_hook = ext_hook
        self.tuples = tuples
        self._by_type: dict[type, tuple[int, Callable[[Any], bytes]]] = {}
        self._by_code: dict[int, Callable[[bytes], Any]] = {}

    def register(self, cls: type, code: int, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> Codec:
        """Carry instances of ``cls`` (subclasses too) as msgpack extension type ``code``."""
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 127:
            raise ConfigError(f"an extension type code is 0 to 127, got {code!r}")
        if not isinstance(cls, type) or not callable(encode) or not callable(decode):
            raise ConfigError(f"register takes a class and two functions, got {cls!r}, {encode!r} and {decode!r}")
        if code in self._by_code:
            raise ConfigError(f"extension type code {code} is registered already")
        self._by_type[cls] = (code, encode)
        self._by_code[code] = decode
        return self

    def _default(self, obj: Any) -> Any:
        for cls in type(obj).__mro__:
            hit = self._by_type.get(cls)
            if hit is not None:
                data = hit[1](obj)
                if not isinstance(data, bytes):
                    raise TypeError(
                        f"the encoder registered for {cls.__name__} returned {type(data).__name__}, not bytes"
                    )
                return msgpack.ExtType(hit[0], data)
        if self.default is not None:
            return self.default(obj)
        raise TypeError(f"cannot serialise {type(obj).__name__} (register it with a Codec: docs/semantics.md)")

    def _ext(self, code: int, data: bytes) -> Any:
        decode = self._by_code.get(code)
        if decode is not None:
            return decode(data)
        if self.ext_hook is not None:
            return self.ext_hook(code, data)
        return msgpack.ExtType(code, data)

    def pack(self, value: Any) -> bytes:
        """Return ``value`` as msgpack bytes. Raises :class:`TypeError` if it cannot be encoded."""
        try:
            data: bytes = msgpack.packb(value, use_bin_type=True, default=self._default)
            return data
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"value of type {type(value).__name__} is not serialisable: {exc}") from exc

    def unpack(self, data: bytes) -> Any:
        """Return the value packed in ``data``. Raises :class:`ValueError` for bad msgpack."""
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=not self.tuples, ext_hook=self._ext)
        except Exception as exc:
            raise ValueError(f"payload is not valid msgpack: {exc}") from exc
