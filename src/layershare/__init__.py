"""layershare: make pretrained transformers smaller by sharing parameters across layers."""
from .api import (CompressionResult, compress, evaluate_accuracy, evaluate_perplexity, finetune, load,
                  load_model, load_preprocessing)
from .recipe import Recipe

__version__ = "0.1.0"
__all__ = ["CompressionResult", "Recipe", "compress", "evaluate_accuracy", "evaluate_perplexity", "finetune", "load",
           "load_model", "load_preprocessing"]
