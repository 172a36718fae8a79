"""Per-GPU training memory of a config under DDP, ZeRO-1 and full sharding (FSDP / ZeRO-3).

    python tools/memory_plan.py CONFIG --gpus N [--strategy ddp|zero1|full_shard] [--json]

* parameters: counted on the config's model built on the meta device (no memory used);
* bytes per parameter (ZeRO paper accounting, AdamW): float32 training keeps 4 B weights,
  4 B gradients and 8 B optimizer state (two float32 moments); mixed precision (an
  ``AmpOptimWrapper`` config) keeps 2 B weights, 2 B gradients and 12 B optimizer state
  (float32 master weights and the two moments). DDP replicates all three, ZeRO-1 shards the
  optimizer state over the GPUs, full shard shards all three;
* activations (not sharded; one image per GPU times the config's batch size): the bytes
  autograd saves for backward in one forward pass of the *backbone* (same depths, groups,
  group width and ``with_cp`` as the config), measured on the CPU at ``--measure-width`` of
  its channels and a small input, then scaled by the channel and pixel ratios. Heads and
  decoders, the recomputation peak of checkpointed blocks, temporary buffers and the CUDA
  context are not included: add a margin.
"""
import argparse
import inspect
import json
import math

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

STRATEGIES = ("ddp", "zero1", "full_shard")


def count_parameters(cfg) -> tuple:
    """(all, trainable) parameter counts of the config's model, built on the meta device."""
    import internimage  # noqa: F401
    import internimage.engine  # noqa: F401

    scope = cfg.get("default_scope", "mmengine")
    init_default_scope(scope)
    registry = {"mmseg": "mmseg.registry", "mmdet": "mmdet.registry", "mmpretrain": "mmpretrain.registry"}
    module = __import__(registry.get(scope, "mmengine.registry"), fromlist=["MODELS"])
    with torch.device("meta"):
        model = module.MODELS.build(cfg.model)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def backbone_kwargs(cfg, width: float) -> dict:
    from internimage import InternImage
    from internimage.models.backbone import resolve_arch

    allowed = set(inspect.signature(InternImage.__init__).parameters) - {"self", "init_cfg", "pretrained"}
    given = {k: v for k, v in dict(cfg.model.backbone).items() if k in allowed}
    settings = resolve_arch(given.pop("arch", None), **{k: given.pop(k) for k in ("channels", "depths", "groups")
                                                         if k in given})
    group_width = settings["channels"] // settings["groups"][0]
    given.update(settings)
    # Divide every stage's groups by the largest divisor k of the first stage's groups with
    # k <= 1 / width (the group width stays, so the model is the same architecture, narrower).
    k = max(d for d in range(1, settings["groups"][0] + 1)
            if settings["groups"][0] % d == 0 and d <= max(1.0, 1 / width))
    given["groups"] = [g // k for g in settings["groups"]]
    given["channels"] = given["groups"][0] * group_width
    given.update(drop_path_rate=0.0, frozen_stages=-1)
    return given


def saved_activation_bytes(model: torch.nn.Module, size: tuple) -> int:
    """Bytes of the tensors autograd saves in one forward pass of one image (each storage once)."""
    seen = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # weights are counted as parameters
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    x = torch.randn(1, 3, *size, requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
    loss.backward()
    return sum(seen.values())


def measure_activations(cfg, size: tuple, width: float, measure_size: int) -> tuple:
    """(bytes per image, description) for the config's backbone at input ``size``."""
    from internimage import InternImage

    kwargs = backbone_kwargs(cfg, width)
    full_channels = backbone_kwargs(cfg, 1.0)["channels"]
    small = (measure_size, measure_size)
    scale = (full_channels / kwargs["channels"]) * (size[0] * size[1]) / (small[0] * small[1])
    estimates = {}
    for with_cp in (False, True):
        torch.manual_seed(0)
        estimates[with_cp] = int(saved_activation_bytes(InternImage(**{**kwargs, "with_cp": with_cp}), small) * scale)
    config_cp = bool(kwargs.get("with_cp", False))
    how = (f"backbone only, saved-for-backward bytes of one forward on CPU at {kwargs['channels']} of "
           f"{full_channels} channels and {small[0]}x{small[1]}, scaled x{scale:.1f} to {size[0]}x{size[1]}; "
           f"per image {estimates[False] / 2**30:.2f} GiB without with_cp, {estimates[True] / 2**30:.2f} GiB "
           f"with it; the config has with_cp={config_cp}")
    return estimates[config_cp], how


def input_size(cfg) -> tuple:
    for key in ("crop_size", "img_size"):
        value = cfg.get(key)
        if value:
            return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    size = cfg.model.get("data_preprocessor", {}).get("size")
    if size:
        return tuple(size)
    raise SystemExit("cannot find the input size in the config (crop_size / img_size); give --shape H W")


def plan(params: int, trainable: int, activations: int, gpus: int, mixed: bool) -> dict:
    weight, grad, optim = (2, 2, 12) if mixed else (4, 4, 8)
    full = dict(params=params * weight, grads=trainable * grad, optimizer=trainable * optim)
    shard = {"ddp": (), "zero1": ("optimizer",), "full_shard": ("params", "grads", "optimizer")}
    result = {}
    for name, sharded in shard.items():
        row = {k: math.ceil(v / gpus) if k in sharded else v for k, v in full.items()}
        row["activations"] = activations
        row["total"] = sum(row.values())
        result[name] = row
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--strategy", choices=STRATEGIES, help="print one strategy (default: all)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shape", type=int, nargs=2, help="input size (default: the config's)")
    parser.add_argument("--batch", type=int, help="images per GPU (default: the config's train batch size)")
    parser.add_argument("--measure-width", type=float, default=0.125, help="channel fraction measured on CPU")
    parser.add_argument("--measure-size", type=int, default=64, help="input side measured on CPU")
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.config)
    params, trainable = count_parameters(cfg)
    size = tuple(args.shape) if args.shape else input_size(cfg)
    batch = args.batch or cfg.get("train_dataloader", {}).get("batch_size", 1)
    per_image, how = measure_activations(cfg, size, args.measure_width, args.measure_size)
    mixed = "Amp" in str(cfg.get("optim_wrapper", {}).get("type", ""))
    result = plan(params, trainable, per_image * batch, args.gpus, mixed)
    if args.strategy:
        result = {args.strategy: result[args.strategy]}
    if args.json:
        print(json.dumps(result))
        return
    gib = 2 ** 30
    print(f"{args.config}: {params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable), "
          f"{'mixed precision' if mixed else 'float32'}, {args.gpus} GPUs, batch {batch} per GPU")
    print(f"activations: {how}")
    print(f"{'strategy':<12}" + "".join(f"{k:>13}" for k in ("params", "grads", "optimizer", "activations", "total")))
    for name, row in result.items():
        print(f"{name:<12}" + "".join(f"{row[k] / gib:>9.2f} GiB" for k in row))


if __name__ == "__main__":
    main()
