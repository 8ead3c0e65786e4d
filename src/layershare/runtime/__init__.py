"""Running a model: the run-time forms of compressed layers (forms.py), their kernels
(kernels/), and forward helpers (forward.py)."""
