"""The installed stack: mmcv's compiled ops, mmdet/mmseg imports, our extension, and
loading mmengine checkpoints with torch's default ``weights_only=True``."""
import pickle

import pytest
import torch
from torch import nn


def test_mmcv_ops_on_cpu_hand_checked():
    from mmcv.ops import RoIAlign, nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # Box 3 (0.95) suppresses box 0 (IoU 0.9) and box 1 (IoU 81/130 = 0.62 > 0.5); box 2 stays.
    assert keep.tolist() == [3, 2]
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.95, 0.7]))

    # RoIAlign of a linear ramp f(y, x) = x is exact: the mean of x over each bin.
    feature = torch.arange(8, dtype=torch.float32).repeat(8, 1)[None, None]  # (1, 1, 8, 8), value = x
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])  # batch index, x1, y1, x2, y2
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feature, rois)
    # aligned=True shifts by -0.5: the roi spans x in [0.5, 4.5], bins [0.5, 2.5] and [2.5, 4.5].
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.5, 3.5], [1.5, 3.5]]))


def test_openmmlab_versions():
    import mmcv
    import mmdet
    import mmengine
    import mmseg

    assert mmcv.__version__ == "2.1.0"
    assert mmengine.__version__ == "0.10.7"
    assert mmdet.__version__ == "3.3.0"
    assert mmseg.__version__ == "1.2.2"


def test_compiled_extension_loads():
    import ops_dcnv3._C  # noqa: F401

    assert hasattr(torch.ops.ops_dcnv3, "dcnv3_forward")
    assert hasattr(torch.ops.ops_dcnv3, "dcnv3_backward")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ops_dcnv3::dcnv3_forward", "CPU")


def test_internimage_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    import internimage

    assert MMDET_MODELS.get("InternImage") is internimage.InternImage
    assert MMSEG_MODELS.get("InternImage") is internimage.InternImage




class Arbitrary:
    """A class pickled into a checkpoint: torch must refuse to load it."""

    def __init__(self):
        self.value = 1


class ReachesThroughGetattr:
    """Pickles as getattr(HistoryBuffer, '__init__'): only the statistics methods may pass."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer

        return getattr, (HistoryBuffer, "__init__")


def make_runner(work_dir, max_epochs, **kwargs):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs, targets=None, mode="tensor"):
            out = self.linear(torch.stack(inputs) if isinstance(inputs, list) else inputs)
            if mode == "loss":
                return {"loss": (out.squeeze(-1) - torch.stack(targets) if isinstance(targets, list) else
                                 out.squeeze(-1) - targets).pow(2).mean()}
            return out

    data = [dict(inputs=torch.randn(2), targets=torch.tensor(1.0)) for _ in range(8)]
    return Runner(
        model=Net(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=data, sampler=dict(type="DefaultSampler", shuffle=True), batch_size=2,
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
        param_scheduler=dict(type="MultiStepLR", milestones=[1], by_epoch=True),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)),
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
        **kwargs)


def test_mmengine_checkpoints_load_with_weights_only(tmp_path):
    from mmengine.runner import load_checkpoint

    import internimage  # noqa: F401  (allow-lists mmengine's checkpoint contents)

    runner = make_runner(tmp_path, max_epochs=1)
    runner.train()
    ckpt = tmp_path / "epoch_1.pth"
    assert ckpt.exists()
    # Everything it pickles is allow-listed, and it loads with torch's default (weights_only=True).
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt)) == []
    state = torch.load(ckpt, weights_only=True)
    assert "message_hub" in state and "optimizer" in state
    load_checkpoint(runner.model, str(ckpt), map_location="cpu")

    resumed = make_runner(tmp_path / "resumed", max_epochs=2, resume=True, load_from=str(ckpt))
    resumed.train()
    assert resumed.epoch == 2
    assert (tmp_path / "resumed" / "epoch_2.pth").exists()


def test_arbitrary_pickled_objects_are_still_refused(tmp_path):
    from mmengine.runner import load_checkpoint

    import internimage  # noqa: F401

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"linear.weight": torch.zeros(1, 2)}, "meta": {"payload": Arbitrary()}}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(nn.Linear(2, 1), str(path), map_location="cpu")
    torch.save({"state_dict": {}, "meta": {"payload": ReachesThroughGetattr()}}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        load_checkpoint(nn.Linear(2, 1), str(path), map_location="cpu")


def test_import_internimage_leaves_mmdet_and_mmseg_out():
    import subprocess
    import sys

    code = ("import sys, internimage, mmengine.runner.checkpoint as c; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmseg'))); "
            "print(c.CheckpointLoader._schemes[''].__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "mmengine.runner.checkpoint"  # mmengine's local loader is left as it is


def test_scoped_type_names_build_once_configs_import_the_datasets():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    import internimage
    import internimage.datasets  # noqa: F401  (what configs import)

    assert MMDET_MODELS.get("mmdet.InternImage") is internimage.InternImage
    assert MMSEG_MODELS.get("mmseg.InternImage") is internimage.InternImage
