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
#include <cstring>
#include <vector>

#include "isa.h"

namespace ops_dcnv3 {
namespace {

DCNV3_INLINE float float_from_bits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// e^x for x <= 0 in operations that vectorise (no libm call): x = k ln2 + r with |r| <= ln2/2,
// e^r by its Taylor polynomial to degree 7 (remainder below 6e-9 relative) and 2^k from the
// exponent bits. Below -87 (e^-87 ~ 1.6e-38, the smallest normal range) it returns e^-87.
DCNV3_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;  // ln 2 in two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * float_from_bits((int32_t(k) + 127) << 23);
}

// x/2 (1 + erf(x / sqrt 2)), the exact (not tanh) GELU.
DCNV3_INLINE float gelu_erf(float x) {
  const float z = std::fabs(x) * 0.707106781186547524f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erfc = poly * exp_nonpositive(-z * z);  // erfc(|x| / sqrt 2)
  return 0.5f * x * (x >= 0.0f ? 2.0f - erfc : erfc);
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
  const float inv_c = 1.0f / float(C);
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
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += acc[c];
      const float mean = sum * inv_c;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < C; ++c) {
        const float d = acc[c] - mean;
        squares += d * d;
      }
      const float rstd = 1.0f / std::sqrt(squares * inv_c + a.eps);
      float* dst = a.output + (row * W + w) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c] = gelu_erf((acc[c] - mean) * rstd * a.gamma[c] + a.beta[c]);
    }
  }
}

DCNV3_DEFINE_ISA_VARIANTS(dw_conv_ln_gelu_rows)

at::Tensor dw_conv_ln_gelu_cpu(const at::Tensor& input_, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, double eps) {
  TORCH_CHECK(input_.dim() == 4, "dw_conv_ln_gelu: input must be 4-D (N, H, W, C), got ", input_.dim(), "-D");
  const int64_t C = input_.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              "dw_conv_ln_gelu: weight must be a depthwise (C, 1, k, k) kernel of odd k for C = ", C, ", got ",
              weight.sizes());
  for (const at::Tensor* t : {&input_, &weight, &norm_weight, &norm_bias}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "dw_conv_ln_gelu: tensors must be float32 CPU tensors, got ", t->scalar_type(), " on ",
                t->device());
  }
  TORCH_CHECK(norm_weight.numel() == C && norm_bias.numel() == C,
              "dw_conv_ln_gelu: the norm's weight and bias must have C = ", C, " elements, got ",
              norm_weight.numel(), " and ", norm_bias.numel());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->numel() == C,
                "dw_conv_ln_gelu: bias must be a float32 CPU tensor of C = ", C, " elements");
  }
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

}  // namespace

TORCH_LIBRARY_IMPL(ops_dcnv3, CPU, m) { m.impl("dw_conv_ln_gelu", &dw_conv_ln_gelu_cpu); }

}  // namespace ops_dcnv3
