"""Run claims for benchmarks that several processes share: a lock file per run holding the claimant's pid, so each
process skips runs a live process holds and resumes those whose holder died."""

from __future__ import annotations

import os


def lock_path(work: str, name: str) -> str:
    return os.path.join(work, name + ".lock")


def claim(work: str, name: str) -> bool:
    """Create run ``name``'s lock file holding our pid; False if a live process holds it (a dead holder's is
    replaced)."""
    os.makedirs(work, exist_ok=True)
    path = lock_path(work, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if held(work, name):
            return False
        os.remove(path)  # the holder died; its run resumes from the last round it checkpointed
        return claim(work, name)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def held(work: str, name: str) -> bool:
    """Whether a live process holds run ``name``'s lock file."""
    try:
        with open(lock_path(work, name)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
