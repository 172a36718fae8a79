"""Run a detector or segmentor on one image and save the image with the predictions drawn.

    python tools/image_demo.py IMAGE CONFIG CHECKPOINT --out-file OUT.png [--device cpu] [--score-thr 0.3]

The arguments are checked before the model is built: IMAGE must be an image file OpenCV
can read, CONFIG a file, CHECKPOINT a file or an http(s) URL, and OUT.png a name with an
image extension OpenCV can write (.png, .jpg, ...) in a folder that exists or can be
created, and is writable.
"""
import argparse
import os
import tempfile


def check_image(parser, path):
    """Fail, naming the file, unless ``path`` is an image that OpenCV (as mmcv) can decode."""
    import cv2
    import numpy as np

    if not os.path.isfile(path):
        parser.error(f"IMAGE {path!r}: no such file")
    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
    except OSError as e:
        parser.error(f"IMAGE {path!r}: cannot read it: {e.strerror or e}")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        parser.error(f"IMAGE {path!r} is not an image file OpenCV can decode (empty, corrupt, or not an image)")


def check_out_file(parser, path):
    """Fail unless an image can be written to ``path``: checked before inference, so a bad
    name does not cost a model build and a forward pass."""
    import cv2
    import numpy as np

    if os.path.isdir(path):
        parser.error(f"--out-file {path!r} is a folder; give a file name such as {os.path.join(path, 'result.png')}")
    ext = os.path.splitext(path)[1]
    try:
        encodable = bool(ext) and cv2.imencode(ext, np.zeros((1, 1, 3), np.uint8))[0]
    except cv2.error:
        encodable = False
    if not encodable:
        parser.error(f"--out-file {path!r}: OpenCV cannot write images with the extension {ext or '(none)'!r}; "
                     "use e.g. .png or .jpg")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        parser.error(f"--out-file {path!r}: cannot create the folder {folder!r}: {e.strerror or e}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".image_demo-", suffix=ext)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out-file {path!r}: cannot write in the folder {folder!r}: {e.strerror or e}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        parser.error(f"--out-file {path!r}: the file exists and is not writable")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--out-file", required=True, help="where to save the drawn image (.png, .jpg, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--score-thr", type=float, default=0.3, help="detection score threshold")
    args = parser.parse_args()
    if not os.path.isfile(args.config):
        parser.error(f"CONFIG {args.config!r}: no such file")
    if not args.checkpoint.startswith(("http://", "https://")) and not os.path.isfile(args.checkpoint):
        parser.error(f"CHECKPOINT {args.checkpoint!r}: no such file")
    check_image(parser, args.image)
    check_out_file(parser, args.out_file)  # last: it may create the output folder

    import mmcv
    from mmengine.config import Config

    import internimage  # noqa: F401  (registries, checkpoint loading)
    from internimage.engine.runner_utils import check_checkpoint_argument

    check_checkpoint_argument(args.checkpoint)  # the hash a published file's name carries
    cfg = Config.fromfile(args.config)
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
