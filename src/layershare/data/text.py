"""Calibration and evaluation text: a file, a folder of files, or a `datasets` dataset.

`read_text(source)` accepts
  - a path to a text file (.txt, .md, ... anything UTF-8),
  - a folder: every *.txt file in it, sorted by name, joined by blank lines,
  - `austen:BOOK[+BOOK]`: Jane Austen's novels, fetched from Debian's archive (assets.py),
  - a dataset saved with `Dataset.save_to_disk` (a folder holding dataset_info.json or
    state.json), or `hf:NAME[:CONFIG][:SPLIT]` for a dataset in the local `datasets`
    cache (e.g. hf:wikitext:wikitext-2-raw-v1:test); its "text" column is used.
"""
from __future__ import annotations

from pathlib import Path

import torch


class DataError(ValueError):
    pass


def _join_dataset(ds, column: str = "text") -> str:
    if column not in ds.column_names:
        raise DataError(f"dataset has no {column!r} column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds[column] if t is not None)


def read_text(source: str | Path, column: str = "text") -> str:
    src = str(source)
    if src.startswith("austen:"):
        from layershare.data.assets import austen

        return austen(src[len("austen:"):])
    if src.startswith("hf:"):
        import datasets

        parts = src[3:].split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 else "train"
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001 - say which dataset could not be read, keep the cause
            raise DataError(f"could not load dataset {src!r} (is it in the local datasets cache?): {e}") from e
        return _join_dataset(ds, column)
    path = Path(src)
    if not path.exists():
        raise DataError(f"text source {src!r} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return _join_dataset(ds, column)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {src!r} holds no *.txt files")
        return "\n\n".join(read_text_file(p) for p in files)
    return read_text_file(path)


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; binary data or another encoding is refused, naming the file and where."""
    data = path.read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise DataError(f"{str(path)!r} looks binary (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from e


def tokenize(tokenizer, text: str, add_special_tokens: bool = True) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no length warnings, no truncation)."""
    if not text.strip():
        raise DataError("the text is empty")
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)
    try:
        ids = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(ids: torch.Tensor, nsamples: int, seqlen: int, batch_size: int, seed: int,
                        source: str = "calibration text") -> list[torch.Tensor]:
    """`nsamples` distinct non-overlapping windows of `seqlen` tokens, chosen with `seed`."""
    need = nsamples * seqlen
    have = ids.numel()
    if have < need:
        raise DataError(
            f"{source} is too short: {nsamples} samples x {seqlen} tokens need {need:,} tokens, "
            f"but it has {have:,}. Give more text, or lower nsamples/seqlen."
        )
    n_windows = have // seqlen
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_windows, generator=gen)[:nsamples].sort().values
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)[chosen]
    return list(windows.split(batch_size))
