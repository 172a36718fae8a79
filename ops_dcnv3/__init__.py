"""DCNv3 operator: compiled CPU (and CUDA) kernels, a pure-PyTorch reference, and the module."""
from .functions import dcnv3, dcnv3_output_size, dcnv3_reference
from .modules import DCNv3, DCNv3_pytorch

__all__ = ["dcnv3", "dcnv3_reference", "dcnv3_output_size", "DCNv3", "DCNv3_pytorch"]
