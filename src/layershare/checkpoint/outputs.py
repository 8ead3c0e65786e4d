"""Output directories: refuse clobbering and full disks before work, one run per output (a lock),
and Ctrl-C/SIGTERM held during the final renames (save.py swaps a finished folder into place)."""
from __future__ import annotations

import fcntl
import os
import signal
import shutil
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless told to overwrite; called before
    long work. Missing parent directories are fine (created when saving), as long as the
    nearest existing one is a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {str(path)!r} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {str(path)!r} exists and is not empty; pass overwrite=True "
                                f"(--overwrite) to replace it")
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        raise OutputExistsError(f"cannot create {str(path)!r}: {str(ancestor)!r} is not a directory")
    return path


def nearest_existing(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (where it will be created)."""
    ancestor = Path(path).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


class OutputSpaceError(OSError):
    """Not enough free space where the output is to be written."""


def check_free_space(path: str | Path, need: int) -> None:
    """Refuse, before the work, an output whose file system has less than `need` bytes free
    (the planned size; an --overwrite swap keeps the old copy until the new one is complete)."""
    ancestor = nearest_existing(path)
    free = shutil.disk_usage(ancestor).free
    if free < need:
        raise OutputSpaceError(f"not enough free space for {str(path)!r}: the compressed model needs about "
                               f"{need / 2**20:,.0f} MiB and {str(ancestor)!r} has {free / 2**20:,.0f} MiB free")


_HELD: dict[Path, int] = {}  # output directory -> pid of the process holding its lock (re-entrant there)


@contextmanager
def output_lock(output_dir: str | Path):
    """One run at a time per output directory: an flock on `.NAME.lock` beside it (removed at the
    end), held from the checks before the work to the end of the save. Inside it, what
    interrupted runs left is cleaned: `.NAME.partial-*` folders are removed, and an `.NAME.old-*`
    (a swap cut between its two renames) is put back at NAME if NAME is missing, else removed."""
    path = Path(output_dir).absolute()
    if _HELD.get(path) == os.getpid():  # (a forked child inherits the dict, not the right)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputExistsError(f"another layershare run is writing to {str(output_dir)!r}; wait for it to end "
                                f"or choose another output") from None
    _HELD[path] = os.getpid()
    try:
        for left in sorted(path.parent.glob(f".{path.name}.old-*")):
            if not path.exists():
                os.rename(left, path)
            else:
                shutil.rmtree(left, ignore_errors=True)
        for left in path.parent.glob(f".{path.name}.partial-*"):
            shutil.rmtree(left, ignore_errors=True)
        yield
    finally:
        del _HELD[path]
        try:  # removed while held, so it is never left behind
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)  # releases the lock


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block ends (the two renames of an overwrite). In the main
    thread their handlers are swapped for ones that only note them, and what was noted is sent
    again after the block: a thread mask alone would not do, as the kernel may hand the signal to
    any other thread (tqdm's monitor, OpenMP's workers) and Python then runs the handler in the
    main thread at once. Elsewhere (signal handlers belong to the main thread) the calling
    thread's mask is used."""
    import threading

    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(sigs))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in sigs}
    swapped = [s for s in sigs if previous[s] is not None]  # (None: a handler not set from Python)
    for s in swapped:
        signal.signal(s, lambda num, frame: pending.append(num))
    try:
        yield
    finally:
        for s in swapped:
            signal.signal(s, previous[s])
        for num in pending:
            os.kill(os.getpid(), num)


