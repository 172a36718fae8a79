// Per-thread bodies of the DCNv3 CUDA kernels (forward and backward), the arithmetic they
// are made of, and the host-side set-up they share.
//
// The bodies are __host__ __device__ functions of the thread's global index: dcnv3_cuda.cu
// launches them from thin __global__ wrappers, and a host harness
// (tests/helpers/dcnv3_cuda_host.cpp, run by tests/test_dcnv3_cuda_host.py) runs the very
// same functions on the CPU over an emulated launch grid, so that the index arithmetic,
// sampling and gradient code of the GPU path are tested where there is no GPU. Only three
// things differ between the two: the __global__ wrappers (thread index from blockIdx and
// threadIdx), the warp shuffles (a `Lanes` object: shuffles on the device, an emulation of
// one warp on the host) and the atomics (`accumulate`: an atomic add on the device, a plain
// add on the host, where the emulated threads run one after another).
//
// One thread per output element (n, ho, wo, g, c): channels are the fastest index, so a
// warp reads contiguous channels of the same sampling corners, and the offsets and masks
// of a group are broadcast to its threads. The backward accumulates grad_input with
// atomics into a float32 (float64) buffer; grad_offset and grad_mask, sums over the
// channels of a group, are reduced with warp shuffles when the channels of a group fill
// an aligned part of a warp (group_channels a power of two up to 32) and with atomics
// otherwise. With softmax=True the mask holds logits: the forward normalises them per
// thread, the backward kernel gives the gradient of the weights and ATen takes it through
// the softmax (softmax_backward). A sampling location that is not finite makes its
// (pixel, group) output NaN and its offset and mask gradients NaN, as on the CPU.
//
// Positions inside an image are indexed with int: make_params checks that every size
// and the products formed from them fit (element counts across the batch are int64).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../dcnv3.h"

#ifdef __CUDACC__
#include <ATen/cuda/Atomic.cuh>
#define DCNV3_HOST_DEVICE __host__ __device__
#define DCNV3_FORCEINLINE __forceinline__
#define DCNV3_UNROLL _Pragma("unroll")
#else
#define DCNV3_HOST_DEVICE
#define DCNV3_FORCEINLINE inline
#define DCNV3_UNROLL
#endif

namespace ops_dcnv3 {
namespace cuda_kernels {

constexpr int kThreads = 256;  // threads per block, a multiple of the warp size
constexpr int kWarpSize = 32;

struct Params {
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int group, group_channels, points;
  int height_in, width_in, height_out, width_out;
  double offset_scale;  // double: a float would round the scale of float64 runs (0.1 by 3.4e-8)
  bool remove_center;
  bool softmax;  // the mask holds logits, normalised over the P points of each group
};

// --- math functions that name the same operation on the host and the device -----------

template <typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE bool finite(acc_t x, acc_t y) {
#ifdef __CUDA_ARCH__
  return isfinite(x) && isfinite(y);
#else
  return std::isfinite(x) && std::isfinite(y);
#endif
}

template <typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE acc_t floor_of(acc_t x) {
#ifdef __CUDA_ARCH__
  return floor(x);
#else
  return std::floor(x);
#endif
}

template <typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE acc_t exp_of(acc_t x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

// *address += value, from many threads at once on the device. The host harness runs the
// emulated threads one after another, so a plain add is the same operation there.
template <typename T>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE void accumulate(T* address, T value) {
#ifdef __CUDA_ARCH__
  gpuAtomicAdd(address, value);
#else
  *address += value;
#endif
}

// --- per-element arithmetic --------------------------------------------------------------

// The output element a thread computes: index = ((pixel * group + g) * group_channels + c),
// pixel = (n * Ho + ho) * Wo + wo. Two int64 divisions; the rest is int (channels and
// Ho * Wo fit in int, see make_params), cheaper on the GPU than int64 division.
struct Element {
  int64_t pixel, n;
  int ho, wo, g, c;
};

DCNV3_HOST_DEVICE DCNV3_FORCEINLINE Element split_index(const Params& p, int64_t index) {
  const int channels = p.group * p.group_channels;
  const int hw_out = p.height_out * p.width_out;
  Element e;
  e.pixel = index / channels;
  const int channel = static_cast<int>(index - e.pixel * channels);
  e.g = channel / p.group_channels;
  e.c = channel - e.g * p.group_channels;
  e.n = e.pixel / hw_out;
  const int spatial = static_cast<int>(e.pixel - e.n * hw_out);
  e.ho = spatial / p.width_out;
  e.wo = spatial - e.ho * p.width_out;
  return e;
}

// Largest logit of one (pixel, group), subtracted before exp as torch.softmax does; 0
// without softmax. P > 0: check_dcnv3_args rejects kernels without sampling points.
template <typename scalar_t, typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE acc_t softmax_shift(const Params& p, const scalar_t* mask) {
  if (!p.softmax) return acc_t(0);
  acc_t largest = acc_t(mask[0]);
  for (int k = 1; k < p.points; ++k) largest = largest < acc_t(mask[k]) ? acc_t(mask[k]) : largest;
  return largest;
}

// Weight of point k before normalisation: exp(logit - shift) with softmax, else the mask.
template <typename scalar_t, typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE acc_t unnormalised_weight(const Params& p, const scalar_t* mask, int k,
                                                              acc_t shift) {
  return p.softmax ? exp_of(acc_t(mask[k]) - shift) : acc_t(mask[k]);
}

// Softmax denominator of one (pixel, group) (sum of the unnormalised weights), 1 without softmax.
template <typename scalar_t, typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE acc_t softmax_denominator(const Params& p, const scalar_t* mask, acc_t shift) {
  if (!p.softmax) return acc_t(1);
  acc_t denominator = 0;
  for (int k = 0; k < p.points; ++k) denominator += unnormalised_weight<scalar_t, acc_t>(p, mask, k, shift);
  return denominator;
}

// Kernel point k -> its position (i along x, j along y) on the regular grid.
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE void point_position(const Params& p, int k, int& i, int& j) {
  if (p.remove_center && k >= (p.kernel_w / 2) * p.kernel_h + p.kernel_h / 2) ++k;
  i = k / p.kernel_h;
  j = k % p.kernel_h;
}

// Sampling location of point k of output pixel (ho, wo) with learned offset (dx, dy).
template <typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE void sampling_location(const Params& p, int ho, int wo, int k, acc_t dx,
                                                           acc_t dy, acc_t& x, acc_t& y) {
  int i, j;
  point_position(p, k, i, j);
  const int half_w = (p.dilation_w * (p.kernel_w - 1)) / 2, half_h = (p.dilation_h * (p.kernel_h - 1)) / 2;
  const acc_t scale = acc_t(p.offset_scale);  // rounded once, as the CPU kernels do
  x = acc_t(wo * p.stride_w - p.pad_w + half_w) + (acc_t(i * p.dilation_w - half_w) + dx) * scale;
  y = acc_t(ho * p.stride_h - p.pad_h + half_h) + (acc_t(j * p.dilation_h - half_h) + dy) * scale;
}

template <typename acc_t>
struct Corners {
  int pixel[4];  // y * W + x, or -1 outside the image
  acc_t weight[4];
  acc_t lx, ly, hx, hy;
};

// False when the location reads no pixel: outside (-1, W) x (-1, H) or not finite (NaN
// fails the test, so no float->int conversion happens for it).
template <typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE bool locate(acc_t x, acc_t y, int height, int width, Corners<acc_t>& c) {
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < acc_t(width) && y < acc_t(height))) return false;
  const acc_t xf = floor_of(x), yf = floor_of(y);
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

// Bilinear interpolation of one channel (`image` points at it in pixel 0), zero outside.
template <typename scalar_t, typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE acc_t bilinear(const scalar_t* image, int channels, const Corners<acc_t>& c) {
  acc_t value = 0;
  DCNV3_UNROLL
  for (int q = 0; q < 4; ++q) {
    if (c.pixel[q] >= 0) value += c.weight[q] * acc_t(image[int64_t(c.pixel[q]) * channels]);
  }
  return value;
}

// This channel's share of the gradients of one point's mask weight and offset, from
// d[q] = grad_output * value of corner q (0 outside the image) and the weight m.
template <typename acc_t>
struct PointGradient {
  acc_t mask, x, y;
};

template <typename acc_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE PointGradient<acc_t> point_gradient(const Corners<acc_t>& c, const acc_t* d,
                                                                        acc_t m, acc_t scale) {
  PointGradient<acc_t> g;
  g.mask = c.weight[0] * d[0] + c.weight[1] * d[1] + c.weight[2] * d[2] + c.weight[3] * d[3];
  g.x = m * (c.hy * (d[1] - d[0]) + c.ly * (d[3] - d[2])) * scale;
  g.y = m * (c.hx * (d[2] - d[0]) + c.lx * (d[3] - d[1])) * scale;
  return g;
}

// --- thread bodies -----------------------------------------------------------------------

// Forward of thread `thread` of `threads`, over output elements thread, thread + threads,
// ... below `elements` (a grid-stride loop). The output is m * sum_q(w_q v_q) summed over
// the points, as in the reference (an infinite mask then gives +-Inf, not Inf * 0 = NaN
// from a corner of zero bilinear weight). With softmax, each point's exp is computed once
// and the sum is divided by the denominator at the end.
template <typename scalar_t>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE void forward_thread(int64_t thread, int64_t threads, int64_t elements,
                                                        const scalar_t* __restrict__ input,
                                                        const scalar_t* __restrict__ offset,
                                                        const scalar_t* __restrict__ mask,
                                                        scalar_t* __restrict__ output, const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int channels = p.group * p.group_channels;
  for (int64_t index = thread; index < elements; index += threads) {
    const Element e = split_index(p, index);
    const scalar_t* image = input + e.n * p.height_in * p.width_in * channels + e.g * p.group_channels + e.c;
    const int64_t pair = e.pixel * p.group + e.g;  // (pixel, group)
    const scalar_t* off = offset + pair * p.points * 2;
    const scalar_t* msk = mask + pair * p.points;
    const acc_t shift = softmax_shift<scalar_t, acc_t>(p, msk);
    acc_t acc = 0, denominator = p.softmax ? acc_t(0) : acc_t(1);
    for (int k = 0; k < p.points; ++k) {
      const acc_t weight = unnormalised_weight<scalar_t, acc_t>(p, msk, k, shift);
      if (p.softmax) denominator += weight;
      acc_t x, y;
      sampling_location<acc_t>(p, e.ho, e.wo, k, acc_t(off[2 * k]), acc_t(off[2 * k + 1]), x, y);
      Corners<acc_t> corners;
      if (!locate(x, y, p.height_in, p.width_in, corners)) {
        if (!finite(x, y)) acc = acc_t(NAN);  // and stays NaN
        continue;
      }
      acc += weight * bilinear(image, channels, corners);
    }
    output[index] = scalar_t(acc / denominator);  // exact without softmax (denominator 1)
  }
}

// Backward of thread `thread` of `threads`: grad_input, grad_offset and grad_mask (the
// gradient of the weights: with softmax, of the normalised ones) of the elements of its
// grid-stride loop. `lanes.segment_sum(value, width)` returns, in the lowest lane of each
// aligned segment of `width` lanes of the warp, the sum of `value` over that segment; it
// must be reached by every lane of the warp (full-mask shuffles), so every thread runs
// the same number of rounds and none leaves early.
template <typename scalar_t, typename Lanes>
DCNV3_HOST_DEVICE DCNV3_FORCEINLINE void backward_thread(
    int64_t thread, int64_t threads, int64_t elements, const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
    at::opmath_type<scalar_t>* __restrict__ grad_input, at::opmath_type<scalar_t>* __restrict__ grad_offset,
    at::opmath_type<scalar_t>* __restrict__ grad_mask, const Params& p, bool warp_reduce, Lanes& lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int channels = p.group * p.group_channels;
  const acc_t scale = acc_t(p.offset_scale);
  const int64_t rounds = (elements + threads - 1) / threads;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t index = round * threads + thread;
    // Past the end, a thread works on element 0 with a zero gradient and writes nothing:
    // element counts are multiples of group_channels, so a shuffle segment is either all
    // active or all inactive.
    const bool active = index < elements;
    const Element e = split_index(p, active ? index : 0);
    const int64_t image_base = e.n * p.height_in * p.width_in * channels + e.g * p.group_channels + e.c;
    const int64_t pair = e.pixel * p.group + e.g;
    const scalar_t* off = offset + pair * p.points * 2;
    const scalar_t* msk = mask + pair * p.points;
    const acc_t go = active ? acc_t(grad_output[index]) : acc_t(0);
    const acc_t shift = softmax_shift<scalar_t, acc_t>(p, msk);
    const acc_t denominator = softmax_denominator<scalar_t, acc_t>(p, msk, shift);
    for (int k = 0; k < p.points; ++k) {
      acc_t x, y;
      sampling_location<acc_t>(p, e.ho, e.wo, k, acc_t(off[2 * k]), acc_t(off[2 * k + 1]), x, y);
      Corners<acc_t> corners;
      const bool inside = locate(x, y, p.height_in, p.width_in, corners);  // same for the whole group
      const acc_t m = unnormalised_weight<scalar_t, acc_t>(p, msk, k, shift) / denominator;
      acc_t d[4] = {0, 0, 0, 0};
      if (inside && active) {
        DCNV3_UNROLL
        for (int q = 0; q < 4; ++q) {
          if (corners.pixel[q] < 0) continue;
          const int64_t at = image_base + int64_t(corners.pixel[q]) * channels;
          d[q] = go * acc_t(input[at]);
          accumulate(grad_input + at, m * corners.weight[q] * go);
        }
      }
      // A non-finite location has NaN gradients (the same for the whole group).
      const bool poisoned = !inside && !finite(x, y);
      PointGradient<acc_t> grad;
      grad.mask = grad.x = grad.y = poisoned ? acc_t(NAN) : acc_t(0);
      if (inside) grad = point_gradient(corners, d, m, scale);
      const int64_t slot = pair * p.points + k;
      if (warp_reduce) {
        grad.mask = lanes.segment_sum(grad.mask, p.group_channels);
        grad.x = lanes.segment_sum(grad.x, p.group_channels);
        grad.y = lanes.segment_sum(grad.y, p.group_channels);
        if (active && e.c == 0) {
          grad_mask[slot] = grad.mask;
          grad_offset[2 * slot] = grad.x;
          grad_offset[2 * slot + 1] = grad.y;
        }
      } else if (active && (inside || poisoned)) {
        accumulate(grad_mask + slot, grad.mask);
        accumulate(grad_offset + 2 * slot, grad.x);
        accumulate(grad_offset + 2 * slot + 1, grad.y);
      }
    }
  }
}

// --- host-side set-up shared by dcnv3_cuda.cu and the host harness ---------------------

inline int narrow(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), "dcnv3: ", what, " = ", value,
              " is too large for the CUDA kernels, which index with int32 (at most ",
              std::numeric_limits<int>::max(), ")");
  return static_cast<int>(value);
}

// The kernel's Params, after checking that every value the kernels hold in an int fits
// (check_dcnv3_args has checked the products against int64 already).
inline Params make_params(const Geometry& geo, int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
                          int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                          int64_t group, int64_t group_channels, double offset_scale, bool remove_center,
                          bool softmax) {
  // Besides the arguments, the kernels form y * W + x (< H * W), Ho * Wo, wo * stride - pad
  // + half (|.| < W + 2 * pad), i * dilation (<= dilation * (kernel - 1)), 2 * k (< 2 * P)
  // and channels in int.
  narrow(geo.height_in * geo.width_in, "H * W");
  narrow(geo.height_out * geo.width_out, "Ho * Wo");
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
  p.offset_scale = offset_scale;
  p.remove_center = remove_center;
  p.softmax = softmax;
  return p;
}

// Blocks of kThreads for `elements` threads, at most `max_blocks` (the grid-stride loops
// cover the rest).
inline int launch_blocks(int64_t elements, int64_t max_blocks) {
  const int64_t needed = (elements + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, max_blocks)));
}

// Whether the channels of a group fill an aligned part of a warp, so that the backward
// can sum grad_offset and grad_mask over them with shuffles instead of atomics.
inline bool warp_reduce_fits(int64_t group_channels) {
  return group_channels <= kWarpSize && (group_channels & (group_channels - 1)) == 0;
}

// From the gradient of the softmax weights (what backward_thread gives) to that of the
// logits: d logit_k = w_k * (d w_k - sum_q w_q d w_q).
inline at::Tensor softmax_backward(const at::Tensor& logits, const at::Tensor& grad_weights, int64_t points) {
  const auto flat_logits = logits.to(grad_weights.scalar_type()).reshape({-1, points});
  const auto weights = at::softmax(flat_logits, -1);
  const auto flat_grad = grad_weights.reshape({-1, points});
  return (weights * (flat_grad - (weights * flat_grad).sum(-1, true))).view(logits.sizes());
}

}  // namespace cuda_kernels
}  // namespace ops_dcnv3
