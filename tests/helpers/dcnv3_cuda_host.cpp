// Host harness of the DCNv3 CUDA kernels: runs their per-thread bodies
// (ops_dcnv3/csrc/cuda/dcnv3_cuda_threads.cuh, the functions that dcnv3_cuda.cu's
// __global__ wrappers call) on the CPU over an emulated launch grid, so that
// tests/test_dcnv3_cuda_host.py can compare the GPU path's arithmetic with the reference
// on a machine without a GPU. Compiled by g++ at test time (torch.utils.cpp_extension.load).
//
// Registers dcnv3_cuda_host::forward and dcnv3_cuda_host::backward, with the arguments of
// the op plus `max_blocks` (the grid is min(blocks needed, max_blocks) blocks of kThreads,
// as dcnv3_cuda.cu sizes it with max_blocks = 32 x the multiprocessors; a small value makes
// the grid-stride loops take several rounds) and, for the backward, `allow_warp_reduce`
// (false: the atomics path even where the shuffles fit).
//
// Threads run one at a time, so `accumulate`'s plain add stands for the atomics. The warp
// shuffles are emulated by EmulatedWarp below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "cuda/dcnv3_cuda_threads.cuh"

namespace {

using namespace ops_dcnv3;
using namespace ops_dcnv3::cuda_kernels;

// One warp of backward_thread, whose lanes run one after another from lane 31 down to
// lane 0. Each segment_sum call records the lane's value; the lowest lane of an aligned
// segment, the only one whose sum the kernel uses, runs after the other lanes of its
// segment, so it gets the sum the xor shuffles would give it, added in their order.
// Other lanes get NaN, so that a kernel that used their sums would fail the tests. It
// also checks what the full-mask shuffles need: every lane of the warp reaches every
// call, with the same width.
template <typename acc_t>
class EmulatedWarp {
 public:
  void start_lane(int lane) {
    lane_ = lane;
    call_ = 0;
  }

  acc_t segment_sum(acc_t value, int width) {
    TORCH_CHECK(width > 0 && width <= kWarpSize && (width & (width - 1)) == 0,
                "emulated warp: segment width ", width, " is not a power of two up to 32");
    if (call_ == calls_.size()) calls_.push_back(Call{width, 0, {}});
    Call& call = calls_[call_++];
    TORCH_CHECK(call.width == width, "emulated warp: lanes disagree on the width of shuffle ", call_ - 1);
    call.values[lane_] = value;
    ++call.lanes;
    if (lane_ % width != 0) return acc_t(NAN);
    std::array<acc_t, kWarpSize> sums{};
    for (int lane = lane_; lane < lane_ + width; ++lane) sums[lane - lane_] = call.values[lane];
    for (int delta = width / 2; delta > 0; delta /= 2) {  // value += __shfl_xor_sync(..., delta)
      std::array<acc_t, kWarpSize> next{};
      for (int lane = 0; lane < width; ++lane) next[lane] = sums[lane] + sums[lane ^ delta];
      sums = next;
    }
    return sums[0];
  }

  // After all 32 lanes ran: each shuffle was reached by all of them.
  void finish() const {
    for (size_t i = 0; i < calls_.size(); ++i) {
      TORCH_CHECK(calls_[i].lanes == kWarpSize, "emulated warp: shuffle ", i, " was reached by ", calls_[i].lanes,
                  " of ", kWarpSize, " lanes (a full-mask shuffle needs all of them)");
    }
  }

 private:
  struct Call {
    int width;
    int lanes;
    std::array<acc_t, kWarpSize> values;
  };
  std::vector<Call> calls_;
  size_t call_ = 0;
  int lane_ = 0;
};

at::Tensor forward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_, int64_t kernel_h,
                   int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                   int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                   double offset_scale, bool remove_center, bool softmax, int64_t max_blocks) {
  const Geometry geo = check_dcnv3_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                        dilation_h, dilation_w, group, group_channels, remove_center);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  at::Tensor output = at::empty({geo.batch, geo.height_out, geo.width_out, geo.channels}, input.options());
  const int64_t elements = output.numel();
  if (elements == 0) return output;
  const Params p = make_params(geo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                               group, group_channels, offset_scale, remove_center, softmax);
  const int64_t blocks = launch_blocks(elements, max_blocks), threads = blocks * kThreads;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv3_cuda_host_forward", [&] {
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t thread = 0; thread < kThreads; ++thread) {
        forward_thread<scalar_t>(block * kThreads + thread, threads, elements, input.const_data_ptr<scalar_t>(),
                                 offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
                                 output.mutable_data_ptr<scalar_t>(), p);
      }
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center, bool softmax, int64_t max_blocks, bool allow_warp_reduce) {
  const Geometry geo = check_dcnv3_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                        dilation_h, dilation_w, group, group_channels, remove_center);
  const at::Tensor grad_output = grad_output_.contiguous(), input = input_.contiguous(),
                   offset = offset_.contiguous(), mask = mask_.contiguous();
  at::Tensor grad_input = at::zeros_like(input), grad_offset = at::zeros_like(offset),
             grad_mask = at::zeros_like(mask);
  const int64_t elements = grad_output.numel();
  if (elements > 0) {
    const Params p = make_params(geo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                                 group, group_channels, offset_scale, remove_center, softmax);
    const bool warp_reduce = allow_warp_reduce && warp_reduce_fits(group_channels);
    const int64_t blocks = launch_blocks(elements, max_blocks), threads = blocks * kThreads;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnv3_cuda_host_backward", [&] {
      for (int64_t block = 0; block < blocks; ++block) {
        for (int64_t warp_start = 0; warp_start < kThreads; warp_start += kWarpSize) {
          EmulatedWarp<scalar_t> warp;
          for (int lane = kWarpSize - 1; lane >= 0; --lane) {
            warp.start_lane(lane);
            backward_thread<scalar_t>(block * kThreads + warp_start + lane, threads, elements,
                                      grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                      offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
                                      grad_input.mutable_data_ptr<scalar_t>(),
                                      grad_offset.mutable_data_ptr<scalar_t>(),
                                      grad_mask.mutable_data_ptr<scalar_t>(), p, warp_reduce, warp);
          }
          warp.finish();
        }
      }
    });
  }
  if (softmax) grad_mask = softmax_backward(mask, grad_mask, geo.points);
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY(dcnv3_cuda_host, m) {
  m.def(
      "forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, int stride_h, int stride_w, "
      "int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
      "bool remove_center, bool softmax, int max_blocks) -> Tensor",
      &forward);
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, bool remove_center, bool softmax, int max_blocks, "
      "bool allow_warp_reduce) -> (Tensor, Tensor, Tensor)",
      &backward);
}
