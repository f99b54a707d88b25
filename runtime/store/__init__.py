"""Persistence: the journal of agent calls, runs, events and saved workflows behind one interface."""

from ._memory import MemoryStore
from ._protocol import Store
from ._records import CallRecord, EventRecord, RunRecord, WorkflowRecord
from ._sqlite import SQLiteStore, StoreStatistics

__all__ = ["CallRecord", "EventRecord", "MemoryStore", "RunRecord", "SQLiteStore", "Store", "StoreStatistics", "WorkflowRecord"]
