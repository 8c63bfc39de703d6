"""ssps-jax: self-supervised speaker verification with Self-Supervised Positive Sampling."""

from ssps_jax import hardware as _hardware

__version__ = "0.1.0"

# Before any module of the package imports JAX: on a host without TPU chips (libtpu comes with `make venv`
# for ahead-of-time compilation), libtpu's start-up would print its "unexpected worker hostname" errors
# whenever JAX starts its backends, for the CLI and the Python API alike (hardware.py says why).
_hardware.quiet_libtpu_off_tpu()
