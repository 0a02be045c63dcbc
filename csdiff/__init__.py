"""csdiff: diffusion features with content shift suppressed."""

__version__ = "0.1.0"
