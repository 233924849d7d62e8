"""posbias: offline calibration and positional-bias profiling for visual-token pruning in VLMs."""

__version__ = "0.1.0"

__all__ = ["__version__"]
