// y = x W^T for a few rows of x (decode at small batch), fp32 on CPU: the weight is read once,
// straight from its own [N, K] rows, at close to the host's read bandwidth. oneDNN's packed GEMM
// (cpu_linear.py) reaches about half of it at 1-8 rows on AVX2; why, with figures: cpu_linear.py.
//
// Each thread takes a contiguous range of output features. For one input row it walks W row by
// row, one sequential stream (a little faster than eight rows side by side: 7.2-7.8 against
// 7.5-8.1 ms for the 30M Llama's 33 weights). For more rows it takes eight weight rows at a time:
// eight dot products of K run side by side as eight vector accumulators, reduced together by
// hsum8, and the same eight rows are read again from L1/L2 for each input row. Both paths add in
// the same order (lane l of the accumulator takes k = l mod 8 by FMA, then hsum8's tree, then the
// tail of K by scalar FMA), so a row of the result does not depend on the other rows in the batch.
// Tried and dropped: a tile of 4 weight rows x 2 input rows (8 accumulators, each weight vector
// loaded once for two input rows) gave the same bits but was slower at every batch: 30M Llama's 33
// weights, 2 threads, 9.8-10.8 against 8.2-10.0 ms at 2 rows, 19.3-20.4 against 15.4-16.0 at 12.
//
// Where the compiler targets AVX-512 (-march=native on such a CPU) a register-tiled kernel takes
// every row count instead: a tile of 4 weight rows x up to 6 input rows, 24 accumulators of 16
// lanes, so each weight vector loaded serves six input rows and each input vector four weight
// rows (10 loads per 24 FMAs, where dot8 needs 9 loads per 8). Every dot product still adds in one
// order whatever the tile (lane l takes k = l mod 16 by FMA, then _mm512_reduce_add_ps, then the
// tail of K by scalar FMA), so a row of the result does not depend on the others. Intel Xeon with
// AVX-512, the wide test-bed model's 16 TP2 weights (376 MB), two processes at once, best of 3, ms,
// this kernel / oneDNN packed / the AVX2 path:
//   rows      1      2      4      8      12     16     24     32
//   tile      21-24  25.7   25-28  34-36  44.8   48-52  65.4   78-81
//   oneDNN    32-35  36.9   34-38  44-46  50.9   52-56  67.3   77-80
//   AVX2      35.2          38.5   54.5          89.2          155.6
// Tried and dropped on the same machine: blocking K by 128-512 (the tile's weights and inputs in
// L1, accumulators kept in memory between blocks): no faster; software prefetch of the next
// weight rows into L2: 62 against 50 ms at 16 rows. Compute alone (weights in cache) runs at
// 100 GFLOP/s, MKL's large sgemm rate; with the weights streamed from memory the two costs mostly
// add up, which is what bounds 16 rows and more.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace {

#if !defined(__AVX512F__)
// out[r] = w[r] . x for the eight rows r of w (row stride ldw), K elements each.
inline void dot8(const float* w, int64_t ldw, const float* x, int64_t K, float* out) {
  v8f acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = v8f{};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const v8f xv = *reinterpret_cast<const v8f*>(x + k);
    for (int r = 0; r < 8; ++r) acc[r] = fmadd(*reinterpret_cast<const v8f*>(w + r * ldw + k), xv, acc[r]);
  }
  const v8f s = hsum8(acc);
  for (int r = 0; r < 8; ++r) {
    float t = s[r];
    for (int64_t j = k; j < K; ++j) t = std::fma(w[r * ldw + j], x[j], t);
    out[r] = t;
  }
}

// w . x in dot8's order.
inline float dot1(const float* w, const float* x, int64_t K) {
  v8f acc = v8f{};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    acc = fmadd(*reinterpret_cast<const v8f*>(w + k), *reinterpret_cast<const v8f*>(x + k), acc);
  }
  float s = hsum1(acc);
  for (; k < K; ++k) s = std::fma(w[k], x[k], s);
  return s;
}

void skinny256(const float* xp, int64_t ldx, const float* wp, int64_t ldw, float* op, int64_t M, int64_t K,
               int64_t N) {
  if (M == 1) {
    // 128 features at least per thread: below that the fork costs more than the reads.
    at::parallel_for(0, N, 128, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) op[n] = dot1(wp + n * ldw, xp, K);
    });
    return;
  }
  const int64_t groups = N / 8;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    float tmp[8];
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t m = 0; m < M; ++m) {
        dot8(wp + g * 8 * ldw, ldw, xp + m * ldx, K, tmp);
        std::memcpy(op + m * N + g * 8, tmp, sizeof(tmp));
      }
    }
  });
  for (int64_t n = groups * 8; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot1(wp + n * ldw, xp + m * ldx, K);
  }
}

#endif

#if defined(__AVX512F__)
// out[c * ldo + r] = w[r] . x[c] for the R weight rows (stride ldw) and C input rows (stride ldx).
template <int R, int C>
inline void tile512(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * ldw + k);
    for (int c = 0; c < C; ++c) {
      const __m512 xv = _mm512_loadu_ps(x + c * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float t = _mm512_reduce_add_ps(acc[r][c]);
      for (int64_t j = k; j < K; ++j) t = std::fma(w[r * ldw + j], x[c * ldx + j], t);
      out[c * ldo + r] = t;
    }
}

constexpr int kTileRows = 6;  // input rows per tile (4 x 6 accumulators of AVX-512's 32 registers)

// Every input row against R weight rows: whole tiles of six rows, then one tile of what is left.
template <int R>
inline void rows512(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t M, int64_t K, float* out,
                    int64_t ldo) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) tile512<R, kTileRows>(w, ldw, x + m * ldx, ldx, K, out + m * ldo, ldo);
  const float* xm = x + m * ldx;
  float* om = out + m * ldo;
  switch (M - m) {
    case 1: tile512<R, 1>(w, ldw, xm, ldx, K, om, ldo); break;
    case 2: tile512<R, 2>(w, ldw, xm, ldx, K, om, ldo); break;
    case 3: tile512<R, 3>(w, ldw, xm, ldx, K, om, ldo); break;
    case 4: tile512<R, 4>(w, ldw, xm, ldx, K, om, ldo); break;
    case 5: tile512<R, 5>(w, ldw, xm, ldx, K, om, ldo); break;
    default: break;
  }
}

void skinny512(const float* xp, int64_t ldx, const float* wp, int64_t ldw, float* op, int64_t M, int64_t K,
               int64_t N) {
  const int64_t groups = N / 4;
  // 8 groups (32 features) at least per thread: below that the fork costs more than the reads.
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) rows512<4>(wp + g * 4 * ldw, ldw, xp, ldx, M, K, op + g * 4, N);
  });
  for (int64_t n = groups * 4; n < N; ++n) rows512<1>(wp + n * ldw, ldw, xp, ldx, M, K, op + n, N);
}
#endif

// x [M, K], weight [N, K], both fp32 with unit stride along K -> [M, N].
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "skinny_linear: x [M, K] and weight [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "skinny_linear: fp32 only");
  TORCH_CHECK(x.stride(1) == 1 && weight.stride(1) == 1, "skinny_linear: K must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t ldx = x.stride(0), ldw = weight.stride(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
#if defined(__AVX512F__)
  skinny512(xp, ldx, wp, ldw, op, M, K, N);
#else
  skinny256(xp, ldx, wp, ldw, op, M, K, N);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seesaw, m) { m.def("skinny_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(seesaw, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
