// Vector helpers shared by the extension's sources (GCC/Clang vector extensions: AVX2 registers
// on x86 with -march=native, NEON pairs on ARM).
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

// exp(x) on a float or eight (V = v8f), relative error ~1e-7, clamped to [-87, 88]: Cody-Waite
// reduction and a degree-7 Taylor polynomial. std::exp does not vectorise without -ffast-math,
// and neither did a clamped scalar loop (GCC 12: "control flow in loop"), so it is written on
// GCC vectors; a scalar expf per element made silu * up 3x slower than torch's (measured).
template <typename V, typename I>
inline V exp_approx(V x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  V p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits;
  if constexpr (sizeof(V) == sizeof(float)) {
    bits = (static_cast<int32_t>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// a * b + c with one rounding where the CPU has FMA. GCC contracts `acc += a * b` into an FMA in
// one loop and not in another (seen in skinny_linear.cpp), so kernels whose results must agree
// bit for bit across code paths say which they mean.
inline v8f fmadd(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// The eight lanes of a summed in hsum8's order: ((0+1)+(2+3))+((4+5)+(6+7)).
inline float hsum1(v8f a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

// Lane j of the result is the sum of the eight lanes of a[j]: eight dot products reduced at once,
// instead of eight horizontal sums (a transpose by pairwise shuffles and adds).
inline v8f hsum8(const v8f* a) {
  const v8i lo = {0, 8, 2, 10, 4, 12, 6, 14}, hi = {1, 9, 3, 11, 5, 13, 7, 15};
  const v8f x01 = __builtin_shuffle(a[0], a[1], lo) + __builtin_shuffle(a[0], a[1], hi);
  const v8f x23 = __builtin_shuffle(a[2], a[3], lo) + __builtin_shuffle(a[2], a[3], hi);
  const v8f x45 = __builtin_shuffle(a[4], a[5], lo) + __builtin_shuffle(a[4], a[5], hi);
  const v8f x67 = __builtin_shuffle(a[6], a[7], lo) + __builtin_shuffle(a[6], a[7], hi);
  const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8f y0 = __builtin_shuffle(x01, x23, lo2) + __builtin_shuffle(x01, x23, hi2);
  const v8f y1 = __builtin_shuffle(x45, x67, lo2) + __builtin_shuffle(x45, x67, hi2);
  const v8i lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(y0, y1, lo3) + __builtin_shuffle(y0, y1, hi3);
}

}  // namespace
