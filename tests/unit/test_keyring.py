"""The allow-lists a CURVE broker reads: a reload replaces them whole, or (a directory it cannot
read) not at all."""

import logging
import shutil

from zmqdist.transport.security import KeyRing, generate, load_public


def _ring(tmp_path):
    keys = tmp_path / "keys"
    for name in ("alice", "bob", "w1"):
        generate(name, keys)
    allow = {role: tmp_path / "allow" / role for role in ("clients", "workers", "brokers")}
    for d in allow.values():
        d.mkdir(parents=True)
    shutil.copy(keys / "alice.key", allow["clients"])
    shutil.copy(keys / "w1.key", allow["workers"])
    return KeyRing(allow), keys, allow


def test_a_reload_applies_added_and_removed_keys(tmp_path):
    ring, keys, allow = _ring(tmp_path)
    alice, bob = load_public(keys / "alice.key"), load_public(keys / "bob.key")
    assert set(ring.keys) == {alice, load_public(keys / "w1.key")}
    (allow["clients"] / "alice.key").unlink()
    shutil.copy(keys / "bob.key", allow["clients"])
    ring.load()
    assert alice not in ring.keys and ring.keys[bob].roles == frozenset({"clients"})
    for f in allow["clients"].iterdir():  # an emptied directory revokes its whole role
        f.unlink()
    ring.load()
    assert bob not in ring.keys and len(ring.keys) == 1


def test_a_reload_that_cannot_read_a_directory_keeps_the_old_allow_lists_and_says_so(tmp_path, caplog):
    """A directory gone (replaced by a deployment, a typo) or unreadable: every key of the table
    read before still applies, and an ERROR says so. It was read as empty, which refused every
    client at its next connection."""
    ring, keys, allow = _ring(tmp_path)
    before = dict(ring.keys)
    shutil.rmtree(allow["clients"])
    shutil.copy(keys / "bob.key", allow["workers"])  # a change in another role is not half-applied
    caplog.set_level(logging.ERROR, logger="zmqdist")
    ring.load()
    assert ring.keys == before
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot read" in errors[0] and "2 keys loaded before still apply" in errors[0]
    allow["clients"].mkdir()
    ring.load()  # readable again: the new table, whole
    assert set(ring.keys) == {load_public(keys / "w1.key"), load_public(keys / "bob.key")}
