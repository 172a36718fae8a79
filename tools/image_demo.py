"""Run a detector or segmentor on one image and save the image with the predictions drawn.

    python tools/image_demo.py IMAGE CONFIG CHECKPOINT --out-file OUT.png [--device cpu] [--score-thr 0.3]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import internimage  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--out-file", required=True, help="where to save the drawn image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--score-thr", type=float, default=0.3, help="detection score threshold")
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    import mmcv

    image = mmcv.imread(args.image, channel_order="rgb")
    if cfg.get("default_scope") == "mmseg":
        from mmseg.apis import inference_model, init_model
        from mmseg.registry import VISUALIZERS

        model = init_model(cfg, args.checkpoint, device=args.device)
        result = inference_model(model, args.image)
        visualizer = VISUALIZERS.build(dict(type="SegLocalVisualizer", name="image_demo"))
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample("result", image, data_sample=result, draw_gt=False, out_file=args.out_file)
    else:
        from mmdet.apis import inference_detector, init_detector
        from mmdet.registry import VISUALIZERS

        model = init_detector(cfg, args.checkpoint, device=args.device)
        result = inference_detector(model, args.image)
        visualizer = VISUALIZERS.build(dict(type="DetLocalVisualizer", name="image_demo"))
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample("result", image, data_sample=result, draw_gt=False, pred_score_thr=args.score_thr,
                                  out_file=args.out_file)
    print(f"saved {args.out_file}")


if __name__ == "__main__":
    main()
