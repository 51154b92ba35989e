"""synthtune: synthesize reasoning data, fine-tune, and prove the result."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("synthtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
