"""Atomic file writes, and a local file backend that uses them (registered by ``import internimage.engine``).

mmengine's ``LocalBackend.put`` opens the final path and writes into it, so a process
killed while saving a checkpoint leaves a truncated ``epoch_N.pth`` behind. Here every
write goes to a new temporary file beside the target, ``<name>.tmp-<random>``, created
exclusively (``O_EXCL``, as ``tempfile.mkstemp`` does: a planted file or symlink under a
predictable name is never opened), then flushed, fsynced and renamed over the target
(``os.replace`` is atomic on POSIX and Windows): a file under a checkpoint's name is always
complete. Use the backend through mmengine's ``backend_args``::

    default_hooks = dict(checkpoint=dict(type='CheckpointHook', backend_args=dict(backend='local_atomic')))

``tools/train.py`` sets this for local work dirs when a config does not choose a backend.
"""
import contextlib
import os
import os.path as osp
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from mmengine.fileio import LocalBackend, register_backend

# Temporary files are named <target name> + TMP_MARK + a random suffix; resume removes
# leftovers of an interrupted save by this pattern (see runner_utils.find_resume_checkpoint).
TMP_MARK = ".tmp-"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: changing the umask to read it is process-wide, unsafe to repeat while threads run.
_UMASK = _read_umask()


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(filepath: Union[str, Path]) -> Iterator[BinaryIO]:
    """Open a binary file that appears under ``filepath`` only when the block completes.

    Readers see the old file or the whole new one, never a part. The new file gets the
    ordinary permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    filepath = os.fspath(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=osp.basename(filepath) + TMP_MARK)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, filepath)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def atomic_write(data: Union[bytes, str], filepath: Union[str, Path], encoding: str = "utf-8") -> None:
    """Write ``data`` to ``filepath`` so that readers see the old file or the whole new one."""
    with atomic_output(filepath) as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)


@register_backend("local_atomic")
class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` with ``put`` / ``put_text`` done by temporary file + rename."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = "utf-8") -> None:
        atomic_write(obj, filepath, encoding=encoding)
