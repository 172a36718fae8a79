"""Export InternImage models to ONNX, ``torch.export`` programs and AOTInductor packages,
and check the results against PyTorch.

All three start from one ``torch.export`` capture (:func:`capture`), whose graph holds the
compiled operator ``ops_dcnv3::dcnv3_forward`` as one node:

* ``onnx``: translated by ``torch.onnx.export(dynamo=True)`` with
  :func:`ops_dcnv3.onnx.translation_table`, so DCNv3 becomes standard operators
  (``GridSample`` and friends) and the file runs in stock onnxruntime / OpenVINO; or, with
  ``custom_op=True``, one ``ops_dcnv3.DCNv3`` node for runtimes with a plugin;
* ``export``: the ``ExportedProgram`` itself (``torch.export.save``);
* ``aoti``: an AOTInductor package (``torch._inductor.aoti_compile_and_package``). The
  compiled code calls the operator through the dispatcher, so the operator library
  (``ops_dcnv3/_C*.so``) must be loaded before the package runs, in Python
  (``torch.ops.load_library(path)``) as in C++ (``dlopen(path, RTLD_NOW | RTLD_GLOBAL)``
  before creating ``torch::inductor::AOTIModelPackageLoader``, or link the executable
  against it with ``-Wl,--no-as-needed`` so its static registrations run).

Checks (:func:`verify_onnx`, :func:`verify_package`): outputs against the eager PyTorch model
on the same inputs, reported as the largest absolute difference and that difference
relative to the largest reference magnitude of the output (an element-wise relative error
is meaningless where logits cross zero); above ``tolerance`` (1e-4) is a failure.
"""
import collections
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

from ..engine.fileio import TMP_MARK

__all__ = ["Comparison", "VerificationError", "capture", "export_onnx", "save_program", "compile_aoti",
           "check_onnx", "onnx_operator_report", "verify_onnx", "verify_package", "run_package_in_subprocess",
           "random_inputs", "output_names_of", "DEFAULT_TOLERANCE", "INPUT_NAME", "op_library_path"]

INPUT_NAME = "image"
DEFAULT_TOLERANCE = 1e-4
MAX_BATCH = 1024
# ONNX files hold at most 2 GiB in one protobuf; bigger models keep their weights beside the file.
_PROTOBUF_LIMIT = 2 ** 31 - 2 ** 26
_RUN_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_package.py")


class VerificationError(RuntimeError):
    """An exported file disagrees with PyTorch beyond the tolerance, or fails its checks."""


@dataclass
class Comparison:
    """One output of one input batch: exported file against eager PyTorch."""

    input_name: str
    output_name: str
    max_abs: float
    max_rel: float
    ok: bool

    def __str__(self):
        return (f"{self.input_name:>14s} {self.output_name:>12s}: max abs error {self.max_abs:.3e}, "
                f"relative {self.max_rel:.3e} {'ok' if self.ok else 'FAILED'}")


def _log(message: str, level=logging.INFO):
    print_log(message, logger="current", level=level)


def _write_atomically(path: str, write) -> str:
    """``write(temporary_path)`` in ``path``'s folder, then rename: an export that fails or is
    interrupted leaves no partial file under ``path`` (an older file stays as it was)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Not mkstemp: the writer creates the file, with the usual permissions (mkstemp's are 0o600).
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}{os.path.splitext(path)[1]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _log(f"Wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
    return path


def op_library_path() -> str:
    """The compiled DCNv3 operator library a deployment must load (``ops_dcnv3/_C*.so``)."""
    from ops_dcnv3 import _C

    return os.path.abspath(_C.__file__)


def random_inputs(input_size: Tuple[int, int], batches: Sequence[int], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Seeded standard-normal image batches (the scale of normalised images), one per batch size."""
    generator = torch.Generator().manual_seed(seed)
    height, width = input_size
    return {f"random b{b}": torch.randn(b, 3, height, width, generator=generator) for b in batches}


def _as_list(output) -> List[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def output_names_of(module: nn.Module, example: torch.Tensor, names: Optional[List[str]]) -> List[str]:
    """``names``, or ``feat0..`` for as many outputs as ``module`` returns."""
    if names is not None:
        return list(names)
    with torch.no_grad():
        return [f"feat{i}" for i in range(len(_as_list(module(example))))]


def capture(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module(example)`` in eval mode and without autograd.

    With ``dynamic_batch`` the batch is a symbol (1 to ``MAX_BATCH``); a batch-1 example is
    repeated to 2 first, since ``torch.export`` specialises a size of 1. Failures raise
    ``ValueError`` with the exporter's first message and what to try.
    """
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    module.eval()
    _log(f"Capturing the model with torch.export (input {tuple(example.shape)}"
         f"{', dynamic batch' if dynamic_batch else ''})")
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:  # the exporter raises many types; the user needs the first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"torch.export could not capture {type(module).__name__} as one graph: {first}. "
                         "Models with data-dependent control flow (detection heads, sliding-window "
                         "inference) cannot be exported; try --features for the backbone") from error


def export_onnx(program: torch.export.ExportedProgram, path: str, output_names: Sequence[str],
                opset: Optional[int] = None, custom_op: bool = False) -> str:
    """Translate a captured program to ONNX at ``path``; returns ``path``.

    DCNv3 is written in standard operators (``custom_op=False``), or as the plugin node
    ``ops_dcnv3.DCNv3``. ``opset`` defaults to the exporter's (20 in torch 2.14); 18 is the
    lowest it translates to. Weights go beside the file (``PATH.data``) only for models over
    the 2 GiB protobuf limit (H, G).
    """
    from ops_dcnv3.onnx import translation_table

    _log(f"Translating to ONNX (opset {opset or 'default'}, DCNv3 as "
         f"{'the custom node ops_dcnv3.DCNv3' if custom_op else 'standard operators'})")
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=translation_table(custom_op),
                                     opset_version=opset, input_names=[INPUT_NAME], output_names=list(output_names),
                                     optimize=True, verbose=False)
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    if weight_bytes > _PROTOBUF_LIMIT:  # the weights file is named after the model file: write in place
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        onnx_program.save(path, external_data=True)
        _log(f"Wrote {path} and its weights {path}.data ({weight_bytes / 2 ** 30:.1f} GiB)")
        return path
    return _write_atomically(path, lambda tmp: onnx_program.save(tmp, external_data=False))


def save_program(program: torch.export.ExportedProgram, path: str) -> str:
    """``torch.export.save`` to ``path`` (load with ``torch.export.load`` after loading the op library)."""
    return _write_atomically(path, lambda tmp: torch.export.save(program, tmp))


def compile_aoti(program: torch.export.ExportedProgram, path: str, inductor_configs: Optional[dict] = None) -> str:
    """Compile ``program`` with AOTInductor into the package ``path`` (``.pt2``).

    Minutes for InternImage-T on a few cores (C++ compilation of every fused kernel).
    """
    from torch._inductor import aoti_compile_and_package

    if not path.endswith(".pt2"):
        raise ValueError(f"an AOTInductor package must be named *.pt2, got {path}")
    _log("Compiling with AOTInductor (C++ compilation: this takes a while)")
    return _write_atomically(path, lambda tmp: aoti_compile_and_package(
        program, package_path=tmp, inductor_configs=dict(inductor_configs or {})))


def onnx_operator_report(model) -> Dict[str, object]:
    """Opset imports and node counts by ``domain::op_type`` (main graph, subgraphs and functions)."""
    counts = collections.Counter()

    def visit(nodes):
        for node in nodes:
            counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
            for attribute in node.attribute:
                if attribute.g is not None and attribute.g.node:
                    visit(attribute.g.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return dict(opsets={imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
                ops=dict(sorted(counts.items())))


def check_onnx(path: str, custom_op: bool = False) -> Dict[str, object]:
    """``onnx.checker`` (with shape inference) on the file, and its operator report.

    Without ``custom_op`` a node outside the standard domains (``ai.onnx``, ``ai.onnx.ml``)
    is an error: the file would not run in a stock runtime.
    """
    import onnx

    try:
        onnx.checker.check_model(path, full_check=not custom_op)
    except onnx.checker.ValidationError as error:
        raise VerificationError(f"onnx.checker rejects {path}: {error}") from error
    report = onnx_operator_report(onnx.load(path, load_external_data=False))
    foreign = [op for op in report["ops"] if op.split("::")[0] not in ("ai.onnx", "ai.onnx.ml")]
    if foreign and not custom_op:
        raise VerificationError(f"{path} uses operators outside the standard ONNX domains: {foreign}")
    return report


def _compare(input_name: str, names: Sequence[str], reference: List[torch.Tensor], got: List,
             tolerance: float) -> List[Comparison]:
    if len(got) != len(reference):
        raise VerificationError(f"{input_name}: the exported model returns {len(got)} outputs, PyTorch "
                                f"{len(reference)}")
    results = []
    for name, ref, out in zip(names, reference, got):
        out = torch.as_tensor(out)
        if tuple(out.shape) != tuple(ref.shape):
            raise VerificationError(f"{input_name} {name}: exported output has shape {tuple(out.shape)}, "
                                    f"PyTorch {tuple(ref.shape)}")
        ref64, out64 = ref.double(), out.double()
        max_abs = (out64 - ref64).abs().max().item() if ref.numel() else 0.0
        scale = ref64.abs().max().item() if ref.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        ok = bool(torch.isfinite(out64).all()) and max_rel <= tolerance
        results.append(Comparison(input_name, name, max_abs, max_rel, ok))
    return results


def _reference(module: nn.Module, inputs: Dict[str, torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
    module.eval()
    with torch.no_grad():
        return {name: [t.detach().float() for t in _as_list(module(x))] for name, x in inputs.items()}


def _finish(results: List[Comparison], what: str, tolerance: float) -> List[Comparison]:
    for result in results:
        _log(f"{what} vs PyTorch, {result}")
    failed = [r for r in results if not r.ok]
    if failed:
        raise VerificationError(f"{what} disagrees with PyTorch beyond relative error {tolerance:g}: "
                                + "; ".join(str(r).strip() for r in failed))
    return results


def verify_onnx(path: str, module: nn.Module, inputs: Dict[str, torch.Tensor], output_names: Sequence[str],
                tolerance: float = DEFAULT_TOLERANCE, threads: Optional[int] = None) -> List[Comparison]:
    """Run ``path`` in onnxruntime (CPU provider) on ``inputs`` and compare with ``module``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    reference = _reference(module, inputs)
    results = []
    for name, x in inputs.items():
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        results += _compare(name, output_names, reference[name], got, tolerance)
    return _finish(results, f"onnxruntime {ort.__version__} ({os.path.basename(path)})", tolerance)


def run_package_in_subprocess(kind: str, path: str, inputs: Sequence[torch.Tensor],
                              timeout: Optional[float] = None) -> List[List[torch.Tensor]]:
    """Run a ``.pt2`` file (``kind`` 'aoti' or 'export') in a fresh interpreter that loads only
    torch and the operator library (:mod:`internimage.deploy.run_package`); returns the
    outputs of each input batch."""
    with tempfile.TemporaryDirectory(prefix="internimage-export-") as tmp:
        inputs_path, outputs_path = os.path.join(tmp, "inputs.pt"), os.path.join(tmp, "outputs.pt")
        torch.save(list(inputs), inputs_path)
        command = [sys.executable, _RUN_PACKAGE, kind, os.path.abspath(path), inputs_path, outputs_path,
                   "--op-library", op_library_path()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise VerificationError(f"running {path} in a fresh process failed (exit {done.returncode}):\n"
                                    f"{done.stderr.strip()[-3000:]}")
        return torch.load(outputs_path, weights_only=True)


def verify_package(kind: str, path: str, module: nn.Module, inputs: Dict[str, torch.Tensor],
                   output_names: Sequence[str], tolerance: float = DEFAULT_TOLERANCE) -> List[Comparison]:
    """Load ``path`` in a fresh process (``torch.export.load`` or ``aoti_load_package`` after
    ``torch.ops.load_library``), run it on ``inputs`` and compare with ``module``."""
    reference = _reference(module, inputs)
    outputs = run_package_in_subprocess(kind, path, list(inputs.values()))
    results = []
    for (name, _), got in zip(inputs.items(), outputs):
        results += _compare(name, output_names, reference[name], got, tolerance)
    what = "AOTInductor package" if kind == "aoti" else "ExportedProgram"
    return _finish(results, f"{what} {os.path.basename(path)} (fresh process)", tolerance)
