"""The edges: the FastAPI application (HTTP, SSE, dashboard), the CLI and its HTTP client.

Everything here is thin over :mod:`runtime`: a route and the CLI command that mirrors it call
the same engine method.
"""

from .app import create_app
from .client import ApiError, Client

__all__ = ["ApiError", "Client", "create_app"]
