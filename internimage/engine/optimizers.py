"""Layer-wise learning-rate decay for InternImage (the official rule), as an mmengine
optimizer-wrapper constructor usable from any mmdet or mmseg config::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        constructor='InternImageLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(num_layers=30, layer_decay_rate=1.0))

With ``L = num_layers + 2``: the stem (``backbone.patch_embed``) has layer id 0, block j of
stage i has ``1 + j + depths[0] + ... + depths[i-1]``, a stage's ``downsample`` and
``norm`` belong with the first block of the next stage (the last stage's with its own
first block), and everything outside the backbone has ``L - 1``. A parameter's learning
rate is ``lr * layer_decay_rate ** (L - 1 - layer_id)``. Weight decay is 0 for
one-dimensional parameters (norms, biases, layer-scale gammas), names ending in
``.bias`` and names containing ``norm``, and, as in the official detection and
segmentation constructors, for the ``sampling_offsets`` of multi-scale deformable
attention (DINO's transformer, Mask2Former's pixel decoder; the backbone has none).
So a DINO or Mask2Former model's transformer, query embeddings and pixel decoder (all
outside ``backbone.``) get layer id ``L - 1``. ``offset_lr_scale`` (official name and
rule, default 1.0; the H/G DINO configs use 1e-3) multiplies the learning rate of
parameters whose name contains ``sampling_offsets`` or ``reference_points``.

The official *classification* recipes (``LR_LAYER_DECAY``, for fine-tuning the 22K
checkpoints) use another rule, chosen with ``paramwise_cfg=dict(decay_rule='classification',
layer_decay_rate=0.9)`` (``num_layers`` is not used): counting blocks over all stages, block
``k`` of ``N`` gets ``rate ** (N - 1 - k)`` (the last block 1.0), the stem the ratio of
the first block, a stage's ``downsample`` and ``norm`` that of the next stage's first block
(stages 1-3), and everything else (the last stage's norm, level-2 post norms, the
classification head) 1.0. ``dcn_lr_mul`` (official ``DCN_LR_MUL``, either rule) then
multiplies the learning rate of parameters whose name contains one of ``dcn_lr_keys``
(default the official code's: ``offset``, ``attention_weights``, ``center_feature_scale_proj``,
``alpha_beta``; note that it does not list ``mask``, the DCNv3 mask projection).
"""
from typing import List, Sequence

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn


def layer_id(name: str, num_layers: int, depths: Sequence[int], prefix: str = "backbone.") -> int:
    """Layer id of parameter ``name`` under the official rule (``num_layers`` = L)."""
    if not name.startswith(prefix):
        return num_layers - 1
    parts = name[len(prefix):].split(".")
    if parts[0] == "patch_embed":
        return 0
    if parts[0] == "levels":
        stage = int(parts[1])
        if parts[2] in ("downsample", "norm"):
            return 1 + sum(depths[:min(stage + 1, len(depths) - 1)])
        return 1 + int(parts[3]) + sum(depths[:stage])
    return num_layers - 1


# Parameter names whose lr the official DCN_LR_MUL multiplies (classification/optimizer.py).
DCN_LR_KEYS = ("offset", "attention_weights", "center_feature_scale_proj", "alpha_beta")


def classification_lr_scale(name: str, depths: Sequence[int], rate: float, prefix: str = "backbone.") -> float:
    """Layer-decay factor of parameter ``name`` under the official classification rule."""
    total = sum(depths)
    if not name.startswith(prefix):
        return 1.0
    parts = name[len(prefix):].split(".")
    if parts[0] == "patch_embed":
        return rate ** (total - 1)
    if parts[0] == "levels" and len(parts) > 3:
        stage = int(parts[1])
        if parts[2] == "blocks":
            return rate ** (total - 1 - sum(depths[:stage]) - int(parts[3]))
        if parts[2] in ("downsample", "norm") and stage < len(depths) - 1:
            return rate ** (total - 1 - sum(depths[:stage + 1]))
    return 1.0


# Names whose lr the official detection/segmentation ``offset_lr_scale`` multiplies.
OFFSET_LR_KEYS = ("sampling_offsets", "reference_points")


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def original_ndims(module: nn.Module) -> dict:
    """Under FSDP (``use_orig_params=True``) a parameter is a 1-D view of its shard: the
    number of dimensions of each parameter before flattening, by name (empty without FSDP)."""
    ndims = {}
    for prefix, sub in module.named_modules():
        flat = getattr(getattr(sub, "_handle", None), "flat_param", None)
        if flat is None or not hasattr(flat, "_fqns"):
            continue
        for fqn, shape in zip(flat._fqns, flat._shapes):
            ndims[_clean(f"{prefix}.{fqn}" if prefix else fqn)] = len(shape)
    return ndims


def no_weight_decay(name: str, param: nn.Parameter, ndim: int = None) -> bool:
    return ((param.ndim if ndim is None else ndim) == 1 or name.endswith(".bias") or "norm" in name
            or "sampling_offsets" in name)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class InternImageLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg``: ``num_layers`` (the official value: the sum of the depths),
    ``layer_decay_rate``, and optionally ``depths`` (default: the backbone's),
    ``decay_rule`` (``'detection'``, default, or ``'classification'``), ``dcn_lr_mul``,
    ``dcn_lr_keys`` and ``offset_lr_scale`` (see the module's documentation)."""

    def __call__(self, model: nn.Module):
        # mmengine hands add_params the wrapped module (FSDP's .module), where the FSDP
        # flat parameters that know the original shapes are out of reach.
        self._ndims = original_ndims(model)
        return super().__call__(model)

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        rule = cfg.get("decay_rule", "detection")
        if rule not in ("detection", "classification"):
            raise ValueError(f"paramwise_cfg.decay_rule must be 'detection' or 'classification', got {rule!r}")
        needed = ("layer_decay_rate",) if rule == "classification" else ("num_layers", "layer_decay_rate")
        if any(key not in cfg for key in needed):
            raise KeyError(f"InternImageLayerDecayOptimizerConstructor needs paramwise_cfg="
                           f"dict({', '.join(k + '=...' for k in needed)}) for decay_rule={rule!r}")
        total = cfg["num_layers"] + 2 if rule == "detection" else None
        rate = cfg["layer_decay_rate"]
        dcn_lr_mul = cfg.get("dcn_lr_mul")
        dcn_lr_keys = tuple(cfg.get("dcn_lr_keys", DCN_LR_KEYS))
        offset_lr_scale = cfg.get("offset_lr_scale", 1.0)
        depths = cfg.get("depths")
        if depths is None:
            backbone = getattr(module, "backbone", module)
            depths = getattr(backbone, "depths", None)
            if depths is None:
                raise ValueError("cannot find the backbone's depths; give paramwise_cfg=dict(depths=[...])")
        prefix = "backbone." if hasattr(module, "backbone") else ""
        groups, ndims = {}, {**getattr(self, "_ndims", {}), **original_ndims(module)}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            # Under FSDP (use_orig_params) or activation-checkpoint wrappers the names carry
            # the wrappers' prefixes: the rule applies to the model's own names.
            name = _clean(name)
            if rule == "detection":
                lid = layer_id(name, total, depths, prefix)
                scale, extra = rate ** (total - 1 - lid), dict(layer_id=lid)
            else:
                scale = classification_lr_scale(name, depths, rate, prefix)
                lid, extra = f"x{scale:.6g}", {}
            dcn = dcn_lr_mul is not None and any(k in name for k in dcn_lr_keys)
            if dcn:
                scale *= dcn_lr_mul
            offset = offset_lr_scale != 1.0 and any(k in name for k in OFFSET_LR_KEYS)
            if offset:
                scale *= offset_lr_scale
            decay = not no_weight_decay(name, param, ndims.get(name))
            key = (f"layer_{lid}{'_dcn' if dcn else ''}{'_offset' if offset else ''}"
                   f"_{'decay' if decay else 'no_decay'}")
            if key not in groups:
                groups[key] = dict(params=[], param_names=[], lr=self.base_lr * scale,
                                   weight_decay=self.base_wd if decay else 0.0, **extra)
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        params.extend(groups.values())
        stem = rate ** (total - 1) if rule == "detection" else rate ** (sum(depths) - 1)
        print_log(f"Layer-wise lr decay ({rule} rule): {len(groups)} parameter groups"
                  f"{f', L={total}' if total else ''}, rate={rate}, lr from {self.base_lr * stem:.3g} (stem) to "
                  f"{self.base_lr:.3g} (heads)" + (f", DCN lr x{dcn_lr_mul}" if dcn_lr_mul is not None else ""),
                  logger="current")

