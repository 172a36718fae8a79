"""Checkpoint loading as a hostile or careless user would try it: a remote file whose
unpickling would run code, a file whose hash-named name lies, the wrong file for a model,
an output name equal to the input, temporary files outside the work dir."""
import functools
import hashlib
import http.server
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from mmengine.runner import CheckpointLoader, load_checkpoint

import internimage
from internimage.checkpoint import load_file, verify_hash_in_name
from internimage.checkpoint.publish import publish_checkpoint
from internimage.datasets.synthetic import make_coco_shapes
from internimage.engine.runner_utils import find_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "mask-rcnn_internimage-tiny_shapes.py"
TINY_BACKBONE = dict(channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 2, 4])


class Payload:
    """Unpickling this creates the file ``marker`` (``open(marker, 'w')``): code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An http.server on 127.0.0.1 serving tmp_path/www; torch.hub's cache in tmp_path/hub."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield www, base
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        """Keep the test output free of one access-log line per request."""


def _evil_checkpoint(path, marker):
    torch.save({"state_dict": {"stem.0.weight": torch.zeros(1)}, "meta": {"x": Payload(marker)}}, path)
    return path


def _cache_dir(tmp_path):
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_payload_really_runs_code_under_plain_pickle(tmp_path):
    # The test's premise: without weights_only the payload does run.
    marker = tmp_path / "ran"
    _evil_checkpoint(tmp_path / "evil.pth", marker)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("path", ["CheckpointLoader", "mmengine.load_checkpoint", "build_model",
                                  "InternImage.init_cfg", "load_file", "torchvision_scheme"])
def test_remote_checkpoint_never_runs_code(server, tmp_path, path, monkeypatch):
    www, base = server
    marker = tmp_path / "PWNED"
    _evil_checkpoint(www / "evil.pth", marker)
    url = f"{base}/evil.pth"
    with pytest.raises(pickle.UnpicklingError, match=url.replace(".", r"\.")):
        if path == "CheckpointLoader":
            CheckpointLoader.load_checkpoint(url, map_location="cpu")
        elif path == "mmengine.load_checkpoint":
            load_checkpoint(torch.nn.Linear(1, 1), url, map_location="cpu")
        elif path == "build_model":
            internimage.build_model("t", pretrained=url, **TINY_BACKBONE, num_classes=3)
        elif path == "InternImage.init_cfg":
            internimage.InternImage(**TINY_BACKBONE, init_cfg=dict(type="Pretrained", checkpoint=url)).init_weights()
        elif path == "load_file":
            load_file(url)
        else:  # torchvision:// resolves to a URL and calls mmengine's load_from_http by name
            import mmengine.runner.checkpoint as mc
            monkeypatch.setattr(mc, "get_torchvision_models", lambda: {"evil": url})
            CheckpointLoader.load_checkpoint("torchvision://evil", map_location="cpu")
    assert not marker.exists()
    # An unloadable download is not kept in the cache to be tried again.
    assert not list(_cache_dir(tmp_path).glob("evil*"))


def test_hash_mismatch_is_refused_before_unpickling_and_removed_from_cache(server, tmp_path):
    www, base = server
    marker = tmp_path / "PWNED"
    _evil_checkpoint(www / "evil-deadbeef.pth", marker)
    url = f"{base}/evil-deadbeef.pth"
    for _ in range(2):  # a second try downloads again and fails the same way
        with pytest.raises(ValueError, match=r"corrupt or was modified") as info:
            CheckpointLoader.load_checkpoint(url, map_location="cpu")
        assert url in str(info.value)
        assert not marker.exists()
        assert not (_cache_dir(tmp_path) / "evil-deadbeef.pth").exists()


def test_remote_checkpoint_with_good_hash_loads(server, tmp_path):
    www, base = server
    plain = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()[:8]
    shutil.copy(plain, www / f"good-{digest.upper()}.pth")  # upper-case hashes are checked too
    loaded = CheckpointLoader.load_checkpoint(f"{base}/good-{digest.upper()}.pth", map_location="cpu")
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("shapes")
    make_coco_shapes(str(data), num_train=2, num_val=2, size=64, seed=0)
    return str(data) + "/"


def _tool(args, data_root, tmp_path, timeout=300):
    env = dict(os.environ, INTERNIMAGE_SHAPES_COCO=data_root, TORCH_HOME=str(tmp_path / "torch_home"))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("tool", ["test.py", "train.py --resume", "train.py load_from", "convert_checkpoint.py"])
def test_tools_refuse_remote_payload(server, shapes_data, tmp_path, tool):
    www, base = server
    marker = tmp_path / "PWNED"
    _evil_checkpoint(www / "evil.pth", marker)
    url = f"{base}/evil.pth"
    work = str(tmp_path / "work")
    args = {"test.py": ["tools/test.py", str(TINY), url, "--work-dir", work],
            "train.py --resume": ["tools/train.py", str(TINY), "--work-dir", work, "--resume", url],
            "train.py load_from": ["tools/train.py", str(TINY), "--work-dir", work, "--cfg-options",
                                   f"load_from={url}"],
            "convert_checkpoint.py": ["tools/convert_checkpoint.py", url, str(tmp_path / "out.pth")]}[tool]
    result = _tool(args, shapes_data, tmp_path)
    assert result.returncode != 0
    assert "refusing to load checkpoint " + url in result.stderr, result.stderr[-3000:]
    assert not marker.exists()


def test_test_tool_refuses_a_checkpoint_that_fits_nothing(shapes_data, tmp_path):
    ckpt = tmp_path / "other_model.pth"
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(2, 2)}}, ckpt)
    result = _tool(["tools/test.py", str(TINY), str(ckpt), "--work-dir", str(tmp_path / "w")], shapes_data, tmp_path)
    assert result.returncode != 0
    assert f"checkpoint {ckpt} does not fit the model: it provides 0 of its" in result.stderr, result.stderr[-3000:]
    assert "encoder.layer.0.weight" in result.stderr and "backbone." in result.stderr


def test_backbone_refuses_a_checkpoint_that_fits_nothing(tmp_path):
    ckpt = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, ckpt)
    model = internimage.InternImage(**TINY_BACKBONE, init_cfg=dict(type="Pretrained", checkpoint=str(ckpt)))
    with pytest.raises(ValueError, match=r"resnet\.pth does not fit the model: it provides 0 of its \d+ weights"):
        model.init_weights()


def test_hash_check_opt_out_for_names_that_only_look_hashed(tmp_path, monkeypatch):
    ckpt = tmp_path / "model-20240101.pth"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ValueError, match="INTERNIMAGE_VERIFY_HASH=0"):
        load_file(str(ckpt))
    assert load_file(str(ckpt), verify_hash=False) == {"state_dict": {}}
    monkeypatch.setenv("INTERNIMAGE_VERIFY_HASH", "0")
    assert verify_hash_in_name(str(ckpt)) is None
    assert load_file(str(ckpt)) == {"state_dict": {}}


def test_upper_case_hash_in_name_is_verified(tmp_path):
    ckpt = tmp_path / "model-ABCDEF12.pth"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ValueError, match="corrupt or was modified"):
        load_file(str(ckpt))


def test_mmengine_local_loading_is_not_replaced(tmp_path):
    # Hash checks are the project's (explicit) business; mmengine's local loader stays its own.
    ckpt = tmp_path / "model-20240101.pth"
    torch.save({"state_dict": {}}, ckpt)
    assert CheckpointLoader.load_checkpoint(str(ckpt), map_location="cpu") == {"state_dict": {}}


def test_convert_refuses_to_overwrite_its_input(tmp_path):
    ckpt = tmp_path / "a.pth"
    torch.save({"model": {"w": torch.ones(1)}}, ckpt)
    before = ckpt.read_bytes()
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(ckpt), str(ckpt)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "refusing to overwrite" in result.stderr
    assert ckpt.read_bytes() == before


def test_publish_never_deletes_or_replaces_its_input(tmp_path):
    src = tmp_path / "a.unhashed.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {}}, src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        publish_checkpoint(str(src), str(tmp_path / "a"))
    assert src.read_bytes() == before
    # A normal publish leaves its input in place.
    final = publish_checkpoint(str(src), str(tmp_path / "b.pth"))
    assert src.read_bytes() == before and Path(final).exists()
    assert not list(tmp_path.glob("b.unhashed*")) and not list(tmp_path.glob("*.tmp-*"))


def test_resume_cleans_only_regular_temporaries_inside_the_work_dir(tmp_path):
    work = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    torch.save({"state_dict": {}}, work / "epoch_1.pth")
    victim = elsewhere / "data.pth.tmp-1"
    victim.write_bytes(b"someone else's file")
    torch.save({"state_dict": {}}, elsewhere / "epoch_9.pth")
    (work / "last_checkpoint").write_text(str(elsewhere / "epoch_9.pth"))
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    (work / "epoch_2.pth.tmp-7").symlink_to(target)
    (work / "epoch_3.pth.tmp-8").write_bytes(b"partial")
    find_resume_checkpoint(str(work))
    assert victim.exists(), "a file outside the work dir was deleted"
    assert (work / "epoch_2.pth.tmp-7").is_symlink() and target.read_bytes() == b"keep"
    assert not (work / "epoch_3.pth.tmp-8").exists()


def test_atomic_write_never_follows_a_planted_temporary(tmp_path):
    from internimage.engine.fileio import atomic_write

    target = tmp_path / "epoch_1.pth"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    # The old writer used <name>.tmp-<pid>: a symlink planted there was written through.
    (tmp_path / f"epoch_1.pth.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write(b"checkpoint", target)
    assert victim.read_bytes() == b"keep"
    assert target.read_bytes() == b"checkpoint"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
