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
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace {

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
  if (M == 1) {
    // 128 features at least per thread: below that the fork costs more than the reads.
    at::parallel_for(0, N, 128, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) op[n] = dot1(wp + n * ldw, xp, K);
    });
    return out;
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
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seesaw, m) { m.def("skinny_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(seesaw, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
