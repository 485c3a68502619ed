# One image for the worker and the page (docker-compose.yml picks the command).
#   docker compose build                          CUDA build of torch from PyPI (large; needs the NVIDIA driver +
#                                                 NVIDIA Container Toolkit on the host to use the GPU)
#   docker compose build --build-arg TORCH=cpu    CPU-only torch (much smaller)
FROM python:3.11-slim

ARG TORCH=cuda
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    RESNET_LAB_MODELS_DIR=/models \
    RESNET_LAB_DATA_ROOTS=/data

# Layers from least to most often changed: torch, the other dependencies, our code.
RUN if [ "$TORCH" = cpu ]; then index="--index-url https://download.pytorch.org/whl/cpu"; else index=""; fi \
 && pip install $index "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# README.md is not copied: the image needs no long description (setuptools only warns)
COPY shared ./shared
COPY worker ./worker
COPY ui ./ui
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 lab \
 && mkdir -p /models /data \
 && chown lab:lab /models /data

# named volumes mounted here start out owned by `lab`
USER lab
EXPOSE 7860
CMD ["resnet-lab", "ui"]
