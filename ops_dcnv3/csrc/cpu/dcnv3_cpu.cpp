// CPU kernels of the DCNv3 operator (forward and backward).
//
// Layout is channels-last, so the Cg channels of one group at one pixel are
// contiguous: every inner loop runs over them and is vectorised by the compiler
// (compiled for AVX2+FMA and for baseline x86-64, picked at run time).
// Sums are accumulated in float32 (float64 for float64 inputs). bfloat16 tensors are read
// and written by the kernels themselves (widened with a shift); float16 ones are converted to
// float32 once, by ATen (F16C where the CPU has it), and the float32 kernels' results rounded
// back: widening a float16 in the channel loops cost more than the multiply-adds (GCC 12 does
// not vectorise _Float16 conversions), which made the op twice as slow as in float32.
//
// A sampling location outside the open box (-1, W) x (-1, H) contributes nothing to the
// output and receives no gradient; the range test happens in floating point before any
// conversion to an integer. A location that is not finite (NaN or +-Inf in x or y, as
// diverged offset weights give) makes the output channels of its (pixel, group) NaN and
// gets NaN offset and mask gradients, as the grid_sample reference does, so that the
// divergence reaches the loss instead of being hidden; it reads and writes no memory.
// A non-finite mask value m multiplies the point's bilinear value, m * sum_q(w_q v_q), as
// in the reference: an infinite mask gives +-Inf (NaN only where that value is 0).
//
// The backward splits an (image, group) pair into bands of output rows when there are
// too few pairs to occupy the threads. The bands scatter into private grad_input
// buffers that cover only the input rows a band's sampling points reach (found by a
// pass over the offsets) and are summed in a fixed order; their total size is kept
// within max(2 x the input, 32 MiB) in the accumulation type by using fewer bands when
// the offsets spread every band over the whole image.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../dcnv3.h"
#include "isa.h"
#include "vec_math.h"

namespace ops_dcnv3 {
namespace {

// float32 value of a kernel input. bfloat16 is the high half of a float32: widened with an
// integer shift that the compiler vectorises in the channel loops. Exact for every value,
// NaN and +-Inf included.
template <typename T>
DCNV3_INLINE at::opmath_type<T> widen(T value) {
  return static_cast<at::opmath_type<T>>(value);
}
template <>
DCNV3_INLINE float widen(c10::BFloat16 value) {
  return bits_to_float(uint32_t(value.x) << 16);
}

// A float32 result stored in the kernel's type, rounded to nearest even. bfloat16: integer
// rounding with a mask for NaN (vectorised).
template <typename T>
DCNV3_INLINE T narrow(at::opmath_type<T> value) {
  return static_cast<T>(value);
}
template <>
DCNV3_INLINE c10::BFloat16 narrow(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - uint32_t(value != value);
  return c10::BFloat16(uint16_t((0x7fc0u & is_nan) | (rounded & ~is_nan)), c10::BFloat16::from_bits());
}

// Channels 2i and 2i + 1 of a bfloat16 vector as one 32-bit word (channel 2i in the low half).
DCNV3_INLINE uint32_t channel_pair(const c10::BFloat16* values, int64_t i) {
  uint32_t word;
  std::memcpy(&word, values + 2 * i, sizeof(word));
  return word;
}

struct Params {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t group, group_channels;
  double offset_scale;
  bool remove_center;
  bool softmax;  // the mask holds logits: normalise over the P points of each group first
  // Elements between the offsets (masks) of consecutive output pixels: group * P * 2
  // (group * P) when contiguous; larger for the forward's views into a wider tensor.
  int64_t offset_row = 0, mask_row = 0;
};

// The sampling weights of one (pixel, group): the mask values, or their softmax over the
// P points when p.softmax (max subtracted first, as torch.softmax does).
template <typename scalar_t, typename acc_t>
inline void sampling_weights(const scalar_t* mask, int64_t points, bool softmax, acc_t* weights) {
  if (!softmax) {
    for (int64_t k = 0; k < points; ++k) weights[k] = widen(mask[k]);
    return;
  }
  acc_t largest = widen(mask[0]);
  for (int64_t k = 1; k < points; ++k) largest = std::max(largest, widen(mask[k]));
  acc_t total = 0;
  for (int64_t k = 0; k < points; ++k) {
    weights[k] = exp_nonpositive(widen(mask[k]) - largest);
    total += weights[k];
  }
  for (int64_t k = 0; k < points; ++k) weights[k] /= total;
}

// Position of each sampling point relative to the output pixel's centre on the
// regular grid, in the x-major order of the offset/mask tensors (centre skipped
// with remove_center).
template <typename acc_t>
struct KernelGrid {
  std::vector<acc_t> dx, dy;
  KernelGrid(const Params& p) {
    const int64_t half_w = (p.dilation_w * (p.kernel_w - 1)) / 2;
    const int64_t half_h = (p.dilation_h * (p.kernel_h - 1)) / 2;
    for (int64_t i = 0; i < p.kernel_w; ++i) {
      for (int64_t j = 0; j < p.kernel_h; ++j) {
        if (p.remove_center && i == p.kernel_w / 2 && j == p.kernel_h / 2) continue;
        dx.push_back(acc_t(i * p.dilation_w - half_w));
        dy.push_back(acc_t(j * p.dilation_h - half_h));
      }
    }
  }
};

// The four bilinear corners of one sampling location.
template <typename acc_t>
struct Corners {
  int64_t pixel[4];  // y * W + x of each corner, or -1 when it lies outside the image
  acc_t weight[4];   // bilinear weights (without the mask)
  acc_t lx, ly, hx, hy;
};

template <typename acc_t>
inline bool finite(acc_t x, acc_t y) {
  return std::isfinite(x) && std::isfinite(y);
}

// Returns false when the location reads no pixel (outside the box or not finite).
template <typename acc_t>
inline bool locate(acc_t x, acc_t y, int64_t height, int64_t width, Corners<acc_t>& c) {
  // Written so that NaN fails the test: no float->int conversion happens for it.
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < acc_t(width) && y < acc_t(height))) return false;
  const acc_t xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
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

// The sampling points of one output pixel, all groups (index j = g * P + k), worked out in
// loops over j that the compiler vectorises (the per-point arithmetic otherwise costs more
// than the multiply-adds over a group's 16 or 32 channels): the mask weight m folded into
// the four bilinear corner weights (0 for a corner outside the image), each corner's element
// offset in the image ((y * W + x) * C, clamped into the image: a corner outside it reads a
// pixel inside with weight 0, so that the channel loops need no select) and whether the
// location lies in the box (-1, W) x (-1, H) at all. The operations are those of
// forward_pixel_exact (results equal up to how the compiler fuses multiply-adds).
template <typename acc_t>
struct PixelPlan {
  std::vector<acc_t> grid_x, grid_y;  // the kernel grid, repeated for each group
  std::vector<acc_t> m, total, w0, w1, w2, w3;
  std::vector<int32_t> i0, i1, i2, i3, inside;
  PixelPlan(const KernelGrid<acc_t>& grid, int64_t group) {
    for (int64_t g = 0; g < group; ++g) {
      grid_x.insert(grid_x.end(), grid.dx.begin(), grid.dx.end());
      grid_y.insert(grid_y.end(), grid.dy.begin(), grid.dy.end());
    }
    for (auto* v : {&m, &total, &w0, &w1, &w2, &w3}) v->resize(grid_x.size());
    for (auto* v : {&i0, &i1, &i2, &i3, &inside}) v->resize(grid_x.size());
  }
};

// Fills `plan` for the pixel whose offsets and mask values start at off and msk. Returns
// false when a location or a sampling weight is not finite (the pixel then takes
// forward_pixel_exact). Needs height_in * width_in * channels < 2^31 (int32 offsets).
template <typename scalar_t, typename acc_t>
DCNV3_INLINE bool plan_pixel(const scalar_t* __restrict off, const scalar_t* __restrict msk, acc_t base_x,
                             acc_t base_y, const Geometry& geo, const Params& p, PixelPlan<acc_t>& plan) {
  const int64_t P = geo.points, n = p.group * P;
  acc_t* __restrict m = plan.m.data();
  if (p.softmax) {  // sampling_weights for every group at once, the exps in one loop
    acc_t* __restrict total = plan.total.data();
    for (int64_t g = 0; g < p.group; ++g) {
      acc_t largest = widen(msk[g * P]);
      for (int64_t k = 1; k < P; ++k) largest = std::max(largest, widen(msk[g * P + k]));
      for (int64_t k = 0; k < P; ++k) m[g * P + k] = widen(msk[g * P + k]) - largest;
    }
    for (int64_t j = 0; j < n; ++j) m[j] = exp_nonpositive(m[j]);
    for (int64_t g = 0; g < p.group; ++g) {
      acc_t sum = 0;
      for (int64_t k = 0; k < P; ++k) sum += m[g * P + k];
      for (int64_t k = 0; k < P; ++k) total[g * P + k] = sum;
    }
    for (int64_t j = 0; j < n; ++j) m[j] /= total[j];
  } else {
    for (int64_t j = 0; j < n; ++j) m[j] = widen(msk[j]);
  }
  const acc_t* __restrict gx = plan.grid_x.data();
  const acc_t* __restrict gy = plan.grid_y.data();
  acc_t *__restrict w0 = plan.w0.data(), *__restrict w1 = plan.w1.data(), *__restrict w2 = plan.w2.data(),
         *__restrict w3 = plan.w3.data();
  int32_t *__restrict i0 = plan.i0.data(), *__restrict i1 = plan.i1.data(), *__restrict i2 = plan.i2.data(),
          *__restrict i3 = plan.i3.data(), *__restrict inside = plan.inside.data();
  const acc_t scale = acc_t(p.offset_scale), width_f = acc_t(geo.width_in), height_f = acc_t(geo.height_in);
  const int32_t width = static_cast<int32_t>(geo.width_in), height = static_cast<int32_t>(geo.height_in);
  const int32_t channels = static_cast<int32_t>(geo.channels);
  int32_t bad = 0;
  // (simd: after inlining, GCC 12 no longer trusts the restrict pointers and gives up on
  // runtime alias checks for this many arrays.)
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = base_x + (gx[j] + widen(off[2 * j])) * scale;
    const acc_t y = base_y + (gy[j] + widen(off[2 * j + 1])) * scale;
    const acc_t mj = m[j];
    // x - x is 0 exactly when x is finite.
    bad |= int32_t(!(x - x == acc_t(0))) | int32_t(!(y - y == acc_t(0))) | int32_t(!(mj - mj == acc_t(0)));
    const int32_t in = int32_t(x > acc_t(-1)) & int32_t(y > acc_t(-1)) & int32_t(x < width_f) &
                       int32_t(y < height_f);
    // Clamped (NaN to -1) so that the conversions below are defined; points outside the box
    // are skipped by `inside`. (A select on `in` here kept GCC 12 from vectorising the loop.)
    const acc_t xs = std::min(width_f, std::max(acc_t(-1), x)), ys = std::min(height_f, std::max(acc_t(-1), y));
    const acc_t xf = std::floor(xs), yf = std::floor(ys);
    const int32_t x0 = static_cast<int32_t>(xf), y0 = static_cast<int32_t>(yf);
    const acc_t lx = xs - xf, ly = ys - yf, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const int32_t top = int32_t(y0 >= 0), bottom = int32_t(y0 + 1 < height);
    const int32_t left = int32_t(x0 >= 0), right = int32_t(x0 + 1 < width);
    w0[j] = mj * (top & left ? hy * hx : acc_t(0));
    w1[j] = mj * (top & right ? hy * lx : acc_t(0));
    w2[j] = mj * (bottom & left ? ly * hx : acc_t(0));
    w3[j] = mj * (bottom & right ? ly * lx : acc_t(0));
    const int32_t xl = std::min(std::max(x0, 0), width - 1), xr = std::min(std::max(x0 + 1, 0), width - 1);
    const int32_t yt = std::min(std::max(y0, 0), height - 1), yb = std::min(std::max(y0 + 1, 0), height - 1);
    i0[j] = (yt * width + xl) * channels;
    i1[j] = (yt * width + xr) * channels;
    i2[j] = (yb * width + xl) * channels;
    i3[j] = (yb * width + xr) * channels;
    inside[j] = in;
  }
  return bad == 0;
}

// The forward of one output pixel, all groups, point by point, for pixels with a location
// or a sampling weight that is not finite (see the top of the file): a location that is not
// finite makes its group's channels NaN; a non-finite m multiplies the bilinear value,
// m * sum_q(w_q v_q), as the reference and the CUDA kernels compute it (folded into the
// weights, an infinite m times a corner of weight 0 would give NaN where they give +-Inf).
template <typename scalar_t, typename acc_t>
void forward_pixel_exact(const scalar_t* image, const scalar_t* off, const scalar_t* msk, scalar_t* out,
                         acc_t base_x, acc_t base_y, const KernelGrid<acc_t>& grid, const Geometry& geo,
                         const Params& p, acc_t* a, acc_t* weights, const scalar_t* zeros) {
  const int64_t P = geo.points, Cg = p.group_channels, C = geo.channels;
  const acc_t scale = acc_t(p.offset_scale);
  for (int64_t g = 0; g < p.group; ++g) {
    sampling_weights(msk + g * P, P, p.softmax, weights);
    for (int64_t ch = 0; ch < Cg; ++ch) a[ch] = acc_t(0);
    for (int64_t k = 0; k < P; ++k) {
      const acc_t x = base_x + (grid.dx[k] + widen(off[(g * P + k) * 2])) * scale;
      const acc_t y = base_y + (grid.dy[k] + widen(off[(g * P + k) * 2 + 1])) * scale;
      Corners<acc_t> c;
      if (!locate(x, y, geo.height_in, geo.width_in, c)) {
        if (!finite(x, y)) {
          for (int64_t ch = 0; ch < Cg; ++ch) a[ch] = std::numeric_limits<acc_t>::quiet_NaN();
        }
        continue;
      }
      const acc_t m = weights[k];
      const scalar_t* v[4];
      acc_t w[4];
      for (int corner = 0; corner < 4; ++corner) {
        const bool inside = c.pixel[corner] >= 0;
        v[corner] = inside ? image + c.pixel[corner] * C + g * Cg : zeros;
        w[corner] = inside ? c.weight[corner] : acc_t(0);
      }
      if (std::isfinite(m)) {
        const acc_t w0 = m * w[0], w1 = m * w[1], w2 = m * w[2], w3 = m * w[3];
        for (int64_t ch = 0; ch < Cg; ++ch) {
          a[ch] += w0 * widen(v[0][ch]) + w1 * widen(v[1][ch]) + w2 * widen(v[2][ch]) + w3 * widen(v[3][ch]);
        }
      } else {
        for (int64_t ch = 0; ch < Cg; ++ch) {
          a[ch] += m * (w[0] * widen(v[0][ch]) + w[1] * widen(v[1][ch]) + w[2] * widen(v[2][ch]) +
                        w[3] * widen(v[3][ch]));
        }
      }
    }
    for (int64_t ch = 0; ch < Cg; ++ch) out[g * Cg + ch] = narrow<scalar_t>(a[ch]);
  }
}

// Forward for output pixels [begin, end) of the flattened (N, Ho, Wo) range.
// CG > 0 fixes the channels per group at compile time (the loops over channels then
// unroll and the accumulator stays in registers); CG == 0 handles any count.
template <typename scalar_t, int CG>
DCNV3_INLINE void forward_pixels(const scalar_t* __restrict input, const scalar_t* __restrict offset,
                                 const scalar_t* __restrict mask, scalar_t* __restrict output,
                                 const Geometry& geo, const Params& p, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const KernelGrid<acc_t> grid(p);
  PixelPlan<acc_t> plan(grid, p.group);
  const int64_t P = geo.points, Cg = CG > 0 ? CG : p.group_channels, C = geo.channels;
  const int64_t hw_out = geo.height_out * geo.width_out;
  // int32 element offsets in the plan: larger images go point by point.
  const bool plannable = geo.height_in * geo.width_in * C < (int64_t(1) << 31);
  acc_t acc_fixed[CG > 0 ? CG : 1];
  std::vector<acc_t> acc_any(CG > 0 ? 0 : Cg);
  acc_t* const acc = CG > 0 ? acc_fixed : acc_any.data();
  const std::vector<scalar_t> zeros(Cg, scalar_t(0));
  std::vector<acc_t> weights(P);
  // bfloat16 with an even channel count: the channels are read in pairs as 32-bit words;
  // the even channel is the word shifted left by 16, the odd one the word with its low
  // half cleared, so one vector load feeds two float32 vectors without unpacking. `a`
  // then holds the even channels first and the odd ones after; the store interleaves them.
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const bool pairs = kBf16 && Cg % 2 == 0;
  const int64_t half = Cg / 2;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t n = idx / hw_out, ho = (idx % hw_out) / geo.width_out, wo = idx % geo.width_out;
    const acc_t base_x = acc_t(wo * p.stride_w - p.pad_w + (p.dilation_w * (p.kernel_w - 1)) / 2);
    const acc_t base_y = acc_t(ho * p.stride_h - p.pad_h + (p.dilation_h * (p.kernel_h - 1)) / 2);
    const scalar_t* image = input + n * geo.height_in * geo.width_in * C;
    const scalar_t* off = offset + idx * p.offset_row;
    const scalar_t* msk = mask + idx * p.mask_row;
    const auto point_by_point = [&] {
      forward_pixel_exact(image, off, msk, output + idx * C, base_x, base_y, grid, geo, p, acc, weights.data(),
                          zeros.data());
    };
    if (!plannable || !plan_pixel(off, msk, base_x, base_y, geo, p, plan)) {
      point_by_point();
      continue;
    }
    // A corner outside the image reads a pixel inside with weight 0 (see PixelPlan): where that
    // pixel is not finite, 0 * value makes the sum NaN although the corner must add nothing.
    // Such a pixel (or a result that overflows) leaves a sum that is not finite, and the pixel
    // is then recomputed point by point, which reads only the corners inside.
    int32_t not_finite = 0;
    for (int64_t g = 0; g < p.group; ++g) {
      acc_t* __restrict a = acc;
      for (int64_t ch = 0; ch < Cg; ++ch) a[ch] = acc_t(0);
      const scalar_t* group_image = image + g * Cg;
      for (int64_t j = g * P; j < (g + 1) * P; ++j) {
        if (!plan.inside[j]) continue;
        const scalar_t *__restrict v0 = group_image + plan.i0[j], *__restrict v1 = group_image + plan.i1[j],
                                   *__restrict v2 = group_image + plan.i2[j], *__restrict v3 = group_image + plan.i3[j];
        const acc_t w0 = plan.w0[j], w1 = plan.w1[j], w2 = plan.w2[j], w3 = plan.w3[j];
        if constexpr (kBf16) {
          if (pairs) {
            for (int64_t i = 0; i < half; ++i) {
              const uint32_t u0 = channel_pair(v0, i), u1 = channel_pair(v1, i), u2 = channel_pair(v2, i),
                             u3 = channel_pair(v3, i);
              a[i] += w0 * bits_to_float(u0 << 16) + w1 * bits_to_float(u1 << 16) +
                      w2 * bits_to_float(u2 << 16) + w3 * bits_to_float(u3 << 16);
              a[half + i] += w0 * bits_to_float(u0 & 0xffff0000u) + w1 * bits_to_float(u1 & 0xffff0000u) +
                             w2 * bits_to_float(u2 & 0xffff0000u) + w3 * bits_to_float(u3 & 0xffff0000u);
            }
            continue;
          }
        }
        for (int64_t ch = 0; ch < Cg; ++ch) {
          a[ch] += w0 * widen(v0[ch]) + w1 * widen(v1[ch]) + w2 * widen(v2[ch]) + w3 * widen(v3[ch]);
        }
      }
#pragma omp simd reduction(| : not_finite)
      for (int64_t ch = 0; ch < Cg; ++ch) not_finite |= int32_t(!(a[ch] - a[ch] == acc_t(0)));
      scalar_t* out = output + idx * C + g * Cg;
      if (pairs) {
        for (int64_t i = 0; i < half; ++i) {
          out[2 * i] = narrow<scalar_t>(a[i]);
          out[2 * i + 1] = narrow<scalar_t>(a[half + i]);
        }
      } else {
        for (int64_t ch = 0; ch < Cg; ++ch) out[ch] = narrow<scalar_t>(a[ch]);
      }
    }
    if (not_finite) point_by_point();
  }
}

// The backward of one output pixel `pix` of pair (n, g), point by point, for pixels that
// backward_task does not plan: a location or a sampling weight that is not finite (see the
// top of the file). A point outside the box gets zero gradients, one whose location is not
// finite NaN offset and mask gradients. `image` is the pair's image (input of image n, from
// group g's channels).
template <typename scalar_t, typename Banded>
void backward_pixel_exact(const scalar_t* grad_output, const scalar_t* image, const scalar_t* offset,
                          const scalar_t* mask, at::opmath_type<scalar_t>* grad_image, int64_t gi_stride,
                          int64_t gi_begin, int64_t gi_end, scalar_t* grad_offset, scalar_t* grad_mask,
                          const Geometry& geo, const Params& p, const KernelGrid<at::opmath_type<scalar_t>>& grid,
                          int64_t n, int64_t g, int64_t pix, Banded) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = geo.points, Cg = p.group_channels, C = geo.channels;
  const acc_t scale = acc_t(p.offset_scale);
  const std::vector<scalar_t> zeros(Cg, scalar_t(0));
  std::vector<acc_t> sink(Cg), go(Cg), weights(P), grad_weights(P);
  const int64_t idx = n * geo.height_out * geo.width_out + pix;
  const int64_t ho = pix / geo.width_out, wo = pix % geo.width_out;
  const acc_t base_x = acc_t(wo * p.stride_w - p.pad_w + (p.dilation_w * (p.kernel_w - 1)) / 2);
  const acc_t base_y = acc_t(ho * p.stride_h - p.pad_h + (p.dilation_h * (p.kernel_h - 1)) / 2);
  const scalar_t* go_in = grad_output + idx * C + g * Cg;
  for (int64_t ch = 0; ch < Cg; ++ch) go[ch] = widen(go_in[ch]);
  const scalar_t* off = offset + (idx * p.group + g) * P * 2;
  const scalar_t* msk = mask + (idx * p.group + g) * P;
  scalar_t* goff = grad_offset + (idx * p.group + g) * P * 2;
  scalar_t* gmsk = grad_mask + (idx * p.group + g) * P;
  sampling_weights(msk, P, p.softmax, weights.data());
  for (int64_t k = 0; k < P; ++k) {
    const acc_t x = base_x + (grid.dx[k] + widen(off[k * 2])) * scale;
    const acc_t y = base_y + (grid.dy[k] + widen(off[k * 2 + 1])) * scale;
    Corners<acc_t> c;
    if (!locate(x, y, geo.height_in, geo.width_in, c)) {
      const bool nan = !finite(x, y);
      goff[k * 2] = goff[k * 2 + 1] = nan ? std::numeric_limits<scalar_t>::quiet_NaN() : scalar_t(0);
      grad_weights[k] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
      continue;
    }
    const acc_t m = weights[k];
    acc_t d[4];  // <grad_output, corner value>
    for (int corner = 0; corner < 4; ++corner) {
      const int64_t pixel = c.pixel[corner];
      const scalar_t* v = pixel >= 0 ? image + pixel * C : zeros.data();
      bool in_buffer = pixel >= 0;
      if constexpr (Banded::value) {
        in_buffer = static_cast<uint64_t>(pixel - gi_begin) < static_cast<uint64_t>(gi_end - gi_begin);
      }
      acc_t* dst = in_buffer ? grad_image + (pixel - gi_begin) * gi_stride : sink.data();
      const acc_t wc = m * c.weight[corner];
      acc_t dot = 0;
      for (int64_t ch = 0; ch < Cg; ++ch) {
        dot += go[ch] * widen(v[ch]);
        dst[ch] += wc * go[ch];
      }
      d[corner] = dot;
    }
    grad_weights[k] = c.weight[0] * d[0] + c.weight[1] * d[1] + c.weight[2] * d[2] + c.weight[3] * d[3];
    goff[k * 2] = narrow<scalar_t>(m * (c.hy * (d[1] - d[0]) + c.ly * (d[3] - d[2])) * scale);
    goff[k * 2 + 1] = narrow<scalar_t>(m * (c.hx * (d[2] - d[0]) + c.lx * (d[3] - d[1])) * scale);
  }
  // Through the softmax: d logit_k = w_k * (d w_k - sum_q w_q d w_q).
  acc_t weighted = 0;
  if (p.softmax) {
    for (int64_t k = 0; k < P; ++k) weighted += weights[k] * grad_weights[k];
  }
  for (int64_t k = 0; k < P; ++k) {
    gmsk[k] = narrow<scalar_t>(p.softmax ? weights[k] * (grad_weights[k] - weighted) : grad_weights[k]);
  }
}

// The sampling points of up to kBackwardChunk consecutive output pixels of one (image, group)
// pair, stored point-major ([k * kBackwardChunk + c] for point k of the chunk's pixel c) so
// that each step below is a loop over the pixels that the compiler vectorises: sampling
// weights (softmax), locations, bilinear corner weights (0 for a corner outside the image),
// corner pixel indices (-1 outside), and after the products the <grad_output, corner>
// dot products d0..d3 and the weight gradients.
constexpr int64_t kBackwardChunk = 32;

template <typename acc_t>
struct BackwardPlan {
  std::vector<acc_t> m, w0, w1, w2, w3, lx, ly, d0, d1, d2, d3, gw;
  std::vector<int32_t> i0, i1, i2, i3, inside;
  std::vector<acc_t> base_x, base_y, largest, total, weighted;  // per pixel
  std::vector<int32_t> bad;  // per pixel: something not finite, backward_pixel_exact
  explicit BackwardPlan(int64_t points) {
    for (auto* v : {&m, &w0, &w1, &w2, &w3, &lx, &ly, &d0, &d1, &d2, &d3, &gw}) v->resize(points * kBackwardChunk);
    for (auto* v : {&i0, &i1, &i2, &i3, &inside}) v->resize(points * kBackwardChunk);
    for (auto* v : {&base_x, &base_y, &largest, &total, &weighted}) v->resize(kBackwardChunk);
    bad.resize(kBackwardChunk);
  }
};

// What backward_task works in besides its arguments, made once per thread of a call and
// reused by its tasks (allocating it per (image, group) task cost ~10% of the op at stage 4
// of InternImage-T).
template <typename scalar_t>
struct BackwardWorkspace {
  using acc_t = at::opmath_type<scalar_t>;
  KernelGrid<acc_t> grid;
  BackwardPlan<acc_t> plan;
  std::vector<scalar_t> zeros;  // the value of a corner outside the image
  std::vector<acc_t> sink;      // write target for corners outside the image or the range
  std::vector<acc_t> go;        // see backward_task
  std::vector<scalar_t> staged;  // see finish_backward_chunk
  BackwardWorkspace(const Geometry& geo, const Params& p)
      : grid(p), plan(geo.points), zeros(p.group_channels, scalar_t(0)), sink(p.group_channels),
        go(2 * p.group_channels), staged(3 * geo.points * kBackwardChunk) {}
};

// Plans pixels [pix0, pix0 + count) of pair (n, g); off and msk point at the first pixel's
// values of group g. Marks as bad the pixels with a location or a sampling weight that is not
// finite. Needs height_in * width_in < 2^31. CG is not used: this and finish_backward_chunk
// are compiled once per type and instruction set, not for every copy of backward_task.
template <typename scalar_t, int CG, typename acc_t = at::opmath_type<scalar_t>>
DCNV3_INLINE void plan_backward_chunk(const scalar_t* __restrict off, const scalar_t* __restrict msk,
                                      int64_t pix0, int64_t count, const Geometry* geo_, const Params* p_,
                                      const KernelGrid<acc_t>* grid_, BackwardPlan<acc_t>* plan_) {
  const Geometry& geo = *geo_;
  const Params& p = *p_;
  const KernelGrid<acc_t>& grid = *grid_;
  BackwardPlan<acc_t>& plan = *plan_;
  constexpr int64_t S = kBackwardChunk;
  const int64_t P = geo.points, ostep = p.group * P * 2, mstep = p.group * P;
  acc_t *__restrict m = plan.m.data(), *__restrict largest = plan.largest.data(),
        *__restrict total = plan.total.data(), *__restrict bx = plan.base_x.data(),
        *__restrict by = plan.base_y.data();
  int32_t* __restrict bad = plan.bad.data();
  for (int64_t c = 0; c < count; ++c) {
    const int64_t pix = pix0 + c, ho = pix / geo.width_out, wo = pix % geo.width_out;
    bx[c] = acc_t(wo * p.stride_w - p.pad_w + (p.dilation_w * (p.kernel_w - 1)) / 2);
    by[c] = acc_t(ho * p.stride_h - p.pad_h + (p.dilation_h * (p.kernel_h - 1)) / 2);
    bad[c] = 0;
  }
  // The sampling weights, as sampling_weights computes them (same order of operations).
  if (p.softmax) {
    for (int64_t c = 0; c < count; ++c) largest[c] = widen(msk[c * mstep]);
    for (int64_t k = 1; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) largest[c] = std::max(largest[c], widen(msk[c * mstep + k]));
    }
    for (int64_t c = 0; c < count; ++c) total[c] = acc_t(0);
    for (int64_t k = 0; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) {
        m[k * S + c] = exp_nonpositive(widen(msk[c * mstep + k]) - largest[c]);
        total[c] += m[k * S + c];
      }
    }
    for (int64_t k = 0; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) m[k * S + c] /= total[c];
    }
  } else {
    for (int64_t k = 0; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) m[k * S + c] = widen(msk[c * mstep + k]);
    }
  }
  acc_t *__restrict w0 = plan.w0.data(), *__restrict w1 = plan.w1.data(), *__restrict w2 = plan.w2.data(),
         *__restrict w3 = plan.w3.data(), *__restrict lxs = plan.lx.data(), *__restrict lys = plan.ly.data();
  int32_t *__restrict i0 = plan.i0.data(), *__restrict i1 = plan.i1.data(), *__restrict i2 = plan.i2.data(),
          *__restrict i3 = plan.i3.data(), *__restrict inside = plan.inside.data();
  const acc_t scale = acc_t(p.offset_scale), width_f = acc_t(geo.width_in), height_f = acc_t(geo.height_in);
  const int32_t width = static_cast<int32_t>(geo.width_in), height = static_cast<int32_t>(geo.height_in);
  for (int64_t k = 0; k < P; ++k) {
    const acc_t dx = grid.dx[k], dy = grid.dy[k];
    // The same arithmetic as plan_pixel (see there for the clamps and the masks), written out
    // again: with it in a shared inline function returning a struct, GCC 12 no longer
    // vectorised this loop.
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) {
      const int64_t j = k * S + c;
      const acc_t x = bx[c] + (dx + widen(off[c * ostep + 2 * k])) * scale;
      const acc_t y = by[c] + (dy + widen(off[c * ostep + 2 * k + 1])) * scale;
      const acc_t mj = m[j];
      bad[c] |= int32_t(!(x - x == acc_t(0))) | int32_t(!(y - y == acc_t(0))) | int32_t(!(mj - mj == acc_t(0)));
      const int32_t in = int32_t(x > acc_t(-1)) & int32_t(y > acc_t(-1)) & int32_t(x < width_f) &
                         int32_t(y < height_f);
      const acc_t xs = std::min(width_f, std::max(acc_t(-1), x)), ys = std::min(height_f, std::max(acc_t(-1), y));
      const acc_t xf = std::floor(xs), yf = std::floor(ys);
      const int32_t x0 = static_cast<int32_t>(xf), y0 = static_cast<int32_t>(yf);
      const acc_t lx = xs - xf, ly = ys - yf, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
      const int32_t top = int32_t(y0 >= 0), bottom = int32_t(y0 + 1 < height);
      const int32_t left = int32_t(x0 >= 0), right = int32_t(x0 + 1 < width);
      w0[j] = top & left ? hy * hx : acc_t(0);
      w1[j] = top & right ? hy * lx : acc_t(0);
      w2[j] = bottom & left ? ly * hx : acc_t(0);
      w3[j] = bottom & right ? ly * lx : acc_t(0);
      i0[j] = top & left ? y0 * width + x0 : -1;
      i1[j] = top & right ? y0 * width + x0 + 1 : -1;
      i2[j] = bottom & left ? (y0 + 1) * width + x0 : -1;
      i3[j] = bottom & right ? (y0 + 1) * width + x0 + 1 : -1;
      lxs[j] = lx;
      lys[j] = ly;
      inside[j] = in;
    }
  }
}

// The offset and mask gradients of a planned chunk from the dot products of backward_task
// (goff and gmsk: those of the chunk's first pixel, group g), computed and rounded in loops
// over the pixels (vectorised) into `staged` (point-major, 3 x points x kBackwardChunk
// values), then stored pixel by pixel: with the stores, strided by pixel, in the same loops,
// GCC 12 left the offset loop scalar.
template <typename scalar_t, int CG, typename acc_t = at::opmath_type<scalar_t>>
DCNV3_INLINE void finish_backward_chunk(scalar_t* __restrict goff, scalar_t* __restrict gmsk, int64_t count,
                                        const Geometry* geo, const Params* p_, BackwardPlan<acc_t>* plan_,
                                        scalar_t* __restrict staged) {
  constexpr int64_t S = kBackwardChunk;
  const Params& p = *p_;
  BackwardPlan<acc_t>& plan = *plan_;
  const int64_t P = geo->points, ostep = p.group * P * 2, mstep = p.group * P;
  const acc_t scale = acc_t(p.offset_scale);
  // Offset and weight gradients of the chunk's points (a point outside the box: 0).
  const acc_t *__restrict m = plan.m.data(), *__restrict w0 = plan.w0.data(), *__restrict w1 = plan.w1.data(),
                          *__restrict w2 = plan.w2.data(), *__restrict w3 = plan.w3.data(),
                          *__restrict lxs = plan.lx.data(), *__restrict lys = plan.ly.data(),
                          *__restrict d0 = plan.d0.data(), *__restrict d1 = plan.d1.data(),
                          *__restrict d2 = plan.d2.data(), *__restrict d3 = plan.d3.data();
  const int32_t* __restrict inside = plan.inside.data();
  acc_t* __restrict gw = plan.gw.data();
  scalar_t *__restrict staged_offset = staged, *__restrict staged_mask = staged + 2 * P * S;
  for (int64_t k = 0; k < P; ++k) {
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) {
      const int64_t j = k * S + c;
      const acc_t lx = lxs[j], ly = lys[j], hx = acc_t(1) - lx, hy = acc_t(1) - ly;
      const acc_t grad_x = m[j] * (hy * (d1[j] - d0[j]) + ly * (d3[j] - d2[j]));
      const acc_t grad_y = m[j] * (hx * (d2[j] - d0[j]) + lx * (d3[j] - d1[j]));
      const bool in = inside[j] != 0;
      gw[j] = in ? w0[j] * d0[j] + w1[j] * d1[j] + w2[j] * d2[j] + w3[j] * d3[j] : acc_t(0);
      staged_offset[2 * k * S + c] = in ? narrow<scalar_t>(grad_x * scale) : scalar_t(0);
      staged_offset[(2 * k + 1) * S + c] = in ? narrow<scalar_t>(grad_y * scale) : scalar_t(0);
    }
  }
  // Through the softmax: d logit_k = w_k * (d w_k - sum_q w_q d w_q).
  acc_t* __restrict weighted = plan.weighted.data();
  if (p.softmax) {
    for (int64_t c = 0; c < count; ++c) weighted[c] = acc_t(0);
    for (int64_t k = 0; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) weighted[c] += m[k * S + c] * gw[k * S + c];
    }
    for (int64_t k = 0; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) {
        staged_mask[k * S + c] = narrow<scalar_t>(m[k * S + c] * (gw[k * S + c] - weighted[c]));
      }
    }
  } else {
    for (int64_t k = 0; k < P; ++k) {
      for (int64_t c = 0; c < count; ++c) staged_mask[k * S + c] = narrow<scalar_t>(gw[k * S + c]);
    }
  }
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t q = 0; q < 2 * P; ++q) goff[c * ostep + q] = staged_offset[q * S + c];
    for (int64_t k = 0; k < P; ++k) gmsk[c * mstep + k] = staged_mask[k * S + c];
  }
}

DCNV3_DEFINE_ISA_VARIANTS(plan_backward_chunk)
DCNV3_DEFINE_ISA_VARIANTS(finish_backward_chunk)

// dst[r * dst_stride + i] = src[r * src_stride + i] rounded to scalar_t, for `rows` rows of
// `cols` values: float32 grad_input accumulators stored into grad_input (compiled per
// instruction set, so that the rounding is vectorised).
template <typename scalar_t, int CG, typename acc_t = at::opmath_type<scalar_t>>
DCNV3_INLINE void store_rounded(const acc_t* __restrict src, int64_t src_stride, scalar_t* __restrict dst,
                                int64_t dst_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) dst[r * dst_stride + i] = narrow<scalar_t>(src[r * src_stride + i]);
  }
}

DCNV3_DEFINE_ISA_VARIANTS(store_rounded)

// Backward for one (n, g) pair and output pixels [pix_begin, pix_end) of its image, in
// chunks of kBackwardChunk pixels: plan the chunk (plan_backward_chunk), then for each pixel
// and point the dot products of grad_output with the four corners and the scatter of
// grad_output into the corners' grad_input, then the offset and mask gradients of the chunk
// in loops over its pixels; pixels with something not finite go through
// backward_pixel_exact. grad_input is accumulated into `grad_image` (pixel stride
// `gi_stride`), which this call owns exclusively: no two tasks write the same memory. Without
// bands (Banded = std::false_type) it is the pair's whole image. A band's buffer
// (std::true_type) holds input pixels [gi_begin, gi_end) (index y * W + x) only, and corners
// outside them are dropped: the caller sizes the buffer to cover every pixel the points
// reach, and the check keeps a mistake there from writing out of bounds.
template <typename scalar_t, int CG, typename Banded>
DCNV3_INLINE void backward_task(const scalar_t* __restrict grad_output, const scalar_t* __restrict input,
                                const scalar_t* __restrict offset, const scalar_t* __restrict mask,
                                at::opmath_type<scalar_t>* __restrict grad_image, int64_t gi_stride,
                                int64_t gi_begin, int64_t gi_end, scalar_t* __restrict grad_offset,
                                scalar_t* __restrict grad_mask, const Geometry& geo, const Params& p,
                                int64_t n, int64_t g, int64_t pix_begin, int64_t pix_end, Banded,
                                BackwardWorkspace<scalar_t>* workspace, Isa isa) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t S = kBackwardChunk;
  const KernelGrid<acc_t>& grid = workspace->grid;
  BackwardPlan<acc_t>& plan = workspace->plan;
  const int64_t P = geo.points, Cg = CG > 0 ? CG : p.group_channels, C = geo.channels;
  const int64_t hw_out = geo.height_out * geo.width_out;
  const scalar_t* const zeros = workspace->zeros.data();
  acc_t* const sink = workspace->sink.data();
  // grad_output of one (pixel, group) in float32: `go` in channel order, and for bfloat16
  // with an even count also `go_pairs`, even channels then odd ones, for the dot products
  // with corner values read in pairs (see forward_pixels).
  acc_t go_fixed[CG > 0 ? 2 * CG : 1];
  acc_t* __restrict const go = CG > 0 ? go_fixed : workspace->go.data();
  acc_t* __restrict const go_pairs = go + Cg;
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const bool pairs = kBf16 && Cg % 2 == 0;
  const int64_t half = Cg / 2;
  const scalar_t* image = input + n * geo.height_in * geo.width_in * C + g * Cg;
  // int32 pixel indices in the plan: larger images go point by point.
  const bool plannable = geo.height_in * geo.width_in < (int64_t(1) << 31);
  for (int64_t pix0 = pix_begin; pix0 < pix_end; pix0 += S) {
    const int64_t count = std::min(S, pix_end - pix0), idx0 = n * hw_out + pix0;
    if (!plannable) {
      for (int64_t pix = pix0; pix < pix0 + count; ++pix) {
        backward_pixel_exact(grad_output, image, offset, mask, grad_image, gi_stride, gi_begin, gi_end,
                             grad_offset, grad_mask, geo, p, grid, n, g, pix, Banded{});
      }
      continue;
    }
    plan_backward_chunk_dispatch<scalar_t, 0>(isa, offset + (idx0 * p.group + g) * P * 2,
                                              mask + (idx0 * p.group + g) * P, pix0, count, &geo, &p, &grid, &plan);
    for (int64_t c = 0; c < count; ++c) {
      if (plan.bad[c]) continue;
      // grad_output of this (pixel, group), widened once: it is read 8 times per point.
      const scalar_t* __restrict go_in = grad_output + (idx0 + c) * C + g * Cg;
      for (int64_t ch = 0; ch < Cg; ++ch) go[ch] = widen(go_in[ch]);
      if (pairs) {
        for (int64_t i = 0; i < half; ++i) {
          go_pairs[i] = go[2 * i];
          go_pairs[half + i] = go[2 * i + 1];
        }
      }
      for (int64_t j = c; j < P * S; j += S) {
        if (!plan.inside[j]) {
          plan.d0[j] = plan.d1[j] = plan.d2[j] = plan.d3[j] = acc_t(0);
          continue;
        }
        const int32_t corner_pixel[4] = {plan.i0[j], plan.i1[j], plan.i2[j], plan.i3[j]};
        const acc_t mj = plan.m[j];
        const acc_t w[4] = {mj * plan.w0[j], mj * plan.w1[j], mj * plan.w2[j], mj * plan.w3[j]};
        const scalar_t* v[4];
        acc_t* gi[4];
        for (int corner = 0; corner < 4; ++corner) {
          const int64_t pixel = corner_pixel[corner];
          v[corner] = pixel >= 0 ? image + pixel * C : zeros;
          if constexpr (Banded::value) {
            // One unsigned comparison: also false for pixel == -1 (outside the image).
            const bool in_buffer =
                static_cast<uint64_t>(pixel - gi_begin) < static_cast<uint64_t>(gi_end - gi_begin);
            gi[corner] = in_buffer ? grad_image + (pixel - gi_begin) * gi_stride : sink;
          } else {
            gi[corner] = pixel >= 0 ? grad_image + pixel * gi_stride : sink;
          }
        }
        const scalar_t *__restrict v0 = v[0], *__restrict v1 = v[1], *__restrict v2 = v[2],
                                   *__restrict v3 = v[3];
        acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;  // <grad_output, corner value>
        bool done = false;
        if constexpr (kBf16) {
          if (pairs) {
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t i = 0; i < half; ++i) {
              const acc_t ge = go_pairs[i], gd = go_pairs[half + i];
              const uint32_t u0 = channel_pair(v0, i), u1 = channel_pair(v1, i), u2 = channel_pair(v2, i),
                             u3 = channel_pair(v3, i);
              d0 += ge * bits_to_float(u0 << 16) + gd * bits_to_float(u0 & 0xffff0000u);
              d1 += ge * bits_to_float(u1 << 16) + gd * bits_to_float(u1 & 0xffff0000u);
              d2 += ge * bits_to_float(u2 << 16) + gd * bits_to_float(u2 & 0xffff0000u);
              d3 += ge * bits_to_float(u3 << 16) + gd * bits_to_float(u3 & 0xffff0000u);
            }
            done = true;
          }
        }
        if (!done) {
#pragma omp simd reduction(+ : d0, d1, d2, d3)
          for (int64_t ch = 0; ch < Cg; ++ch) {
            const acc_t gch = go[ch];
            d0 += gch * widen(v0[ch]);
            d1 += gch * widen(v1[ch]);
            d2 += gch * widen(v2[ch]);
            d3 += gch * widen(v3[ch]);
          }
        }
        // Corners may coincide with the sink only, never with each other, so these
        // four updates are independent.
        for (int corner = 0; corner < 4; ++corner) {
          acc_t* __restrict dst = gi[corner];
          const acc_t wc = w[corner];
          for (int64_t ch = 0; ch < Cg; ++ch) dst[ch] += wc * go[ch];
        }
        plan.d0[j] = d0;
        plan.d1[j] = d1;
        plan.d2[j] = d2;
        plan.d3[j] = d3;
      }
    }
    finish_backward_chunk_dispatch<scalar_t, 0>(isa, grad_offset + (idx0 * p.group + g) * P * 2,
                                                grad_mask + (idx0 * p.group + g) * P, count, &geo, &p, &plan,
                                                workspace->staged.data());
    for (int64_t c = 0; c < count; ++c) {
      if (!plan.bad[c]) continue;
      backward_pixel_exact(grad_output, image, offset, mask, grad_image, gi_stride, gi_begin, gi_end,
                           grad_offset, grad_mask, geo, p, grid, n, g, pix0 + c, Banded{});
    }
  }
}

// ---- Instruction sets -------------------------------------------------------------
// "auto" (the default) runs the AVX2 copy wherever the CPU has AVX2+FMA+F16C, AVX-512
// CPUs included: with 16-32 channels per group the loops fill one or two 512-bit
// registers, and the AVX-512 copy has not been measured faster than AVX2 yet. It is
// picked with DCNV3_CPU_ISA=avx512 or ops_dcnv3.set_cpu_isa("avx512"), and
// tools/benchmark_dcnv3.py --isa all times every copy the CPU can run.
// DCNV3_CPU_ISA=baseline|avx2|avx512|auto forces a copy for the whole process; a copy the
// CPU cannot run is an error at the first call, never an illegal instruction.
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

bool cpu_supports(Isa isa) {
#if DCNV3_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::kBaseline:
      return true;
    case Isa::kAvx2:
      return avx2;
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

std::vector<std::string> supported_isa_names();

Isa auto_isa() { return cpu_supports(Isa::kAvx2) ? Isa::kAvx2 : Isa::kBaseline; }

// The copy that a name asks for ("auto" included), with a clear error for a name that is
// not an instruction set or a copy that this CPU cannot run.
Isa isa_from_name(const std::string& name, const char* source) {
  if (name == "auto" || name.empty()) return auto_isa();
  for (int i = 0; i < 3; ++i) {
    if (name != kIsaNames[i]) continue;
    TORCH_CHECK(cpu_supports(Isa(i)), source, "=", name, ": this CPU cannot run the ", name,
                " kernels (see /proc/cpuinfo); use one of ", c10::Join(", ", supported_isa_names()));
    return Isa(i);
  }
  TORCH_CHECK(false, source, " must be auto, baseline, avx2 or avx512, got '", name, "'");
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (int i = 0; i < 3; ++i) {
    if (cpu_supports(Isa(i))) names.emplace_back(kIsaNames[i]);
  }
  return names;
}

// -1 until the first call reads DCNV3_CPU_ISA (an error there is raised at that call).
std::atomic<int> g_isa{-1};

std::string cpu_isa() { return kIsaNames[int(current_isa())]; }

// Sets the copy for later calls ("auto": the default choice); returns the previous one.
std::string set_cpu_isa(const std::string& name) {
  const Isa isa = isa_from_name(name, "set_cpu_isa");
  const int previous = g_isa.exchange(int(isa));
  return previous < 0 ? std::string("auto") : std::string(kIsaNames[previous]);
}

DCNV3_DEFINE_ISA_VARIANTS(forward_pixels)
DCNV3_DEFINE_ISA_VARIANTS(backward_task)

// Calls f(std::integral_constant<int, CG>) with CG = the channels per group when it is
// one that InternImage uses (16 for T..XL, 32 for H/G), else CG = 0 (any count).
template <typename scalar_t, typename F>
void dispatch_group_channels(int64_t group_channels, const F& f) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (group_channels == 16) return f(std::integral_constant<int, 16>{});
    if (group_channels == 32) return f(std::integral_constant<int, 32>{});
  }
  f(std::integral_constant<int, 0>{});
}

Params make_params(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                   int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                   int64_t group_channels, double offset_scale, bool remove_center, bool softmax) {
  const int64_t points = kernel_h * kernel_w - (remove_center ? 1 : 0);
  return Params{kernel_h, kernel_w,       stride_h,     stride_w,      pad_h,   pad_w,
                dilation_h, dilation_w,   group,        group_channels, offset_scale, remove_center,
                softmax,  group * points * 2, group * points};
}

// Elements between consecutive pixels of an (N, Ho, Wo, K) tensor whose channels are
// contiguous and whose pixels are equally spaced (a contiguous tensor, or a slice of the
// channels of one: the module computes offsets and masks with one matrix product and
// passes the two slices), else -1.
int64_t pixel_stride(const at::Tensor& t) {
  if (t.stride(3) != 1 && t.size(3) > 1) return -1;
  const int64_t row = t.stride(2);
  if (row < t.size(3)) return -1;
  if (t.size(1) > 1 && t.stride(1) != row * t.size(2)) return -1;
  if (t.size(0) > 1 && t.stride(0) != row * t.size(2) * t.size(1)) return -1;
  return row;
}

at::Tensor dcnv3_forward_cpu(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                             int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                             int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                             int64_t group, int64_t group_channels, double offset_scale,
                             bool remove_center, bool softmax) {
  const Geometry geo = check_dcnv3_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w,
                                        pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                                        remove_center);
  TORCH_CHECK(input_.device().is_cpu(), "dcnv3_forward_cpu: tensors must be on the CPU");
  if (input_.scalar_type() == at::kHalf) {  // in float32, rounded once (see the top of the file)
    return dcnv3_forward_cpu(input_.to(at::kFloat), offset_.to(at::kFloat), mask_.to(at::kFloat), kernel_h,
                             kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                             group_channels, offset_scale, remove_center, softmax)
        .to(at::kHalf);
  }
  Params p = make_params(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                         group_channels, offset_scale, remove_center, softmax);
  const Isa isa = current_isa();
  // Offsets and masks may be channel slices of wider tensors (see pixel_stride): read in
  // place. Anything else is made contiguous (pixels then group * P * 2 / group * P apart).
  const int64_t offset_row = pixel_stride(offset_), mask_row = pixel_stride(mask_);
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_row > 0 ? offset_ : offset_.contiguous();
  const at::Tensor mask = mask_row > 0 ? mask_ : mask_.contiguous();
  if (offset_row > 0) p.offset_row = offset_row;
  if (mask_row > 0) p.mask_row = mask_row;
  at::Tensor output = at::empty({geo.batch, geo.height_out, geo.width_out, geo.channels}, input.options());
  const int64_t pixels = geo.batch * geo.height_out * geo.width_out;
  if (pixels == 0 || geo.channels == 0) return output;
  // Roughly 4 * P * C multiply-adds per pixel: ~2^14 of them per chunk is worth a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * geo.points * geo.channels));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dcnv3_forward_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* off = offset.const_data_ptr<scalar_t>();
    const scalar_t* msk = mask.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    dispatch_group_channels<scalar_t>(group_channels, [&](auto cg) {
      at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
        forward_pixels_dispatch<scalar_t, decltype(cg)::value>(isa, in, off, msk, out, geo, p, begin, end);
      });
    });
  });
  return output;
}

// How the backward splits each (image, group) pair into bands of output rows, and the
// private grad_input buffer of each task (pair * count + band): input rows [lo, hi),
// stored from row `start` of one flat buffer of input rows (start[tasks] rows in all).
struct Bands {
  int64_t count = 1;
  std::vector<int64_t> lo, hi, start;
};

// Input rows [lo, hi) that the corners of the sampling points of output row `ho` of pair
// (n, g) can touch (lo >= hi when none). Each location is computed as the kernels do, but
// a location counts if it is within a row of the box the kernels use, and its rows are
// widened by one each way, so that a last-bit difference in the kernels' arithmetic (the
// AVX2 copy contracts to FMA) cannot reach a row outside.
template <typename scalar_t>
void touched_rows(const scalar_t* offset, const Geometry& geo, const Params& p,
                  const KernelGrid<at::opmath_type<scalar_t>>& grid, int64_t n, int64_t g, int64_t ho,
                  int64_t& lo, int64_t& hi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = geo.points;
  const acc_t scale = acc_t(p.offset_scale);
  const acc_t base_y = acc_t(ho * p.stride_h - p.pad_h + (p.dilation_h * (p.kernel_h - 1)) / 2);
  lo = geo.height_in;
  hi = 0;
  for (int64_t wo = 0; wo < geo.width_out; ++wo) {
    const int64_t idx = (n * geo.height_out + ho) * geo.width_out + wo;
    const scalar_t* off = offset + (idx * p.group + g) * P * 2;
    for (int64_t k = 0; k < P; ++k) {
      const acc_t y = base_y + (grid.dy[k] + widen(off[k * 2 + 1])) * scale;
      if (!(y > acc_t(-2) && y < acc_t(geo.height_in + 1))) continue;  // NaN fails too
      const int64_t y0 = static_cast<int64_t>(std::floor(y));
      lo = std::min(lo, y0 - 1);
      hi = std::max(hi, y0 + 3);
    }
  }
  lo = std::max<int64_t>(lo, 0);
  hi = std::min(hi, geo.height_in);
}

// Splits every pair into at most `wanted` bands of output rows. With the rows each band
// reaches, the buffers usually add up to little more than one copy of grad_input; when
// the offsets spread the bands over the whole image, the band count is halved until the
// buffers fit in max(2 x the input, 32 MiB) (one band always fits).
template <typename scalar_t>
Bands plan_bands(const scalar_t* offset, const Geometry& geo, const Params& p, int64_t wanted) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pairs = geo.batch * p.group, Ho = geo.height_out;
  std::vector<int64_t> row_lo(pairs * Ho), row_hi(pairs * Ho);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, geo.width_out * geo.points));
  at::parallel_for(0, pairs * Ho, grain, [&](int64_t begin, int64_t end) {
    const KernelGrid<acc_t> grid(p);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / Ho;
      touched_rows(offset, geo, p, grid, pair / p.group, pair % p.group, item % Ho, row_lo[item], row_hi[item]);
    }
  });
  const int64_t row_bytes = std::max<int64_t>(1, geo.width_in * p.group_channels * int64_t(sizeof(acc_t)));
  const int64_t budget_rows = std::max<int64_t>(2 * geo.height_in * pairs, (int64_t(32) << 20) / row_bytes);
  Bands bands;
  for (int64_t count = std::max<int64_t>(wanted, 1);; count /= 2) {
    bands.count = count;
    bands.lo.assign(pairs * count, 0);
    bands.hi.assign(pairs * count, 0);
    bands.start.assign(pairs * count + 1, 0);
    int64_t rows = 0;
    for (int64_t task = 0; task < pairs * count && (rows <= budget_rows || count == 1); ++task) {
      const int64_t pair = task / count, band = task % count;
      int64_t lo = geo.height_in, hi = 0;
      for (int64_t ho = band * Ho / count; ho < (band + 1) * Ho / count; ++ho) {
        lo = std::min(lo, row_lo[pair * Ho + ho]);
        hi = std::max(hi, row_hi[pair * Ho + ho]);
      }
      if (lo >= hi) lo = hi = 0;
      bands.lo[task] = lo;
      bands.hi[task] = hi;
      bands.start[task] = rows;
      rows += hi - lo;
      bands.start[task + 1] = rows;
    }
    if (rows <= budget_rows || count == 1) return bands;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& offset_,
    const at::Tensor& mask_, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
    int64_t group_channels, double offset_scale, bool remove_center, bool softmax) {
  const Geometry geo = check_dcnv3_args(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w,
                                        pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                                        remove_center);
  TORCH_CHECK(input_.device().is_cpu() && grad_output_.device().is_cpu(),
              "dcnv3_backward_cpu: tensors must be on the CPU");
  const std::vector<int64_t> out_shape{geo.batch, geo.height_out, geo.width_out, geo.channels};
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef(out_shape), "dcnv3: grad_output must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_output_.sizes());
  TORCH_CHECK(grad_output_.scalar_type() == input_.scalar_type(), "dcnv3: grad_output must have dtype ",
              input_.scalar_type(), ", got ", grad_output_.scalar_type());
  if (input_.scalar_type() == at::kHalf) {  // in float32, rounded once (see the top of the file)
    auto grads = dcnv3_backward_cpu(grad_output_.to(at::kFloat), input_.to(at::kFloat), offset_.to(at::kFloat),
                                    mask_.to(at::kFloat), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
                                    softmax);
    return {std::get<0>(grads).to(at::kHalf), std::get<1>(grads).to(at::kHalf), std::get<2>(grads).to(at::kHalf)};
  }
  const Params p = make_params(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                               dilation_w, group, group_channels, offset_scale, remove_center, softmax);
  const at::Tensor grad_output = grad_output_.contiguous(), input = input_.contiguous(),
                   offset = offset_.contiguous(), mask = mask_.contiguous();
  const Isa isa = current_isa();
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);

  // Each task is one (image, group) pair, split into `bands` bands of output rows when
  // there are too few pairs to occupy the threads. grad_input slices of different (n, g)
  // never overlap, so a pair in one band accumulates straight into grad_input; split
  // pairs go through banded buffers (see the top of the file), so results depend only on
  // the thread count and the input.
  const int64_t pairs = geo.batch * group;
  const int64_t hw_out = geo.height_out * geo.width_out, hw_in = geo.height_in * geo.width_in;
  if (pairs == 0 || hw_out == 0) return {at::zeros_like(input), grad_offset, grad_mask};
  const int64_t threads = at::get_num_threads();
  const int64_t wanted_bands =
      pairs >= 4 * threads ? 1 : std::min<int64_t>(geo.height_out, (4 * threads + pairs - 1) / pairs);
  const bool direct = wanted_bands == 1 && at::toOpMathType(input.scalar_type()) == input.scalar_type();
  at::Tensor grad_input = direct ? at::zeros_like(input) : at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dcnv3_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* off = offset.const_data_ptr<scalar_t>();
    const scalar_t* msk = mask.const_data_ptr<scalar_t>();
    scalar_t* goff = grad_offset.mutable_data_ptr<scalar_t>();
    scalar_t* gmsk = grad_mask.mutable_data_ptr<scalar_t>();
    scalar_t* gin = grad_input.mutable_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      if (direct) {
        dispatch_group_channels<scalar_t>(group_channels, [&](auto cg) {
          at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
            BackwardWorkspace<scalar_t> workspace(geo, p);
            for (int64_t pair = begin; pair < end; ++pair) {
              const int64_t n = pair / group, g = pair % group;
              backward_task_dispatch<scalar_t, decltype(cg)::value>(
                  isa, go, in, off, msk, gin + n * hw_in * geo.channels + g * group_channels, geo.channels,
                  int64_t(0), hw_in, goff, gmsk, geo, p, n, g, int64_t(0), hw_out, std::false_type{}, &workspace,
                  isa);
            }
          });
        });
        return;
      }
    } else if (wanted_bands == 1) {
      // 16-bit types: each pair accumulates in a float32 image of its own (one per thread,
      // reused), written to grad_input once, rounded, when the pair is done.
      dispatch_group_channels<scalar_t>(group_channels, [&](auto cg) {
        at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> scratch(hw_in * group_channels);
          BackwardWorkspace<scalar_t> workspace(geo, p);
          for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t n = pair / group, g = pair % group;
            std::fill(scratch.begin(), scratch.end(), acc_t(0));
            backward_task_dispatch<scalar_t, decltype(cg)::value>(
                isa, go, in, off, msk, scratch.data(), group_channels, int64_t(0), hw_in, goff, gmsk, geo, p, n,
                g, int64_t(0), hw_out, std::false_type{}, &workspace, isa);
            store_rounded_dispatch<scalar_t, 0>(isa, static_cast<const acc_t*>(scratch.data()), group_channels,
                                                gin + n * hw_in * geo.channels + g * group_channels, geo.channels,
                                                hw_in, group_channels);
          }
        });
      });
      return;
    }
    const Bands bands = plan_bands(off, geo, p, wanted_bands);
    const int64_t tasks = pairs * bands.count;
    const int64_t row_size = geo.width_in * group_channels;  // one input row of one group
    at::Tensor partial = at::zeros({bands.start[tasks] * row_size},
                                   input.options().dtype(at::toOpMathType(input.scalar_type())));
    acc_t* const partial_base = partial.mutable_data_ptr<acc_t>();
    dispatch_group_channels<scalar_t>(group_channels, [&](auto cg) {
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        BackwardWorkspace<scalar_t> workspace(geo, p);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t pair = task / bands.count, band = task % bands.count;
          const int64_t n = pair / group, g = pair % group;
          const int64_t rows_begin = band * geo.height_out / bands.count;
          const int64_t rows_end = (band + 1) * geo.height_out / bands.count;
          backward_task_dispatch<scalar_t, decltype(cg)::value>(
              isa, go, in, off, msk, partial_base + bands.start[task] * row_size, group_channels,
              bands.lo[task] * geo.width_in, bands.hi[task] * geo.width_in, goff, gmsk, geo, p, n, g,
              rows_begin * geo.width_out, rows_end * geo.width_out, std::true_type{}, &workspace, isa);
        }
      });
    });
    // Sum the bands of each (pair, input row) in band order.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, bands.count * row_size));
    at::parallel_for(0, pairs * geo.height_in, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(row_size);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t pair = item / geo.height_in, y = item % geo.height_in;
        const int64_t n = pair / group, g = pair % group;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t task = pair * bands.count; task < (pair + 1) * bands.count; ++task) {
          if (y < bands.lo[task] || y >= bands.hi[task]) continue;
          const acc_t* src = partial_base + (bands.start[task] + y - bands.lo[task]) * row_size;
          for (int64_t i = 0; i < row_size; ++i) sum[i] += src[i];
        }
        store_rounded_dispatch<scalar_t, 0>(isa, static_cast<const acc_t*>(sum.data()), group_channels,
                                            gin + (n * hw_in + y * geo.width_in) * geo.channels + g * group_channels,
                                            geo.channels, geo.width_in, group_channels);
      }
    });
  });
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace

Isa current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("DCNV3_CPU_ISA");
    isa = int(isa_from_name(env == nullptr ? "auto" : env, "DCNV3_CPU_ISA"));
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return Isa(isa);
}

TORCH_LIBRARY_FRAGMENT(ops_dcnv3, m) {
  // Which copy of the CPU kernels runs (see "Instruction sets"); ops_dcnv3.cpu_isa() etc.
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("set_cpu_isa(str isa) -> str", &set_cpu_isa);
  m.def("supported_cpu_isas() -> str[]", &supported_isa_names);
}

TORCH_LIBRARY_IMPL(ops_dcnv3, CPU, m) {
  m.impl("dcnv3_forward", &dcnv3_forward_cpu);
  m.impl("dcnv3_backward", &dcnv3_backward_cpu);
}

}  // namespace ops_dcnv3
