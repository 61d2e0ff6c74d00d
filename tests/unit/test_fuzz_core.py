"""Property-based fuzzing of everything a broker does with bytes: streams of random, mutated and
valid-looking frames from every role (native clients, workers, proxies, the upstream link,
Majordomo peers) go into the broker machine through its doors, as in production (the per-request
fast path first). Nothing may come out of a door, and the machine's invariants hold after every
message. (The same harness runs coverage-guided under atheris: tests/fuzz/fuzz_broker.py.)"""

from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.broker import BrokerCore
from zmqdist.core.failover import PairedBroker
from zmqdist.core.mdp import MDP_HEADERS
from zmqdist.core.records import UPSTREAM
from zmqdist.testing import feed

VALID = [
    p.Hello(p.ROLE_WORKER, "w", ("echo",), 2, 250),
    p.Hello(p.ROLE_BROKER, "proxy", (), 0, 250),
    p.Hello(p.ROLE_CLIENT, "c", (), 0, 250),
    p.Request(1, "echo", 100, (), b"\xc0"),
    p.Request(2, "echo", 100, ("proxy",), b"\xc0"),
    p.Result(1, p.RS_OK, b"\xc0"),
    p.Heartbeat(p.ROLE_WORKER, "", 1, (1,)),
    p.Credit(1),
    p.Advert((("echo", 2),)),
    p.Reply(1, p.ST_OK, "", b""),
    p.Task(1, "echo", 100, 1, "k", 1, (), b""),
    p.Welcome("up", "inc", 250, 4),
    p.Bye("x"),
]


@st.composite
def frames(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a valid native message, possibly with one byte changed or cut
        head, payload = p.encode(draw(st.sampled_from(VALID)))
        if draw(st.booleans()):
            i = draw(st.integers(0, len(head)))
            head = head[:i] + draw(st.binary(max_size=3)) + head[i + 1 :]
        return [head, payload]
    if kind == 1:  # right tag and command, random header bytes
        cmd = draw(st.integers(0, 14))
        return [p.PREFIX + bytes([cmd]) + draw(st.binary(max_size=40)), draw(st.binary(max_size=8))]
    if kind == 2:  # Majordomo-shaped
        first = [b""] if draw(st.booleans()) else []
        header = draw(st.sampled_from(sorted(MDP_HEADERS)))
        cmd = bytes([draw(st.integers(0, 7))])
        rest = draw(st.lists(st.binary(max_size=10), max_size=5))
        return [*first, header, cmd, *rest]
    return draw(st.lists(st.binary(max_size=30), min_size=1, max_size=5))


@given(st.lists(st.tuples(st.sampled_from([b"A", b"B", b"W", b"P", UPSTREAM]), frames(), st.floats(0, 2)), max_size=60))
def test_fuzzed_frame_streams_never_break_the_broker(stream):
    core = BrokerCore(BrokerSettings(name="fuzz", upstream=("sim://up",)), "inc", 0.0)
    core.start(0.0)
    now = 0.0
    for peer, fr, dt in stream:
        now += dt
        out = feed(core, peer, fr, now)
        for dest, m in out:
            if type(dest) is bytes and core.mdp.speaks_mdp(dest) and isinstance(m, tuple) and type(m) in p.CMD_OF:
                core.mdp.outbound(dest, m)
        core.tick(now)
        assert all(n <= cap for n, cap in core.worker_load().values())
        assert 0 <= core.queued <= core.open_requests


PAIR_VALID = [
    p.PairState("peer", 1, p.PAIR_ACTIVE, 3, "pinc", 0, 0),
    p.PairState("peer", 1, p.PAIR_PENDING, 0, "pinc2", -1, 0),
    p.PairState("peer", 0, p.PAIR_PASSIVE, 3, "pinc", 5, 1),
    p.Replicate(
        3, 1, 1, p.pack_ops(0.0, [p.OpAccepted(7, b"C", 1, "echo", 5.0, (), "", "", 0, b"\xc0"), p.OpSent(7, b"W", 1)])
    ),
    p.Replicate(3, 2, 0, p.pack_ops(0.0, [p.OpEnded(7), p.OpRequeued(8)])),
    p.Handover(3),
]


@given(
    st.lists(
        st.tuples(
            st.booleans(),  # True: on the pair link; False: from a peer on the main endpoint
            st.one_of(st.sampled_from(PAIR_VALID), st.sampled_from(VALID)),
            st.binary(max_size=6),  # bytes spliced into the encoded head (none: the message as is)
            st.floats(0, 1.5),
        ),
        max_size=60,
    )
)
def test_fuzzed_pair_link_streams_never_break_a_broker_of_a_pair(stream):
    """Random and mutated pair-link messages (states, replication, handovers) interleaved with peer
    traffic: only RemoteProtocolError comes out of decoding, and the broker keeps its invariants."""
    core = PairedBroker(BrokerSettings(name="fuzz", ha="backup"), "inc", 0.0)
    core.start(0.0)
    now = 0.0
    for on_pair, msg, splice, dt in stream:
        now += dt
        head, payload = p.encode(msg)
        if splice:
            head = head[:5] + splice + head[5 + len(splice) :]
        if on_pair:
            core.receive_pair_frames([head, payload], now)
        else:
            core.receive_message(b"W", [head, payload], now, [])
        core.tick(now)
        core.flush(now)
        assert all(n <= cap for n, cap in core.worker_load().values())
        assert 0 <= core.queued <= core.open_requests
        assert core.standby == (core.pair.state != p.PAIR_ACTIVE)
