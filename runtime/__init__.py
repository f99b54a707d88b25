"""Orchestration: runs, scheduling, agent backends, the journal and its store, events, budgets.

The public surface is :class:`Engine` (host runs in-process) with :class:`RunRequest`; the
CLI and the HTTP API both go through it.
"""

from ._native import activate as _activate_native

_activate_native()  # before any compiled module is imported: their sources, if those changed

from .backends import AgentBackend, AgentRequest, AgentResult, SimulateBackend, Usage
from .config import Settings, load_settings
from .dispatcher import Dispatcher, DispatcherStatistics
from .engine import Engine, RunRequest
from .events import EventLog, EventType
from .limits import Limits
from .options import RunOptions
from .run import Run
from .state import AgentStatus, RunStatus
from .store import CallRecord, EventRecord, MemoryStore, RunRecord, Store, WorkflowRecord

__all__ = [
    "AgentBackend",
    "AgentRequest",
    "AgentResult",
    "AgentStatus",
    "CallRecord",
    "Dispatcher",
    "DispatcherStatistics",
    "Engine",
    "EventLog",
    "EventRecord",
    "EventType",
    "Limits",
    "MemoryStore",
    "Run",
    "RunOptions",
    "RunRecord",
    "RunRequest",
    "RunStatus",
    "SimulateBackend",
    "Settings",
    "Store",
    "Usage",
    "WorkflowRecord",
    "load_settings",
]
