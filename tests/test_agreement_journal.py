"""
The agreement journal (fit_broker/replica/journal.py) on a storage that
loses unsynced writes, and the replicated log's rule that no message
leaves before the journal records it relies on are durable.
"""

from zope.interface.verify import verifyObject

from fit_broker.agreement.effects import Effects
from fit_broker.agreement.engine import Orderer
from fit_broker.interfaces import IJournalledOrdering
from fit_broker.replica import journal as journal_module
from fit_broker.replica.journal import AgreementJournal
from fit_broker.replica.replicated_log import ReplicatedLog
from fit_broker.storage import FakeStorage


def test_the_engine_provides_the_journalled_interface():
    """The agreement engine declares that it keeps a journal and can resume from one."""
    orderer = Orderer(0, 4, 1, False, None, journal=True)
    assert verifyObject(IJournalledOrdering, orderer)


def test_synced_records_survive_a_power_loss_and_unsynced_ones_do_not():
    """What was synced comes back in order after a crash; what was appended after the last sync is gone, and the journal is not taken as damaged for it."""
    storage = FakeStorage()
    journal = AgreementJournal(storage)
    journal.append([(False, b"one"), (False, b"two")], 1.0)
    assert journal.sync(1.0)
    journal.append([(False, b"three")], 2.0)
    storage.crash()
    again = AgreementJournal(storage)
    assert again.records == [b"one", b"two"]
    assert again.damaged is None and not again.fresh


def test_a_durable_base_lets_the_records_before_it_go(monkeypatch):
    """Once a base record (a stable checkpoint) is synced, the segments before it are dropped, and a reopened journal starts at or before the base."""
    storage = FakeStorage()
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 200)
    journal = AgreementJournal(storage)
    for i in range(20):
        journal.append([(False, b"old-%02d" % i + b"x" * 40)], 1.0)
    journal.append([(True, b"base"), (False, b"after")], 2.0)
    journal.sync(2.0)
    records = AgreementJournal(storage).records
    assert records[-2:] == [b"base", b"after"]
    assert len(records) < 10


def test_a_damaged_older_segment_makes_the_journal_fresh_and_empty(monkeypatch):
    """A byte flipped in an older segment cannot be told from a good record: the journal is dropped, reported damaged, and the replica starts as one that forgot its votes."""
    storage = FakeStorage()
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 100)
    journal = AgreementJournal(storage)
    for i in range(10):
        journal.append([(False, b"record-%d" % i + b"y" * 30)], 1.0)
    journal.sync(1.0)
    first = sorted(storage.files())[0]
    storage.damage(first, 20, b"\xff")
    again = AgreementJournal(storage)
    assert again.damaged is not None and again.fresh
    assert again.records == []


def test_a_journal_that_cannot_sync_silences_the_replica():
    """When the journal's fsync fails, the messages that rely on it are not sent and the failure is counted: saying nothing is safe, saying what a restart could contradict is not."""
    storage = FakeStorage()
    journal = AgreementJournal(storage)
    sent = []

    class Machine:
        def take_proposals(self):
            return []

        def take_answers(self):
            return []

    log = ReplicatedLog(None, Machine(), lambda to, kind, body: sent.append(body), lambda t, r: None, journal)
    log._carry(Effects(messages=((None, b"vote"),), journal=((False, b"voted"),)), 1.0)
    assert sent == [b"vote"]
    storage.fail_syncs()
    log._carry(Effects(messages=((None, b"vote2"),), journal=((False, b"voted2"),)), 2.0)
    assert sent == [b"vote"]
    assert log.counters["journal-failed-unsent"] == 1
    assert journal.failed is not None
    assert journal.stats()["failed"]
