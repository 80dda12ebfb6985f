# GPU image for cluster nodes: CUDA PyTorch base + nowcast, running train.py.
#   docker build -t nowcast .
#   docker run --gpus all --shm-size 8g -v /path/to/radar:/data nowcast \
#       data=radar data.path=/data trainer=gpu
# Apptainer/Singularity: see README.md ("Clusters").
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
WORKDIR /opt/nowcast
COPY . /opt/nowcast
# torch comes from the base image (CUDA build); this installs the rest.
RUN python -m pip install --no-cache-dir -e ".[pysteps,slurm]"

RUN useradd --create-home --uid 1000 nowcast && mkdir -p /opt/nowcast/logs /opt/nowcast/data \
    && chown -R nowcast /opt/nowcast/logs /opt/nowcast/data
USER nowcast
ENV NOWCAST_ROOT=/opt/nowcast
ENTRYPOINT ["python", "train.py"]
