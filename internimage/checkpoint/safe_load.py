"""Let mmengine's own checkpoints load under torch's default ``weights_only=True``.

Since torch 2.6, ``torch.load`` refuses any pickled global that is not allow-listed.
mmengine 0.10.7 saves numpy arrays and scalars (in ``meta`` and the message hub) and
its ``HistoryBuffer`` objects (whose statistics methods are pickled as
``getattr(HistoryBuffer, 'min')``), so its ``load_checkpoint`` and ``Runner.resume`` fail.
Importing this module allow-lists exactly those types; anything else in a pickle
(an arbitrary class, a function) is still refused by torch.
"""
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# numpy 2 moved numpy.core to numpy._core; pickles name whichever module wrote them.
_NUMPY_CORE_NAMES = ("numpy.core.multiarray", "numpy._core.multiarray")


def _numpy_safe_globals():
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    entries = [np.ndarray, np.dtype]
    for module in _NUMPY_CORE_NAMES:
        entries.append((multiarray._reconstruct, f"{module}._reconstruct"))
        entries.append((multiarray.scalar, f"{module}.scalar"))
    # dtype classes (numpy >= 1.25 pickles dtypes as numpy.dtypes.Float64DType etc.)
    for scalar_type in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                        np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128, np.str_):
        entries.append(type(np.dtype(scalar_type)))
    return entries


def _history_buffer_method(obj, name):
    """Stands in for ``getattr`` in these pickles, which use it only to name
    ``HistoryBuffer.min/max/mean/current`` (its statistics methods). Anything else is refused:
    a general ``getattr`` would let a pickle reach arbitrary callables."""
    if obj is HistoryBuffer and name in ("min", "max", "mean", "current"):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) while loading a checkpoint")


SAFE_GLOBALS = _numpy_safe_globals() + [HistoryBuffer, (_history_buffer_method, "builtins.getattr")]


def allow_mmengine_checkpoints():
    """Allow-list the types in mmengine checkpoints for ``torch.load(weights_only=True)``."""
    if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
        torch.serialization.add_safe_globals(SAFE_GLOBALS)


allow_mmengine_checkpoints()
