"""The pseudo-positive samplers of SSPS, one module each; ssps/sampling.py registers them by name."""
