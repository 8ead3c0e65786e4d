"""Build the native bitmask kernels (bitmask.cpp) once per machine:

    python -m layershare.runtime.kernels.build

The library goes to ~/.cache/layershare/kernels/<torch version>-<hash of the source and flags>/
($XDG_CACHE_HOME instead of ~/.cache when set), so a new torch or an edited source builds anew
and a stale library is never loaded. Loading a model never compiles: ops.py loads the library
from there when it exists (without importing torch.utils.cpp_extension, which pulls in
setuptools) and falls back to pure PyTorch otherwise. Without a C++ compiler or ninja this
command prints a warning and exits 0 (the fallback is then what runs).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from layershare.runtime.kernels.library import (
    CFLAGS,
    LDFLAGS,
    NAME,
    SOURCE,
    build_dir,
    library_path,
)


def build(verbose: bool = False) -> Path:
    """Compile bitmask.cpp (if not already built) and load it into this process."""
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
         build_directory=str(folder),
         is_python_module=False, verbose=verbose)
    return library_path()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"warning: no C++ compiler ({compiler!r} not found): the native sparse kernel is not built; "
              "layershare runs sparse layers on its pure-PyTorch fallback. Install one (e.g. g++) and run "
              "`python -m layershare.runtime.kernels.build`.", file=sys.stderr)
        return 0
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        print("warning: ninja not found (`pip install ninja`): the native sparse kernel is not built; "
              "layershare runs sparse layers on its pure-PyTorch fallback.", file=sys.stderr)
        return 0
    path = build(verbose="-v" in argv or "--verbose" in argv)
    from layershare.runtime.kernels import ops

    if ops.disabled():
        print(f"layershare sparse kernel: {path} (not used while LAYERSHARE_NO_KERNEL is set)")
        return 0
    if not ops.available():
        print(f"error: built {path} but could not load it", file=sys.stderr)
        return 1
    ops.self_check()
    print(f"layershare sparse kernel: {path}")
    print(f"  path in use: {ops.isa()}"
          + ("" if ops.isa() in ("avx512", "avx2") else
             " (this CPU lacks AVX2+FMA+F16C, or LAYERSHARE_KERNEL=portable)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
