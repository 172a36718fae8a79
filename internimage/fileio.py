"""A local file backend whose writes are atomic (registered by ``import internimage``).

mmengine's ``LocalBackend.put`` opens the final path and writes into it, so a process
killed while saving a checkpoint leaves a truncated ``epoch_N.pth`` behind. This backend
writes to ``<name>.tmp-<pid>`` in the same folder, flushes and fsyncs it, then renames it
over the final name (``os.replace`` is atomic on POSIX and Windows): a file under a
checkpoint's name is always complete. Use it through mmengine's ``backend_args``::

    default_hooks = dict(checkpoint=dict(type='CheckpointHook', backend_args=dict(backend='local_atomic')))

``tools/train.py`` sets this for local work dirs when a config does not choose a backend.
"""
import os
import os.path as osp
from typing import Union
from pathlib import Path

from mmengine.fileio import LocalBackend, register_backend

TMP_MARK = ".tmp-"


def atomic_write(data: Union[bytes, str], filepath: Union[str, Path], encoding: str = "utf-8") -> None:
    """Write ``data`` to ``filepath`` so that readers see the old file or the whole new one."""
    filepath = os.fspath(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{filepath}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@register_backend("local_atomic")
class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` with ``put`` / ``put_text`` done by temporary file + rename."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = "utf-8") -> None:
        atomic_write(obj, filepath, encoding=encoding)
