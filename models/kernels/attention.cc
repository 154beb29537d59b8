// Attention over the KV cache on the CPU, as an XLA FFI custom call: every query token of a row against that
// row's own cache positions [first, last], for decode steps (one token a row) and prompt chunks (T tokens a
// row) alike. The work is split into units of (row, KV head, up to kTokens query tokens), run in parallel on
// XLA's intra-op thread pool.
//
// XLA CPU runs decode attention as a loop of small dots at about a fifth of the core's arithmetic rate, and a
// chunk's attention over its whole window (masked positions included). Here a unit's queries go in register
// tiles of up to kTile queries: their scores are accumulated over the transposed keys kLanes positions at a
// time, soft-maxed exactly (no online rescaling), and weighted over the values in one pass. A query's result
// depends only on its own q, positions and keys, never on which other queries share its call or tile.
//
// Operands (float32, the layouts of models/layers.py):
//   q      [B, KVH, T, G, Dh]   the rows' queries, grouped by KV head: T tokens of G query heads each
//   k      [S, KVH, Dh, W]      the key cache, transposed
//   v      [S, KVH, W, Dh]      the value cache
//   rows   [B] int32            the cache row each row reads
//   first  [B, T] int32         each token's first attended position (a sliding window's start, else 0)
//   last   [B, T] int32         its last attended position (its own)
// Attributes: scale (scores are q·k · scale), cap (soft-cap cap·tanh(s / cap) when > 0).
// Result: out [B, KVH, T, G, Dh].
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxgen::kAhead;
using jaxgen::kLanes;
using jaxgen::kTile;
using jaxgen::ProductTile;
constexpr int64_t kTokens = 8;  // query tokens per work unit

struct Dims {
  int64_t rows, kv_heads, tokens, group, head_dim, width;
};

// Scores of Q queries q [Q, Dh] over positions [lo, lo + n) of one head's transposed keys k [Dh, W] -> scores
// [Q, n], kLanes positions a tile.
template <int Q>
void Scores(const float* q, const float* k, int64_t head_dim, int64_t width, int64_t lo, int64_t n,
            float* scores) {
  int64_t l0 = 0;
  for (; l0 + kLanes <= n; l0 += kLanes)
    ProductTile<Q, kLanes>(q, head_dim, k + lo + l0, width, head_dim, kLanes, scores + l0, n, kAhead, false);
  if (l0 < n) ProductTile<Q, 0>(q, head_dim, k + lo + l0, width, head_dim, n - l0, scores + l0, n, kAhead, false);
}

// The softmax of one query's scores s [n], over its own positions [f, l] (offsets into s); the others get
// weight 0. Returns the sum of its weights. The sum runs in a fixed order from f, whatever the tile's extent.
float Softmax(float* s, int64_t n, int64_t f, int64_t l, float scale, float cap) {
  std::fill(s, s + f, 0.0f);
  std::fill(s + l + 1, s + n, 0.0f);
  float* own = s + f;
  const int64_t m = l - f + 1;
  for (int64_t i = 0; i < m; ++i) own[i] *= scale;
  if (cap > 0.0f) {
    for (int64_t i = 0; i < m; ++i) own[i] = cap * std::tanh(own[i] / cap);
  }
  const float top = *std::max_element(own, own + m);
  for (int64_t i = 0; i < m; ++i) own[i] = std::exp(own[i] - top);
  constexpr int64_t kSum = 16;
  float partial[kSum] = {};
  int64_t i = 0;
  for (; i + kSum <= m; i += kSum)
    for (int64_t j = 0; j < kSum; ++j) partial[j] += own[i + j];
  for (; i < m; ++i) partial[0] += own[i];
  float total = 0.0f;
  for (int64_t j = 0; j < kSum; ++j) total += partial[j];
  return total;
}

// One register tile: Q queries q [Q, Dh] whose attended positions are [f[g], l[g]] of one head (keys k [Dh, W],
// values v [W, Dh]) -> out [Q, Dh]. `scores` (Q × W floats) is scratch.
template <int Q>
void AttendTile(const float* q, const float* k, const float* v, float* out, const Dims& dims, const int64_t* f,
                const int64_t* l, float scale, float cap, float* scores) {
  const int64_t lo = *std::min_element(f, f + Q), hi = *std::max_element(l, l + Q), n = hi - lo + 1;
  const int64_t head_dim = dims.head_dim;
  Scores<Q>(q, k, head_dim, dims.width, lo, n, scores);
  float totals[Q];
  for (int g = 0; g < Q; ++g) totals[g] = Softmax(scores + g * n, n, f[g] - lo, l[g] - lo, scale, cap);
  const float* value = v + lo * head_dim;
  int64_t d0 = 0;
  for (; d0 + kLanes <= head_dim; d0 += kLanes)
    ProductTile<Q, kLanes>(scores, n, value + d0, head_dim, n, kLanes, out + d0, head_dim, kAhead, false);  // Σ p v
  if (d0 < head_dim) ProductTile<Q, 0>(scores, n, value + d0, head_dim, n, head_dim - d0, out + d0, head_dim, kAhead,
                                      false);
  for (int g = 0; g < Q; ++g) {
    const float inv = 1.0f / totals[g];
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] *= inv;
  }
}

using TileFn = void (*)(const float*, const float*, const float*, float*, const Dims&, const int64_t*,
                        const int64_t*, float, float, float*);
constexpr TileFn kTiles[kTile] = {AttendTile<1>, AttendTile<2>, AttendTile<3>, AttendTile<4>, AttendTile<5>,
                                  AttendTile<6>};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> first, ffi::Buffer<ffi::S32> last,
                     float scale, float cap, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4) return ffi::Error::InvalidArgument("q must be rank 5, k and v rank 4");
  const int64_t tokens = qd[0] * qd[2];
  if (kd[1] != qd[1] || kd[2] != qd[4] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[3] || vd[3] != kd[2] ||
      static_cast<int64_t>(rows.element_count()) != qd[0] || static_cast<int64_t>(first.element_count()) != tokens ||
      static_cast<int64_t>(last.element_count()) != tokens)
    return ffi::Error::InvalidArgument(
        "q [B, KVH, T, G, Dh], k [S, KVH, Dh, W], v [S, KVH, W, Dh], rows [B], first/last [B, T]");
  const Dims dims{qd[0], qd[1], qd[2], qd[3], qd[4], kd[3]};
  const int64_t slots = kd[0];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *rp = rows.typed_data(), *fp = first.typed_data(), *lp = last.typed_data();
  float* op = out->typed_data();
  for (int64_t b = 0; b < dims.rows; ++b) {
    if (rp[b] < 0 || rp[b] >= slots) return ffi::Error::InvalidArgument("a row lies outside the cache");
  }
  for (int64_t t = 0; t < tokens; ++t) {
    if (fp[t] < 0 || lp[t] < fp[t] || lp[t] >= dims.width)
      return ffi::Error::InvalidArgument("a token's attended positions lie outside the cache");
  }
  const int64_t blocks = (dims.tokens + kTokens - 1) / kTokens;  // work units per (row, KV head)
  const int64_t units = dims.rows * dims.kv_heads * blocks;
  const int64_t q_token = dims.group * dims.head_dim, k_head = dims.head_dim * dims.width;
  jaxgen::ParallelFor(pool, units, kTile * dims.width, [=](int64_t u, float* scores) {
    const int64_t pair = u / blocks, b = pair / dims.kv_heads, h = pair % dims.kv_heads;
    const int64_t t0 = (u % blocks) * kTokens, t1 = std::min(dims.tokens, t0 + kTokens);
    const int64_t head = rp[b] * dims.kv_heads + h;
    const float *kh = kp + head * k_head, *vh = vp + head * k_head;
    const int64_t base = pair * dims.tokens * q_token;  // this pair's first query, in q and out
    for (int64_t j0 = t0 * dims.group; j0 < t1 * dims.group; j0 += kTile) {  // queries j = token · G + head
      const int count = static_cast<int>(std::min<int64_t>(kTile, t1 * dims.group - j0));
      int64_t f[kTile], l[kTile];
      for (int g = 0; g < count; ++g) {
        const int64_t token = b * dims.tokens + (j0 + g) / dims.group;
        f[g] = fp[token];
        l[g] = lp[token];
      }
      kTiles[count - 1](qp + base + j0 * dims.head_dim, kh, vh, op + base + j0 * dims.head_dim, dims, f, l, scale,
                        cap, scores);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("cap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
