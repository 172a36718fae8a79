"""Deployment: ONNX (DCNv3 in standard operators), ``torch.export`` programs and AOTInductor
packages of InternImage classifiers, backbones and UperNet segmentors, with parity checks.

``tools/export.py`` is the command line; the same steps from Python::

    from internimage.deploy import build_from_variant, capture, export_onnx, verify_onnx, random_inputs

    target = build_from_variant("t", "internimage_t_1k_224.pth")
    program = capture(target.module, random_inputs(target.input_size, [2])["random b2"], dynamic_batch=True)
    export_onnx(program, "t.onnx", ["logits"])
    verify_onnx("t.onnx", target.module, random_inputs(target.input_size, [1, 3]), ["logits"])

Needs the deploy extras (onnx, onnxruntime, onnxscript) for ONNX; ``export`` and ``aoti``
need only torch.
"""
from .export import (
    DEFAULT_TOLERANCE,
    INPUT_NAME,
    Comparison,
    VerificationError,
    capture,
    check_onnx,
    compile_aoti,
    export_onnx,
    onnx_operator_report,
    op_library_path,
    output_names_of,
    random_inputs,
    run_package_in_subprocess,
    save_program,
    verify_onnx,
    verify_package,
)
from .models import ExportTarget, build_from_config, build_from_variant

__all__ = ["DEFAULT_TOLERANCE", "INPUT_NAME", "Comparison", "VerificationError", "ExportTarget", "build_from_config",
           "build_from_variant", "capture", "check_onnx", "compile_aoti", "export_onnx", "onnx_operator_report",
           "op_library_path", "output_names_of", "random_inputs", "run_package_in_subprocess", "save_program",
           "verify_onnx", "verify_package"]
