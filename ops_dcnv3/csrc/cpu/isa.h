// Copies of the CPU kernels per x86-64 instruction set, shared by the kernel files
// (dcnv3_cpu.cpp, block_inference_cpu.cpp). On x86-64 a kernel is compiled three times, for the
// baseline, for AVX2+FMA+F16C and for AVX-512 (F/BW/VL/DQ, 512-bit vectors), and one copy
// is picked at run time: current_isa() (see "Instruction sets" in dcnv3_cpu.cpp).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define DCNV3_X86_DISPATCH 1
#define DCNV3_INLINE inline __attribute__((always_inline))
#define DCNV3_NOINLINE __attribute__((noinline))
#define DCNV3_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DCNV3_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#else
#define DCNV3_X86_DISPATCH 0
#define DCNV3_INLINE inline
#define DCNV3_NOINLINE
#endif

namespace ops_dcnv3 {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The copy that the kernels run: DCNV3_CPU_ISA at the first call, or set_cpu_isa().
Isa current_isa();

// One copy of each kernel per instruction set:
// DCNV3_DEFINE_ISA_VARIANTS(kernel) defines kernel_baseline, kernel_avx2, kernel_avx512 and
// kernel_dispatch(isa, ...). The op reads the chosen set once per call and passes it on.
#define DCNV3_DEFINE_ISA_VARIANTS(kernel)                                               \
  template <typename scalar_t, int CG, typename... Args>                                \
  DCNV3_NOINLINE void kernel##_baseline(Args... args) {                                 \
    kernel<scalar_t, CG>(args...);                                                      \
  }                                                                                     \
  DCNV3_ISA_VARIANT(kernel, avx2, DCNV3_TARGET_AVX2)                                    \
  DCNV3_ISA_VARIANT(kernel, avx512, DCNV3_TARGET_AVX512)                                \
  template <typename scalar_t, int CG, typename... Args>                                \
  void kernel##_dispatch(Isa isa, Args... args) {                                       \
    DCNV3_ISA_CALL(kernel, args)                                                        \
    kernel##_baseline<scalar_t, CG>(args...);                                           \
  }

#if DCNV3_X86_DISPATCH
#define DCNV3_ISA_VARIANT(kernel, isa, target)                                          \
  template <typename scalar_t, int CG, typename... Args>                                \
  DCNV3_NOINLINE target void kernel##_##isa(Args... args) {                             \
    kernel<scalar_t, CG>(args...);                                                      \
  }
#define DCNV3_ISA_CALL(kernel, args)                                                    \
  if (isa == Isa::kAvx512) return kernel##_avx512<scalar_t, CG>(args...);               \
  if (isa == Isa::kAvx2) return kernel##_avx2<scalar_t, CG>(args...);
#else
#define DCNV3_ISA_VARIANT(kernel, isa, target)
#define DCNV3_ISA_CALL(kernel, args)
#endif

}  // namespace ops_dcnv3
