# The training image for GKE TPU node pools (launch/gke.py, docs/pods.md): Python 3.11 with
# exactly requirements/lock.txt (hash-checked) and requirements/tpu.txt (what jax[tpu] adds to
# the lock), then this repository at /opt/simclr_jax, the pods' working directory (configs/
# are read from there).
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/simclr_jax:TAG . && docker push ...
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/simclr_jax

# The lock first: this layer is rebuilt only when the lock changes, not on every source edit.
COPY requirements/lock.txt requirements/tpu.txt requirements/
RUN python -m pip install --require-hashes -r requirements/lock.txt -r requirements/tpu.txt

COPY . .
# The project itself, without touching the locked dependencies; setuptools comes from the lock.
RUN python -m pip install --no-deps --no-build-isolation . \
    && python -c "import jax, flax, simclr_jax; print('jax', jax.__version__)"

CMD ["python", "-m", "simclr_jax.main", "--help"]
