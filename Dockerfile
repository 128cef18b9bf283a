# Hilo's image: one image, two roles. `hilo api` (the default command) serves HTTP on :8000;
# `hilo worker` runs the journey workflows and their activities. Configure it with HILO_*
# environment variables only (hilo/settings.py); docker-compose.temporal.yml shows a whole
# production setup.
FROM python:3.11-slim

# No PYTHONDONTWRITEBYTECODE: the workflow sandbox imports workflows/journey.py afresh for every
# journey it starts, and the bytecode pip compiles at install time saves recompiling it each time.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layer, so that a code change does not reinstall them (a stub
# package stands in for Hilo's code). psycopg drives HILO_DATABASE_URL=postgresql+psycopg://...
COPY pyproject.toml README.md ./
RUN mkdir hilo \
    && touch hilo/__init__.py \
    && pip install ".[postgres]" \
    && pip uninstall --yes hilo \
    && rm -rf hilo build *.egg-info

COPY hilo ./hilo
COPY workflows ./workflows
COPY activities ./activities
COPY worker ./worker
COPY api ./api
COPY examples ./examples
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && useradd --create-home --uid 10001 --user-group hilo

USER hilo
ENV HILO_ENVIRONMENT=production \
    HILO_API_HOST=0.0.0.0 \
    HILO_API_PORT=8000 \
    HILO_EXAMPLES_DIR=/app/examples/journeys \
    HILO_STATE_DIR=/home/hilo/.hilo
EXPOSE 8000

CMD ["hilo", "api"]
