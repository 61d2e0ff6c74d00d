"""Coverage-guided fuzzing (atheris) of everything a broker does with bytes: every message goes
into the broker machine through its doors, as in production (the per-request fast path first,
then the decoder, the Majordomo bridge and the handlers), from one peer or another.

Nothing may come out of a door; any exception, or a broken invariant, is a crash atheris reports
with its input. Run: python tests/fuzz/fuzz_broker.py -runs=100000   (pip install -e '.[fuzz]')
"""

import sys

import atheris

from zmqdist import protocol as p
from zmqdist.config import BrokerSettings
from zmqdist.core.broker import BrokerCore
from zmqdist.core.mdp import MDP_HEADERS
from zmqdist.core.records import UPSTREAM
from zmqdist.testing import feed

atheris.instrument_all()

core = BrokerCore(BrokerSettings(name="fuzz", upstream=("sim://up",)), "inc", 0.0)
core.start(0.0)
core.receive(b"W", p.Hello(p.ROLE_WORKER, "w", ("echo",), 4, 250), 0.0)
clock = [0.0]


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    clock[0] += fdp.ConsumeFloatInRange(0.0, 2.0)
    now = clock[0]
    peer = fdp.PickValueInList([b"A", b"B", b"W", b"P", UPSTREAM])
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # a native message: right tag, any command, fuzzed header and payload
        cmd = fdp.ConsumeIntInRange(0, 14)
        frames = [p.PREFIX + bytes([cmd]) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)), fdp.ConsumeBytes(8)]
    elif mode == 1:  # a Majordomo message: a real header, a command byte, fuzzed frames
        first = [b""] if fdp.ConsumeBool() else []
        header = fdp.PickValueInList(sorted(MDP_HEADERS))
        rest = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12)) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        frames = [*first, header, bytes([fdp.ConsumeIntInRange(0, 7)]), *rest]
    else:
        frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)) for _ in range(fdp.ConsumeIntInRange(1, 6))]
    for dest, out in feed(core, peer, frames, now):
        if type(dest) is bytes and core.mdp.speaks_mdp(dest) and type(out) in p.CMD_OF:
            core.mdp.outbound(dest, out)  # type: ignore[arg-type]
    core.tick(now)
    load = core.worker_load()
    assert all(n <= cap for n, cap in load.values()), load
    assert core.queued >= 0 and core.open_requests >= core.queued


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
