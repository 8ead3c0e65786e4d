"""Where the native library lives: built once per torch version and source into the user's cache
(build.py writes it; ops.py loads it from there, without importing torch.utils.cpp_extension)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("bitmask.cpp")
HEADERS = (Path(__file__).with_name("bitmask_avx512.h"),)  # included by SOURCE
NAME = "layershare_bitmask"
# no -march=native: the library must run on any x86-64; the AVX2 functions carry their own target.
# -fopenmp: at::parallel_for is an inline header whose OpenMP pragma is dropped without it, and the ops
# then run on one thread whatever torch.set_num_threads says (measured: 1 and 2 threads equal before).
# Linked with -fopenmp the library needs libgomp.so.1, the one torch has already loaded: one thread pool.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    sources = b"".join(f.read_bytes() for f in (SOURCE, *HEADERS))
    digest = hashlib.sha256(sources + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:16]
    return cache / "layershare" / "kernels" / f"{torch.__version__}-{digest}"


def library_path() -> Path:
    return build_dir() / f"{NAME}.so"
