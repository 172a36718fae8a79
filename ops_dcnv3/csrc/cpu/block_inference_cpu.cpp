// CPU kernel of the offset/mask branch of a DCNv3 block at inference: the depthwise
// convolution ("same" size, stride 1), LayerNorm over the channels and the exact GELU,
// fused into one pass over a channels-last (N, H, W, C) float32 tensor.
//
// DCNv3.inference_forward made these three oneDNN/ATen calls per block. At InternImage-T's
// sizes their fixed costs outweighed their arithmetic (batch 1, 14x14x256: ~140 us for the
// convolution, ~40 us for the norm and ~70 us for the GELU, for about 0.5 M multiply-adds);
// here one call does the work of a pixel while its channels are in the L1 cache.
//
// Numerics: float32 throughout, as the three ops. The convolution sums bias + taps in row
// order, the norm takes the mean and then the mean squared deviation (two passes over the
// pixel's channels), and GELU(x) = x/2 (1 + erf(x / sqrt 2)) uses the erf approximation of
// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the one ATen's vectorised GELU
// uses too), with erfc taken directly for x < 0 so that the small values there keep their
// relative precision. Results differ from the three ops by rounding only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "vec_math.h"

namespace ops_dcnv3 {
namespace {

// x/2 (1 + erf(x / sqrt 2)), the exact (not tanh) GELU.
DCNV3_INLINE float gelu_erf(float x) {
  const float z = std::fabs(x) * 0.707106781186547524f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erfc = poly * exp_nonpositive(-z * z);  // erfc(|x| / sqrt 2)
  return 0.5f * x * (x >= 0.0f ? 2.0f - erfc : erfc);
}

// Sum of value(c) for c in [0, n), in 8 partial sums (one vector register) added pairwise at
// the end.
template <typename F>
DCNV3_INLINE float sum8(int64_t n, const F& value) {
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int l = 0; l < 8; ++l) part[l] += value(c + l);
  }
  float tail = 0.0f;
  for (; c < n; ++c) tail += value(c);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
}

// LayerNorm of the C values at v (their mean, then their mean squared deviation), then the
// GELU if kGelu, written to dst.
template <bool kGelu>
DCNV3_INLINE void normalize_pixel(const float* v, int64_t C, const float* gamma, const float* beta, float eps, float* dst) {
  const float inv_c = 1.0f / float(C);
  const float mean = sum8(C, [v](int64_t c) { return v[c]; }) * inv_c;
  const float squares = sum8(C, [v, mean](int64_t c) { return (v[c] - mean) * (v[c] - mean); });
  const float rstd = 1.0f / std::sqrt(squares * inv_c + eps);
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const float y = (v[i] - mean) * rstd * gamma[i] + beta[i];
    dst[i] = kGelu ? gelu_erf(y) : y;
  }
}

struct DwArgs {
  const float* input;   // (N, H, W, C)
  const float* weight;  // (k * k, C): tap-major, channels contiguous
  const float* bias;    // (C)
  const float* gamma;   // (C), the norm's weight
  const float* beta;    // (C), the norm's bias
  float* output;        // (N, H, W, C)
  int64_t height, width, channels, kernel;
  float eps;
};

constexpr int64_t kBlock = 32;

// Output rows [begin, end) of the N * H rows; acc: C floats of scratch.
template <typename scalar_t, int CG>
DCNV3_INLINE void dw_conv_ln_gelu_rows(const DwArgs& a, int64_t begin, int64_t end, float* acc) {
  const int64_t C = a.channels, k = a.kernel, pad = k / 2, H = a.height, W = a.width;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / H, h = row % H;
    const int64_t i0 = std::max<int64_t>(0, pad - h), i1 = std::min<int64_t>(k, H + pad - h);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t j0 = std::max<int64_t>(0, pad - w), j1 = std::min<int64_t>(k, W + pad - w);
      const float* src_pixel = a.input + ((n * H + h - pad) * W + (w - pad)) * C;  // tap (0, 0)
      // Blocks of kBlock channels summed over all taps in registers, then the rest.
      int64_t c0 = 0;
      for (; c0 + kBlock <= C; c0 += kBlock) {
        float block[kBlock];
#pragma omp simd
        for (int64_t c = 0; c < kBlock; ++c) block[c] = a.bias[c0 + c];
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) {
            const float* src = src_pixel + (i * W + j) * C + c0;
            const float* wt = a.weight + (i * k + j) * C + c0;
#pragma omp simd
            for (int64_t c = 0; c < kBlock; ++c) block[c] += src[c] * wt[c];
          }
        }
#pragma omp simd
        for (int64_t c = 0; c < kBlock; ++c) acc[c0 + c] = block[c];
      }
      for (int64_t c = c0; c < C; ++c) {
        float sum = a.bias[c];
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) sum += src_pixel[(i * W + j) * C + c] * a.weight[(i * k + j) * C + c];
        }
        acc[c] = sum;
      }
      normalize_pixel<true>(acc, C, a.gamma, a.beta, a.eps, a.output + (row * W + w) * C);
    }
  }
}

DCNV3_DEFINE_ISA_VARIANTS(dw_conv_ln_gelu_rows)

// A per-channel parameter: a float32 CPU tensor of C elements.
void check_channels(const char* op, const char* what, const at::Tensor& t, int64_t C) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == C, op, ": ", what,
              " must be float32, on the CPU, with C = ", C, " elements; got ", t.scalar_type(), " on ", t.device(),
              " with ", t.numel());
}

void check_norm_params(const char* op, int64_t C, const at::Tensor& weight, const at::Tensor& bias) {
  check_channels(op, "the norm's weight and bias", weight, C);
  check_channels(op, "the norm's weight and bias", bias, C);
}

at::Tensor dw_conv_ln_gelu_cpu(const at::Tensor& input_, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, double eps) {
  TORCH_CHECK(input_.dim() == 4, "dw_conv_ln_gelu: input must be 4-D (N, H, W, C), got ", input_.dim(), "-D");
  const int64_t C = input_.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              "dw_conv_ln_gelu: weight must be a depthwise (C, 1, k, k) kernel of odd k for C = ", C, ", got ",
              weight.sizes());
  for (const at::Tensor* t : {&input_, &weight}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "dw_conv_ln_gelu: input and weight must be float32 CPU tensors, got ", t->scalar_type(), " on ",
                t->device());
  }
  check_norm_params("dw_conv_ln_gelu", C, norm_weight, norm_bias);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_channels("dw_conv_ln_gelu", "bias", *bias, C);
  const int64_t k = weight.size(2);
  const at::Tensor input = input_.contiguous();
  at::Tensor output = at::empty_like(input);
  const int64_t rows = input.size(0) * input.size(1), W = input.size(2);
  if (rows == 0 || W == 0 || C == 0) return output;

  // The kernel tap-major, the parameters contiguous (a few thousand values).
  std::vector<float> taps(k * k * C), bias_values(C, 0.0f);
  const at::Tensor w = weight.contiguous(), gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();
  const float* wp = w.const_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < k * k; ++t) taps[t * C + c] = wp[c * k * k + t];
  }
  if (has_bias) {
    const at::Tensor b = bias->contiguous();
    std::copy_n(b.const_data_ptr<float>(), C, bias_values.begin());
  }
  const DwArgs args{input.const_data_ptr<float>(), taps.data(), bias_values.data(), gamma.const_data_ptr<float>(),
                    beta.const_data_ptr<float>(), output.mutable_data_ptr<float>(), input.size(1), W, C, k,
                    float(eps)};
  const Isa isa = current_isa();
  // ~k*k + 30 operations per value: about 2^16 of them per chunk is worth a thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * C * (k * k + 30)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    dw_conv_ln_gelu_rows_dispatch<float, 0>(isa, args, begin, end, acc.data());
  });
  return output;
}

struct AddNormArgs {
  float* x;               // (pixels, C): a block branch's output, becomes residual + scale * x
  const float* residual;  // (pixels, C)
  const float* scale;     // (C) or null: the branch's layer scale
  const float* gamma;     // (C), the norm's weight
  const float* beta;      // (C), the norm's bias
  float* normed;          // (pixels, C): LayerNorm of the sum
  int64_t channels;
  float eps;
};

template <typename scalar_t, int CG>
DCNV3_INLINE void add_layer_norm_pixels(const AddNormArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.channels;
  for (int64_t p = begin; p < end; ++p) {
    float* x = a.x + p * C;
    const float* r = a.residual + p * C;
    if (a.scale != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) x[c] = r[c] + a.scale[c] * x[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) x[c] = r[c] + x[c];
    }
    normalize_pixel<false>(x, C, a.gamma, a.beta, a.eps, a.normed + p * C);
  }
}

DCNV3_DEFINE_ISA_VARIANTS(add_layer_norm_pixels)

// x <- residual + scale * x (in place: x is the block branch's own output), returns
// LayerNorm(x) over the last dimension.
at::Tensor add_layer_norm_cpu(at::Tensor& x, const at::Tensor& residual_, const c10::optional<at::Tensor>& scale,
                              const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == residual_.sizes(), "add_layer_norm_: x and residual must have the same "
              "shape, got ", x.sizes(), " and ", residual_.sizes());
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&x), &residual_}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "add_layer_norm_: x and residual must be float32 CPU tensors, got ", t->scalar_type(), " on ",
                t->device());
  }
  TORCH_CHECK(x.is_contiguous(), "add_layer_norm_: x must be contiguous (it is updated in place)");
  const int64_t C = x.size(-1);
  check_norm_params("add_layer_norm_", C, norm_weight, norm_bias);
  const bool has_scale = scale.has_value() && scale->defined();
  if (has_scale) check_channels("add_layer_norm_", "scale", *scale, C);
  const at::Tensor residual = residual_.contiguous();
  at::Tensor normed = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t pixels = C == 0 ? 0 : x.numel() / C;
  if (pixels == 0) return normed;
  const at::Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();
  const at::Tensor scale_values = has_scale ? scale->contiguous() : at::Tensor();
  const AddNormArgs args{x.mutable_data_ptr<float>(), residual.const_data_ptr<float>(),
                         has_scale ? scale_values.const_data_ptr<float>() : nullptr, gamma.const_data_ptr<float>(),
                         beta.const_data_ptr<float>(), normed.mutable_data_ptr<float>(), C, float(eps)};
  const Isa isa = current_isa();
  // ~10 operations per value: about 2^16 of them per chunk is worth a thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (10 * C));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    add_layer_norm_pixels_dispatch<float, 0>(isa, args, begin, end);
  });
  return normed;
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dcnv3, CPU, m) {
  m.impl("dw_conv_ln_gelu", &dw_conv_ln_gelu_cpu);
  m.impl("add_layer_norm_", &add_layer_norm_cpu);
}

}  // namespace ops_dcnv3
