# The eventpulse worker. Two stages: the builder has a C compiler and builds the compiled read
# loop (Cython, eventpulse/tables/_ringread.pyx) and fold (eventpulse/tables/fold.py) into a
# virtualenv; the runtime stage copies that virtualenv only, and runs as a non-root user.
#   docker build -t eventpulse .
#   docker run --env-file worker.env -p 9108:9108 eventpulse

FROM python:3.11-slim AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY eventpulse ./eventpulse
# the build of the read loop is optional in setup.py; here it must have happened
RUN python -m venv /opt/eventpulse \
    && /opt/eventpulse/bin/pip install --no-cache-dir . \
    && cd / && /opt/eventpulse/bin/python -c \
       "from eventpulse.tables import ringread; assert ringread.ACCELERATED, 'read loop not compiled'" \
    && /opt/eventpulse/bin/python -c \
       "from eventpulse.tables import batch; assert batch.COMPILED_FOLD, 'fold not compiled'"

FROM python:3.11-slim
COPY --from=builder /opt/eventpulse /opt/eventpulse
# Faust writes its (empty, memory-store) data directory into the working directory.
RUN useradd --system --uid 10001 --home-dir /var/lib/eventpulse --create-home eventpulse
ENV PATH=/opt/eventpulse/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EVENTPULSE_METRICS_PORT=9108
WORKDIR /var/lib/eventpulse
USER 10001:10001
EXPOSE 9108
# Liveness: the event loop answers /healthz (see docs/deployment.md); readiness is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EVENTPULSE_METRICS_PORT', '9108'), timeout=4)"]
# SIGTERM: finish and commit the batch in hand, within EVENTPULSE_STOP_TIMEOUT_S (25 s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["eventpulse"]
CMD ["worker"]
