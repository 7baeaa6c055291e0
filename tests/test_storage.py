"""
The storage seam: FileStorage on real files and FakeStorage in memory keep
one contract, and the fake loses on a crash what a disk may lose.
"""

import errno
import os
import random

import pytest
from zope.interface.verify import verifyObject

from fit_broker.interfaces import IStorage
from fit_broker.storage import FakeStorage, FileStorage, StorageError
from fit_broker.storage import files as files_module
from fit_broker.storage.files import sync_many


@pytest.fixture(params=["file", "fake"])
def storage(request, tmp_path):
    if request.param == "fake":
        yield FakeStorage()
    else:
        store = FileStorage(tmp_path / "data", max_open=2)
        yield store
        store.close()


def test_provides_istorage(storage):
    """Both storages provide IStorage."""
    assert verifyObject(IStorage, storage)


def test_append_read_size(storage):
    """Appends accumulate; reads return what was appended, shorter at the end of a file."""
    assert storage.files() == []
    storage.append("a", b"hello ")
    storage.append("a", memoryview(b"world"))
    storage.append("b", b"")
    assert storage.files() == ["a", "b"]
    assert storage.size("a") == 11 and storage.size("b") == 0
    assert storage.read("a", 0, 5) == b"hello"
    assert storage.read("a", 6, 100) == b"world"
    assert storage.read("a", 11, 10) == b""


def test_truncate_and_delete(storage):
    """Truncate cuts a file to a length; delete removes it and tolerates a missing file."""
    storage.append("a", b"0123456789")
    storage.truncate("a", 4)
    storage.append("a", b"xy")
    assert storage.read("a", 0, 100) == b"0123xy"
    storage.delete("a")
    storage.delete("a")
    assert storage.files() == []


def test_many_files_beyond_open_handles(storage):
    """Interleaved appends to more files than handles stay open keep every file whole."""
    for round_ in range(3):
        for k in range(5):
            storage.append(f"f{k}", bytes([k]) * (round_ + 1))
    for k in range(5):
        storage.sync(f"f{k}")
        assert storage.read(f"f{k}", 0, 100) == bytes([k]) * 6


def test_missing_file_is_a_clear_error(storage):
    """Reading, sizing or syncing a missing file raises a one-line StorageError naming it."""
    for call in (lambda: storage.read("nope", 0, 1), lambda: storage.size("nope"), lambda: storage.sync("nope")):
        with pytest.raises(StorageError) as caught:
            call()
        assert "nope" in str(caught.value) and "\n" not in str(caught.value)
        assert caught.value.errno == errno.ENOENT and not caught.value.full


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\0b", "x" * 256, 3])
def test_names_stay_in_the_folder(storage, name):
    """A name with a separator, dot names, NUL, an over-long or non-string name is refused."""
    with pytest.raises(ValueError):
        storage.append(name, b"x")
    assert storage.files() == []


def test_file_storage_round_trip(tmp_path):
    """What FileStorage synced is read back by a new FileStorage on the same folder."""
    folder = tmp_path / "deep" / "data"
    store = FileStorage(folder)
    store.append("seg", b"abc" * 1000)
    store.sync("seg")
    store.append("seg", b"tail")
    store.sync("seg")
    store.close()
    assert oct(os.stat(folder / "seg").st_mode & 0o777) == oct(0o600)
    again = FileStorage(folder)
    assert again.files() == ["seg"]
    assert again.size("seg") == 3004
    assert again.read("seg", 2998, 10) == b"bctail"
    again.close()


def test_file_storage_syncs_the_folder_for_new_files(tmp_path, monkeypatch):
    """Syncing a newly created file also syncs its folder once; deleting syncs the folder too."""
    store = FileStorage(tmp_path)
    folder_syncs = []
    real = store._sync_folder
    monkeypatch.setattr(store, "_sync_folder", lambda folder=None: (folder_syncs.append(1), real(folder)))
    store.append("a", b"1")
    store.sync("a")
    store.append("a", b"2")
    store.sync("a")
    assert len(folder_syncs) == 1
    store.delete("a")
    assert len(folder_syncs) == 2
    store.close()


def test_file_storage_full_disk(tmp_path):
    """An append on a full device raises StorageError with .full, naming the path in one line."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / "seg").symlink_to("/dev/full")
    store = FileStorage(tmp_path)
    with pytest.raises(StorageError) as caught:
        store.append("seg", b"x" * 100)
    message = str(caught.value)
    assert caught.value.full and caught.value.errno == errno.ENOSPC
    assert str(tmp_path / "seg") in message and "No space left" in message and "\n" not in message
    store.close()


def test_file_storage_folder_is_a_file(tmp_path):
    """A folder path that is a file gives a one-line StorageError naming it."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError) as caught:
        FileStorage(tmp_path / "file")
    assert str(tmp_path / "file") in str(caught.value) and not caught.value.full


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the modes say")
def test_file_storage_permission_denied(tmp_path):
    """A file the process may not open gives a StorageError naming it, not a traceback."""
    store = FileStorage(tmp_path)
    store.append("seg", b"x")
    store.close()
    os.chmod(tmp_path / "seg", 0)
    with pytest.raises(StorageError) as caught:
        store.append("seg", b"y")
    assert caught.value.errno == errno.EACCES and "seg" in str(caught.value)


def test_fake_crash_keeps_only_synced_bytes():
    """After a crash each file holds exactly what was synced; files never synced are gone."""
    store = FakeStorage()
    store.append("a", b"durable")
    store.sync("a")
    store.append("a", b" lost")
    store.append("b", b"never synced")
    store.crash()
    assert store.files() == ["a"]
    assert store.read("a", 0, 100) == b"durable"
    store.crash()
    assert store.read("a", 0, 100) == b"durable"


def test_fake_crash_torn_writes():
    """With an rng a crash keeps the synced bytes plus a random prefix of the unsynced tail, never more."""
    kept = set()
    for seed in range(40):
        store = FakeStorage()
        store.append("a", b"S" * 10)
        store.sync("a")
        store.append("a", b"0123456789")
        store.crash(random.Random(seed))
        data = store.read("a", 0, 100)
        assert data == (b"S" * 10 + b"0123456789")[: len(data)] and len(data) >= 10
        kept.add(len(data))
    assert len(kept) > 5


def test_fake_truncate_and_delete_are_durable():
    """A truncation and a deletion survive a crash, as FileStorage makes them durable."""
    store = FakeStorage()
    store.append("a", b"0123456789")
    store.append("b", b"x")
    store.sync("a")
    store.sync("b")
    store.truncate("a", 3)
    store.delete("b")
    store.crash()
    assert store.files() == ["a"] and store.read("a", 0, 100) == b"012"


def test_fake_full_disk_writes_what_fits():
    """full_after lets n bytes through, then an append writes what fits and fails like ENOSPC."""
    store = FakeStorage()
    store.full_after(5)
    store.append("a", b"123")
    with pytest.raises(StorageError) as caught:
        store.append("a", b"4567")
    assert caught.value.full and caught.value.errno == errno.ENOSPC
    assert "a" in str(caught.value) and "No space left" in str(caught.value)
    assert store.read("a", 0, 100) == b"12345"
    store.full_after(None)
    store.append("a", b"6")
    assert store.size("a") == 6


def test_fake_sync_failure():
    """fail_syncs makes sync raise a StorageError (EIO) and keeps nothing new durable."""
    store = FakeStorage()
    store.append("a", b"x")
    store.fail_syncs()
    with pytest.raises(StorageError) as caught:
        store.sync("a")
    assert caught.value.errno == errno.EIO and not caught.value.full
    store.crash()
    assert store.files() == []


def test_fake_damage_reaches_synced_bytes():
    """damage overwrites bytes in place, and the overwritten synced bytes are what a crash keeps."""
    store = FakeStorage()
    store.append("a", b"abcdef")
    store.sync("a")
    store.append("a", b"gh")
    store.damage("a", 4, b"XYZ")
    assert store.read("a", 0, 100) == b"abcdXYZh"
    store.crash()
    assert store.read("a", 0, 100) == b"abcdXY"


def _syncfs_storages(tmp_path, count):
    stores = [FileStorage(tmp_path / f"s{k}") for k in range(count)]
    if any(store.syncfs_fd is None for store in stores):
        for store in stores:
            store.close()
        pytest.skip("syncfs cannot be trusted on this system or file system")
    return stores


def test_sync_many_uses_one_syncfs_for_files_of_one_file_system(tmp_path, monkeypatch):
    """sync_many makes several new files of one file system durable with a single syncfs, no fdatasync and no folder sync."""
    stores = _syncfs_storages(tmp_path, 4)
    calls = {"syncfs": 0, "fdatasync": 0}
    real_syncfs = files_module._syncfs
    monkeypatch.setattr(files_module, "_syncfs", lambda fd: (calls.__setitem__("syncfs", calls["syncfs"] + 1), real_syncfs(fd))[1])
    monkeypatch.setattr(files_module, "_datasync", lambda fd: calls.__setitem__("fdatasync", calls["fdatasync"] + 1))
    for store in stores:
        store.append("seg", b"x" * 100)
    assert sync_many([(store, "seg") for store in stores]) == [None] * 4
    assert calls == {"syncfs": 1, "fdatasync": 0}
    assert all(not store._created for store in stores)
    for store in stores:
        store.close()


def test_sync_many_syncs_few_files_and_fakes_one_by_one(tmp_path, monkeypatch):
    """Below SYNCFS_MIN_FILES, and for storages without a file system of their own, sync_many calls each storage's sync."""
    store = FileStorage(tmp_path / "s")
    fake = FakeStorage()
    monkeypatch.setattr(files_module, "_syncfs", lambda fd: pytest.fail("syncfs for two files"))
    store.append("a", b"1")
    fake.append("b", b"2")
    fake.append("c", b"3")
    assert sync_many([(store, "a"), (fake, "b"), (fake, "c")]) == [None, None, None]
    assert fake.durable("b") == b"2" and fake.durable("c") == b"3"
    assert not store._created
    store.close()


def test_sync_many_finds_which_file_failed_after_a_failed_syncfs(tmp_path, monkeypatch):
    """When syncfs reports a write-back error, each file is synced on its own and only the one whose fdatasync fails gets an error."""
    stores = _syncfs_storages(tmp_path, 5)
    for store in stores:
        store.append("seg", b"x")
    bad = stores[2]._handle("seg")
    monkeypatch.setattr(files_module, "_syncfs", lambda fd: -1)

    def datasync(fd):
        if fd == bad:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files_module, "_datasync", datasync)
    errors = sync_many([(store, "seg") for store in stores])
    assert [e is None for e in errors] == [True, True, False, True, True]
    assert isinstance(errors[2], StorageError) and errors[2].errno == errno.EIO
    assert "Input/output error" in str(errors[2]) and "\n" not in str(errors[2])
    for store in stores:
        store.close()


def test_syncfs_is_not_trusted_before_linux_5_8(monkeypatch):
    """On a kernel whose syncfs reports no write-back errors, or off Linux, sync_many never uses it."""
    monkeypatch.setattr(files_module.os, "uname", lambda: os.uname_result(("Linux", "h", "5.4.0-99-generic", "", "x86_64")))
    assert files_module._load_syncfs() is None
    monkeypatch.setattr(files_module.sys, "platform", "darwin")
    assert files_module._load_syncfs() is None
