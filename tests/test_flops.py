"""tools/get_flops.py reproduces the official parameter counts and FLOPs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from internimage.checkpoint.flops import classifier_complexity

REPO = Path(__file__).resolve().parents[1]
# Official parameter counts (the official models' state dicts, tests/data/official) and FLOPs by the
# official counting rule: per-module MACs plus 5*H*W*9*C for each DCNv3 core (the published figures).
OFFICIAL = {"t": (224, 29_918_424, 5.00e9), "s": (224, 50_079_880, 8.46e9), "b": (224, 97_461_832, 16.40e9),
            "l": (384, 223_334_810, 108.85e9), "xl": (384, 334_819_780, 164.24e9)}


@pytest.mark.parametrize("variant", ["s", "b", "l", "xl"])
def test_variant_complexity(variant):
    size, params, flops = OFFICIAL[variant]
    got_params, got_flops = classifier_complexity(variant, size, size)
    assert got_params == params
    assert abs(got_flops - flops) / flops < 0.01


def test_get_flops_cli_json():
    out = subprocess.run([sys.executable, "tools/get_flops.py", "--variant", "t", "--shape", "224", "--json"],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    size, params, flops = OFFICIAL["t"]
    assert isinstance(result["params"], int) and isinstance(result["flops"], int)
    assert result["params"] == params
    assert abs(result["flops"] - flops) / flops < 0.01
