"""DCNv3 operator: compiled CPU (and CUDA) kernels, Triton kernels for GPUs
(``ops_dcnv3.triton_ops``, imported on demand), a pure-PyTorch reference, and the module."""
from .functions import (
    cpu_isa,
    dcnv3,
    dcnv3_output_size,
    dcnv3_reference,
    get_backend,
    set_backend,
    set_cpu_isa,
    supported_cpu_isas,
)
from .modules import DCNv3, DCNv3_pytorch

__all__ = ["dcnv3", "dcnv3_reference", "dcnv3_output_size", "set_backend", "get_backend", "cpu_isa", "set_cpu_isa",
           "supported_cpu_isas", "DCNv3", "DCNv3_pytorch"]
