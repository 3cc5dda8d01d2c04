// Paged attention on CPU that reads K/V where they lie in the block-table cache (no gather).
//
// One call serves decode and prefill alike: sequence s has q_len = cu_q[s+1] - cu_q[s] query
// tokens, the last q_len of its context_lens[s] tokens, all of whose K/V are already in its
// blocks. Query row j of s sits at position context_lens[s] - q_len + j and attends to cache
// positions 0..that position (causal; a cached prefix is just context_lens > q_len).
//
// Work unit: (sequence, kv heads, tile of up to 16 query rows). A unit walks its sequence's block
// table once; for each block and kv head it reads every key and value once for all the GQA
// group's query heads of all its rows, keeps an online softmax per query vector, and accumulates
// in fp32 whatever the cache dtype. Units are dealt to threads by estimated cost (rows x keys),
// not by count: decode rows arrive sorted by length, and an even split by count would give one
// thread all the long sequences. Decode is memory-bound here: 16 sequences x 256 tokens (8 MB of
// K/V) ran at ~75 ns per (query head, key) against ~18 ns when the cache fits in L2; SDPA on
// the same K/V laid out contiguously took about as long (70 ns).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kRowTile = 16;  // query rows per prefill unit: keys are loaded once per tile

struct Unit {
  int64_t seq, head_begin, head_end, row_begin, row_end, cost;
};

struct Geometry {
  int64_t heads, kv_heads, group, dim, block_size, max_blocks, num_blocks;
  int64_t s_block, s_token, s_head;  // cache strides (elements); the last dim is contiguous
  float scale;
};

template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Online-softmax update of one query vector (scaled q `qv`, accumulator `a`, dv = D / 8 vectors)
// with `valid` keys. DVF > 0 fixes dv at compile time, so that the accumulator stays in registers
// across the block's keys (a version that read and wrote it in memory per key was 1.6x slower).
// Scores are taken eight keys at a time and reduced together (hsum8), and their exponentials
// computed eight at a time (exp_approx): a horizontal sum and a scalar exp per key were most of
// the compute of a decode step once the keys are in cache.
// q . k as eight lane sums (reduced by the caller: eight keys at once through hsum8, or one).
inline v8f dot_lanes(const v8f* q, const float* key, int dv) {
  const v8f* k = reinterpret_cast<const v8f*>(key);
  v8f x = q[0] * k[0];
  for (int i = 1; i < dv; ++i) x += q[i] * k[i];
  return x;
}

template <int DVF>
inline void update(const float* qv, float* a, float& mx, float& sum, const float* const* kf, const float* const* vf,
                   int64_t valid, int dv_rt, float* s) {
  constexpr int kMaxDV = DVF > 0 ? DVF : 32;
  const int dv = DVF > 0 ? DVF : dv_rt;
  const v8f* q = reinterpret_cast<const v8f*>(qv);
  float bmax = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  for (; t + 8 <= valid; t += 8) {
    v8f acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = dot_lanes(q, kf[t + j], dv);
    const v8f sc = hsum8(acc);
    std::memcpy(s + t, &sc, sizeof(sc));
    for (int j = 0; j < 8; ++j) bmax = std::max(bmax, sc[j]);
  }
  for (; t < valid; ++t) {
    const v8f x = dot_lanes(q, kf[t], dv);
    float r = 0.f;
    for (int i = 0; i < 8; ++i) r += x[i];
    s[t] = r;
    bmax = std::max(bmax, r);
  }
  float alpha = 1.f;
  if (bmax > mx) {
    alpha = std::exp(mx - bmax);  // exp(-inf) = 0 on the first block
    mx = bmax;
  }
  for (t = 0; t + 8 <= valid; t += 8) {
    v8f x;
    std::memcpy(&x, s + t, sizeof(x));
    x = exp_approx<v8f, v8i>(x - mx);
    std::memcpy(s + t, &x, sizeof(x));
  }
  for (; t < valid; ++t) s[t] = exp_approx<float, int32_t>(s[t] - mx);
  v8f r[kMaxDV];
  v8f* av = reinterpret_cast<v8f*>(a);
  for (int i = 0; i < dv; ++i) r[i] = av[i] * alpha;
  float psum = 0.f;
  for (t = 0; t < valid; ++t) {
    const float p = s[t];
    psum += p;
    const v8f* v = reinterpret_cast<const v8f*>(vf[t]);
    for (int i = 0; i < dv; ++i) r[i] += p * v[i];
  }
  sum = sum * alpha + psum;
  for (int i = 0; i < dv; ++i) av[i] = r[i];
}

// Ask for the next block's keys and values of one head while this block is computed: the next
// block lies anywhere in the cache, and in a token-major block a head's rows are also D values
// every s_token apart, too short a run for the hardware prefetcher to see before the block is
// done; decode waited on each. (In the CPU engine's head-major blocks the rows are one run.)
template <typename T>
inline void prefetch_rows(const T* k_cache, const T* v_cache, int64_t off, const Geometry& g) {
  const int64_t per_line = 64 / sizeof(T);
  for (int64_t t = 0; t < g.block_size; ++t) {
    for (int64_t d = 0; d < g.dim; d += per_line) {
      __builtin_prefetch(k_cache + off + t * g.s_token + d);
      __builtin_prefetch(v_cache + off + t * g.s_token + d);
    }
  }
}

// One unit: rows [row_begin, row_end) of sequence `seq`, the query heads of kv heads
// [head_begin, head_end). Query vector m = (row * heads_in_unit + head) * group + g.
template <typename T, int DVF>
void attend_unit(const Unit& u, const Geometry& g, const T* q, const T* k_cache, const T* v_cache,
                 const int32_t* block_table, int64_t ctx, int64_t first_pos, T* out, std::vector<float>& work) {
  const int64_t rows = u.row_end - u.row_begin, nh = u.head_end - u.head_begin, G = g.group;
  const int64_t m_count = rows * nh * G, D = g.dim, bs = g.block_size;
  work.resize(m_count * (2 * D + 2) + bs * (1 + 2 * D));
  float* qf = work.data();          // [M, D] scaled queries
  float* acc = qf + m_count * D;    // [M, D]
  float* mx = acc + m_count * D;    // [M] running max
  float* sum = mx + m_count;        // [M] running denominator
  float* scores = sum + m_count;    // [bs]
  float* kbuf = scores + bs;        // [bs, D] (non-fp32 caches only)
  float* vbuf = kbuf + bs * D;
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + ((u.row_begin + r) * g.heads + u.head_begin * G) * D;  // the unit's heads are adjacent
    float* dst = qf + r * nh * G * D;
    for (int64_t i = 0; i < nh * G * D; ++i) dst[i] = static_cast<float>(src[i]) * g.scale;
  }
  std::fill(acc, acc + m_count * D, 0.f);
  std::fill(mx, mx + m_count, -std::numeric_limits<float>::infinity());
  std::fill(sum, sum + m_count, 0.f);
  const int64_t n_keys = std::min(ctx, first_pos + rows);  // keys past the last row's position: masked for all
  const float* kf[64];
  const float* vf[64];
  for (int64_t blk = 0; blk * bs < n_keys; ++blk) {
    const int64_t phys = block_table[blk], base = blk * bs, n = std::min(bs, n_keys - base);
    TORCH_CHECK(phys >= 0 && phys < g.num_blocks, "paged_attention: block id ", phys, " out of range");
    const int64_t next = (blk + 1) * bs < n_keys ? block_table[blk + 1] : -1;
    for (int64_t hh = 0; hh < nh; ++hh) {
      const int64_t off = phys * g.s_block + (u.head_begin + hh) * g.s_head;
      if (next >= 0 && next < g.num_blocks) prefetch_rows(k_cache, v_cache, next * g.s_block +
                                                          (u.head_begin + hh) * g.s_head, g);
      for (int64_t t = 0; t < n; ++t) {
        kf[t] = as_float(k_cache + off + t * g.s_token, kbuf + t * D, D);
        vf[t] = as_float(v_cache + off + t * g.s_token, vbuf + t * D, D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t valid = std::min(n, first_pos + r + 1 - base);  // causal limit in this block
        if (valid <= 0) continue;
        for (int64_t j = 0; j < G; ++j) {
          const int64_t m = (r * nh + hh) * G + j;
          update<DVF>(qf + m * D, acc + m * D, mx[m], sum[m], kf, vf, valid, D / 8, scores);
        }
      }
    }
  }
  for (int64_t m = 0; m < m_count; ++m) {
    const float inv = sum[m] > 0.f ? 1.f / sum[m] : 0.f;
    T* dst = out + ((u.row_begin + m / (nh * G)) * g.heads + u.head_begin * G + m % (nh * G)) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[m * D + d] * inv);
  }
}

// Units of (sequence, kv heads, query-row tile). A unit takes all kv heads of its rows when there
// are enough units to keep every thread busy, so that each cache block is swept once, while it is
// hot; otherwise one kv head each (a single long sequence still spreads over the threads).
std::vector<Unit> make_units(const int32_t* cu_q, const int32_t* ctx, int64_t num_seqs, int64_t kv_heads,
                             int64_t threads) {
  int64_t tiles = 0;
  for (int64_t s = 0; s < num_seqs; ++s) tiles += (cu_q[s + 1] - cu_q[s] + kRowTile - 1) / kRowTile;
  const int64_t step = tiles >= 4 * threads ? kv_heads : 1;
  std::vector<Unit> units;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t r = cu_q[s]; r < cu_q[s + 1]; r += kRowTile) {
      const int64_t end = std::min<int64_t>(r + kRowTile, cu_q[s + 1]);
      const int64_t keys = ctx[s] - (cu_q[s + 1] - end);  // keys seen by the tile's last row
      for (int64_t h = 0; h < kv_heads; h += step) units.push_back({s, h, h + step, r, end, (end - r) * keys * step + 64});
    }
  }
  return units;
}

template <typename T>
void run(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& cu_q, const at::Tensor& context_lens, const Geometry& g) {
  const int32_t* cu = cu_q.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const std::vector<Unit> units = make_units(cu, ctx, context_lens.size(0), g.kv_heads, at::get_num_threads());
  std::vector<int64_t> prefix(units.size() + 1, 0);
  for (size_t i = 0; i < units.size(); ++i) prefix[i + 1] = prefix[i] + units[i].cost;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units.size()));
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> work;
    for (int64_t p = p0; p < p1; ++p) {
      // Part p takes the units whose cost prefix falls in its share of the total.
      auto lo = std::lower_bound(prefix.begin(), prefix.end(), prefix.back() * p / parts) - prefix.begin();
      auto hi = std::lower_bound(prefix.begin(), prefix.end(), prefix.back() * (p + 1) / parts) - prefix.begin();
      if (p == parts - 1) hi = units.size();
      for (int64_t i = lo; i < hi; ++i) {
        const Unit& u = units[i];
        const int64_t first_pos = ctx[u.seq] - (cu[u.seq + 1] - u.row_begin);
        const int32_t* table = bt + u.seq * g.max_blocks;
        if (g.dim == 64) {
          attend_unit<T, 8>(u, g, qp, kp, vp, table, ctx[u.seq], first_pos, op, work);
        } else if (g.dim == 128) {
          attend_unit<T, 16>(u, g, qp, kp, vp, table, ctx[u.seq], first_pos, op, work);
        } else {
          attend_unit<T, 0>(u, g, qp, kp, vp, table, ctx[u.seq], first_pos, op, work);
        }
      }
    }
  });
}

}  // namespace

// q [T, H, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D] with any strides but a contiguous D
// (the engine's are head-major per block: [num_blocks, H_kv, block_size, D] in memory); block_tables [S, max_blocks] int32;
// cu_q [S + 1] int32; context_lens [S] int32 (cached tokens + this step's). Returns [T, H, D].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& cu_q, const at::Tensor& context_lens,
                           double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "paged_attention: q must be a contiguous [T, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "paged_attention: k_cache and v_cache must be alike [num_blocks, block_size, H_kv, D]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "paged_attention: dtype must be float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: caches must match q's dtype with a contiguous last dim");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && cu_q.scalar_type() == at::kInt &&
                  context_lens.scalar_type() == at::kInt && block_tables.is_contiguous() && cu_q.is_contiguous() &&
                  context_lens.is_contiguous(),
              "paged_attention: block_tables, cu_q and context_lens must be contiguous int32");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), dim = q.size(2), bs = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "paged_attention: head shapes do not match");
  TORCH_CHECK(dim % 8 == 0 && dim <= 256, "paged_attention: head_dim must be a multiple of 8, at most 256");
  TORCH_CHECK(bs <= 64, "paged_attention: block_size above 64 is not supported");
  TORCH_CHECK(cu_q.size(0) == context_lens.size(0) + 1 && block_tables.size(0) == context_lens.size(0),
              "paged_attention: cu_q, context_lens and block_tables disagree on the number of sequences");
  Geometry g{heads, kv_heads, heads / kv_heads, dim, bs, block_tables.size(1), k_cache.size(0),
             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), static_cast<float>(scale)};
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    run<scalar_t>(out, q, k_cache, v_cache, block_tables, cu_q, context_lens, g);
  });
  return out;
}

// Registered with the dispatcher (not a bare pybind function), so that torch.profiler records
// it as seesaw::paged_attention and torch.compile can treat it as an opaque op.
TORCH_LIBRARY(seesaw, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_q, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seesaw, CPU, m) { m.impl("paged_attention", &paged_attention); }
