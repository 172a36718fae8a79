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
``.bias`` and names containing ``norm``.
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


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim == 1 or name.endswith(".bias") or "norm" in name


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class InternImageLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg``: ``num_layers`` (the official value: the sum of the depths),
    ``layer_decay_rate``, and optionally ``depths`` (default: the backbone's)."""

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        if "num_layers" not in cfg or "layer_decay_rate" not in cfg:
            raise KeyError("InternImageLayerDecayOptimizerConstructor needs paramwise_cfg="
                           "dict(num_layers=..., layer_decay_rate=...)")
        total = cfg["num_layers"] + 2
        rate = cfg["layer_decay_rate"]
        depths = cfg.get("depths")
        if depths is None:
            backbone = getattr(module, "backbone", module)
            depths = getattr(backbone, "depths", None)
            if depths is None:
                raise ValueError("cannot find the backbone's depths; give paramwise_cfg=dict(depths=[...])")
        prefix = "backbone." if hasattr(module, "backbone") else ""
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lid = layer_id(name, total, depths, prefix)
            decay = not no_weight_decay(name, param)
            key = f"layer_{lid}_{'decay' if decay else 'no_decay'}"
            if key not in groups:
                groups[key] = dict(params=[], param_names=[], lr=self.base_lr * rate ** (total - 1 - lid),
                                   weight_decay=self.base_wd if decay else 0.0, layer_id=lid)
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        params.extend(groups.values())
        print_log(f"Layer-wise lr decay: {len(groups)} parameter groups, L={total}, rate={rate}, "
                  f"lr from {self.base_lr * rate ** (total - 1):.3g} (stem) to {self.base_lr:.3g} (heads)",
                  logger="current")

