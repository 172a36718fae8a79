"""Run an exported ``.pt2`` file on saved inputs, as a deployment would: in a fresh process,
with nothing of this project imported but the DCNv3 operator library.

    python internimage/deploy/run_package.py aoti|export PACKAGE INPUTS.pt OUTPUTS.pt --op-library ops_dcnv3/_C*.so

It is run by file path (not ``-m``), so that ``internimage`` is never imported: the point is
to show that loading the operator's shared library is all a package needs. The graph calls
``ops_dcnv3::dcnv3_forward``; ``torch.ops.load_library`` registers it with the dispatcher
(its ``TORCH_LIBRARY`` block), after which both ``torch._inductor.aoti_load_package`` and
``torch.export.load(...).module()`` run. INPUTS.pt holds a list of image batches;
OUTPUTS.pt receives, for each, the list of output tensors.
"""
import argparse

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["aoti", "export"])
    parser.add_argument("package")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--op-library", required=True, help="path of ops_dcnv3/_C*.so")
    args = parser.parse_args(argv)
    torch.ops.load_library(args.op_library)
    if args.kind == "aoti":
        model = torch._inductor.aoti_load_package(args.package)
    else:
        model = torch.export.load(args.package).module()
    results = []
    with torch.no_grad():
        for batch in torch.load(args.inputs, weights_only=True):
            out = model(batch)
            results.append([t.contiguous() for t in (out if isinstance(out, (list, tuple)) else [out])])
    torch.save(results, args.outputs)


if __name__ == "__main__":
    main()
