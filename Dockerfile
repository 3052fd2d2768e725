# The tuner image: tuner workers, the MLflow server and optuna-dashboard all run from it.
# CPU torch by default; GPU: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

WORKDIR /app
# torch first and pinned, from the chosen index: pip never swaps it for another build
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY tuner ./tuner
RUN pip install ".[postgres]"
COPY studies ./studies
COPY data ./data

RUN useradd --create-home tuner && mkdir /mlartifacts && chown tuner /mlartifacts /app
USER tuner
CMD ["tuner", "--help"]
