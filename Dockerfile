# GPU image for clusters: CUDA (devel, so DeepSpeed can build its ops), Python 3.11, the package with its GPU extras.
# Build:  docker build -t llark .
# Run:    docker run --gpus all -v /data:/data llark llark --help
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

# torch wheels built for the base image's CUDA version; change both together.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common gcc g++ make git libsndfile1 default-jre-headless \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/llark
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY llark ./llark
COPY launch ./launch
COPY prompts ./prompts
# On a GPU image take torch's CUDA build of the pinned release from the PyTorch index.
RUN pip install --upgrade pip \
    && pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple torch==2.13.0 \
    && pip install '.[gpu,ray]'

CMD ["llark", "--help"]
