# quickflow service. Mirrors ./scripts/serve: pip install the project, run `quickflow serve`.

# The wheel, with the hot path compiled by mypyc (setup.py): a C compiler in this stage only.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sandbox ./sandbox
COPY js_stdlib ./js_stdlib
COPY runtime ./runtime
COPY api ./api
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    QUICKFLOW_DATA_DIR=/data QUICKFLOW_HOST=0.0.0.0 QUICKFLOW_PORT=8765

WORKDIR /app
COPY --from=build /wheels /wheels
COPY examples ./examples
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --create-home --uid 10001 quickflow \
 && mkdir -p /data && chown quickflow /data

USER quickflow
VOLUME ["/data"]
EXPOSE 8765
# Binding beyond loopback requires QUICKFLOW_TOKENS or QUICKFLOW_ADMIN_TOKEN at run time.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8765/healthz').status == 200 else 1)"
CMD ["quickflow", "serve", "--workflows-dir", "/app/examples"]
