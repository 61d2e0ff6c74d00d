"""A backup pair: which of two brokers is active, its epoch, and the replicated request table. Sans-IO.

Rules of this module:
1. Each broker of a pair is PENDING (just started), ACTIVE (serves) or PASSIVE (refuses work, sends
   its peers to the active one, keeps a copy of the active's request table). The two exchange a
   PairState every heartbeat on their own link.
2. Decisions (:meth:`Pair.decide`), from what each side last said:
   - both PENDING (a cold start): the primary becomes active, the backup passive;
   - a PENDING broker that hears an ACTIVE peer becomes PASSIVE; a PASSIVE one that hears its peer
     PENDING takes over (the peer restarted and lost its tables; we have a copy of them);
   - a PASSIVE (or PENDING, after one ttl and a heartbeat) broker whose peer has been silent for
     the ttl takes over only if a client, worker or downstream broker came to it within that ttl
     (the vote of the ZeroMQ guide's Binary Star), or a witness said the peer is gone (a proxy's
     upstream, which sees both brokers of the pair). With the pair's own link cut while everyone
     still reaches the active broker, nobody votes and the passive one stays passive;
   - a PENDING broker is answered at once by its peer (which hears its first PairState), so a
     broker that restarts next to a live active one hears it within a heartbeat, before its grace
     ends; it never acts on a silence it has not waited out;
   - two ACTIVE brokers (a healed split, or a restart that took over beside a live active one):
     when one took over with a synced copy of the pair's table (warm) and the other cold, the cold
     one steps down and the warm one raises its epoch above the other's, so that peers accept it;
     otherwise the one with the lower epoch steps down (on a tie, the backup). So a broker that
     restarted cold never deposes the active one that carries the pair's work.
3. Every takeover grows the epoch: max(ours, the peer's, a floor) + 1, where the floor is the
   wall clock in milliseconds when the broker started (given by the runtime), so a pair whose
   brokers both restarted cold still outranks every epoch its peers remember. Brokers put the
   epoch in WELCOME and in every HEARTBEAT; peers remember the highest epoch per broker name (and
   for its named peer) and refuse a broker whose epoch is lower.
4. The active broker records every change to its request table as an op and sends them in order
   (REPLICATE, numbered); a passive broker that misses one, or starts, asks for a snapshot
   (``synced`` = -1 in its PairState) and ignores deltas until the snapshot comes.
5. Failback: manual (an operator asks the active backup to hand over) or automatic (``failback
   = "auto"``): an active backup whose primary is passive and fully in sync hands over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.link import Pauses
from zmqdist.core.records import Copy
from zmqdist.errors import RemoteProtocolError

PENDING: Final = p.PAIR_PENDING
ACTIVE: Final = p.PAIR_ACTIVE
PASSIVE: Final = p.PAIR_PASSIVE
STATE_NAMES: Final = {PENDING: "pending", ACTIVE: "active", PASSIVE: "passive"}
# A new active broker numbers its tickets past every ticket it saw replicated plus this gap (the old
# active may have issued some it never replicated); a cold start (no copy of any table) begins at a
# random point of a 61-bit space. Either way no ticket of an earlier run is reused, so a result a
# worker kept from one can never be taken for the answer to another request.
TICKET_GAP: Final = 2**32
# A silent peer's connection is replaced at most this often (and never before a ttl of silence).
REDIAL_MIN_S: Final = 1.0
# Peers a passive broker sent away that it keeps before it forgets those told a heartbeat ago
REDIRECTS_KEPT: Final = 1024

# What decide() asks the broker to do.
TAKE_OVER: Final = "take over"
BECOME_PASSIVE: Final = "become passive"
STEP_DOWN: Final = "step down"
HAND_OVER: Final = "hand over"
RAISE_EPOCH: Final = "raise epoch"  # two active brokers, we hold the work: move above the other's epoch
# How far along its run a broker's state is, at one epoch (see Pair.heard).
_ORDER: Final[dict[int, int]] = {PENDING: 0, ACTIVE: 1, PASSIVE: 2}


def _op_size(op: p.ReplicationOp) -> int:
    """About the bytes ``op`` takes packed (a little more: the estimate cuts REPLICATEs)."""
    if type(op) is p.OpAccepted:
        strings = len(op.service) + len(op.trace) + len(op.key) + sum(4 + len(h) for h in op.hops)
        return len(op.payload) + len(op.client) + 4 * strings + 128  # UTF-8, msgpack's headers
    return 48


class Pair:
    """State of one broker of a backup pair (see the module rules)."""

    def __init__(self, settings: BrokerSettings, incarnation: str, now: float, epoch_floor: int = 0) -> None:
        self.name = settings.name
        self.floor = epoch_floor
        self.primary = settings.ha == "primary"
        self.auto_failback = settings.failback == "auto"
        self.incarnation = incarnation
        self.hb_s = settings.heartbeat.heartbeat_s
        self.ttl_s = settings.heartbeat.ttl_s
        self.max_message = settings.max_message_size  # said in PairState: REPLICATEs keep within both
        self.state = PENDING
        self.epoch = 0
        self.started = now
        self.since = now  # when the current state began
        self.next_beat = now
        self.decided = now  # when decide() last ran (its timers after that are still due)
        # The peer, as last heard.
        self.peer_name = ""
        self.peer_primary = not self.primary
        self.peer_state = PENDING
        self.peer_epoch = 0
        self.peer_inc = ""
        self.peer_synced = -1
        self.peer_warm = False  # the peer took over with a synced copy of the table (if active)
        self.peer_max = 0  # the peer's --max-message-size (0: not said; ours is taken)
        # The peer's heartbeat interval: ours if it does not say, or if its interval is shorter.
        self.peer_hb_s = self.hb_s
        self.warm = False  # we took over with a synced copy of the table (while active)
        self.peer_seen: float | None = None
        self.pauses = Pauses()  # this broker's own (see silent_since)
        self.peer_endpoint = settings.peer
        self.redialed = now  # when the connection to the peer was last made (see redial_due)
        self.heard_key = (0, 0)  # (epoch, order) of the last state heard from the peer's run
        self.votes: dict[bytes, float] = {}  # peers that came to us while we were not active, when
        self.held: set[bytes] = set()  # voters not answered yet (the active looked dead)
        self.redirected: dict[bytes, float] = {}  # when each peer was last sent to the active broker
        self._redirects_pruned = now  # when redirected last forgot (see redirect_due)
        # Active side: ops since the last flush, the seq of the last REPLICATE, the last snapshot.
        self.ops: list[p.ReplicationOp] = []
        self.seq = 0
        self.snap_at: float | None = None
        self.snap_inc = ""  # the peer run the last snapshot went to
        # Passive side: the copy of the active's table (ticket -> record) and the last seq applied.
        self.table: dict[int, Copy] = {}
        self.applied = -1
        self.top = 0  # the highest ticket seen replicated (0: never had a copy of a table)
        self.counters = dict.fromkeys(
            (
                "takeovers",
                "step_downs",
                "handovers",
                "epoch_raises",
                "snapshots_sent",
                "snapshots_applied",
                "gaps",
                "bad_ops",
                "stale_states",
                "redials",
                "not_replicated",  # requests too large for the peer's pair link ever to take
            ),
            0,
        )

    # --- the peer ---------------------------------------------------------------------------------

    def silent_since(self) -> float | None:
        """Since when the peer counts as silent: since it was last heard, moved on by this
        broker's own pauses since (:class:`Pauses`). Silence across our own pause (SIGSTOP, a
        stalled host) proves nothing: a stalled host stops both brokers of a pair on it, and the
        passive one, resumed first, found the active one silent for the whole pause and took over.
        Moved on, not restarted: a broker paused again and again still takes over from a dead one."""
        seen = self.peer_seen
        return None if seen is None else self.pauses.since(seen)

    def peer_alive(self, now: float) -> bool:
        """Has the peer been heard within the ttl (less our own pauses)?"""
        since = self.silent_since()
        return since is not None and now - since <= self.peer_ttl_s

    def peer_fresh(self, now: float) -> bool:
        """Has the peer been heard very recently (two heartbeats)? Then redirecting to it is safe."""
        return self.peer_seen is not None and now - self.peer_seen <= 2 * self.peer_hb_s

    def heard(self, m: p.PairState, now: float) -> bool:
        """Record the peer's PairState; return False (and record nothing) for a stale one.

        The peer's states come on two connections (its own link to us, and its answers on ours),
        which keep no order between them: after a pause (a stopped process, a stalled host) one
        can hold a state from before the peer's takeover while the other already told it. Within
        one run of the peer, (epoch, PENDING < ACTIVE < PASSIVE) never goes back (a takeover
        raises the epoch; stepping down keeps it or takes a higher one), so a state below the last
        heard from that run is old news: acting on it made a resumed broker take over again from
        a peer it had just heard active."""
        key = (m.epoch, _ORDER.get(m.state, 0))
        if m.incarnation == self.peer_inc and key < self.heard_key:
            self.counters["stale_states"] += 1
            return False
        self.heard_key = key
        self.peer_name = m.name
        self.peer_primary = bool(m.primary)
        self.peer_state = m.state
        self.peer_epoch = m.epoch
        self.peer_inc = m.incarnation
        self.peer_synced = m.synced
        self.peer_warm = bool(m.warm)
        self.peer_max = m.max_message
        self.peer_seen = now
        self.peer_hb_s = max(self.hb_s, m.heartbeat_ms / 1000.0)
        return True

    @property
    def peer_ttl_s(self) -> float:
        """The peer's silence after which it counts as gone: its interval times our liveness (a
        peer that beats less often is not taken for gone between its beats)."""
        return self.ttl_s * self.peer_hb_s / self.hb_s

    def redial_due(self, now: float) -> bool:
        """Is a new connection to the silent peer due (and counted as made)?

        A TCP connection that went silent (a cut cable, a vanished host) is not given up by the
        kernel for many minutes, and its retransmissions back off to one every two minutes: a
        healed network went unnoticed that long, with both brokers active (measured: 23 s after a
        30 s cut). A connect into silence backs off the same way. So the peer's connection is made
        anew after a ttl of silence (at least REDIAL_MIN_S) and again each such interval while
        the peer stays silent: the pair hears itself within about one interval of the heal."""
        since = self.silent_since()
        last = self.redialed if since is None else max(since, self.redialed)
        if now - last < max(self.peer_ttl_s, REDIAL_MIN_S) or not self.peer_endpoint:
            return False
        self.redialed = now
        self.counters["redials"] += 1
        return True

    def vote(self, ident: bytes, now: float) -> None:
        """``ident`` came to us while we were not active."""
        self.votes[ident] = now

    def redirect_due(self, ident: bytes, now: float) -> bool:
        """Should ``ident`` be told (again) to go to the active broker? At most once a heartbeat."""
        last = self.redirected.get(ident)
        if last is not None and now - last < self.hb_s:
            return False
        n = len(self.redirected)
        if n >= REDIRECTS_KEPT and (now - self._redirects_pruned >= self.hb_s or n > 100 * REDIRECTS_KEPT):
            # Forget the peers told a heartbeat ago or more, once a heartbeat: kept until 100,000,
            # clients that came and went (or list this broker first) grew it for nothing.
            self._redirects_pruned = now
            self.redirected = {i: t for i, t in self.redirected.items() if now - t < self.hb_s}
        self.redirected[ident] = now
        return True

    def live_votes(self, now: float) -> int:
        """Votes cast within the ttl (older ones are forgotten)."""
        stale = [i for i, t in self.votes.items() if now - t > self.ttl_s]
        for i in stale:
            del self.votes[i]
        return len(self.votes)

    # --- decisions --------------------------------------------------------------------------------

    @property
    def grace_s(self) -> float:
        """How long a just-started broker waits to hear its peer before a silence counts."""
        return self.ttl_s + self.hb_s

    def decide(self, now: float) -> str | None:
        """Return what the broker should do now (one of the module constants), or None."""
        self.decided = now
        alive = self.peer_alive(now)
        ps = self.peer_state if alive else None
        if self.state == ACTIVE:
            if ps == ACTIVE:
                if self.warm != self.peer_warm:  # the one that carries the pair's table on stays
                    if self.peer_warm:
                        return STEP_DOWN
                    return RAISE_EPOCH if self.epoch <= self.peer_epoch else None
                if self.peer_epoch > self.epoch or (self.peer_epoch == self.epoch and self.peer_primary):
                    return STEP_DOWN
            if (
                self.auto_failback
                and not self.primary
                and ps == PASSIVE
                and self.peer_fresh(now)  # heard just now: alive may count from our own resume
                and self.peer_primary
                and self.peer_synced == self.seq
                and not self.ops
                and now - self.since >= self.ttl_s
            ):
                return HAND_OVER
            return None
        if ps == ACTIVE:
            return BECOME_PASSIVE if self.state == PENDING else None
        if ps == PENDING:
            # The peer restarted (it lost its tables; a passive broker has a copy), or a cold start.
            return TAKE_OVER if self.state == PASSIVE or self.primary else None
        if ps == PASSIVE:
            # We are pending: the passive peer takes over when it hears us. Both passive (after a
            # handover crossed a failure): the primary takes over.
            return TAKE_OVER if self.state == PASSIVE and self.primary else None
        # The peer is silent (or was never heard).
        if self.state == PENDING and now - self.started <= self.grace_s:
            return None  # give a peer that is up the time to be heard
        return TAKE_OVER if self.live_votes(now) else None

    def activate(self, now: float) -> int:
        """Become active; return the new epoch."""
        self.warm = self.applied >= 0  # we hold a synced copy of the table we take over
        self.epoch = max(self.epoch, self.peer_epoch, self.floor) + 1
        self.state = ACTIVE
        self.since = now
        self.counters["takeovers"] += 1
        self.ops.clear()
        self.seq = 0
        self.snap_at = None
        self.snap_inc = ""
        self.votes.clear()
        self.held.clear()
        return self.epoch

    def raise_epoch(self, seen: int) -> int:
        """Active: move our epoch above ``seen`` (an epoch of this pair a peer remembers)."""
        self.epoch = max(self.epoch, seen, self.floor) + 1
        self.counters["epoch_raises"] += 1
        return self.epoch

    def deactivate(self, now: float, *, stepped_down: bool) -> None:
        """Become passive (after a step-down or a handover, or from pending)."""
        self.state = PASSIVE
        self.since = now
        self.epoch = max(self.epoch, self.peer_epoch)
        if stepped_down:
            self.counters["step_downs"] += 1
        self.ops.clear()
        self.table = {}
        self.applied = -1  # ask for a snapshot
        self.votes.clear()

    # --- messages -------------------------------------------------------------------------------

    def state_message(self, now: float) -> p.PairState:
        """Our PairState (and schedule the next one)."""
        self.next_beat = now + self.hb_s
        active = self.state == ACTIVE
        return p.PairState(
            self.name,
            int(self.primary),
            self.state,
            self.epoch,
            self.incarnation,
            self.seq if active else self.applied,
            0 if active else self.live_votes(now),
            int(active and self.warm),
            self.max_message,
            max(1, round(self.hb_s * 1000)),
        )

    def flush(self, now: float, snapshot: Callable[[], list[p.ReplicationOp]]) -> list[p.Replicate]:
        """Return the REPLICATEs to send now, if any: the ops since the last flush, or (when the
        peer needs one, at most once per ttl) a snapshot made by calling ``snapshot()``."""
        peer_inc = self.peer_inc
        if self.state != ACTIVE or not self.peer_alive(now) or self.peer_state == ACTIVE:
            self.ops.clear()
            return []
        # A snapshot for a new run of the peer, or (at most once per ttl) when it reports a gap;
        # deltas follow it in order, so they go on even while its reports still lag.
        stale = self.peer_synced < 0 and (self.snap_at is None or now - self.snap_at > self.ttl_s)
        if self.snap_inc != peer_inc or stale:
            self.snap_at = now
            self.snap_inc = peer_inc
            self.ops.clear()
            self.counters["snapshots_sent"] += 1
            return self._replicates(now, snapshot(), True)
        if not self.ops:
            return []
        ops = self.ops.copy()
        self.ops.clear()  # in place: the broker appends to this very list
        return self._replicates(now, ops, False)

    def _replicates(self, now: float, ops: list[p.ReplicationOp], snapshot: bool) -> list[p.Replicate]:
        """``ops`` as REPLICATEs in order, each within the peer's message limit (one over it is
        refused whole, and its table never synced: a snapshot of a queue of large requests is
        larger than one request may be). Cut in one pass by each op's estimated size, a part that
        still packs too large is halved; one op alone may pass the limit (the link takes twice
        it); one over twice the limit is left out. A snapshot's first part replaces the peer's
        table, the rest are deltas after it."""
        limit = min(self.max_message, self.peer_max or self.max_message)  # a peer's may be smaller
        cuts: list[list[p.ReplicationOp]] = []
        part: list[p.ReplicationOp] = []
        size = 16  # the array and the sender's time
        for op in ops:
            n = _op_size(op)
            if n + 16 > 2 * limit:
                # No REPLICATE can carry it: the peer's link would drop it with its connection, and
                # every op after it, for good (its limit is smaller: a rolling change). The peer
                # goes without it (it ignores the later ops of a ticket it does not hold); after a
                # takeover the caller sends it again, and is told if it is over the new limit.
                self.counters["not_replicated"] += 1
                continue
            if part and size + n > limit:
                cuts.append(part)
                part, size = [], 16
            part.append(op)
            size += n
        cuts.append(part)  # the last (for an empty snapshot, the empty part that says so)
        out: list[p.Replicate] = []
        cuts.reverse()  # a stack: the next part to send is last
        while cuts:
            part = cuts.pop()
            packed = p.pack_ops(now, part)
            if len(packed) > limit and len(part) > 1:
                half = len(part) // 2
                cuts += (part[half:], part[:half])
                continue
            self.seq += 1
            out.append(p.Replicate(self.epoch, self.seq, int(snapshot and not out), packed))
        return out

    def apply(self, m: p.Replicate, now: float) -> str | None:
        """Apply the active peer's REPLICATE to our copy; return a problem to log, or None.

        The ops (:class:`~zmqdist.protocol.OpAccepted` and the others) come with the sender's time,
        so that deadlines move into our clock: they keep the time left, not the number.
        """
        if self.state == ACTIVE:
            return "REPLICATE ignored: this broker is active"
        if m.epoch < self.epoch:
            return f"REPLICATE of stale epoch {m.epoch} ignored (ours is {self.epoch})"
        if not m.snapshot and (self.applied < 0 or m.seq != self.applied + 1):
            if self.applied >= 0:
                self.counters["gaps"] += 1
                self.applied = -1  # a gap: wait for a snapshot
                return f"replication gap (seq {m.seq} after {self.applied}): asking for a snapshot"
            return None
        try:
            sent_at, ops = p.unpack_ops(m.ops)
        except RemoteProtocolError as exc:
            self.counters["bad_ops"] += 1
            self.applied = -1
            return f"bad REPLICATE dropped: {exc}; asking for a snapshot"
        shift = now - sent_at
        table = {} if m.snapshot else self.table
        for op in ops:
            ticket = op.ticket
            self.top = max(self.top, ticket)
            match op:
                case p.OpAccepted():
                    table[ticket] = Copy(op._replace(deadline=op.deadline + shift))
                case p.OpSent():
                    if (rec := table.get(ticket)) is not None:
                        rec.member = op.member
                        rec.accepted = rec.accepted._replace(attempt=op.attempt)
                case p.OpRequeued():
                    if (rec := table.get(ticket)) is not None:
                        rec.member = None
                case p.OpEnded():
                    table.pop(ticket, None)
        self.table = table
        self.applied = m.seq
        self.epoch = max(self.epoch, m.epoch)
        if m.snapshot:
            self.counters["snapshots_applied"] += 1
        return None

    def next_deadline(self) -> float:
        """When :meth:`decide` may change its answer, a PairState is due, or a silent peer's
        connection is to be made anew (checked at each beat: :meth:`redial_due`)."""
        d = self.next_beat
        if self.state != ACTIVE:  # silence of the peer matters only to a broker that may take over
            since = self.silent_since()
            if since is not None and since + self.peer_ttl_s + 1e-6 > self.decided:
                d = min(d, since + self.peer_ttl_s + 1e-6)
            if self.state == PENDING and self.started + self.grace_s + 1e-6 > self.decided:
                d = min(d, self.started + self.grace_s + 1e-6)
        return d

    def status(self, now: float) -> dict[str, object]:
        """The pair's part of ``zmqdist status``."""
        return {
            "role": "primary" if self.primary else "backup",
            "state": STATE_NAMES[self.state],
            "epoch": self.epoch,
            "failback": "auto" if self.auto_failback else "manual",
            "peer": {
                "name": self.peer_name or None,
                "state": STATE_NAMES[self.peer_state] if self.peer_alive(now) else "silent",
                "epoch": self.peer_epoch,
                "silent_s": round(now - self.peer_seen, 3) if self.peer_seen is not None else None,
                "synced": self.peer_synced,
            },
            "replicated": len(self.table) if self.state != ACTIVE else None,
            "seq": self.seq if self.state == ACTIVE else self.applied,
            "votes": len(self.votes),
            **self.counters,
        }
