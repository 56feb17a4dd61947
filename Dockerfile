# k5serve on an official PyTorch CUDA runtime image. Weights live in the Hugging Face cache volume:
#   docker build -t k5serve .
#   docker run --gpus all -v hf-cache:/home/k5/.cache/huggingface k5serve weights download
#   docker run --gpus all -p 8080:8080 -v hf-cache:/home/k5/.cache/huggingface -e K5SERVE_API_KEYS=... k5serve
# The base image's torch must match pyproject.toml's pin (a test checks it), so pip keeps it.
ARG BASE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/k5/.cache/huggingface \
    K5SERVE_DATA_DIR=/home/k5/data

RUN useradd --create-home --uid 1000 k5
WORKDIR /app
COPY pyproject.toml README.md ./
COPY k5serve ./k5serve
COPY server ./server
COPY pipelines ./pipelines
COPY accel ./accel
COPY weights ./weights
# The extras for several front-ends (PostgreSQL, S3), for --quantize fp8 (torchao) and for the text encoder's
# quantisation and the memory profiles (torchao, bitsandbytes) are small; Ray is not
# included (pip install .[ray]).
# The extras' versions are pinned in pyproject.toml, which hadolint does not read:
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[postgres,s3,fp8,quant]"

USER 1000:1000
RUN mkdir -p /home/k5/.cache/huggingface /home/k5/data
VOLUME ["/home/k5/.cache/huggingface", "/home/k5/data"]
EXPOSE 8080
# Ready = model loaded, worker alive, queue not full. Loading the real weights takes minutes: hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/ready', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["k5serve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
