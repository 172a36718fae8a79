"""The Hugging Face hub layout of the releases: read (every loading path), written, round-tripped.

Hub folders are made at test time from the official-output fixtures (float64 models with
their logits and features), in the layout of the official releases: ``config.json``,
``preprocessor_config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` with
``model.``-prefixed keys and ``layer_scale1/2`` for ``gamma1/2``. The seven releases'
``config.json`` files are checked against the official state-dict shapes on the meta device.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

import internimage
from internimage import InternImage, InternImageClassifier, build_model, from_pretrained
from internimage.checkpoint import hub, load_file, to_state_dict
from internimage.models.variants import classifier_config, data_config, variant_name

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
OFFICIAL_HUB = json.loads((DATA / "hub" / "official_hub_configs.json").read_text())
OFFICIAL_SHAPES = json.loads((DATA / "official" / "official_state_dict_shapes.json").read_text())
FIXTURES = ("tiny_t_style", "tiny_b_style")
TOOL_ENV = dict(os.environ, PYTHONPATH=str(REPO))


def fixture(name):
    return torch.load(DATA / "official" / f"{name}.pt")


def write_folder(path, fx, weights="safetensors", data_config=None):
    """A hub folder of fixture ``fx`` in the official layout, written by this project."""
    hub.save_hub_folder(str(path), fx["state_dict"], dict(fx["config"]), data_config=data_config, weights=weights)
    return path


def run_tool(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=TOOL_ENV, capture_output=True,
                          text=True, timeout=300)


# --- the seven releases ---------------------------------------------------------------

@pytest.mark.parametrize("release", sorted(OFFICIAL_HUB))
def test_release_config_builds_the_official_model(release):
    """Each release's config.json gives, on the meta device, exactly the official state dict
    (keys and shapes), and its key names map to the hub names and back."""
    variant = variant_name(release.split("_")[1])
    kwargs = hub.model_kwargs_from_config(OFFICIAL_HUB[release]["config"])
    with torch.device("meta"):
        model = InternImageClassifier(**kwargs)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    official = {k: v for k, v in OFFICIAL_SHAPES[variant]["state_dict"].items()
                if not k.endswith("num_batches_tracked")}
    assert shapes == official
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_SHAPES[variant]["num_params"]
    for key in official:
        hub_key = hub.official_to_hub_key(key)
        assert hub_key.startswith("model.") and "gamma" not in hub_key
        assert hub.hub_to_official_key(hub_key) == key


@pytest.mark.parametrize("release", sorted(OFFICIAL_HUB))
def test_writer_states_the_release_config(release):
    """The config.json written for a variant holds the official file's fields and values."""
    variant = variant_name(release.split("_")[1])
    written = hub.config_from_model_kwargs(classifier_config(variant, drop_path_rate=0.0))
    assert written["auto_map"]["AutoModelForImageClassification"].endswith(
        "--modeling_internimage.InternImageModelForImageClassification")
    assert {k: v for k, v in written.items() if k not in hub.HF_FIELDS[:-1]} == OFFICIAL_HUB[release]["config"]


@pytest.mark.parametrize("release", sorted(OFFICIAL_HUB))
def test_release_preprocessing_against_the_official_evaluation(release):
    """The hub processors and the official evaluation (timm pretrained cfg) agree on size,
    interpolation and mean/std; they differ in the resize rule exactly as documented in the
    README: the hub resizes the short side to the input size and centre-crops, the official
    evaluation resizes to 256 and crops at 224, and squashes to the input size above 224."""
    from_hub = hub.data_config_from_preprocessor(OFFICIAL_HUB[release]["preprocessor"])
    official = data_config(release)
    for key in ("input_size", "interpolation", "mean", "std"):
        assert tuple(from_hub[key]) == tuple(official[key]), key
    assert (from_hub["crop_pct"], from_hub["crop_mode"]) == (1.0, "center")
    size = official["input_size"][1]
    assert (official["crop_pct"], official["crop_mode"]) == ((0.875, "center") if size == 224 else (1.0, "squash"))
    # What this project writes for the release states the official evaluation, and reads back as it.
    assert hub.data_config_from_preprocessor(hub.preprocessor_from_data_config(official)) == official


# --- loading through every path, parity with the official outputs ----------------------

@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("name", FIXTURES)
def test_from_pretrained_gives_official_outputs(tmp_path, name, weights):
    fx = fixture(name)
    folder = write_folder(tmp_path / "hub", fx, weights=weights)
    weights_file = folder / (hub.SAFETENSORS_NAME if weights == "safetensors" else hub.PICKLE_NAME)
    stored = load_safetensors(str(weights_file)) if weights == "safetensors" else torch.load(weights_file)
    assert all(k.startswith("model.") and ".gamma" not in k for k in stored)
    for path in (folder, weights_file):
        model = from_pretrained(str(path))
        assert not model.training
        torch.testing.assert_close(model(fx["input"]), fx["logits"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", FIXTURES)
def test_pretrained_init_cfg_and_converter_accept_a_hub_folder(tmp_path, name):
    """A classifier or backbone with ``init_cfg=Pretrained(FOLDER or FILE)`` (how detection and
    segmentation configs start) and ``tools/convert_checkpoint.py FOLDER OUT.pth``."""
    fx = fixture(name)
    folder = write_folder(tmp_path / "hub", fx)
    kwargs = {k: v for k, v in fx["config"].items() if k != "num_classes"}
    for source in (folder, folder / hub.SAFETENSORS_NAME):
        classifier = InternImageClassifier(num_classes=10, init_cfg=dict(type="Pretrained", checkpoint=str(source)),
                                           **kwargs).double()
        classifier.init_weights()
        torch.testing.assert_close(classifier.eval()(fx["input"]), fx["logits"], rtol=0, atol=1e-8)
    backbone = InternImage(init_cfg=dict(type="Pretrained", checkpoint=str(folder)), **kwargs).double()
    backbone.init_weights()
    for ours, official in zip(backbone.eval()(fx["input"]), fx["features"]):
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-8)

    out = tmp_path / "converted.pth"
    result = run_tool("tools/convert_checkpoint.py", folder, out)
    assert result.returncode == 0, result.stderr
    converted = load_file(str(out))
    assert converted["meta"]["hub_config"]["model_type"] == "internimage"
    for key, value in fx["state_dict"].items():
        assert torch.equal(converted["state_dict"][key], value), key


def test_build_model_loads_a_release_sized_hub_folder(tmp_path):
    """``build_model(name, pretrained=FOLDER)`` with an InternImage-T folder (random weights
    in the release's layout) gives the model ``from_pretrained`` gives."""
    torch.manual_seed(0)
    source = build_model("t").eval()
    folder = tmp_path / "internimage_t_1k_224"
    hub.save_hub_folder(str(folder), source.state_dict(), classifier_config("t", drop_path_rate=0.0),
                        data_config=data_config("t"))
    x = torch.randn(1, 3, 64, 64)
    loaded = from_pretrained(str(folder))
    assert loaded.pretrained_cfg == data_config("t")
    with torch.no_grad():
        expected = source(x)
        torch.testing.assert_close(build_model("t", pretrained=str(folder)).eval()(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="describes another architecture than the model's .channels: 64 in the "
                                         "folder, 80 in the model"):
        build_model("s", pretrained=str(folder))


def test_sharded_folder(tmp_path):
    """A folder whose weights are split into shards listed by model.safetensors.index.json."""
    fx = fixture("tiny_b_style")
    folder = write_folder(tmp_path / "hub", fx)
    weights = load_safetensors(str(folder / hub.SAFETENSORS_NAME))
    os.remove(folder / hub.SAFETENSORS_NAME)
    keys = list(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_safetensors({k: weights[k] for k in names}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(from_pretrained(str(folder))(fx["input"]), fx["logits"], rtol=0, atol=1e-8)
    index["weight_map"][keys[0]] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain file names"):
        from_pretrained(str(folder))


# --- writing, and the round trip --------------------------------------------------------

@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_round_trip_through_the_hub_layout_is_bit_identical(tmp_path, weights):
    """ours -> ``--to hf`` folder -> ours: every tensor equal, dtype included."""
    fx = fixture("tiny_b_style")
    ours = tmp_path / "ours.pth"
    internimage.checkpoint.save_atomic({"state_dict": fx["state_dict"], "meta": {}}, str(ours))
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(fx["config"]))
    folder, back = tmp_path / "hf", tmp_path / "back.pth"
    result = run_tool("tools/convert_checkpoint.py", ours, folder, "--to", "hf", "--model-config", arch,
                      "--weights", weights)
    assert result.returncode == 0, result.stderr
    assert (folder / hub.CONFIG_NAME).is_file()
    assert (folder / (hub.SAFETENSORS_NAME if weights == "safetensors" else hub.PICKLE_NAME)).is_file()
    result = run_tool("tools/convert_checkpoint.py", folder, back)
    assert result.returncode == 0, result.stderr
    restored = load_file(str(back))["state_dict"]
    assert list(restored) == list(fx["state_dict"])
    for key, value in fx["state_dict"].items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
    # Written again from the converted file, the folder keeps the config it came with.
    again = tmp_path / "hf_again"
    assert run_tool("tools/convert_checkpoint.py", back, again, "--to", "hf").returncode == 0
    assert json.loads((again / hub.CONFIG_NAME).read_text()) == json.loads((folder / hub.CONFIG_NAME).read_text())


def test_to_hf_infers_a_release_variant_and_writes_its_preprocessing(tmp_path):
    torch.manual_seed(0)
    ours = tmp_path / "t.pth"
    internimage.checkpoint.save_atomic({"state_dict": build_model("t").state_dict()}, str(ours))
    folder = tmp_path / "hf"
    result = run_tool("tools/convert_checkpoint.py", ours, folder, "--to", "hf", "--name", "me/internimage_t_ft")
    assert result.returncode == 0, result.stderr
    config = json.loads((folder / hub.CONFIG_NAME).read_text())
    assert config["_name_or_path"] == "me/internimage_t_ft"
    assert {k: v for k, v in config.items() if k not in hub.HF_FIELDS[:-1]} == \
        OFFICIAL_HUB["internimage_t_1k_224"]["config"]
    assert hub.read_data_config(str(folder)) == data_config("t")
    result = run_tool("tools/convert_checkpoint.py", folder, folder, "--to", "hf")
    assert result.returncode != 0 and "refusing to overwrite" in result.stderr


# --- preprocessing honoured by the classification tool -----------------------------------

def test_classify_tool_uses_the_folders_preprocessing(tmp_path):
    from PIL import Image
    from timm.data import create_transform

    fx = fixture("tiny_t_style")
    preprocessing = dict(input_size=(3, 64, 64), interpolation="bilinear", mean=(0.5, 0.4, 0.3),
                         std=(0.2, 0.25, 0.3), crop_pct=0.8, crop_mode="center")
    folder = write_folder(tmp_path / "hub", fx, data_config=preprocessing)
    assert hub.read_data_config(str(folder)) == preprocessing
    image_path = tmp_path / "image.png"
    torch.manual_seed(0)
    Image.fromarray((torch.rand(90, 120, 3) * 255).to(torch.uint8).numpy()).save(image_path)
    result = run_tool("tools/classify.py", image_path, folder, "--topk", "3", "--json")
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)[str(image_path)]
    model = from_pretrained(str(folder))
    with Image.open(image_path) as image:
        batch = create_transform(**preprocessing)(image.convert("RGB"))[None].double()
    with torch.no_grad():
        probs = model(batch).softmax(-1)[0]
    assert [e["index"] for e in top] == probs.topk(3).indices.tolist()
    assert [e["probability"] for e in top] == pytest.approx(probs.topk(3).values.tolist(), abs=1e-6)


# --- bad input ----------------------------------------------------------------------------

def test_bad_hub_folders_get_clear_errors(tmp_path):
    fx = fixture("tiny_b_style")
    folder = write_folder(tmp_path / "hub", fx)
    config_path = folder / hub.CONFIG_NAME
    good = json.loads(config_path.read_text())

    config_path.write_text(json.dumps(dict(good, model_type="convnext")))
    with pytest.raises(ValueError, match="model_type 'convnext'.*not an InternImage release"):
        from_pretrained(str(folder))
    with pytest.raises(ValueError, match="not an InternImage release"):
        build_model("t", pretrained=str(folder))

    config_path.write_text(json.dumps(dict(good, channels=32)))
    with pytest.raises(ValueError, match="does not match the weights.*shapes differ"):
        from_pretrained(str(folder))
    config_path.write_text(json.dumps(dict(good, post_norm=False)))
    with pytest.raises(ValueError, match="does not match the weights.*missing"):
        from_pretrained(str(folder))
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(str(folder))

    # Settings that change outputs but no weight's shape: the folder's config must agree with the model.
    config_path.write_text(json.dumps(good))
    other = {k: v for k, v in fx["config"].items() if k != "num_classes"}
    model = InternImageClassifier(num_classes=10, **dict(other, offset_scale=1.0))
    with pytest.raises(ValueError, match="offset_scale: 2.0 in the folder, 1.0 in the model"):
        internimage.load_classifier_weights(model, str(folder))

    os.remove(config_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(str(folder))
    assert set(load_file(str(folder))["state_dict"]) == set(fx["state_dict"])  # weights alone still read

    (folder / hub.SAFETENSORS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_file(str(folder))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face hub folder"):
        load_file(str(empty))
    shutil.copy(DATA / "hub" / "SOURCE.md", empty / "README.md")
    (empty / hub.CONFIG_NAME).write_text(json.dumps(good))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        from_pretrained(str(empty))


def test_foreign_safetensors_and_non_classifiers_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_safetensors({"encoder.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="keys should start with 'model.'"):
        load_file(str(path))
    backbone = {k: v for k, v in to_state_dict(fixture("tiny_t_style")["state_dict"]).items()
                if not k.startswith(("head.", "conv_head."))}
    with pytest.raises(ValueError, match="not an InternImage classifier"):
        hub.infer_model_kwargs(backbone)
