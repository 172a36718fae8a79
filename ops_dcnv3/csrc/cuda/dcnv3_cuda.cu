// CUDA kernels of the DCNv3 operator (forward and backward), same semantics and input
// checks as the CPU kernels (see cpu/dcnv3_cpu.cpp). float32/float64/float16/bfloat16
// inputs, float32 accumulation (float64 for float64), launched on the current stream.
//
// The kernels' per-thread bodies are __host__ __device__ functions in
// dcnv3_cuda_threads.cuh, which also describes the work split; a host harness runs them on
// the CPU in the tests. This file holds what only the GPU runs: the __global__ wrappers,
// the warp shuffles, and the host code that checks, allocates and launches.
//
// The backward accumulates with atomics, so its results vary in the last bits from run to
// run: it reports itself as non-deterministic (torch.use_deterministic_algorithms).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dcnv3.h"
#include "dcnv3_cuda_threads.cuh"

namespace ops_dcnv3 {
namespace {

using cuda_kernels::kThreads;
using cuda_kernels::Params;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                               const scalar_t* __restrict__ mask, scalar_t* __restrict__ output, Params p,
                               int64_t elements) {
  cuda_kernels::forward_thread<scalar_t>(blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                                         int64_t(blockDim.x) * gridDim.x, elements, input, offset, mask, output, p);
}

// The warp's lanes for backward_thread: sums over aligned segments with xor shuffles.
struct WarpShuffle {
  template <typename acc_t>
  __device__ __forceinline__ acc_t segment_sum(acc_t value, int width) const {
    for (int delta = width / 2; delta > 0; delta /= 2) value += __shfl_xor_sync(0xffffffffu, value, delta);
    return value;
  }
};

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                at::opmath_type<scalar_t>* __restrict__ grad_input,
                                at::opmath_type<scalar_t>* __restrict__ grad_offset,
                                at::opmath_type<scalar_t>* __restrict__ grad_mask, Params p, int64_t elements,
                                bool warp_reduce) {
  WarpShuffle lanes;
  cuda_kernels::backward_thread<scalar_t>(blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                                          int64_t(blockDim.x) * gridDim.x, elements, grad_output, input, offset,
                                          mask, grad_input, grad_offset, grad_mask, p, warp_reduce, lanes);
}

// At most 32 blocks per multiprocessor; the grid-stride loops cover the rest.
int blocks_for(int64_t elements) {
  return cuda_kernels::launch_blocks(
      elements, int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
}

at::Tensor dcnv3_forward_cuda(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                              int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                              int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                              int64_t group_channels, double offset_scale, bool remove_center, bool softmax) {
  const Geometry geo = check_dcnv3_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                        dilation_h, dilation_w, group, group_channels, remove_center);
  TORCH_CHECK(input_.is_cuda(), "dcnv3_forward_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  at::Tensor output = at::empty({geo.batch, geo.height_out, geo.width_out, geo.channels}, input.options());
  const int64_t elements = output.numel();
  if (elements == 0) return output;
  const Params p = cuda_kernels::make_params(geo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                             dilation_w, group, group_channels, offset_scale, remove_center, softmax);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
        output.mutable_data_ptr<scalar_t>(), p, elements);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center, bool softmax) {
  const Geometry geo = check_dcnv3_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                        dilation_h, dilation_w, group, group_channels, remove_center);
  TORCH_CHECK(input_.is_cuda() && grad_output_.device() == input_.device(),
              "dcnv3_backward_cuda: tensors must be on the same CUDA device");
  const std::vector<int64_t> out_shape{geo.batch, geo.height_out, geo.width_out, geo.channels};
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef(out_shape), "dcnv3: grad_output must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_output_.sizes());
  TORCH_CHECK(grad_output_.scalar_type() == input_.scalar_type(), "dcnv3: grad_output must have dtype ",
              input_.scalar_type(), ", got ", grad_output_.scalar_type());
  // Atomic adds in an order that varies between runs: torch.use_deterministic_algorithms(True)
  // makes this an error (a warning with warn_only=True).
  at::globalContext().alertNotDeterministic("dcnv3_backward_cuda");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous(), input = input_.contiguous(),
                   offset = offset_.contiguous(), mask = mask_.contiguous();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor grad_input = at::zeros(input.sizes(), acc_options);
  at::Tensor grad_offset = at::zeros(offset.sizes(), acc_options);
  at::Tensor grad_mask = at::zeros(mask.sizes(), acc_options);
  const int64_t elements = grad_output.numel();
  if (elements > 0) {
    const Params p = cuda_kernels::make_params(geo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                               dilation_w, group, group_channels, offset_scale, remove_center,
                                               softmax);
    const bool warp_reduce = cuda_kernels::warp_reduce_fits(group_channels);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t><<<blocks_for(elements), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<acc_t>(),
          grad_offset.mutable_data_ptr<acc_t>(), grad_mask.mutable_data_ptr<acc_t>(), p, elements, warp_reduce);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The kernel gave d(weights); through the softmax to d(logits).
  if (softmax) grad_mask = cuda_kernels::softmax_backward(mask, grad_mask, geo.points);
  return {grad_input.to(input.scalar_type()), grad_offset.to(input.scalar_type()),
          grad_mask.to(input.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dcnv3, CUDA, m) {
  m.impl("dcnv3_forward", &dcnv3_forward_cuda);
  m.impl("dcnv3_backward", &dcnv3_backward_cuda);
}

}  // namespace ops_dcnv3
