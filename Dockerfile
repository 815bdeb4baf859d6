FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY eventpulse ./eventpulse
RUN pip install --no-cache-dir . && useradd --system --uid 10001 eventpulse
USER eventpulse
EXPOSE 9108
ENTRYPOINT ["eventpulse"]
CMD ["worker"]
