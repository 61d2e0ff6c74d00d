"""Sans-IO state machines. They take ``now`` and return what to send; they never do I/O.

Rules for every module in this package: no import of zmq, time, threading, socket or os (checked by
the import contract in setup.cfg); no clock reads; no logging of peer-triggered events here (the
transport logs, rate-limited); outputs are returned, never sent.
"""

from zmqdist.core.broker import BrokerCore, BrokerMachine
from zmqdist.core.client import ClientCore
from zmqdist.core.failover import PairedBroker, make_broker
from zmqdist.core.worker import WorkerCore

__all__ = ["BrokerCore", "BrokerMachine", "ClientCore", "PairedBroker", "WorkerCore", "make_broker"]
