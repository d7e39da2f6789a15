"""Data sources behind `ddpm_jax.input_pipeline` (see `sources.py`)."""
