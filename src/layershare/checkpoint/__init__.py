"""A compressed directory on disk: save, verify, load, the transformers quantizer, the model card,
size accounting. Loading imports only this package, runtime/, modules/ and adapters/."""
