"""reditus-sidecar: signs Reditus widget tokens with a product secret the app never holds."""

from importlib import metadata

try:
    __version__ = metadata.version("reditus-sidecar")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
