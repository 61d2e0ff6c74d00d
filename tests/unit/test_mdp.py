"""Majordomo translation, sans-IO: MDP frames in, the core's decisions, MDP frames out.

Every frame list the broker sends to an MDP peer is checked against the grammar of RFC 7 (MDP/0.1)
or RFC 18 (MDP/0.2), as the peer sees it after the ROUTER strips the identity.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core import mdp
from zmqdist.core.broker import BrokerCore
from zmqdist.core.records import Copy
from zmqdist.errors import RemoteProtocolError

# --- the RFCs' grammar for what a broker sends ------------------------------------------------------


def rfc7_client_reply(f):
    """RFC 7: Frame 0 empty (REQ envelope); 1 "MDPC01"; 2 service name; 3+ reply body."""
    assert f[0] == b"" and f[1] == b"MDPC01" and len(f) >= 4 and f[2], f


def rfc7_worker(f, cmd):
    """RFC 7: Frame 0 empty; 1 "MDPW01"; 2 command; REQUEST: 3 client address, 4 empty, 5+ body;
    HEARTBEAT and DISCONNECT: nothing more."""
    assert f[0] == b"" and f[1] == b"MDPW01" and f[2] == cmd, f
    if cmd == b"\x02":
        assert len(f) >= 6 and f[3] and f[4] == b"", f
    else:
        assert len(f) == 3, f


def rfc18_client_final(f):
    """RFC 18: Frame 0 "MDPC02"; 1 0x03 (FINAL); 2 service name; 3+ reply body."""
    assert f[0] == b"MDPC02" and f[1] == b"\x03" and len(f) >= 4 and f[2], f


def rfc18_worker(f, cmd):
    """RFC 18: Frame 0 "MDPW02"; 1 command; REQUEST: 2 client address, 3 empty, 4+ body;
    HEARTBEAT (0x05) and DISCONNECT (0x06): 2 frames."""
    assert f[0] == b"MDPW02" and f[1] == cmd, f
    if cmd == b"\x02":
        assert len(f) >= 5 and f[2] and f[3] == b"", f
    else:
        assert len(f) == 2, f


# --- harness: a bridge in front of a core -----------------------------------------------------------


class Pair:
    def __init__(self):
        self.core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0)
        self.bridge = mdp.MdpBridge(timeout_s=30, heartbeat_ms=2500)
        self.now = 0.0

    def send(self, ident, frames):
        """Feed an MDP message; return {peer: [frames, ...]} of what MDP peers get back."""
        out = []
        for msg in self.bridge.inbound(ident, frames):
            out += self.core.receive(ident, msg, self.now)
        got = {}
        for peer, msg in out:
            f = self.bridge.outbound(peer, msg)
            if f is not None:
                got.setdefault(peer, []).append(f)
        return got


def test_rfc18_client_and_worker_without_delimiters():
    t = Pair()
    assert t.send(b"W", [b"MDPW02", b"\x01", b"echo"]) == {}  # READY has no answer
    assert t.core.worker_load() == {b"W": (0, 1)}  # a worker of capacity 1
    got = t.send(b"C", [b"MDPC02", b"\x01", b"echo", b"hi", b"there"])
    (task,) = got[b"W"]
    rfc18_worker(task, b"\x02")
    assert task[4:] == [b"hi", b"there"]
    got = t.send(b"W", [b"MDPW02", b"\x04", task[2], b"", b"HI"])
    (reply,) = got[b"C"]
    rfc18_client_final(reply)
    assert reply[2:] == [b"echo", b"HI"]
    (hb,) = t.send(b"W", [b"MDPW02", b"\x05"])[b"W"]
    rfc18_worker(hb, b"\x05")


def test_rfc7_client_on_req_and_worker():
    t = Pair()
    t.send(b"W", [b"", b"MDPW01", b"\x01", b"echo"])
    (task,) = t.send(b"C", [b"", b"MDPC01", b"echo", b"a", b"b"])[b"W"]
    rfc7_worker(task, b"\x02")
    assert task[5:] == [b"a", b"b"]
    (reply,) = t.send(b"W", [b"", b"MDPW01", b"\x03", task[3], b"", b"x"])[b"C"]
    rfc7_client_reply(reply)
    assert reply[2:] == [b"echo", b"x"]
    (hb,) = t.send(b"W", [b"", b"MDPW01", b"\x04"])[b"W"]
    rfc7_worker(hb, b"\x04")


def test_majortomo_dialect_is_answered_in_kind():
    """A delimiter before MDPC02/MDPW02 and client REQUEST 0x02: the reply keeps both habits."""
    t = Pair()
    t.send(b"W", [b"", b"MDPW02", b"\x01", b"echo"])
    (task,) = t.send(b"C", [b"", b"MDPC02", b"\x02", b"echo", b"v"])[b"W"]
    assert task[0] == b"" and task[1:3] == [b"MDPW02", b"\x02"]
    (reply,) = t.send(b"W", [b"", b"MDPW02", b"\x04", task[3], b"", b"V"])[b"C"]
    assert reply == [b"", b"MDPC02", b"\x04", b"echo", b"V"]


def test_unknown_worker_gets_disconnect_and_is_forgotten():
    t = Pair()
    (d,) = t.send(b"W", [b"MDPW02", b"\x05"])[b"W"]  # a heartbeat before READY
    rfc18_worker(d, b"\x06")
    assert not t.bridge.speaks_mdp(b"W")
    (d,) = t.send(b"V", [b"", b"MDPW01", b"\x03", b"\0" * 8, b"", b"late"])[b"V"]
    rfc7_worker(d, b"\x05")


def test_worker_disconnect_requeues_and_partials_are_joined_for_a_client_that_does_not_stream():
    t = Pair()
    t.send(b"W1", [b"MDPW02", b"\x01", b"s"])
    (task,) = t.send(b"C", [b"", b"MDPC01", b"s", b"job"])[b"W1"]
    assert task[4:] == [b"job"]
    t.send(b"W2", [b"MDPW02", b"\x01", b"s"])
    got = t.send(b"W1", [b"MDPW02", b"\x06"])  # W1 leaves holding the request: it goes to W2
    (task2,) = got[b"W2"]
    assert t.send(b"W2", [b"MDPW02", b"\x03", task2[2], b"", b"part1"]) == {}
    (reply,) = t.send(b"W2", [b"MDPW02", b"\x04", task2[2], b"", b"part2"])[b"C"]
    assert reply[1:] == [b"MDPC01", b"s", b"part1", b"part2"]
    assert t.bridge.counters["mdp_partials"] == 1


def mdp_round(core, ident, frames, now=0.0):
    """Feed MDP frames through the core's door; return {peer: [mdp message, ...]}, sending on what
    the machine does next (its acknowledgements for MDP clients) as the runtime does."""
    out = []
    core.receive_mdp(ident, frames, now, out)
    got = {}
    while out:
        peer, msg = out.pop(0)
        if core.mdp.speaks_mdp(peer):
            msgs, more = core.mdp_outbound(peer, msg, now)
            got.setdefault(peer, []).extend(msgs)
            out += more
        else:
            got.setdefault(peer, []).append(msg)
    return got


@pytest.mark.parametrize(
    ("request_code", "partial", "final"),
    [(b"\x01", b"\x02", b"\x03"), (b"\x02", b"\x03", b"\x04")],  # RFC 18's codes; majortomo's
)
def test_an_mdp02_client_gets_each_part_of_a_native_stream_as_partial_the_last_as_final(request_code, partial, final):
    """In its own dialect: an RFC 18 client (REQUEST 0x01) was sent PARTIAL as 0x03, its FINAL."""
    core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0)
    core.receive(b"N", p.Hello(p.ROLE_WORKER, "native", ("gen",), 1, 250), 0)
    (task,) = mdp_round(core, b"C", [b"MDPC02", request_code, b"gen", b"go"])[b"N"]
    assert task.window == mdp.MDP_WINDOW
    n = 3 * mdp.MDP_WINDOW  # more than one window: the broker's acknowledgements keep it going
    got = []
    for seq in range(n):
        answer = core.receive(b"N", p.Part(task.ticket, seq, p.pack_value(f"p{seq}".encode())), 0)
        for peer, msg in answer:
            if peer == b"C":
                msgs, more = core.mdp_outbound(peer, msg, 0)
                got += msgs
                acks = [m for _, m in more]
                assert acks == [p.Ack(task.ticket, seq + 1)]  # acknowledged for the client
    end = core.receive(b"N", p.Result(task.ticket, p.RS_OK, p.pack_value(None), 0, n), 0)
    (last,) = [m for peer, msg in end if peer == b"C" for m in core.mdp_outbound(peer, msg, 0)[0]]
    assert [m[1] for m in got] == [partial] * (n - 1)
    assert [m[3] for m in got] == [f"p{i}".encode() for i in range(n - 1)]
    assert last[1] == final and last[3] == f"p{n - 1}".encode()
    # a plain handler's one value is a FINAL alone
    (task,) = mdp_round(core, b"C", [b"MDPC02", request_code, b"gen", b"x"])[b"N"]
    for peer, msg in core.receive(b"N", p.Part(task.ticket, 0, p.pack_value(b"only")), 0):
        assert core.mdp_outbound(peer, msg, 0)[0] == []  # held back: is it the last one?
    out = core.receive(b"N", p.Result(task.ticket, p.RS_OK, p.pack_value(None), 0, 1), 0)
    (last,) = [m for peer, msg in out if peer == b"C" for m in core.mdp_outbound(peer, msg, 0)[0]]
    assert last[1:] == [final, b"gen", b"only"]


def test_an_mdp02_workers_partials_are_parts_of_a_native_stream():
    core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0)
    mdp_round(core, b"W", [b"MDPW02", b"\x01", b"s"])
    core.receive(b"C", p.Hello(p.ROLE_CLIENT, "c", (), 0, 250), 0)
    (task,) = [
        m
        for peer, m in core.receive(b"C", p.Request(1, "s", 5000, (), p.pack_value(b"v"), "", "", 8), 0)
        for m in [core.mdp_outbound(peer, m, 0)[0][0]]
    ]
    ticket = task[2]
    assert mdp_round(core, b"W", [b"MDPW02", b"\x03", ticket, b"", b"a"])[b"C"] == [p.Part(1, 0, p.pack_value(b"a"))]
    got = mdp_round(core, b"W", [b"MDPW02", b"\x04", ticket, b"", b"b"])[b"C"]
    assert got[0] == p.Part(1, 1, p.pack_value(b"b"))
    assert got[1].status == p.ST_OK and got[1].parts == 2


def test_native_failure_reaches_an_mdp_client_as_an_error_body():
    t = Pair()
    t.core.receive(b"N", p.Hello(p.ROLE_WORKER, "native", ("calc",), 1, 250), 0)
    out = []
    for msg in t.bridge.inbound(b"C", [b"MDPC02", b"\x01", b"calc", b"x"]):
        out += t.core.receive(b"C", msg, 0)
    (_, task) = out[0]
    assert p.unpack_value(task.payload) == b"x"  # one body frame -> a bytes value
    out = t.core.receive(b"N", p.Result(task.ticket, p.RS_FAILED, p.pack_error("ValueError", "bad x", "tb")), 0)
    (peer, reply) = next(o for o in out if o[0] == b"C")
    frames = t.bridge.outbound(peer, reply)
    rfc18_client_final(frames)
    assert frames[2:] == [b"calc", b"zmqdist.error", b"FAILED", b"ValueError: bad x"]


@pytest.mark.parametrize(
    "frames",
    [
        [b"MDPW02"],
        [b"", b"MDPC01"],
        [b"MDPX01", b"\x01", b"s"],
        [b"MDPC02", b"\x09", b"s", b"b"],
        [b"MDPC02", b"\x01"],
        [b"MDPW02", b"\x01"],  # READY without a service
        [b"MDPW02", b"\x01", b"a", b"b"],
        [b"MDPW02", b"\x01", b"\xff\xfe"],  # not UTF-8
        [b"MDPW02", b"\x01", b""],
        [b"MDPW02", b"\x04", b"short", b"", b"x"],  # client address is not a ticket
        [b"MDPW02", b"\x04", b"\0" * 8, b"not empty", b"x"],
        [b"MDPW02", b"\x42"],
        [b"MDPC02", b"\x01", b"s", *([b"x"] * (mdp.MAX_FRAMES + 1))],
    ],
)
def test_malformed_mdp_messages_raise_remote_protocol_errors(frames):
    with pytest.raises(RemoteProtocolError):
        mdp.MdpBridge(30, 2500).inbound(b"P", frames)


def test_mmi_service_discovery_in_the_core():
    core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0)
    core.receive(b"W", p.Hello(p.ROLE_WORKER, "w", ("echo",), 1, 250), 0)

    def ask(service, body):
        ((_, reply),) = core.receive(b"C", p.Request(1, service, 1000, (), p.pack_value(body)), 0)
        return p.unpack_value(reply.payload)

    assert ask("mmi.service", b"echo") == b"200"
    assert ask("mmi.service", b"nosuch") == b"404"
    assert ask("mmi.discovery", b"") == b"501"
    # nobody may register under mmi.
    ((_, err),) = core.receive(b"X", p.Hello(p.ROLE_WORKER, "x", ("mmi.service",), 1, 250), 0)
    assert type(err) is p.Error and "reserved" in err.message


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=6))
def test_body_frames_survive_the_payload_mapping(frames):
    assert mdp.unpack_body(mdp.pack_body(frames)) == frames


def test_native_values_become_frames():
    assert mdp.unpack_body(p.pack_value("text")) == [b"text"]
    assert mdp.unpack_body(p.pack_value([b"a", "b"])) == [b"a", b"b"]
    assert mdp.unpack_body(p.pack_value({"k": 1})) == [p.pack_value({"k": 1})]  # msgpack as is
    assert mdp.unpack_body(b"\xc1not msgpack") == [b"\xc1not msgpack"]


def test_the_peer_table_stays_bounded_under_a_spray_of_identities():
    bridge = mdp.MdpBridge(30, 2500, max_peers=50)
    for i in range(500):
        bridge.inbound(f"w{i}".encode(), [b"MDPW02", b"\x03", b"\0" * 8, b"", b"partial"])  # unknown workers
        bridge.inbound(f"c{i}".encode(), [b"MDPC02", b"\x01", b"echo", b"x"])  # clients never answered
    assert len(bridge.peers) <= 51


def test_the_brokers_message_limit_holds_for_mdp_bodies_and_a_worker_past_it_keeps_serving():
    """Rule 6: a body's total, not each frame (libzmq's check), against --max-message-size."""
    core = BrokerCore(BrokerSettings(name="b", max_message_size=1000), "inc", 0.0)

    def to(peer, frames):
        out = []
        core.receive_mdp(peer, frames, 0, out)
        return [(q, f) for q, m in out if q in (b"C", b"W") for f in core.mdp_outbound(q, m, 0)[0]]

    to(b"W", [b"MDPW02", b"\x01", b"s"])
    # a request of three frames of 400 bytes is refused with the reason, and reaches no worker
    (got,) = to(b"C", [b"MDPC02", b"\x01", b"s", *[b"r" * 400] * 3])
    assert got[0] == b"C" and got[1][3:5] == [mdp.ERROR_TAG, b"INVALID"] and b"limit of 1000" in got[1][5]
    assert core.counters.invalid == 1 and core.mdp.counters["mdp_requests"] == 1

    def ask(request=(b"MDPC02", b"\x01")):
        ((peer, task),) = to(b"C", [*request, b"s", b"go"])
        assert peer == b"W" and task[1] == mdp.REQUEST
        return task[2]

    h = b"h" * 400
    for answer in (
        [[mdp.W2_FINAL, b"x" * 1001]],
        [[mdp.W2_FINAL, h, h, h]],
    ):
        ticket = ask()
        got = [f for cmd, *body in answer for f in to(b"W", [b"MDPW02", cmd, ticket, b"", *body])]
        assert [g[0] for g in got] == [b"C"] and got[0][1][3:5] == [mdp.ERROR_TAG, b"FAILED"], got
        assert got[0][1][5].startswith(b"ResultTooLarge") and b"limit of 1000" in got[0][1][5]
    # PARTIALs collected for one reply (an MDP 0.1 client asks for one): failed as soon as they pass
    # the limit, the rest of that reply dropped, the FINAL too
    ticket = ask((b"MDPC01",))
    assert to(b"W", [b"MDPW02", mdp.W2_PARTIAL, ticket, b"", h, h]) == []
    (got,) = to(b"W", [b"MDPW02", mdp.W2_PARTIAL, ticket, b"", h])
    assert got[1][2:4] == [mdp.ERROR_TAG, b"FAILED"] and b"PARTIALs" in got[1][4]
    assert to(b"W", [b"MDPW02", mdp.W2_PARTIAL, ticket, b"", h]) == []
    assert to(b"W", [b"MDPW02", mdp.W2_FINAL, ticket, b"", h]) == []
    assert not core.mdp.peers[b"W"].partial and not core.mdp.peers[b"W"].dropping  # nothing kept
    # a stream's part over it: the parts before it, then the failure saying which part
    ticket = ask()
    assert to(b"W", [b"MDPW02", mdp.W2_PARTIAL, ticket, b"", b"p0"]) == []  # held: the last one?
    got = to(b"W", [b"MDPW02", mdp.W2_PARTIAL, ticket, b"", b"x" * 1001])
    assert [g[1][1] for g in got] == [mdp.C2_PARTIAL, mdp.C2_FINAL] and got[0][1][3] == b"p0"
    assert got[1][1][4] == b"FAILED" and b"part 2 of the stream" in got[1][1][5]
    assert to(b"W", [b"MDPW02", mdp.W2_FINAL, ticket, b"", b"end"]) == []
    # the worker was never told DISCONNECT: it serves on, within the limit
    ticket = ask()
    (got,) = to(b"W", [b"MDPW02", mdp.W2_FINAL, ticket, b"", b"x" * 900])
    assert got[1][1] == mdp.C2_FINAL and got[1][3] == b"x" * 900
    assert core.mdp.counters["mdp_too_large"] == 4 and core.counters.bad_input == 1


def test_a_bridge_without_a_limit_takes_any_size():
    bridge = mdp.MdpBridge(30, 2500)
    (req,) = bridge.inbound(b"C", [b"MDPC02", b"\x01", b"s", b"x" * 100_000])
    assert type(req) is p.Request and len(req.payload) > 100_000


def test_a_bye_to_an_mdp_client_ends_each_request_it_has_open_with_busy_saying_where_to_go():
    bridge = mdp.MdpBridge(30, 2500)
    bridge.inbound(b"C", [b"MDPC02", b"\x01", b"s", b"one"])
    bridge.inbound(b"C", [b"MDPC02", b"\x01", b"t", b"two"])
    ends = bridge.outbound_many(b"C", p.Bye("B is the passive broker of its pair; A is active", "B", "A"))
    assert [e[:5] for e in ends] == [[b"MDPC02", b"\x03", name, mdp.ERROR_TAG, b"BUSY"] for name in (b"s", b"t")]
    assert all(b"broker B sent this client away: B is the passive" in e[5] for e in ends)
    for e in ends:
        rfc18_client_final(e)
    assert not bridge.is_client(b"C") and bridge.outbound_many(b"C", p.Bye("again")) == []


def test_a_reconnect_to_an_mdp_client_ends_its_open_requests_with_busy_to_send_again():
    """A passive broker that held the client's request (a vote) and took over says RECONNECT: the
    request never entered its machine, and MDP clients do not send again by themselves."""
    bridge = mdp.MdpBridge(30, 2500)
    bridge.inbound(b"C", [b"", b"MDPC01", b"s", b"one"])
    (end,) = bridge.outbound_many(b"C", p.Reconnect("B is now the active broker of its pair: register again"))
    rfc7_client_reply(end)
    assert end[2:5] == [b"s", mdp.ERROR_TAG, b"BUSY"] and end[5].startswith(b"send it again: B is now the active")


def _serve(core, tasks, now):
    """Answer ``tasks`` one at a time as MDP worker W (``re:`` and the body) until none is left;
    return what MDP client C got."""
    got = []
    while tasks:
        task = tasks.pop(0)
        out = []
        core.receive_mdp(b"W", [b"MDPW02", b"\x04", mdp.ticket_frame(task.ticket), b"", b"re:", task.payload], now, out)
        tasks += [m for peer, m in out if peer == b"W" and type(m) is p.Task]
        for peer, m in out:
            if peer == b"C":
                got += core.mdp.outbound_many(peer, m)
    return got


def test_a_pairs_new_active_broker_leaves_an_mdp_clients_requests_out_of_the_table_it_takes_over():
    """An MDP client cannot send a request again by its number: a copy taken over would run for
    nobody, and its answer reach the client out of turn. Old code took it over, numbered the
    client's next request there as that copy (the bridge counted from 1 for a client new to it),
    took the new request for the copy sent again, and gave the client the copy's answer as its
    own: a wrong value. A native caller's request is taken over as before."""
    core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0, first_ticket=1000)
    body = mdp.pack_body([b"old"])
    table = {
        7: Copy(p.OpAccepted(7, b"C", mdp.FIRST_RID, "echo", 30.0, (), "", "", 1, body)),
        8: Copy(p.OpAccepted(8, b"N", 1, "echo", 30.0, (), "", "", 1, body)),
    }
    core.restore(table, 0.0)
    assert core.open_requests == 1 and core.holds(b"N", 1) and core.counters.mdp_not_taken_over == 1
    out = []
    core.receive_mdp(b"W", [b"MDPW02", b"\x01", b"echo"], 0.0, out)  # READY: the native caller's copy goes to it
    core.receive_mdp(b"C", [b"MDPC02", b"\x01", b"echo", b"new"], 0.0, out)
    tasks = [m for peer, m in out if peer == b"W" and type(m) is p.Task]
    assert [t.ticket for t in tasks] == [8]  # capacity 1: the new one waits its turn
    assert _serve(core, tasks, 0.1) == [[b"MDPC02", b"\x03", b"echo", b"re:", mdp.pack_body([b"new"])]]
    assert core.open_requests == 0 and core.counters.duplicates == 0


def test_an_mdp_client_forgotten_with_a_request_open_never_gets_its_number_again():
    """The bridge remembers a bounded number of MDP peers. A client forgotten while a request of
    its was open, back with a new one, is numbered from the start again: around the open one,
    or (old code) the core takes the new request for that one sent again and the client gets its
    answer as the new one's."""
    core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0)
    core.mdp.max_peers = 2
    out = []
    core.receive_mdp(b"C", [b"", b"MDPC01", b"echo", b"first"], 0.0, out)
    core.receive_mdp(b"W", [b"MDPW02", b"\x01", b"echo"], 0.0, out)
    tasks = [m for peer, m in out if peer == b"W" and type(m) is p.Task]
    core.receive_mdp(b"D", [b"MDPC02", b"\x01", b"nobody", b"x"], 0.0, out)  # the table is full: C, the oldest, goes
    assert not core.mdp.is_client(b"C") and core.holds(b"C", mdp.FIRST_RID)
    core.receive_mdp(b"C", [b"", b"MDPC01", b"echo", b"second"], 0.0, out)
    assert core.holds(b"C", mdp.FIRST_RID + 1) and core.counters.duplicates == 0
    # the first one's answer is for nobody now (the bridge does not know that number for C)
    assert _serve(core, tasks, 0.1) == [[b"", b"MDPC01", b"echo", b"re:", mdp.pack_body([b"second"])]]


def test_an_mdp_worker_the_pairs_table_says_held_a_request_is_sent_it_again_on_its_ready():
    """After a takeover a request the old active broker had sent to a worker waits for that worker
    to register here: a native worker carries it over and its first heartbeat says so. A Majordomo
    worker carries nothing (and its heartbeat lists nothing); one that comes back under the same
    routing id (a fixed id) gets the request again as a REQUEST. (Old code: the request stayed
    held by it, never sent, open for good.)"""
    core = BrokerCore(BrokerSettings(name="b"), "inc", 0.0, first_ticket=1000)
    restored = p.OpAccepted(7, b"N", 1, "echo", 30.0, (), "", "", 1, mdp.pack_body([b"old"]))
    core.restore({7: Copy(restored, member=b"X")}, 0.0)
    out = []
    core.receive_mdp(b"X", [b"MDPW02", b"\x01", b"echo"], 0.1, out)
    (task,) = [m for peer, m in out if peer == b"X" and type(m) is p.Task]
    assert task.ticket == 7 and mdp.unpack_body(task.payload) == [b"old"]
    assert core.worker_load() == {b"X": (1, 1)} and core.counters.adopted == 0
    out = []
    core.receive_mdp(b"X", [b"MDPW02", b"\x04", mdp.ticket_frame(7), b"", b"done"], 0.2, out)
    assert [(peer, m.status, m.payload) for peer, m in out if type(m) is p.Reply] == [(b"N", p.ST_OK, b"\xc4\x04done")]
    assert core.open_requests == 0


def test_an_mdp_worker_that_vanished_without_disconnect_is_forgotten_by_the_bridge():
    """The core expired it; the bridge kept it until it held 100,000 peers (a probe: 1,500 such
    workers, +1,500 entries), then dropped its oldest peer to make room, a live worker too. At
    the broker's forgetting, the bridge forgets the workers the core no longer has; a live one
    stays, and so does its translation."""
    from zmqdist.core.broker import FORGET_EVERY_TTLS

    settings = BrokerSettings(name="b", heartbeat_s=0.1, liveness=4, mdp_heartbeat_s=0.1, mdp_liveness=3)
    core = BrokerCore(settings, "inc", 0.0)
    for w in (b"gone", b"live"):
        mdp_round(core, w, [b"MDPW02", b"\x01", b"s"])
    assert {b"gone", b"live"} <= core.d.members.keys()
    at = 0.0
    while at < FORGET_EVERY_TTLS * settings.heartbeat.ttl_s + 0.5:  # only "live" beats
        at = round(at + 0.1, 6)
        mdp_round(core, b"live", [b"MDPW02", b"\x05"], at)
        core.tick(at)
    assert b"gone" not in core.d.members
    assert not core.mdp.speaks_mdp(b"gone") and core.mdp.speaks_mdp(b"live")
    (task,) = mdp_round(core, b"C", [b"MDPC01", b"s", b"job"], at)[b"live"]  # still served
    assert task[-1] == b"job"


def test_a_pair_broker_forgets_its_vanished_mdp_workers_from_the_bridge_its_door_reads():
    """A pair's broker translates at its door with a bridge of its own; the machine behind it
    must forget from that one, not from a second bridge nobody reads."""
    from zmqdist.core.broker import FORGET_EVERY_TTLS
    from zmqdist.core.failover import PairedBroker
    from zmqdist.core.ha import ACTIVE, PENDING

    settings = BrokerSettings(name="a", ha="primary", heartbeat_s=0.1, liveness=4, mdp_heartbeat_s=0.1)
    a = PairedBroker(settings, "inc-a", 0.0)
    a.pair_receive(p.PairState("b", 0, PENDING, 0, "pinc", 0, 0), 0.0)  # a starting backup: we serve
    a.tick(0.01)
    assert a.pair.state == ACTIVE
    a.receive_mdp(b"W", [b"MDPW02", b"\x01", b"s"], 0.02, [])
    assert a.mdp.speaks_mdp(b"W")
    at = 0.02
    while at < FORGET_EVERY_TTLS * settings.heartbeat.ttl_s + 2.0:
        at = round(at + 0.1, 6)
        a.tick(at)
    assert not a.mdp.speaks_mdp(b"W")
    assert a.inner.mdp is a.mdp


def test_a_broker_that_stepped_down_keeps_no_mdp_peer_it_does_not_hold():
    """Seed 151 of the soak: a master that stepped down after a SIGSTOP kept a Majordomo peer for
    good (the passive broker never forgot any). Its MDP worker, told DISCONNECT at the step-down,
    still sends the reply it was working on and a heartbeat or two: the bridge learned it anew
    each time as a worker it does not know, and a passive broker answers neither (the active
    one is told). Only a peer held for an answer at a takeover (a voter) is kept."""
    from zmqdist.core.failover import PairedBroker
    from zmqdist.core.ha import ACTIVE, PASSIVE, PENDING

    settings = BrokerSettings(name="a", ha="primary", heartbeat_s=0.1, liveness=4, mdp_heartbeat_s=0.1)
    a = PairedBroker(settings, "inc-a", 0.0)
    a.pair_receive(p.PairState("b", 0, PENDING, 0, "pinc", 0, 0), 0.0)
    a.tick(0.01)
    assert a.pair.state == ACTIVE
    out: list = []
    a.receive_mdp(b"W", [b"MDPW02", b"\x01", b"s"], 0.02, out)
    a.receive_mdp(b"C", [b"MDPC02", b"\x01", b"s", b"job"], 0.02, out)
    (task,) = [m for peer, m in out if peer == b"W" and type(m) is p.Task]
    # B took over while A was stopped: A steps down and sends its peers away.
    out = a.pair_receive(p.PairState("b", 0, ACTIVE, a.pair.epoch + 1, "pinc", 7, 0, 1), 0.03)
    assert a.pair.state == PASSIVE
    told = {peer: a.mdp_outbound(peer, m, 0.03)[0] for peer, m in out if peer in (b"W", b"C")}
    assert told[b"W"] == [[b"MDPW02", b"\x06"]] and told[b"C"][0][:2] == [b"MDPC02", b"\x03"]
    # What W sent before it read its DISCONNECT: its reply, then heartbeats.
    late = []
    a.receive_mdp(b"W", [b"MDPW02", b"\x04", mdp.ticket_frame(task.ticket), b"", b"re"], 0.04, late)
    a.receive_mdp(b"W", [b"MDPW02", b"\x05"], 0.05, late)
    a.receive_mdp(b"W", [b"MDPW02", b"\x05"], 0.06, late)
    at = 0.06
    while at < 3.0:  # B stays active and fresh
        at = round(at + 0.1, 6)
        a.pair_receive(p.PairState("b", 0, ACTIVE, a.pair.epoch + 1, "pinc", 7, 0, 1), at)
        a.tick(at)
    assert not a.mdp.peers
    # A peer held for an answer (B is not fresh, not yet silent past its ttl) is kept until it
    # gets one: BUSY "send it again" at the takeover.
    at += 3 * settings.heartbeat_s
    held: list = []
    a.receive_mdp(b"D", [b"MDPC02", b"\x01", b"s", b"x"], at, held)
    assert held == [] and b"D" in a.pair.held
    a.tick(at + 0.01)
    assert a.mdp.is_client(b"D")
    took = a.tick(at + settings.heartbeat.ttl_s)
    assert a.pair.state == ACTIVE
    (end,) = [a.mdp_outbound(peer, m, at)[0] for peer, m in took if peer == b"D"]
    assert end[0][:2] == [b"MDPC02", b"\x03"] and b"send it again" in end[0][-1]
