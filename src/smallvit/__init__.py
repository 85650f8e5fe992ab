"""smallvit: small Vision Transformers trained from scratch on small image datasets."""

from .config import Config
from .experiments import make_config
from .predict import load
from .train import train  # noqa: E402  (the function shadows the submodule name on purpose: smallvit.train(cfg))

__version__ = "0.1.0"

__all__ = ["Config", "make_config", "train", "load", "__version__"]
