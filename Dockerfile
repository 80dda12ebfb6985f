# GPU image for cluster nodes: Python 3.11 and the torch version CI tests, then nowcast,
# running train.py.
#   docker build -t nowcast .
#   docker run --gpus all --shm-size 8g -v /path/to/radar:/data nowcast \
#       data=radar data.path=/data trainer=gpu
# Apptainer/Singularity: see README.md ("Clusters"). Tested torch versions:
# docs/compatibility.md.
# The full python image, like CI's machine (Python, pip, gcc): pysteps builds from source.
FROM python:3.11

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg
WORKDIR /opt/nowcast
# The same line as .ci/run (tests/test_packaging.py checks it), so the image runs the torch
# version CI tests. From PyPI on Linux x86-64 this is the CUDA build (CUDA and cuDNN come
# as pip packages, the host's NVIDIA driver with --gpus all); CI's machine finds a local
# CPU wheel of the same version first.
RUN python -m pip install torch==2.13.0
COPY . /opt/nowcast
# The rest; torch is already satisfied.
RUN python -m pip install --no-cache-dir -e ".[pysteps,slurm]"

RUN useradd --create-home --uid 1000 nowcast && mkdir -p /opt/nowcast/logs /opt/nowcast/data \
    && chown -R nowcast /opt/nowcast/logs /opt/nowcast/data
USER nowcast
ENV NOWCAST_ROOT=/opt/nowcast
ENTRYPOINT ["python", "train.py"]
