// Schema of the DCNv3 operator (and of the fused offset/mask branch of its module). Kernels live in one file per dispatch key
// (cpu/dcnv3_cpu.cpp, cuda/dcnv3_cuda.cu); autograd and fake kernels are
// registered from Python (ops_dcnv3/functions.py). With softmax=True the mask holds
// logits that the kernels normalise over the P points of each group (fused softmax);
// dcnv3_backward then returns the gradient with respect to those logits.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import ops_dcnv3._C` only needs to load this library so that the
// TORCH_LIBRARY blocks below run; it defines no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ops_dcnv3, m) {
  m.def(
      "dcnv3_forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int group, int group_channels, float offset_scale, bool remove_center, bool softmax=False) -> Tensor");
  m.def(
      "dcnv3_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int kernel_h, "
      "int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, "
      "int dilation_w, int group, int group_channels, float offset_scale, bool remove_center, "
      "bool softmax=False) -> (Tensor, Tensor, Tensor)");
  // The offset/mask branch of a DCNv3 block at inference, fused (CPU, float32, no autograd):
  // gelu(layer_norm(depthwise_conv(input))) on channels-last (N, H, W, C) tensors; weight is
  // the convolution's (C, 1, k, k) for an odd k, padded to keep the size (cpu/block_inference_cpu.cpp).
  m.def(
      "dw_conv_ln_gelu(Tensor input, Tensor weight, Tensor? bias, Tensor norm_weight, Tensor norm_bias, "
      "float eps) -> Tensor");
  // x <- residual + scale * x in place, returns layer_norm(x) over the last dim: a block's
  // residual sum and its next norm at inference (CPU, float32, no autograd; scale: the
  // branch's layer scale or None).
  m.def(
      "add_layer_norm_(Tensor(a!) x, Tensor residual, Tensor? scale, Tensor norm_weight, Tensor norm_bias, "
      "float eps) -> Tensor");
}
