# optimizely-agent-listener: reads an Optimizely Agent's notification stream
# and forwards exposures and conversions to GA4 and Amplitude.
#
#   docker build -t optimizely-agent-listener .
#   docker run --env-file .env -p 127.0.0.1:8090:8090 optimizely-agent-listener
#
# Every setting, secrets included, comes from the environment at run time
# (settings.py lists them); nothing secret is baked into the image.
FROM python:3.13-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEALTH_HOST=0.0.0.0 \
    HEALTH_PORT=8090 \
    DEAD_LETTER_PATH=/var/lib/listener/dead-letter.jsonl

# A fixed UID/GID so a Kubernetes securityContext (runAsUser: 10001) and
# volume ownership can name the same user the image runs as.
RUN groupadd --system --gid 10001 listener \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin listener \
    && mkdir -p /var/lib/listener \
    && chown 10001:10001 /var/lib/listener

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# Only the daemon's top-level modules; .dockerignore keeps everything else out.
# The code stays owned by root, so the daemon cannot rewrite itself.
COPY *.py ./

USER 10001:10001

# The dead-letter file (DEAD_LETTER_PATH) and an optional SPOOL_PATH live here.
VOLUME ["/var/lib/listener"]

# The operator endpoint: /healthz, /readyz, /metrics.
EXPOSE 8090

# The daemon drains on SIGTERM within SHUTDOWN_TIMEOUT_SECONDS (default 20 s);
# give `docker stop` more than that, e.g. `docker stop -t 30`.
STOPSIGNAL SIGTERM

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "healthcheck.py"]

# Exec form: Python is PID 1 and receives SIGTERM itself; main.py installs
# the handlers that turn it into a drain. Arguments are passed through, so
# `docker run IMAGE replay FILE` re-sends a dead-letter file.
ENTRYPOINT ["python", "main.py"]
