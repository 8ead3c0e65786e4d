from .perplexity import Perplexity, perplexity

__all__ = ["Perplexity", "perplexity"]
from .vision import Accuracy, accuracy

__all__ += ["Accuracy", "accuracy"]
