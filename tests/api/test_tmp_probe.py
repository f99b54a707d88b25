import time, anyio, pytest, httpx, socket
from tests.api.conftest import serve, start_run, wait_done, wait_for_event
pytestmark = pytest.mark.anyio

async def test_probe(tmp_path):
    async with serve(tmp_path) as svc:
        async with svc.client("alice") as c:
            for i in range(3):
                t = time.monotonic(); r = await c.get("/healthz"); print("keepalive", round(time.monotonic()-t, 4))
        async with svc.client("alice", limits=httpx.Limits(max_keepalive_connections=0)) as c:
            for i in range(3):
                t = time.monotonic(); r = await c.get("/healthz"); print("fresh", round(time.monotonic()-t, 4))
        # raw socket
        s = socket.create_connection(("127.0.0.1", int(svc.url.rsplit(":",1)[1])))
        for i in range(3):
            t = time.monotonic()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"}" not in data:
                data += await anyio.to_thread.run_sync(s.recv, 65536)
            print("raw", round(time.monotonic()-t, 4))
        s.close()
