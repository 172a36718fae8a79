"""The README's `make demo`: a first check that the stack works on this machine.

Builds InternImage-T (the released architecture, random weights) with the compiled
DCNv3 operator, runs one 224x224 image through the classifier and the detection
backbone on the CPU, and prints the output shapes, the time and the model size, and
the agreement with the same model on the pure-PyTorch reference core.
"""
import time

import torch

from internimage import InternImage, build_model
from internimage.variants import backbone_config


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"DCNv3 kernels: {torch.ops.ops_dcnv3.dcnv3_forward.default}")
    image = torch.rand(1, 3, 224, 224)

    classifier = build_model("internimage_t").eval()
    params = sum(p.numel() for p in classifier.parameters())
    with torch.inference_mode():
        classifier(image)  # warm-up
        start = time.perf_counter()
        logits = classifier(image)
        elapsed = time.perf_counter() - start
    print(f"InternImage-T classifier: {params / 1e6:.2f}M parameters, logits {tuple(logits.shape)}, "
          f"{elapsed * 1e3:.0f} ms per 224x224 image")

    backbone = InternImage(**backbone_config("t")).eval()
    with torch.inference_mode():
        features = backbone(image)
    print("InternImage-T backbone features (NCHW): " + ", ".join(str(tuple(f.shape)) for f in features))

    reference = build_model("internimage_t", core_op="DCNv3_pytorch").eval()
    reference.load_state_dict(classifier.state_dict())
    with torch.inference_mode():
        start = time.perf_counter()
        reference_logits = reference(image)
        reference_elapsed = time.perf_counter() - start
    difference = (logits - reference_logits).abs().max().item()
    print(f"Same model on the pure-PyTorch reference core: {reference_elapsed * 1e3:.0f} ms, "
          f"max |logit difference| {difference:.2e}")
    if difference > 1e-3:
        raise SystemExit("the compiled DCNv3 kernels disagree with the reference: please report this")
    print("demo finished: the InternImage stack runs on this machine")

if __name__ == "__main__":
    main()
