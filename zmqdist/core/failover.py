"""A broker of a backup pair: a :class:`PairedBroker` wraps a broker machine. Sans-IO.

Rules of this module:
1. The pair's state (who is active, the epoch, the replicated table) is :class:`~zmqdist.core.ha.Pair`;
   this module acts on its decisions. It wraps a :class:`~zmqdist.core.broker.BrokerCore` as h11's
   ``Connection`` wraps its state machine: the machine knows nothing of the pair but its epoch.
2. Not active (pending or passive): the broker answers by itself. It answers status, sends a peer
   to the active broker (BYE, at most once a heartbeat per peer) when that one is alive, and
   otherwise counts the peer's visit as a vote for a takeover. A passive proxy with a synced copy
   of the table whose peer is silent asks its upstream, every heartbeat, whether the peer is still
   registered there (``zmqdist.member``); the upstream sees both brokers of the pair, and its
   "not there, or silent past the ttl" is a vote too (the witness: docs/ha.md).
3. A takeover builds a fresh machine from the replicated table (new epoch, new incarnation, tickets
   past every ticket seen); stepping down drops the machine for an empty one that serves nobody.
   Counters and histograms belong to the pair's broker and carry over.
4. :func:`make_broker` gives a runtime the machine its settings ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.broker import BrokerCore
from zmqdist.core.door import BrokerMachine
from zmqdist.core.ha import (
    ACTIVE,
    BECOME_PASSIVE,
    HAND_OVER,
    PASSIVE,
    PENDING,
    RAISE_EPOCH,
    STEP_DOWN,
    TAKE_OVER,
    TICKET_GAP,
    Pair,
)
from zmqdist.core.link import BrokerLink, Connect, Problem
from zmqdist.core.metrics import Hist
from zmqdist.core.records import LOG, NONE, PAIR, UPSTREAM, Counters, Out
from zmqdist.core.services import HANDOVER_SERVICE, MEMBER_SERVICE, STATUS_SERVICE, StatusPart
from zmqdist.core.tiers import Upstream, half

WITNESS: Final = b"upstream:witness"  # the vote of a proxy pair's upstream (it does not hear our peer)


def make_broker(
    settings: BrokerSettings, incarnation: str, now: float, rng: Callable[[], float] = half, epoch_floor: int = 0
) -> BrokerMachine:
    """The broker machine for ``settings``: one of a pair when ``settings.ha`` is set, else alone."""
    if settings.ha:
        return PairedBroker(settings, incarnation, now, rng, epoch_floor)
    return BrokerCore(settings, incarnation, now, rng)


class PairedBroker(BrokerMachine):
    """One broker of a backup pair (see the module rules). ``epoch_floor``: it never takes over with
    an epoch below it (the runtime gives the wall clock in milliseconds; see :mod:`zmqdist.core.ha`)."""

    def __init__(
        self,
        settings: BrokerSettings,
        incarnation: str,
        now: float,
        rng: Callable[[], float] = half,
        epoch_floor: int = 0,
    ) -> None:
        super().__init__(settings, Counters())
        self.name = settings.name
        self.pair = Pair(settings, incarnation, now, epoch_floor)
        self.incarnation = incarnation
        self._base_incarnation = incarnation
        self._rng = rng
        self._started = now
        self._now = now
        self._epoch = 0
        self._active = False
        self._hist: dict[str, Hist] | None = None
        self._parts: list[StatusPart] = [self._pair_status]
        self.inner = self._machine(now, serving=False)
        # A passive proxy's question to its upstream about its silent peer (the pair's witness).
        self._witness = BrokerLink(settings.upstream, settings.heartbeat, now) if settings.upstream else None
        self._witness_rid = 0
        self._witness_connected = False

    def _machine(self, now: float, serving: bool, first_ticket: int = 1) -> BrokerCore:
        """A fresh machine: serving (after a takeover) or an empty one that answers status."""
        m = BrokerCore(
            self.settings,
            self.incarnation,
            now,
            self._rng,
            counters=self.counters,
            started=self._started,
            epoch=self._epoch if serving else 0,
            peer=self.pair.peer_name if serving else "",
            ops=self.pair.ops if serving else None,
            first_ticket=first_ticket,
            serving=serving,
        )
        # One table of batch limits: our door notes them, the machine forgets its silent clients'
        # (a table of its own was never read, and ours grew with every client ever heard). A
        # passive broker notes none (the peers it holds register again at its takeover), and
        # forgets the active one's at its step-down.
        if not serving:
            self.batching = {}
        m.batching = self.batching
        m.mdp = self.mdp  # one bridge too: the door's, whose gone workers the machine forgets
        for part in self._parts:
            m.add_status_part(part)
        if self._hist is not None:
            m.use_histograms(self._hist)
        return m

    def note_batching(self, peer: bytes, limit: int) -> None:
        if self._active:  # see _machine
            super().note_batching(peer, limit)

    def _pair_status(self, now: float) -> dict[str, object]:
        return {"ha": self.pair.status(now)}

    def _state(self, now: float) -> p.PairState:
        """Our PairState (with the requests we hold, when active)."""
        return self.pair.state_message(now)

    # --- inputs -----------------------------------------------------------------------------------

    def start(self, now: float) -> list[Out]:
        return [(PAIR, self._state(now))]

    def receive_plain(self, peer: bytes, head: bytes, payload: bytes, now: float, out: list[Out]) -> bool:
        return self._active and self.inner.receive_plain(peer, head, payload, now, out)

    def receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        self._now = now
        if not self._active:
            return self._standby_receive(peer, msg, now)
        match msg:
            case p.Hello() if msg.epoch > self._epoch:
                out: list[Out] = []
                self._outgrown(msg.epoch, now, out)
                return out + self.inner.receive(peer, msg, now)
            case p.Request(service=service) if service == HANDOVER_SERVICE:
                self.counters.requests += 1
                return self._handover_service(peer, msg.rid, now)
        return self.inner.receive(peer, msg, now)

    def upstream_receive(self, msg: p.Message, now: float) -> list[Out]:
        self._now = now
        if self._active:
            return self.inner.upstream_receive(msg, now)
        out: list[Out] = []
        w = self._witness
        if w is not None and self._witness_connected:
            w.last_heard = now
            if type(msg) is p.Reply and msg.rid == self._witness_rid and msg.status == p.ST_OK:
                try:
                    seen = p.unpack_value(msg.payload)
                except ValueError:
                    seen = None
                silent = seen.get("silent_s") if isinstance(seen, dict) else 0.0
                pair = self.pair
                if isinstance(seen, dict) and (not seen.get("registered") or (silent or 0.0) > pair.peer_ttl_s):
                    pair.vote(WITNESS, now)  # the upstream does not hear our peer either
                    self._decide(now, out)
        return out

    def pair_receive(self, msg: p.Message, now: float) -> list[Out]:
        """Handle a message from the other broker of our pair (the runtime's pair link)."""
        self._now = now
        pair = self.pair
        out: list[Out] = []
        match msg:
            case p.PairState():
                if msg.incarnation == pair.incarnation:  # our own state, back: the link reached us
                    self.counters.bad_input += 1
                    why = f"the pair link reached this broker itself: --peer {self.settings.peer} is its own --ha-bind"
                    out.append((LOG, Problem(why, "pair")))
                    return out
                if bool(msg.primary) == pair.primary and msg.name != pair.peer_name:  # at the first state it sends
                    role = "primary" if pair.primary else "backup"
                    why = f"{msg.name} is configured {role} too: a pair needs one primary and one backup (--ha)"
                    out.append((LOG, Problem(why, "")))
                before = pair.peer_hb_s
                if not pair.heard(msg, now):
                    return out  # older than what the peer has told us since (see Pair.heard)
                if pair.peer_hb_s != before and pair.peer_hb_s > pair.hb_s:
                    why = (
                        f"{msg.name} heartbeats every {pair.peer_hb_s:g}s, this broker every {pair.hb_s:g}s: "
                        f"its silence counts after {pair.peer_ttl_s:g}s (give both brokers of a pair one --heartbeat)"
                    )
                    out.append((LOG, Problem(why, "")))
                self._decide(now, out)
                if msg.state == PENDING and pair.state != PENDING:
                    # It just started: answer at once (it must hear a live peer within its grace).
                    out.append((PAIR, self._state(now)))
            case p.Replicate():
                problem = pair.apply(msg, now)
                if problem is not None:
                    out.append((PAIR, Problem(problem)))
            case p.Handover():
                if not self._active and msg.epoch >= pair.epoch:
                    pair.peer_state = PASSIVE  # it stepped down as it sent this
                    pair.peer_epoch = max(pair.peer_epoch, msg.epoch)
                    self._take_over(now, out, f"{pair.peer_name} handed over")
            case _:  # a peer that is not our pair's broker (a client at --ha-bind by mistake): rate-limited
                self.counters.bad_input += 1
                out.append((LOG, Problem(f"unexpected {type(msg).__name__} on the pair link ignored", "pair")))
        return out

    def send_failed(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        if self._active:
            return self.inner.send_failed(peer, msg, now)
        self.counters.send_drops += 1
        return NONE

    # --- timers -----------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Out]:
        self._now = now
        out = self.inner.tick(now) if self._active else []
        pair = self.pair
        if not self._active:
            self._ask_witness(now, out)
        self._decide(now, out)
        if pair.redial_due(now):  # a new connection to the silent peer (see Pair.redial_due)
            silent = f"silent for {now - pair.peer_seen:.1f}s" if pair.peer_seen is not None else "never heard"
            out.append((PAIR, Connect(pair.peer_endpoint, f"{pair.peer_name or 'the peer'} {silent}")))
        if now >= pair.next_beat:
            out.append((PAIR, self._state(now)))
        if not self._active:
            if pair.held and pair.peer_state == ACTIVE and pair.peer_fresh(now):
                self._redirect_held(out)
            if self.mdp.peers:
                # A passive broker never runs the machine's forgetting: an MDP peer it learned and
                # did not hold (a worker's reply or heartbeat after its DISCONNECT) stayed for good.
                self.mdp.keep_only(pair.held)
        out += self.flush(now)
        return out

    def next_deadline(self) -> float | None:
        d = self.pair.next_deadline()
        if self._active and (t := self.inner.next_deadline()) is not None and t < d:
            d = t
        return d

    def flush(self, now: float) -> list[Out]:
        """The replication message for the passive peer, if any (the runtime calls this after each
        batch of input, so one REPLICATE carries many requests)."""
        if not self._active:
            return NONE
        ms = self.pair.flush(now, self.inner.snapshot)
        return [(PAIR, m) for m in ms] if ms else NONE

    def shutdown(self) -> list[Out]:
        pair = self.pair
        if self._active and pair.peer_alive(self._now) and pair.peer_state != ACTIVE:
            # A graceful stop of the active broker of a pair hands over at once (no ttl of silence).
            out: list[Out] = []
            self._hand_over(self._now, out)
            return out
        return self.inner.shutdown()

    # --- decisions --------------------------------------------------------------------------------

    def _decide(self, now: float, out: list[Out]) -> None:
        pair = self.pair
        action = pair.decide(now)
        if action is None:
            return
        if action == TAKE_OVER:
            if pair.peer_alive(now) and pair.state == PENDING:
                why = f"both started, {pair.peer_name} too: the primary serves"
            elif pair.peer_alive(now):
                why = f"{pair.peer_name} is {'restarting' if pair.peer_state == PENDING else 'passive'}"
            else:
                why = f"{pair.peer_name or 'the peer'} silent, {len(pair.votes)} peers came here"
            self._take_over(now, out, why)
        elif action == BECOME_PASSIVE:
            pair.deactivate(now, stepped_down=False)
            out.append((PAIR, Problem(f"{self.name} is passive: {pair.peer_name} is active (epoch {pair.epoch})")))
            self._redirect_held(out)
        elif action == STEP_DOWN:
            self._step_down(now, out, f"{pair.peer_name} is active with epoch {pair.peer_epoch} (ours {pair.epoch})")
        elif action == HAND_OVER:
            self._hand_over(now, out)
        elif action == RAISE_EPOCH:
            # Both active; we carry the pair's table on and the other started cold: it steps down,
            # and peers must accept us, so our epoch goes above the one it announced.
            self._epoch = pair.raise_epoch(pair.peer_epoch)
            self.inner.set_epoch(self._epoch)
            why = f"{pair.peer_name} is active too, started cold: we carry the work on at epoch {self._epoch}"
            out.append((PAIR, Problem(f"{self.name}: {why}")))
            out.append((PAIR, self._state(now)))

    def _ask_witness(self, now: float, out: list[Out]) -> None:
        """Passive proxy, synced, peer silent: ask the upstream whether it hears our peer."""
        w, pair = self._witness, self.pair
        if w is None or pair.state != PASSIVE or pair.applied < 0 or pair.peer_alive(now) or not pair.peer_name:
            return
        if not self._witness_connected or w.silent(now):
            out.append((UPSTREAM, w.connect_next(now, "asking the upstream whether it hears our peer")))
            out.append((UPSTREAM, p.Hello(p.ROLE_CLIENT, self.name, (), 0, max(1, round(w.hb_s * 1000)))))
            self._witness_connected = True
        if w.heartbeat_due(now):
            self._witness_rid += 1
            budget = max(1, round(w.ttl_s * 1000))
            out.append(
                (UPSTREAM, p.Request(self._witness_rid, MEMBER_SERVICE, budget, (), p.pack_value(pair.peer_name)))
            )

    def _redirect_held(self, out: list[Out]) -> None:
        pair = self.pair
        bye = p.Bye(
            f"{self.name} is the passive broker of its pair; {pair.peer_name} is active", self.name, pair.peer_name
        )
        out += [(ident, bye) for ident in pair.held]
        self.counters.redirected += len(pair.held)
        pair.held.clear()

    def _standby_receive(self, peer: bytes, msg: p.Message, now: float) -> list[Out]:
        """A message for a broker that is not active: answer status; send the peer to the active
        broker; or, when the active one looks dead, count a vote and wait."""
        pair = self.pair
        out: list[Out] = []
        match msg:
            case p.Request(service=service) if service == STATUS_SERVICE:
                self.inner.services.answer(peer, 0, msg.rid, service, msg.budget_ms, msg.hops, msg.payload, now, out)
                return out
            case p.Hello() | p.Request() | p.Heartbeat():
                pass
            case _:
                return NONE  # for a registration this broker does not hold: it was told to leave
        if pair.peer_state == ACTIVE and pair.peer_fresh(now):
            # One BYE per peer per heartbeat: a client that resends its pending requests must not
            # get a BYE for each of them (it would fail over once per BYE). An MDP client's BYE is
            # the answer to its requests (MDP has no redirect): each gets one.
            if not pair.redirect_due(peer, now) and not self.mdp.is_client(peer):
                return NONE
            self.counters.redirected += 1
            why = f"{self.name} is the passive broker of its pair; {pair.peer_name} is active"
            return [(peer, p.Bye(why, self.name, pair.peer_name))]
        pair.vote(peer, now)
        pair.held.add(peer)
        self._decide(now, out)  # this vote may be what a takeover waited for
        return out

    def _outgrown(self, seen: int, now: float, out: list[Out]) -> None:
        """A peer has seen a higher epoch of our pair than ours: the other broker took over while
        we were cut off, then lost that state (it restarted cold). If it is alive on the pair link
        and not active, nobody else serves: move above that epoch, or every peer would refuse us
        for ever. If it is silent, it may be serving beyond a cut: stay fenced (peers refuse us),
        as fencing is for; if it is active, decide() makes one of us step down."""
        pair = self.pair
        if not pair.peer_alive(now) or pair.peer_state == ACTIVE:
            return
        epoch = self._epoch = pair.raise_epoch(seen)
        self.inner.set_epoch(epoch)
        out.append((PAIR, Problem(f"{self.name}: a peer has seen epoch {seen} of this pair; now epoch {epoch}")))
        out.append((PAIR, self._state(now)))

    def _take_over(self, now: float, out: list[Out], why: str) -> None:
        """Become the active broker: a new epoch, and a machine built from the replicated table."""
        pair = self.pair
        table, held = pair.table, list(pair.held)
        self._epoch = pair.activate(now)
        self._active = True
        self.incarnation = f"{self._base_incarnation}.{self._epoch}"
        top = max(pair.top, max(table, default=0))
        first = top + TICKET_GAP if top else 1 + int(self._rng() * 2**61)
        self.inner = self._machine(now, serving=True, first_ticket=first)
        self.inner.restore(table, now)
        self._witness_connected = False  # the machine's upstream link replaces the witness's connection
        pair.table = {}
        out.append(
            (
                PAIR,
                Problem(f"{self.name} is active, epoch {self._epoch} ({why}); {len(table)} open requests taken over"),
            )
        )
        out.append((PAIR, self._state(now)))
        reconnect = p.Reconnect(f"{self.name} is now the active broker of its pair: register again")
        out += [(ident, reconnect) for ident in held]
        out += self.inner.start(now)  # a proxy registers upstream

    def _step_down(self, now: float, out: list[Out], why: str) -> None:
        """Stop serving: tell every peer to go (to the other broker), drop the machine."""
        pair = self.pair
        bye = p.Bye(f"{self.name} is now the passive broker of its pair: {why}", self.name, pair.peer_name)
        out += [(ident, bye) for ident in self.inner.leavers()]
        self.inner.tiers.shutdown(f"proxy {self.name} stepped down", out)
        held = (self.inner.open_requests, "warm" if pair.warm else "cold")  # what it carried, for the logs
        pair.deactivate(now, stepped_down=True)
        self._active = False
        self.inner = self._machine(now, serving=False)
        out.append((PAIR, Problem(f"{self.name} stepped down to passive ({held[0]} open requests, {held[1]}): {why}")))
        out.append((PAIR, self._state(now)))

    def _hand_over(self, now: float, out: list[Out]) -> None:
        """Give the work to the passive peer: the last ops, HANDOVER, then step down (failback)."""
        pair = self.pair
        out += self.flush(now)
        out.append((PAIR, p.Handover(pair.epoch)))
        pair.counters["handovers"] += 1
        self._step_down(now, out, f"handed over to {pair.peer_name}")
        pair.peer_state = ACTIVE  # as soon as it reads HANDOVER: send peers there meanwhile

    def _handover_service(self, peer: bytes, rid: int, now: float) -> list[Out]:
        """``zmqdist.handover``: an operator asks the active broker of a pair to hand over."""
        pair = self.pair
        if not pair.peer_fresh(now) or pair.peer_state != PASSIVE:  # (heard just now: see Pair.decide)
            why = f"its peer {pair.peer_name or ''} is not a live passive broker: nothing to hand over to"
        elif pair.peer_synced < 0:
            why = f"its peer {pair.peer_name} has no copy of the request table yet"
        else:
            done = {"handed_over_to": pair.peer_name, "epoch": pair.epoch}  # the peer's will be higher
            out: list[Out] = [(peer, p.Reply(rid, p.ST_OK, "", p.pack_value(done)))]
            self._hand_over(now, out)
            return out
        self.counters.invalid += 1
        return [(peer, p.Reply(rid, p.ST_INVALID, f"cannot hand over: {why}", b""))]

    # --- introspection ----------------------------------------------------------------------------

    def set_ttl(self, peer: bytes, ttl_s: float) -> None:
        self.inner.set_ttl(peer, ttl_s)

    def status(self, now: float) -> dict[str, object]:
        return self.inner.status(now)

    def add_status_part(self, part: StatusPart) -> None:
        self._parts.append(part)
        self.inner.add_status_part(part)

    def enable_histograms(self) -> None:
        self._hist = {"queue_wait": Hist(), "service": Hist(), "end_to_end": Hist()}
        self.inner.use_histograms(self._hist)

    def worker_load(self) -> dict[bytes, tuple[int, int]]:
        return self.inner.worker_load()

    def members(self) -> set[bytes]:
        return self.inner.members()

    def clients_heard(self) -> int:
        return self.inner.clients_heard()

    def carries_nothing(self, peer: bytes, now: float) -> list[Out]:
        return self.inner.carries_nothing(peer, now) if self._active else NONE

    def holds(self, peer: bytes, rid: int) -> bool:
        return self.inner.holds(peer, rid)

    def resumed(self, seconds: float, now: float) -> None:
        pair = self.pair
        pair.pauses.note(seconds, now)  # the peer's silence in it proves nothing (Pair.silent_since)
        pair.next_beat = now  # and ours may have looked like a death to it: say our state at once
        if self._witness is not None:
            self._witness.paused(seconds, now)
        self.inner.resumed(seconds, now)

    @property
    def standby(self) -> bool:
        return not self._active

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def upstream(self) -> Upstream | None:
        return self.inner.upstream

    @property
    def queued(self) -> int:
        return self.inner.queued

    @property
    def open_requests(self) -> int:
        return self.inner.open_requests
