# Hilo's image: one image, two roles. `hilo api` (the default) serves HTTP; `hilo worker` runs
# the journey workflows. Everything is configured through HILO_* environment variables
# (hilo/settings.py); see docker-compose.temporal.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them. psycopg is the driver of
# HILO_DATABASE_URL=postgresql+psycopg://... (PostgreSQL in production).
COPY pyproject.toml README.md ./
RUN mkdir hilo && touch hilo/__init__.py \
    && pip install . "psycopg[binary]>=3.2" \
    && pip uninstall --yes hilo \
    && rm -rf hilo

COPY hilo ./hilo
COPY workflows ./workflows
COPY activities ./activities
COPY worker ./worker
COPY api ./api
COPY examples ./examples
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 --user-group hilo

USER hilo
ENV HILO_ENVIRONMENT=production \
    HILO_API_HOST=0.0.0.0 \
    HILO_API_PORT=8000 \
    HILO_EXAMPLES_DIR=/app/examples/journeys
EXPOSE 8000

ENTRYPOINT ["hilo"]
CMD ["api"]
