"""The rights matrix: what each role's key may send to a secured broker."""

import pytest

from zmqdist import protocol as p
from zmqdist.core.rights import UNCHECKED, pair_peer, refusal

HELLO = {
    "clients": p.Hello(p.ROLE_CLIENT, "c", (), 0, 250),
    "workers": p.Hello(p.ROLE_WORKER, "w", ("echo",), 1, 250),
    "brokers": p.Hello(p.ROLE_BROKER, "b", (), 0, 250),
}
OTHERS = {
    "clients": [p.Request(1, "echo", 10, (), b"")],
    "workers": [p.Result(1, 0, b""), p.Credit(2), p.Heartbeat(p.ROLE_WORKER, "", 0, ())],
    "brokers": [
        p.Advert((("echo", 1),)),
        p.Reply(1, 0, "", b""),
        p.Heartbeat(p.ROLE_BROKER, "", 0, ()),
        p.Request(1, "echo", 10, ("b",), b""),  # a proxy forwards requests
    ],
}


@pytest.mark.parametrize("role", list(HELLO))
def test_each_role_may_do_its_own_part_and_nothing_else(role):
    assert refusal(role, "*", HELLO[role]) is None
    for msg in OTHERS[role]:
        assert refusal(role, "*", msg) is None, msg
    for other, hello in HELLO.items():
        if other != role and (role, other) != ("brokers", "clients"):
            assert refusal(role, "*", hello) is not None  # e.g. a worker key acting as a broker
            for msg in OTHERS[other]:
                if type(msg) not in {type(m) for m in OTHERS[role]}:
                    assert refusal(role, "*", msg) is not None, (role, msg)


def test_service_limits_apply_to_workers_and_clients_but_not_internal_services():
    assert refusal("workers", "echo", p.Hello(p.ROLE_WORKER, "w", ("echo", "sum"), 1, 250)) is not None
    assert refusal("workers", "echo,sum", p.Hello(p.ROLE_WORKER, "w", ("echo", "sum"), 1, 250)) is None
    assert refusal("clients", "echo", p.Request(1, "sum", 10, (), b"")) is not None
    assert refusal("clients", "echo", p.Request(1, "zmqdist.status", 10, (), b"")) is None
    assert refusal("clients", "", p.Request(1, "mmi.service", 10, (), b"")) is None
    assert refusal("clients,workers", "*", p.Result(1, 0, b"")) is None  # a key in two lists
    assert refusal("", "*", p.Request(1, "echo", 10, (), b"")) is not None


def test_a_broker_key_may_come_as_a_client_the_passive_proxys_witness_asks_so():
    """The passive proxy of a pair asks its upstream whether its peer is there (HELLO as a client,
    then zmqdist.member): under CURVE its HELLO and heartbeats were refused ("a key in the brokers
    allow-list cannot act as clients"), logged and counted at every takeover."""
    assert refusal("brokers", "*", HELLO["clients"]) is None
    assert refusal("brokers", "*", p.Heartbeat(p.ROLE_CLIENT, "", 0, ())) is None
    assert refusal("brokers", "*", p.Request(1, "zmqdist.member", 10, (), b"")) is None
    assert refusal("workers", "*", HELLO["clients"]) is not None  # the other roles stay apart
    assert refusal("clients", "*", HELLO["brokers"]) is not None


def test_a_connection_without_rights_is_refused_everything_and_told_why():
    """No role at all: a CURVE connection no ZAP handler checked (libzmq admits any peer that knows
    the server key while none runs). Every message is refused, with the reason and what to do."""
    for msg in [*HELLO.values(), *(m for ms in OTHERS.values() for m in ms)]:
        assert refusal("", "*", msg) == UNCHECKED, msg
    assert "connect again" in UNCHECKED
    assert not pair_peer("")
    assert pair_peer("brokers") and pair_peer(None)
