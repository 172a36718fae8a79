// CUDA kernels of the DCNv3 operator (forward and backward), same semantics and input
// checks as the CPU kernels (see cpu/dcnv3_cpu.cpp). float32/float64/float16/bfloat16
// inputs, float32 accumulation (float64 for float64), launched on the current stream.
//
// One thread per output element (n, ho, wo, g, c): channels are the fastest index, so a
// warp reads contiguous channels of the same sampling corners, and the offsets and masks
// of a group are broadcast to its threads. The backward accumulates grad_input with
// atomics into a float32 (float64) buffer; grad_offset and grad_mask, sums over the
// channels of a group, are reduced with warp shuffles when the channels of a group fill
// an aligned part of a warp (group_channels a power of two up to 32) and with atomics
// otherwise. With softmax=True the mask holds logits: the forward normalises them per
// thread, the backward kernel gives the gradient of the weights and ATen takes it through
// the softmax. A sampling location that is not finite makes its (pixel, group) output NaN
// and its offset and mask gradients NaN, as on the CPU.
//
// Positions inside an image are indexed with int: make_params checks that every size
// and the products formed from them fit (element counts across the batch are int64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../dcnv3.h"

namespace ops_dcnv3 {
namespace {

constexpr int kThreads = 256;

struct Params {
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int group, group_channels, points;
  int height_in, width_in, height_out, width_out;
  float offset_scale;
  bool remove_center;
  bool softmax;  // the mask holds logits, normalised over the P points of each group
};

// Largest logit and the softmax denominator of one (pixel, group), or (0, 1) without softmax.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_stats(const Params& p, const scalar_t* mask, acc_t& largest, acc_t& total) {
  largest = 0;
  total = 1;
  if (!p.softmax) return;
  largest = acc_t(mask[0]);
  for (int k = 1; k < p.points; ++k) largest = max(largest, acc_t(mask[k]));
  total = 0;
  for (int k = 0; k < p.points; ++k) total += exp(acc_t(mask[k]) - largest);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sampling_weight(const Params& p, const scalar_t* mask, int k, acc_t largest,
                                                 acc_t total) {
  return p.softmax ? exp(acc_t(mask[k]) - largest) / total : acc_t(mask[k]);
}

// Kernel point k -> its position (i along x, j along y) on the regular grid.
__device__ __forceinline__ void point_position(const Params& p, int k, int& i, int& j) {
  if (p.remove_center && k >= (p.kernel_w / 2) * p.kernel_h + p.kernel_h / 2) ++k;
  i = k / p.kernel_h;
  j = k % p.kernel_h;
}

template <typename acc_t>
struct Corners {
  int pixel[4];  // y * W + x, or -1 outside the image
  acc_t weight[4];
  acc_t lx, ly, hx, hy;
};

template <typename acc_t>
__device__ __forceinline__ bool finite(acc_t x, acc_t y) {
  return isfinite(x) && isfinite(y);
}

// False when the location reads no pixel: outside (-1, W) x (-1, H) or not finite (NaN
// fails the test).
template <typename acc_t>
__device__ __forceinline__ bool locate(acc_t x, acc_t y, int height, int width, Corners<acc_t>& c) {
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < acc_t(width) && y < acc_t(height))) return false;
  const acc_t xf = floor(x), yf = floor(y);
  const int x0 = static_cast<int>(xf), y0 = static_cast<int>(yf);
  c.lx = x - xf;
  c.ly = y - yf;
  c.hx = acc_t(1) - c.lx;
  c.hy = acc_t(1) - c.ly;
  c.weight[0] = c.hy * c.hx;
  c.weight[1] = c.hy * c.lx;
  c.weight[2] = c.ly * c.hx;
  c.weight[3] = c.ly * c.lx;
  const bool top = y0 >= 0, bottom = y0 + 1 < height, left = x0 >= 0, right = x0 + 1 < width;
  c.pixel[0] = top && left ? y0 * width + x0 : -1;
  c.pixel[1] = top && right ? y0 * width + x0 + 1 : -1;
  c.pixel[2] = bottom && left ? (y0 + 1) * width + x0 : -1;
  c.pixel[3] = bottom && right ? (y0 + 1) * width + x0 + 1 : -1;
  return true;
}

template <typename acc_t>
__device__ __forceinline__ void sampling_location(const Params& p, int ho, int wo, int k, acc_t dx, acc_t dy,
                                                  acc_t& x, acc_t& y) {
  int i, j;
  point_position(p, k, i, j);
  const int half_w = (p.dilation_w * (p.kernel_w - 1)) / 2, half_h = (p.dilation_h * (p.kernel_h - 1)) / 2;
  x = acc_t(wo * p.stride_w - p.pad_w + half_w) + (acc_t(i * p.dilation_w - half_w) + dx) * acc_t(p.offset_scale);
  y = acc_t(ho * p.stride_h - p.pad_h + half_h) + (acc_t(j * p.dilation_h - half_h) + dy) * acc_t(p.offset_scale);
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                               const scalar_t* __restrict__ mask, scalar_t* __restrict__ output, Params p,
                               int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int channels = p.group * p.group_channels;
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int c = index % p.group_channels;
    const int g = (index / p.group_channels) % p.group;
    const int64_t pixel = index / channels;  // n * Ho * Wo + ho * Wo + wo
    const int wo = pixel % p.width_out, ho = (pixel / p.width_out) % p.height_out;
    const int64_t n = pixel / (int64_t(p.width_out) * p.height_out);
    const scalar_t* image = input + n * p.height_in * p.width_in * channels + g * p.group_channels + c;
    const scalar_t* off = offset + (pixel * p.group + g) * p.points * 2;
    const scalar_t* msk = mask + (pixel * p.group + g) * p.points;
    acc_t acc = 0, largest, total;
    softmax_stats(p, msk, largest, total);
    for (int k = 0; k < p.points; ++k) {
      acc_t x, y;
      sampling_location<acc_t>(p, ho, wo, k, acc_t(off[2 * k]), acc_t(off[2 * k + 1]), x, y);
      Corners<acc_t> corners;
      if (!locate(x, y, p.height_in, p.width_in, corners)) {
        if (!finite(x, y)) acc = acc_t(NAN);  // and stays NaN
        continue;
      }
      acc_t value = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (corners.pixel[q] >= 0) value += corners.weight[q] * acc_t(image[int64_t(corners.pixel[q]) * channels]);
      }
      acc += sampling_weight(p, msk, k, largest, total) * value;
    }
    output[index] = scalar_t(acc);
  }
}

// Sum of `value` over the `width` lanes of this thread's aligned segment of the warp.
template <typename acc_t>
__device__ __forceinline__ acc_t segment_sum(acc_t value, int width) {
  for (int delta = width / 2; delta > 0; delta /= 2) value += __shfl_xor_sync(0xffffffffu, value, delta);
  return value;
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                at::opmath_type<scalar_t>* __restrict__ grad_input,
                                at::opmath_type<scalar_t>* __restrict__ grad_offset,
                                at::opmath_type<scalar_t>* __restrict__ grad_mask, Params p, int64_t total,
                                bool warp_reduce) {
  using acc_t = at::opmath_type<scalar_t>;
  const int channels = p.group * p.group_channels;
  // Every thread of a warp runs the same number of iterations (shuffles need them all).
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  const int64_t rounds = (total + stride - 1) / stride;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t index = round * stride + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    const bool active = index < total;
    const int64_t safe = active ? index : 0;
    const int c = safe % p.group_channels;
    const int g = (safe / p.group_channels) % p.group;
    const int64_t pixel = safe / channels;
    const int wo = pixel % p.width_out, ho = (pixel / p.width_out) % p.height_out;
    const int64_t n = pixel / (int64_t(p.width_out) * p.height_out);
    const int64_t image_base = n * p.height_in * p.width_in * channels + g * p.group_channels + c;
    const scalar_t* off = offset + (pixel * p.group + g) * p.points * 2;
    const scalar_t* msk = mask + (pixel * p.group + g) * p.points;
    const acc_t go = active ? acc_t(grad_output[safe]) : acc_t(0);
    acc_t largest, total;
    softmax_stats(p, msk, largest, total);
    for (int k = 0; k < p.points; ++k) {
      acc_t x, y;
      sampling_location<acc_t>(p, ho, wo, k, acc_t(off[2 * k]), acc_t(off[2 * k + 1]), x, y);
      Corners<acc_t> corners;
      const bool inside = locate(x, y, p.height_in, p.width_in, corners);  // same for the whole group
      acc_t d[4] = {0, 0, 0, 0};
      const acc_t m = sampling_weight(p, msk, k, largest, total);
      if (inside && active) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (corners.pixel[q] < 0) continue;
          const int64_t at = image_base + int64_t(corners.pixel[q]) * channels;
          d[q] = go * acc_t(input[at]);
          gpuAtomicAdd(grad_input + at, m * corners.weight[q] * go);
        }
      }
      // A non-finite location has NaN gradients (the same for the whole group).
      const bool poisoned = !inside && !finite(x, y);
      acc_t gm = poisoned ? acc_t(NAN) : acc_t(0), gx = gm, gy = gm;
      if (inside) {
        gm = corners.weight[0] * d[0] + corners.weight[1] * d[1] + corners.weight[2] * d[2] +
             corners.weight[3] * d[3];
        gx = m * (corners.hy * (d[1] - d[0]) + corners.ly * (d[3] - d[2])) * acc_t(p.offset_scale);
        gy = m * (corners.hx * (d[2] - d[0]) + corners.lx * (d[3] - d[1])) * acc_t(p.offset_scale);
      }
      const int64_t slot = (pixel * p.group + g) * p.points + k;
      if (warp_reduce) {
        gm = segment_sum(gm, p.group_channels);
        gx = segment_sum(gx, p.group_channels);
        gy = segment_sum(gy, p.group_channels);
        if (active && c == 0) {
          grad_mask[slot] = gm;
          grad_offset[2 * slot] = gx;
          grad_offset[2 * slot + 1] = gy;
        }
      } else if (active && (inside || poisoned)) {
        gpuAtomicAdd(grad_mask + slot, gm);
        gpuAtomicAdd(grad_offset + 2 * slot, gx);
        gpuAtomicAdd(grad_offset + 2 * slot + 1, gy);
      }
    }
  }
}

int narrow(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), "dcnv3: ", what, " = ", value,
              " is too large for the CUDA kernels, which index with int32 (at most ",
              std::numeric_limits<int>::max(), ")");
  return static_cast<int>(value);
}

Params make_params(const Geometry& geo, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                   int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                   int64_t group_channels, double offset_scale, bool remove_center, bool softmax) {
  // Besides the arguments, the kernels form y * W + x (< H * W), wo * stride - pad + half
  // (|.| < W + 2 * pad), i * dilation (<= dilation * (kernel - 1)), 2 * k (< 2 * P) and
  // channels in int; check_dcnv3_args has checked these against int64 already.
  narrow(geo.height_in * geo.width_in, "H * W");
  narrow(geo.height_in + 2 * pad_h, "H + 2 * pad_h");
  narrow(geo.width_in + 2 * pad_w, "W + 2 * pad_w");
  narrow(dilation_h * (kernel_h - 1), "dilation_h * (kernel_h - 1)");
  narrow(dilation_w * (kernel_w - 1), "dilation_w * (kernel_w - 1)");
  narrow(2 * geo.points, "2 * P");
  narrow(geo.channels, "channels");
  Params p;
  p.kernel_h = narrow(kernel_h, "kernel_h"), p.kernel_w = narrow(kernel_w, "kernel_w");
  p.stride_h = narrow(stride_h, "stride_h"), p.stride_w = narrow(stride_w, "stride_w");
  p.pad_h = narrow(pad_h, "pad_h"), p.pad_w = narrow(pad_w, "pad_w");
  p.dilation_h = narrow(dilation_h, "dilation_h"), p.dilation_w = narrow(dilation_w, "dilation_w");
  p.group = narrow(group, "group"), p.group_channels = narrow(group_channels, "group_channels");
  p.points = narrow(geo.points, "P");
  p.height_in = narrow(geo.height_in, "H"), p.width_in = narrow(geo.width_in, "W");
  p.height_out = narrow(geo.height_out, "Ho"), p.width_out = narrow(geo.width_out, "Wo");
  p.offset_scale = static_cast<float>(offset_scale);
  p.remove_center = remove_center;
  p.softmax = softmax;
  return p;
}

int blocks_for(int64_t total) {
  const int64_t needed = (total + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
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
  const int64_t total = output.numel();
  if (total == 0) return output;
  const Params p = make_params(geo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                               group, group_channels, offset_scale, remove_center, softmax);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
        output.mutable_data_ptr<scalar_t>(), p, total);
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
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous(), input = input_.contiguous(),
                   offset = offset_.contiguous(), mask = mask_.contiguous();
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor grad_input = at::zeros(input.sizes(), acc_options);
  at::Tensor grad_offset = at::zeros(offset.sizes(), acc_options);
  at::Tensor grad_mask = at::zeros(mask.sizes(), acc_options);
  const int64_t total = grad_output.numel();
  if (total > 0) {
    const Params p = make_params(geo, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                                 group, group_channels, offset_scale, remove_center, softmax);
    const bool warp_reduce = group_channels <= 32 && (group_channels & (group_channels - 1)) == 0;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          offset.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<acc_t>(),
          grad_offset.mutable_data_ptr<acc_t>(), grad_mask.mutable_data_ptr<acc_t>(), p, total, warp_reduce);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (softmax) {  // the kernel gave d(weights); through the softmax to d(logits)
    const auto logits = mask.to(acc_options.dtype()).view({-1, geo.points});
    const auto weights = at::softmax(logits, -1);
    const auto grad_weights = grad_mask.view({-1, geo.points});
    grad_mask = (weights * (grad_weights - (weights * grad_weights).sum(-1, true))).view(mask.sizes());
  }
  return {grad_input.to(input.scalar_type()), grad_offset.to(input.scalar_type()),
          grad_mask.to(input.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dcnv3, CUDA, m) {
  m.impl("dcnv3_forward", &dcnv3_forward_cuda);
  m.impl("dcnv3_backward", &dcnv3_backward_cuda);
}

}  // namespace ops_dcnv3
