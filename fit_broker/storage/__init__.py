"""
Durable storage for disk channels: a small seam (L{IStorage}) with a real
and a crash-testing implementation, and the segment log built on it.
"""

from fit_broker.storage.fake import FakeStorage
from fit_broker.storage.files import FileStorage
from fit_broker.storage.records import HEADER_SIZE, MAX_RECORD_BYTES
from fit_broker.storage.reports import Damage, Recovery, Trimmed
from fit_broker.storage.seam import StorageError
from fit_broker.storage.segments import FSYNC_POLICIES, SegmentLog, segment_name

__all__ = [
    "FSYNC_POLICIES",
    "HEADER_SIZE",
    "MAX_RECORD_BYTES",
    "Damage",
    "FakeStorage",
    "FileStorage",
    "Recovery",
    "SegmentLog",
    "StorageError",
    "Trimmed",
    "segment_name",
]
