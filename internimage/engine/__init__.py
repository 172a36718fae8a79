"""Training and testing with mmengine: reliability hooks, the layer-decay optimizer
constructor, atomic checkpoint files, and the logic behind ``tools/train.py`` / ``test.py``.

Importing this package registers ``NonFiniteLossHook``, ``RandomStateHook``,
``ParamSyncCheckHook``, ``InternImageLayerDecayOptimizerConstructor`` and the
``local_atomic`` file backend in mmengine's root registries, which mmdet's and mmseg's
registries search too. Configs name it in ``custom_imports``.
"""
from . import fileio, hooks, optimizers  # noqa: F401  (registrations)
from .fileio import AtomicLocalBackend, atomic_output, atomic_write
from .hooks import NonFiniteLossHook, ParamSyncCheckHook, RandomStateHook
from .optimizers import InternImageLayerDecayOptimizerConstructor

__all__ = ["AtomicLocalBackend", "atomic_output", "atomic_write", "NonFiniteLossHook", "ParamSyncCheckHook",
           "RandomStateHook", "InternImageLayerDecayOptimizerConstructor"]
