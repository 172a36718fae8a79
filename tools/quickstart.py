"""The README's `make demo`: train and evaluate InternImage on this machine's CPU.

1. generates, once, a synthetic instance-segmentation dataset in COCO format under
   data/shapes_coco (circles, squares, triangles on textured backgrounds);
2. trains a Mask R-CNN with a small InternImage backbone from scratch with the compiled
   DCNv3 kernels (configs/quickstart/mask-rcnn_internimage-mini_shapes.py), logging with ETA;
3. evaluates COCO bbox and segm mAP on the validation split;
4. writes under the work dir: metrics.json, predictions.png (validation images with
   predicted boxes and masks), curves.png (training loss and validation mAP), and the
   published checkpoint (tools/publish_model.py);
5. prints a summary with the commands to fine-tune from the published checkpoint (the
   whole detector, or its backbone only).

    python tools/quickstart.py [--work-dir D] [--seed S] [--epochs E] [--cfg-options k=v ...]
"""
import argparse
import json
import os
import time

from internimage.datasets.synthetic import make_coco_shapes
from internimage.engine.runner_utils import DictAction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart", "mask-rcnn_internimage-mini_shapes.py")
DATA = os.path.join(ROOT, "data", "shapes_coco")
DATA_SPEC = dict(num_train=400, num_val=80, size=128, seed=2023, max_objects=4)


def prepare_data(root: str) -> None:
    stamp = os.path.join(root, "dataset.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == DATA_SPEC:
                print(f"[quickstart] using the synthetic dataset in {root}")
                return
    print(f"[quickstart] generating {DATA_SPEC['num_train']} + {DATA_SPEC['num_val']} synthetic images in {root}")
    make_coco_shapes(root, **DATA_SPEC)
    with open(stamp, "w") as f:
        json.dump(DATA_SPEC, f)


def draw_predictions(runner, path: str, count: int = 8) -> None:
    """A grid of validation images with the model's boxes and masks drawn."""
    import mmcv
    import numpy as np
    from mmdet.apis import inference_detector
    from mmdet.registry import VISUALIZERS

    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    model.cfg = runner.cfg
    dataset = runner.val_dataloader.dataset
    visualizer = VISUALIZERS.build(dict(type="DetLocalVisualizer", name=f"quickstart-{time.time()}"))
    visualizer.dataset_meta = dataset.metainfo
    tiles = []
    for index in range(min(count, len(dataset))):
        image_path = dataset.get_data_info(index)["img_path"]
        image = mmcv.imread(image_path, channel_order="rgb")
        result = inference_detector(model, image_path)
        visualizer.add_datasample("prediction", image, data_sample=result, draw_gt=False, pred_score_thr=0.5)
        tiles.append(np.pad(visualizer.get_image(), ((2, 2), (2, 2), (0, 0)), constant_values=255))
    rows = [np.concatenate(tiles[i:i + 4], axis=1) for i in range(0, len(tiles), 4)]
    mmcv.imwrite(np.concatenate(rows, axis=0)[..., ::-1], path)


def plot_curves(log_dir: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(os.path.join(log_dir, "vis_data", "scalars.json"))]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "coco/bbox_mAP" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["iter"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="iteration", ylabel="training loss", title="Training loss")
    right.plot([r["step"] for r in val], [r["coco/bbox_mAP"] for r in val], "o-", label="bbox mAP")
    right.plot([r["step"] for r in val], [r["coco/segm_mAP"] for r in val], "s-", label="segm mAP")
    right.set(xlabel="epoch", ylabel="COCO mAP@[.5:.95]", title="Validation mAP", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "work_dirs", "quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the number of training epochs")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, k=v")
    args = parser.parse_args()
    start = time.time()

    from mmengine.config import Config
    from mmengine.runner import Runner

    from internimage.checkpoint.publish import publish_checkpoint

    prepare_data(DATA)
    os.environ["INTERNIMAGE_SHAPES_COCO"] = DATA + "/"
    cfg = Config.fromfile(CONFIG)
    cfg.work_dir = args.work_dir
    cfg.randomness = dict(seed=args.seed)
    if args.epochs:
        cfg.train_cfg.max_epochs = args.epochs
        cosine = next(s for s in cfg.param_scheduler if s.type == "CosineAnnealingLR")
        cosine.end = args.epochs
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    print(f"[quickstart] training Mask R-CNN + InternImage (mini) on CPU; logs and outputs in {cfg.work_dir}")
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = {k: float(v) for k, v in runner.val_loop.run().items()}
    for key in ("coco/bbox_mAP", "coco/segm_mAP"):
        metrics.setdefault(key, 0.0)  # mmdet reports nothing when there is no detection at all

    os.makedirs(cfg.work_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.work_dir, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(dict(metrics, seed=args.seed, wall_time_s=round(time.time() - start, 1)), f, indent=2)
    predictions_path = os.path.join(cfg.work_dir, "predictions.png")
    draw_predictions(runner, predictions_path)
    curves_path = os.path.join(cfg.work_dir, "curves.png")
    plot_curves(runner.log_dir, curves_path)
    last = os.path.join(cfg.work_dir, f"epoch_{cfg.train_cfg.max_epochs}.pth")
    published = publish_checkpoint(last, os.path.join(cfg.work_dir, "published", "mask-rcnn_internimage-mini_shapes"))

    elapsed = time.time() - start
    print("\n" + "=" * 78)
    print(f"InternImage quickstart finished in {elapsed / 60:.1f} min")
    print(f"  validation bbox mAP {metrics['coco/bbox_mAP']:.3f}, segm mAP {metrics['coco/segm_mAP']:.3f} "
          f"(COCO mAP@[.5:.95], {DATA_SPEC['num_val']} images)")
    print(f"  metrics:     {metrics_path}")
    print(f"  predictions: {predictions_path}")
    print(f"  curves:      {curves_path}")
    print(f"  checkpoint:  {published}")
    print("Fine-tune from it (e.g. with another config or dataset):")
    print(f"  .venv/bin/python tools/train.py {os.path.relpath(CONFIG, ROOT)} --cfg-options load_from={published}")
    print("or from its backbone only:")
    print(f"  .venv/bin/python tools/train.py {os.path.relpath(CONFIG, ROOT)} "
          f"--cfg-options model.backbone.init_cfg.checkpoint={published}")
    print("=" * 78)


if __name__ == "__main__":
    main()
