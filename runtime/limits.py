"""Resource limits as a frozen value, passed down from configuration to runs and isolates."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    concurrency: int = 16
    max_concurrency: int = 64
    server_concurrency: int = 64
    max_agents: int = 1000
    max_max_agents: int = 10_000
    max_items: int = 4096
    script_bytes: int = 512 * 1024
    args_bytes: int = 1024 * 1024
    agent_result_bytes: int = 1024 * 1024
    run_result_bytes: int = 4 * 1024 * 1024
    heap_bytes: int = 64 * 1024 * 1024
    stack_bytes: int = 1024 * 1024
    slice_cpu_s: float = 1.0
    run_cpu_s: float = 60.0
    agent_timeout_s: float = 30 * 60
    max_agent_timeout_s: float = 6 * 3600
    run_timeout_s: float = 24 * 3600
    max_run_timeout_s: float = 7 * 24 * 3600
    log_lines: int = 10_000
    many_agents_warning: int = 25
    # A script that has waited this long for results gives up its JS context (about 0.5 MB); the
    # next result rebuilds it by replaying the script. 0 keeps every context.
    evict_idle_s: float = 2.0
    # An owner whose runs have left this many slices stuck inside single built-in calls, still
    # running on their threads, gets no new run and no new slice until fewer are (each holds a
    # thread and up to ``heap_bytes``). 0: no limit.
    stuck_slices_per_owner: int = 2
