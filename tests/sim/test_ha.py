"""Backup pairs in simulation: takeover, fencing, replication, failback, proxy pairs, partitions.

Every test runs on the fake clock. ``a`` is the primary and ``b`` the backup unless a test says
otherwise; workers and clients list both (``via=("a", "b")``).
"""

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from zmqdist import protocol as p
from zmqdist import testing
from zmqdist.core.client import NO_BROKER
from zmqdist.core.ha import PASSIVE
from zmqdist.testing import Simulation

HB = 0.25  # default heartbeat; ttl = 1 s


def pair_sim(workers=2, concurrency=4, service_time=0.05, failback="manual", seed=0):
    sim = Simulation(seed=seed)
    sim.add_pair("a", "b", failback=failback)
    for i in range(workers):
        sim.add_worker(f"w{i}", concurrency=concurrency, service_time=service_time, via=("a", "b"))
    client = sim.add_client("c", via=("a", "b"))
    sim.run_for(1.5)
    return sim, client


def assert_each_ended_once(client, n, status=p.ST_OK):
    testing.assert_each_ended_once(client, n, status)  # these tests expect success unless they say


def executions(sim):
    return Counter(k for w in sim.workers.values() for k in w.executed)


def test_cold_start_the_primary_serves_and_the_backup_is_passive():
    sim, client = pair_sim()
    assert sim.active("a", "b") == ["a"]
    a, b = sim.brokers["a"].core, sim.brokers["b"].core
    assert a.epoch == 1 and b.pair.state == PASSIVE and b.pair.epoch == 1
    assert len(a.worker_load()) == 2 and not b.worker_load()
    for i in range(20):
        client.submit("echo", i)
    sim.run_for(1)
    assert_each_ended_once(client, 20)
    st = b.status(sim.clock.now())["ha"]
    assert st["role"] == "backup" and st["state"] == "passive" and st["peer"]["state"] == "active"


def test_the_passive_broker_holds_a_copy_of_queued_and_dispatched_requests():
    sim, client = pair_sim(workers=1, concurrency=2, service_time=5.0)
    for i in range(5):
        client.submit("echo", {"n": i, "blob": b"x" * 100}, timeout=30)
    sim.run_for(0.1)
    table = sim.brokers["b"].core.pair.table
    assert len(table) == 5
    members = [rec.member for rec in table.values()]
    assert sum(m == b"w:w0" for m in members) == 2 and members.count(None) == 3  # 2 dispatched, 3 queued
    assert {p.unpack_value(rec.accepted.payload)["n"] for rec in table.values()} == set(range(5))  # payloads too
    sim.run_for(17)
    assert_each_ended_once(client, 5)
    assert not sim.brokers["b"].core.pair.table  # the ends replicated as well


def test_kill_of_the_active_under_load_takeover_under_two_seconds_nothing_lost_or_run_twice():
    sim, client = pair_sim(workers=3, concurrency=4, service_time=0.05)
    n = 0
    for _ in range(10):  # a steady load: 30 requests every 0.1 s
        for _ in range(30):
            n += 1
            client.submit("echo", n, timeout=20)
        sim.run_for(0.1)
    killed = sim.clock.now()
    sim.kill("a")
    for _ in range(40):
        for _ in range(30):
            n += 1
            client.submit("echo", n, timeout=20)
        sim.run_for(0.1)
    sim.run_for(5)
    assert_each_ended_once(client, n)
    for rid, (done,) in client.completed.items():
        assert p.unpack_value(done.payload) == rid
    assert sim.active("a", "b") == ["b"] and sim.brokers["b"].core.epoch == 2
    after = sorted(t for t in client.completed_at.values() if t > killed)
    takeover = after[0] - killed
    assert takeover < 2.0, takeover
    # Work the workers finished while the active died was delivered, not run again.
    assert max(executions(sim).values()) == 1
    assert sim.brokers["b"].core.counters.adopted > 0


def test_a_primary_restarted_after_a_takeover_stays_passive_and_the_load_goes_on():
    sim, client = pair_sim()
    sim.kill("a")
    sim.run_for(3)
    sim.restart_broker("a")
    sim.run_for(2)
    a, b = sim.brokers["a"].core, sim.brokers["b"].core
    assert sim.active("a", "b") == ["b"]
    assert a.pair.state == PASSIVE and a.pair.epoch == b.epoch == 2
    assert a.pair.applied >= 0  # it took a snapshot of b's table
    for i in range(50):
        client.submit("echo", i)
    sim.run_for(3)
    assert_each_ended_once(client, 50)
    # the passive a accepted none of them (a takeover beside the active b would show here): b served all
    assert a.counters.requests == 0 and b.counters.replies_ok >= 50
    assert sim.active("a", "b") == ["b"]


def test_cutting_the_pair_link_while_everyone_reaches_the_active_does_not_split_the_brain():
    sim, client = pair_sim()
    sim.cut_pair("a")
    for i in range(100):
        client.submit("echo", i)
        sim.run_for(0.05)
    sim.run_for(3)
    assert sim.active("a", "b") == ["a"], "the backup took over with no one voting for it"
    assert_each_ended_once(client, 100)
    sim.heal_pair("a")
    sim.run_for(2)
    assert sim.active("a", "b") == ["a"] and sim.brokers["b"].core.pair.state == PASSIVE


def test_a_client_cut_from_the_active_only_is_sent_back_no_takeover():
    """Binary Star's rule: the passive broker serves nothing while its peer is alive, so a client
    that reaches only the passive one waits (here: until its deadline); no split brain."""
    sim, client = pair_sim()
    sim.cut_link("c", "a")
    for i in range(10):
        client.submit("echo", i, timeout=3)
    sim.run_for(5)
    assert sim.active("a", "b") == ["a"]
    assert sim.brokers["b"].core.counters.redirected > 0
    assert_each_ended_once(client, 10, status=p.ST_TIMEOUT)
    sim.heal_link("c", "a")
    client.submit("echo", 99, timeout=3)
    sim.run_for(2)
    assert client.completed[11][0].status == p.ST_OK


def test_an_isolated_active_is_replaced_and_steps_down_when_it_is_back():
    sim, client = pair_sim()
    for i in range(40):
        client.submit("echo", i, timeout=20)
    sim.partition("a")  # cut from everyone, its pair link included
    sim.run_for(3)
    assert sorted(sim.active("a", "b")) == ["a", "b"]  # a cannot know yet
    assert sim.brokers["b"].core.epoch == 2
    sim.heal("a")
    sim.run_for(2)
    assert sim.active("a", "b") == ["b"], "the stale primary kept serving beside the new active"
    assert sim.brokers["a"].core.pair.counters["step_downs"] == 1
    for i in range(40, 80):
        client.submit("echo", i, timeout=20)
    sim.run_for(5)
    assert_each_ended_once(client, 80)


def test_peers_refuse_a_broker_with_a_stale_epoch():
    """A split with the pair link cut: b takes over on a worker's vote while a is still active.
    A worker that saw b's epoch 2 refuses a (epoch 1); once the link heals, a steps down."""
    sim, client = pair_sim()
    sim.cut_pair("a")
    sim.run_for(0.8)  # b stops sending peers to a (not heard for two heartbeats): they vote
    late = sim.add_worker("late", concurrency=1, via=("b", "a"))
    sim.run_for(2)
    assert sorted(sim.active("a", "b")) == ["a", "b"] and sim.brokers["b"].core.epoch == 2
    ran = len(late.executed)
    sim.cut_link("late", "b")  # it fails over to a, which is at epoch 1
    sim.run_for(3)
    assert late.core.counters["fenced"] >= 1
    assert len(late.executed) == ran, "it served the stale broker"
    sim.heal_link("late", "b")
    sim.heal_pair("a")
    sim.run_for(2)
    assert sim.active("a", "b") == ["b"]
    for i in range(30):
        client.submit("echo", i)
    sim.run_for(3)
    assert_each_ended_once(client, 30)


def test_a_pair_restarted_cold_outranks_old_epochs_and_old_results_answer_nothing():
    """Both brokers die (b after a takeover, so peers remember epoch 2) while a worker holds work
    and results; both restart with empty tables. The new active's epoch must be above 2 (or every
    peer would refuse it for ever), and the worker's kept results must not be taken for answers to
    the new run's requests (its tickets are new)."""
    sim, client = pair_sim(workers=1, concurrency=2, service_time=0.3)
    sim.kill("a")
    sim.run_for(3)
    old_epoch = sim.brokers["b"].core.epoch
    for i in range(6):
        client.submit("echo", i, timeout=60)
    sim.run_for(0.4)
    sim.kill("b")  # the worker holds tasks and results of b's run
    sim.run_for(0.5)
    sim.restart_broker("a")
    sim.restart_broker("b")
    sim.run_for(4)
    (active,) = sim.active("a", "b")
    assert sim.brokers[active].core.epoch > old_epoch
    for i in range(6, 30):
        client.submit("echo", i, timeout=60)
    sim.run_for(10)
    assert_each_ended_once(client, 30)
    for rid, (done,) in client.completed.items():
        assert p.unpack_value(done.payload) == rid - 1  # its own answer, never an old one


def test_a_lone_active_whose_epoch_its_peers_outgrew_moves_above_it():
    """a is cut off, b takes over (peers see epoch 2), b dies and restarts cold (it forgot 2), a
    comes back: a is the only active broker but at epoch 1, which every peer refuses. A HELLO
    tells a the epoch its peers have seen and a moves above it, instead of a storm of refusals."""
    sim, client = pair_sim()
    sim.partition("a")
    sim.run_for(3)
    assert sim.brokers["b"].core.epoch == 2 and len(sim.brokers["b"].core.worker_load()) == 2
    sim.kill("b")
    sim.heal("a")
    sim.restart_broker("b")
    sim.run_for(3)
    a = sim.brokers["a"].core
    assert sim.active("a", "b") == ["a"] and a.epoch > 2 and a.pair.counters["epoch_raises"] >= 1
    sends = len(sim.tasks_sent)
    for i in range(30):
        client.submit("echo", i)
    sim.run_for(3)
    assert_each_ended_once(client, 30)
    assert len(sim.tasks_sent) - sends == 30 and len(a.worker_load()) == 2


def test_manual_failback_hands_the_work_back_without_losing_any():
    sim, client = pair_sim(service_time=0.2)
    sim.kill("a")
    sim.run_for(3)
    sim.restart_broker("a")
    sim.run_for(2)
    assert sim.active("a", "b") == ["b"]
    for i in range(60):
        client.submit("echo", i, timeout=20)
    sim.run_for(0.1)
    b_epoch = sim.brokers["b"].core.epoch
    rid = client.submit("zmqdist.handover", None)
    sim.run_for(0.01)
    assert p.unpack_value(client.completed[rid][0].payload) == {"handed_over_to": "a", "epoch": b_epoch}
    sim.run_for(5)
    assert sim.active("a", "b") == ["a"] and sim.brokers["a"].core.epoch > b_epoch
    assert_each_ended_once(client, 61)
    assert max(executions(sim).values()) == 1  # in-flight work followed the handover


def test_handover_is_refused_with_a_reason_when_the_peer_cannot_take_it():
    sim, client = pair_sim()
    sim.kill("b")
    sim.run_for(2)
    rid = client.submit("zmqdist.handover", None)
    sim.run_for(0.1)
    done = client.completed[rid][0]
    assert done.status == p.ST_INVALID and "nothing to hand over to" in done.message
    assert sim.active("a", "b") == ["a"]


def test_automatic_failback_once_the_primary_is_in_sync():
    sim, client = pair_sim(failback="auto")
    sim.kill("a")
    sim.run_for(3)
    assert sim.active("a", "b") == ["b"]
    b_epoch = sim.brokers["b"].core.epoch
    sim.restart_broker("a")
    sim.run_for(4)
    a, b = sim.brokers["a"].core, sim.brokers["b"].core
    assert sim.active("a", "b") == ["a"] and a.epoch > b_epoch
    assert b.pair.state == PASSIVE and b.pair.epoch == a.epoch and a.pair.counters["takeovers"] == 1
    for i in range(30):
        client.submit("echo", i)
    sim.run_for(3)
    assert_each_ended_once(client, 30)


def test_graceful_stop_of_the_active_hands_over_at_once():
    sim, client = pair_sim()
    a = sim.brokers["a"]
    a.out(a.core.shutdown())
    sim.kill("a")
    t0 = sim.clock.now()
    sim.run_for(0.05)
    assert sim.active("a", "b") == ["b"]
    client.submit("echo", 1)
    sim.run_for(0.2)
    assert client.completed[1][0].status == p.ST_OK and sim.clock.now() - t0 < 0.3


def proxy_pairs(seed=0):
    """Master pair (ma, mb) with the workers; proxy pair (pa, pb) below it with the client."""
    sim = Simulation(seed=seed)
    sim.add_pair("ma", "mb")
    sim.add_pair("pa", "pb", upstream=("ma", "mb"))
    for i in range(2):
        sim.add_worker(f"w{i}", concurrency=4, service_time=0.05, via=("ma", "mb"))
    client = sim.add_client("c", via=("pa", "pb"))
    sim.run_for(3)
    return sim, client


def test_a_proxy_pair_funnelling_to_a_master_pair_survives_the_kill_of_each_active():
    sim, client = proxy_pairs()
    assert sim.active("ma", "mb", "pa", "pb") == ["ma", "pa"]
    n = 0
    for victim in ("pa", "ma"):
        for _ in range(20):
            for _ in range(10):
                n += 1
                client.submit("echo", n, timeout=30)
            sim.run_for(0.1)
        sim.kill(victim)
        for _ in range(30):
            for _ in range(10):
                n += 1
                client.submit("echo", n, timeout=30)
            sim.run_for(0.1)
    sim.run_for(10)
    assert sim.active("ma", "mb", "pa", "pb") == ["mb", "pb"]
    assert_each_ended_once(client, n)
    for rid, (done,) in client.completed.items():
        assert p.unpack_value(done.payload) == rid


@given(data=st.data(), n_requests=st.integers(1, 150))
def test_property_pair_every_request_ends_exactly_once_and_one_broker_ends_active(data, n_requests):
    """Random kills, restarts, isolations, pair-link cuts and client-link cuts of a pair under
    load. Every request ends exactly once (a correct value, or a timeout while nothing could
    serve it); once everything is healed, exactly one broker is active and everything is served."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    sim = Simulation(seed=seed)
    sim.add_pair("a", "b", failback=data.draw(st.sampled_from(["manual", "auto"])))
    for i in range(data.draw(st.integers(1, 3))):
        sim.add_worker(
            f"w{i}",
            concurrency=data.draw(st.integers(1, 3)),
            service_time=data.draw(st.sampled_from([0.001, 0.05, 0.3])),
            via=data.draw(st.sampled_from([("a", "b"), ("b", "a")])),
        )
    client = sim.add_client("c", via=data.draw(st.sampled_from([("a", "b"), ("b", "a")])))
    sim.run_for(data.draw(st.floats(0.0, 2.0)))
    sent = 0
    dead: set[str] = set()
    for _ in range(data.draw(st.integers(0, 5))):
        for _ in range(n_requests // 3 + 1):
            sent += 1
            client.submit("echo", sent, timeout=data.draw(st.sampled_from([1.0, 10.0, 60.0])))
        sim.run_for(data.draw(st.floats(0.0, 1.5)))
        action = data.draw(st.sampled_from(["kill", "restart", "isolate", "heal", "cut_pair", "cut_client"]))
        target = data.draw(st.sampled_from(["a", "b"]))
        if action == "kill":
            sim.kill(target)
            dead.add(target)
        elif action == "restart" and target in dead:
            sim.restart_broker(target)
            dead.discard(target)
        elif action == "isolate":
            sim.partition(target)
        elif action == "heal":
            sim.heal(target)
            sim.heal_pair(target)
            sim.heal_link("c", target)
        elif action == "cut_pair":
            sim.cut_pair(target)
        elif action == "cut_client":
            sim.cut_link("c", target)
    # Heal everything, bring the dead back, let it settle; then everything must be served.
    for name in ("a", "b"):
        sim.heal(name)
        sim.heal_pair(name)
        sim.heal_link("c", name)
        if name in dead:
            sim.restart_broker(name)
    sim.run_until(sim.clock.now() + 70, max_steps=400_000)
    assert all(len(v) == 1 for v in client.completed.values()), "a request ended twice"
    assert len(client.completed) == sent, "a request never ended"
    for rid, (done,) in client.completed.items():
        if done.status == p.ST_OK:
            assert p.unpack_value(done.payload) == rid
        else:
            assert done.status in (p.ST_TIMEOUT, p.ST_LOST, NO_BROKER), done
    assert len(sim.active("a", "b")) == 1, "not exactly one active broker after healing"
    (active,) = sim.active("a", "b")
    load = sim.brokers[active].core.worker_load()
    for w in sim.workers.values():  # nothing runs any more: every slot is back
        if w.ident in load:
            assert load[w.ident] == (0, w.core.concurrency), (w.ident, load[w.ident])
    for i in range(5):
        client.submit("echo", -i, timeout=10)
    sim.run_for(5)
    assert all(client.completed[sent + i + 1][0].status == p.ST_OK for i in range(5))
    for w in sim.workers.values():
        assert w.max_running <= w.core.concurrency


def test_a_stalled_host_pausing_both_tiers_and_their_pairs_changes_nothing():
    """A host that stalls stops every broker and worker on it at once, past the ttl, and they
    resume a few milliseconds apart, the passive brokers first. Clients elsewhere (one at the
    proxy pair, one at the master pair) find their brokers silent and go to the passive ones
    meanwhile: votes. No broker may count its own pause as a silence: no takeover, no upstream
    given up. (Before: the master pair's passive broker took over with the first vote, a proxy
    paused with its master gave it up and sent its requests up again.) A request whose reply
    went to a client that had left meanwhile may run again (at-least-once): not counted here."""
    sim, client = proxy_pairs()
    near = sim.add_client("cm", via=("ma", "mb"))
    sim.run_for(0.5)
    assert sim.active("ma", "mb", "pa", "pb") == ["ma", "pa"]
    for n in range(1, 41):
        client.submit("echo", n, timeout=30)
        near.submit("echo", -n, timeout=30)
    sim.run_for(0.02)  # some run at the workers, some wait in the master's queue
    for name, late in (("mb", 0.0), ("pb", 0.01), ("w1", 0.02), ("ma", 0.03), ("pa", 0.04), ("w0", 0.05)):
        sim.freeze(name, 3.0 + late)
    sim.run_for(8)
    assert sim.active("ma", "mb", "pa", "pb") == ["ma", "pa"]
    for name in ("ma", "mb", "pa", "pb"):
        assert sim.brokers[name].core.pair.counters["takeovers"] == (name in ("ma", "pa")), name
    assert sim.brokers["pa"].core.inner.counters.upstream_losses == 0
    for c, sign in ((client, 1), (near, -1)):
        assert_each_ended_once(c, 40)
        got = sorted(sign * p.unpack_value(done.payload) for (done,) in c.completed.values())
        assert got == list(range(1, 41))


def test_brokers_paused_again_and_again_still_take_over_from_a_dead_active_one_in_both_tiers():
    """The passive broker of each pair (master and proxy) paused 0.3 s in every 0.6 s (a host
    stalled again and again, a throttled container), and a worker with them, while the active
    broker of each dies. A broker's own pauses once restarted the count of its peer's silence, so
    it never reached the ttl: no takeover, every request refused or lost. Now each pause is only
    taken off the silence: both take over, and every request ends right."""
    sim, client = proxy_pairs()
    assert sim.active("ma", "mb", "pa", "pb") == ["ma", "pa"]
    for n in range(1, 21):
        client.submit("echo", n, timeout=60)
    sim.run_for(0.1)
    sim.kill("ma")
    sim.kill("pa")
    for n in range(21, 41):
        client.submit("echo", n, timeout=60)
    taken = None
    for step in range(40):  # 24 s at most
        for name in ("mb", "pb", "w1"):
            sim.freeze(name, 0.3)
        sim.run_for(0.6)
        if taken is None and sim.active("mb", "pb") == ["mb", "pb"]:
            taken = step
        if taken is not None and len(client.completed) == 40:
            break
    # A ttl (1 s) of silence while they ran, 0.3 s of each 0.6: in the fourth cycle (step 3) here.
    assert taken is not None and taken <= 6, taken
    assert_each_ended_once(client, 40)
    assert sorted(p.unpack_value(done.payload) for (done,) in client.completed.values()) == list(range(1, 41))
