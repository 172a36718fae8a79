"""Test helper: a checkpoint backend that kills its own process half-way through writing
the second checkpoint, as a SIGKILL or power cut during a save would.

Imported by a training run through ``custom_imports``; select it with
``default_hooks.checkpoint.backend_args.backend=crash_on_second_save``.
"""
import os
import signal

from mmengine.fileio import register_backend

from internimage.engine.fileio import TMP_MARK, AtomicLocalBackend

_saves = []


@register_backend("crash_on_second_save")
class CrashOnSecondSave(AtomicLocalBackend):
    def put(self, obj: bytes, filepath) -> None:
        if str(filepath).endswith(".pth"):
            _saves.append(filepath)
            if len(_saves) == 2:
                # What an interrupted atomic save leaves: part of the temporary file.
                with open(f"{filepath}{TMP_MARK}{os.getpid()}", "wb") as f:
                    f.write(obj[: len(obj) // 2])
                    f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        super().put(obj, filepath)
