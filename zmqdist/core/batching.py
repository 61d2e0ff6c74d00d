"""Natural batching on a broker's way out: which peers read BATCH frames, and what one step made
for each of them, grouped (docs/protocol.md, "Batches"). Sans-IO.

Rules of this module:
1. A peer reads BATCHes only if its HELLO said so (``batch`` > 0); a HELLO without it (a peer of an
   earlier revision, or one that re-registers without it) means single messages from then on.
2. A batch is what one step made for a peer: nothing waits to fill one. One message alone travels
   as itself; messages keep their order; a batch holds at most the peer's limit.
3. The table of peers is bounded: full, it starts afresh (the peers it forgets get single messages:
   slower, never wrong).
"""

from __future__ import annotations

from typing import Any

from zmqdist import protocol as p
from zmqdist.core.records import Counters, Out


def note(peers: dict[bytes, int], peer: bytes, limit: int, cap: int) -> None:
    """``peer`` said in HELLO that it reads BATCHes of up to ``limit`` messages (rules 1, 3)."""
    if limit <= 0:
        peers.pop(peer, None)
        return
    if peer not in peers and len(peers) >= cap:
        peers.clear()
    peers[peer] = min(limit, p.MAX_BATCH)


def group(
    peers: dict[bytes, int], out: list[Out], counters: Counters
) -> tuple[list[tuple[bytes, list[p.Message]]], list[Out]]:
    """Split ``out`` into batches (two or more messages for one peer in ``peers``, in order, at most
    its limit each) and the rest, in order (rule 2)."""
    groups: dict[bytes, list[Any]] = {}  # what goes to a peer is a protocol message
    rest: list[Out] = []
    for item in out:
        peer = item[0]
        if type(peer) is bytes:
            g = groups.get(peer)  # first: one lookup, not two, for all but a peer's first message
            if g is not None:
                g.append(item[1])
                continue
            if peer in peers:
                groups[peer] = [item[1]]
                continue
        rest.append(item)
    batches: list[tuple[bytes, list[p.Message]]] = []
    for peer, msgs in groups.items():
        n = len(msgs)
        if n == 1:
            rest.append((peer, msgs[0]))
            continue
        limit = peers[peer]
        for i in range(0, n, limit):
            chunk = msgs[i : i + limit]
            if len(chunk) == 1:
                rest.append((peer, chunk[0]))
            else:
                batches.append((peer, chunk))
                counters.batches_out += 1
                counters.batched_out += len(chunk)
    return batches, rest
