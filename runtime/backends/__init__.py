"""Agent backends behind one protocol: simulate (offline), anthropic, claude-code (optional)."""

from ._protocol import AgentBackend, AgentRequest, AgentResult, Correction, Usage
from .simulate import SimulateBackend

__all__ = ["AgentBackend", "AgentRequest", "AgentResult", "Correction", "SimulateBackend", "Usage"]
