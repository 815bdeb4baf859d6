FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY eventpulse ./eventpulse
# The worker needs no C compiler: the compiled loop serves feature reads, which fall back to
# Python without it (eventpulse.tables.ringread.ACCELERATED).
RUN pip install --no-cache-dir . && useradd --system --uid 10001 eventpulse
USER eventpulse
EXPOSE 9108
ENTRYPOINT ["eventpulse"]
CMD ["worker"]
