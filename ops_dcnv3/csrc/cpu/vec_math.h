// Scalar math for the CPU kernels' vectorised loops (shared by dcnv3_cpu.cpp and
// block_inference_cpu.cpp): branch-free, without libm calls, so that GCC vectorises the loops
// that use them in every instruction-set copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace ops_dcnv3 {

// The bits of a float32 and back (memcpy: no aliasing rules broken; vectorised as moves).
DCNV3_INLINE float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
DCNV3_INLINE uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(z) for z <= 0, NaN or -Inf (the softmax's logits minus their maximum, GELU's -x^2/2).
// float64: std::exp. float32: 2^n * e^r with n = round(z / ln 2) and a degree-7
// polynomial for e^r (Cephes' expf coefficients), within 2 ulp of std::exp; branch-free, so
// the compiler vectorises loops of it (libm's expf is a call per value). Below -87.3 the
// result would be subnormal and is 0 (std::exp gives at most 1.2e-38 there): in the softmax,
// after the division by the sum (at least 1), no weight differs by more than that.
DCNV3_INLINE double exp_nonpositive(double z) { return std::exp(z); }
DCNV3_INLINE float exp_nonpositive(float z) {
  const float n = std::floor(z * 1.44269504088896341f + 0.5f);
  float r = z - n * 0.693359375f;  // ln 2 in two parts (Cody-Waite): exact product
  r = r - n * -2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.0f;
  // 2^n for n in [-126, 0]; n is clamped into that range (NaN to -126: std::max returns its
  // first argument then), and the select gives 0 below -87.3, NaN for a NaN z (e is NaN).
  const int32_t exponent = static_cast<int32_t>(std::min(0.0f, std::max(-126.0f, n))) + 127;
  const float result = e * bits_to_float(static_cast<uint32_t>(exponent) << 23);
  return z < -87.3f ? 0.0f : result;
}

}  // namespace ops_dcnv3
