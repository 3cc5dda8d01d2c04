// Fused elementwise ops of a decoder layer on CPU (vLLM's CPU build has the same trio:
// rotary_embedding, fused_add_rms_norm, silu_and_mul). Each reads and writes its rows once where
// torch's chain of ops (mul, neg, cat, add, pow, mean, rsqrt, silu...) makes a temporary per
// step. Parallel over tokens with at::parallel_for; fp32 and bf16 storage, fp32 arithmetic.
// Why, with figures: seesaw_mc/model/fused_ops.py.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec_math.h"

namespace {

// Rows handed to one thread at least: below this the fork costs more than the work.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

// o = silu(gate) * up over n elements; silu's output is rounded to T first, as torch's is.
template <typename T>
void silu_mul_span(const T* gate, const T* up, T* o, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 8 <= n; i += 8) {
      const v8f g = *reinterpret_cast<const v8f*>(gate + i);
      const v8f act = g / (1.0f + exp_approx<v8f, v8i>(-g));
      *reinterpret_cast<v8f*>(o + i) = act * *reinterpret_cast<const v8f*>(up + i);
    }
  }
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const T act = static_cast<T>(g / (1.0f + exp_approx<float, int32_t>(-g)));
    o[i] = static_cast<T>(static_cast<float>(act) * static_cast<float>(up[i]));
  }
}

template <typename T>
void rope_rows(T* x, const float* cos, const float* sin, int64_t tokens, int64_t a_n, int64_t b_n, int64_t dim,
               int64_t s0, int64_t s1, int64_t s2) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, grain(a_n * b_n * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t a = 0; a < a_n; ++a) {
        for (int64_t b = 0; b < b_n; ++b) {
          T* __restrict__ lo = x + t * s0 + a * s1 + b * s2;
          T* __restrict__ hi = lo + half;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = static_cast<float>(lo[i]), x2 = static_cast<float>(hi[i]);
            lo[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
            hi[i] = static_cast<T>(x2 * c[i] + x1 * s[i]);
          }
        }
      }
    }
  });
}

// x [T, A, B, D] (any strides, D contiguous), cos/sin [T, D/2] fp32: rotate the two halves of
// every head in place (neox / megatron rotary_interleaved=False). A, B let one call rotate q and
// k inside the fused qkv buffer [T, kv_heads, group + 2, D] (B = group + 1, v excluded).
void rotary_embedding_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rotary: x [T, A, B, even D], D contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(3) / 2 && sin.sizes() == cos.sizes(),
              "rotary: cos/sin [T, D/2] contiguous fp32");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rotary_embedding_", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0), x.size(1),
                        x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2));
  });
}

template <typename T>
void norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* __restrict__ res = residual + r * dim;
      float sumsq = 0.0f;
      if (x != nullptr) {
        const T* __restrict__ add = x + r * dim;
#pragma omp simd reduction(+ : sumsq)
        for (int64_t i = 0; i < dim; ++i) {
          const T sum = static_cast<T>(static_cast<float>(res[i]) + static_cast<float>(add[i]));
          res[i] = sum;  // rounded to storage first, as torch's residual add is
          sumsq += static_cast<float>(sum) * static_cast<float>(sum);
        }
      } else {
#pragma omp simd reduction(+ : sumsq)
        for (int64_t i = 0; i < dim; ++i) sumsq += static_cast<float>(res[i]) * static_cast<float>(res[i]);
      }
      const float inv = 1.0f / std::sqrt(sumsq / static_cast<float>(dim) + eps);
      T* __restrict__ o = out + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) {
        o[i] = static_cast<T>(static_cast<float>(res[i]) * inv * static_cast<float>(weight[i]));
      }
    }
  });
}

// residual += x (when x is given); returns residual * rsqrt(mean(residual^2) + eps) * weight.
at::Tensor add_rms_norm(const c10::optional<at::Tensor>& x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  TORCH_CHECK(residual.is_contiguous() && weight.is_contiguous() && weight.numel() == residual.size(-1) &&
                  weight.scalar_type() == residual.scalar_type(),
              "rms_norm: contiguous residual [.., D], weight [D] of its dtype");
  TORCH_CHECK(!x.has_value() || (x->is_contiguous() && x->sizes() == residual.sizes() &&
                                 x->scalar_type() == residual.scalar_type()),
              "rms_norm: x must match residual");
  const int64_t dim = residual.size(-1), rows = residual.numel() / std::max<int64_t>(1, dim);
  at::Tensor out = at::empty_like(residual);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "add_rms_norm", [&] {
    norm_rows<scalar_t>(x.has_value() ? x->data_ptr<scalar_t>() : nullptr, residual.data_ptr<scalar_t>(),
                        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, dim, static_cast<float>(eps));
  });
  return out;
}

template <typename T>
void silu_rows(const T* h, T* out, int64_t rows, int64_t width, int64_t pairs) {
  const int64_t chunk = width / pairs;  // output columns per [gate_c; up_c] pair
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t p = 0; p < pairs; ++p) {
        const T* gate = h + r * 2 * width + p * 2 * chunk;
        silu_mul_span<T>(gate, gate + chunk, out + r * width + p * chunk, chunk);
      }
    }
  });
}

// h [T, 2F] laid out as `pairs` chunks [gate_c; up_c] (pairs = 1: [gate; up]) -> silu(gate) * up [T, F].
at::Tensor silu_and_mul(const at::Tensor& h, int64_t pairs) {
  TORCH_CHECK(h.is_contiguous() && h.dim() == 2 && pairs >= 1 && h.size(1) % (2 * pairs) == 0,
              "silu_and_mul: contiguous h [T, 2F], 2F divisible by 2 * pairs");
  const int64_t width = h.size(1) / 2;
  at::Tensor out = at::empty({h.size(0), width}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "silu_and_mul", [&] {
    silu_rows<scalar_t>(h.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), h.size(0), width, pairs);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seesaw, m) {
  m.def("rotary_embedding_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("add_rms_norm(Tensor? x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor h, int pairs) -> Tensor");
}

TORCH_LIBRARY_IMPL(seesaw, CPU, m) {
  m.impl("rotary_embedding_", &rotary_embedding_);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
