"""Local storage of remote blobs: sparse data files, durable presence maps, digest check, eviction.

Never the network: bytes come in through BlobCache.write from the scheduler.
"""

from .blob import BlobCache, SimulatedCrash
from .fileio import FileIO
from .presence import PAGE_SIZE, PresenceMap
from .store import CacheStore, water_marks

__all__ = ["BlobCache", "CacheStore", "FileIO", "PAGE_SIZE", "PresenceMap", "SimulatedCrash", "water_marks"]
