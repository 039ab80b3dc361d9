# sdlab on a CUDA machine: docker build -t sdlab . && docker run --gpus all -p 7860:7860 \
#   -e SDLAB_API_KEY=secret sdlab            (serves the embedded model on :7860)
# docker run --gpus all -v ~/models:/models sdlab sdlab generate "a cat" --model /models/sd15 --out /models/out
# PyPI's torch 2.13.0 wheel for Linux x86_64 bundles CUDA; the host needs only the NVIDIA driver
# and the NVIDIA container toolkit (for --gpus).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home sdlab
USER sdlab
EXPOSE 7860
# Listening beyond loopback needs an API key: pass -e SDLAB_API_KEY=...
CMD ["sh", "-c", "exec sdlab serve --host 0.0.0.0 --port 7860 --api-key \"$SDLAB_API_KEY\""]
