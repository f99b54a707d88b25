"""Running the service under uvicorn: binding, the local daemon's token, readiness."""

from __future__ import annotations

import logging
import os
import socket

import uvicorn

from runtime import Settings

from .app import create_app
from .auth import check_bind, daemon_file, generate_token, is_loopback, read_daemon_file, write_daemon_file

__all__ = ["serve_forever"]

logger = logging.getLogger("quickflow.server")

#: uvicorn's loop factory: asyncio on the loop whose timers fire on time, as for `quickflow run`.
LOOP = "runtime.eventloop:new_event_loop"


def serve_forever(settings: Settings) -> int:
    """Bind, publish the daemon file when running as a local daemon, serve until a signal."""
    check_bind(settings, settings.host)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    generated = None if (settings.tokens or settings.admin_token) else generate_token()
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto is TCP;
    # without it Nagle + delayed ACK add ~40 ms to each request on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
    url = f"http://{host}:{port}"
    published = False
    if is_loopback(settings.host):
        # The CLI finds a local daemon through this file; the token only when it was generated.
        write_daemon_file(url, generated or "")
        published = True
        if generated:
            print(f"no token configured: generated one, saved (0600) to {daemon_file()}", flush=True)
    print(f"quickflow listening on {url} (data dir {settings.data_dir})", flush=True)
    app = create_app(settings, generated_token=generated)
    config = uvicorn.Config(app, loop=LOOP,
                            log_level=os.environ.get("QUICKFLOW_LOG_LEVEL", "info"), timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if published and (read_daemon_file() or {}).get("pid") == os.getpid():
            daemon_file().unlink(missing_ok=True)
    return 0
