from .perplexity import Perplexity, perplexity

__all__ = ["Perplexity", "perplexity"]
