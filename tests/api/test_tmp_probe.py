import json, time, anyio, pytest, httpx
from tests.api.conftest import serve

@pytest.mark.anyio
@pytest.mark.parametrize("i", range(4))
async def test_probe(tmp_path, i):
    with anyio.fail_after(30):
        t = time.monotonic()
        async with serve(tmp_path, max_body_bytes=1000) as svc:
            print("startup", time.monotonic() - t)
            t = time.monotonic()
        print("shutdown", time.monotonic() - t)
