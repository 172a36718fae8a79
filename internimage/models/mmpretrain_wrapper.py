"""InternImage as the backbone of mmpretrain's ``ImageClassifier``, keeping the official
state-dict layout.

mmpretrain's ``ClsHead`` has no layers: it takes the last item of the backbone's output
tuple as the class scores. So the whole official classifier (stages, ``conv_head`` / CLIP
projector and the linear ``head``) is the backbone, and a config reads::

    model = dict(type='ImageClassifier',
                 backbone=dict(type='InternImageClsBackbone', arch='t', num_classes=1000),
                 head=dict(type='ClsHead', loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1)))

The model's keys are then ``backbone.`` + the official ones, and an official file
(``{'model': sd}``, a bare state dict, or any other format :func:`internimage.to_state_dict`
reads) loads unchanged: ``ImageClassifier`` registers the backbone's ``_checkpoint_filter``
as a load-state-dict pre-hook (mmpretrain's mechanism for third-party weights), which adds
the prefix. This module does not import mmpretrain; the type is registered in mmengine's
root ``MODELS`` (see :mod:`internimage.registry`), which mmpretrain's registry searches.
"""
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from .classifier import InternImageClassifier

PREFIX = "backbone."
# Keys of an ImageClassifier that are not the backbone's (data preprocessor buffers, a neck
# or head with parameters): left as they are by the conversion.
_OWN_PREFIXES = (PREFIX, "data_preprocessor.", "neck.")


def is_official_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has the official classifier's keys (no ``backbone.`` key)."""
    return bool(state_dict) and not any(key.startswith(PREFIX) for key in state_dict)


def to_image_classifier_keys(state_dict: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """An official classifier state dict with the keys of ``ImageClassifier(backbone=
    InternImageClsBackbone)`` (``backbone.`` + official key); a state dict that already has
    ``backbone.`` keys (this project's checkpoints, detectors' backbones) is returned as is."""
    if not is_official_layout(state_dict):
        return OrderedDict(state_dict)
    return OrderedDict((key if key.startswith(_OWN_PREFIXES) else PREFIX + key, value)
                       for key, value in state_dict.items())


class InternImageClsBackbone(InternImageClassifier):
    """:class:`InternImageClassifier` (same arguments and keys) whose ``forward`` returns
    ``(logits,)``, the output mmpretrain's ``ClsHead`` expects from a backbone."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        return (super().forward(x),)

    @staticmethod
    def _checkpoint_filter(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Load-state-dict pre-hook of the ``ImageClassifier`` (mmpretrain registers it):
        official keys (from ``{'model': sd}`` too, as mmengine's ``load_checkpoint`` passes
        such a file whole) get the ``backbone.`` prefix, in place."""
        own = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
        if set(own) == {"model"} and isinstance(state_dict[prefix + "model"], dict):  # {'model': sd}
            nested = state_dict.pop(prefix + "model")
            state_dict.update((prefix + k, v) for k, v in nested.items())
            own = {k: prefix + k for k in nested}
        if not is_official_layout(own):
            return
        for key in list(own):
            if not key.startswith(_OWN_PREFIXES):
                state_dict[prefix + PREFIX + key] = state_dict.pop(own[key])
