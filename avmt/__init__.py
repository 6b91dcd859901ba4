"""avmt: parameter-efficient audio-visual Transformers (AVBERT, ICLR 2021)."""

__version__ = "0.1.0"
