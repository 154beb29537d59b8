// Decode attention on the CPU, as an XLA FFI custom call: one query per row against that row's own cache
// positions [first, last], for every (row, KV head) pair in parallel on XLA's intra-op thread pool.
//
// XLA CPU runs the same work as a loop of small dots (3 query heads × 64 × 256 positions) at about a fifth of
// the core's arithmetic rate; here each pair's scores are accumulated in registers over the transposed keys,
// soft-maxed exactly (no online rescaling) and weighted over the values in one pass each.
//
// Operands (float32, the layouts of models/layers.py):
//   q      [B, KVH, G, Dh]      the rows' queries, grouped by KV head
//   k      [S, KVH, Dh, W]      the key cache, transposed
//   v      [S, KVH, W, Dh]      the value cache
//   rows   [B] int32            the cache row each query reads
//   first  [B] int32            its first attended position (a sliding window's start, else 0)
//   last   [B] int32            its last attended position (its own)
// Attributes: scale (scores are q·k · scale), cap (soft-cap cap·tanh(s / cap) when > 0).
// Result: out [B, KVH, G, Dh].
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 64;   // positions whose scores one register block accumulates
constexpr int64_t kMaxGroup = 8;  // query heads accumulated together per KV head

struct Dims {
  int64_t rows, kv_heads, group, head_dim, width;
};

// Scores q·k of `group` query heads q [group, Dh] over positions [first, first + n) of one head's transposed
// keys k [Dh, W] -> scores [group, n].
void Scores(const float* q, const float* k, int64_t group, int64_t head_dim, int64_t width, int64_t first,
            int64_t n, float* scores) {
  for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
    const int64_t gs = std::min(kMaxGroup, group - g0);
    for (int64_t l0 = 0; l0 < n; l0 += kLanes) {
      const int64_t lanes = std::min(kLanes, n - l0);
      float acc[kMaxGroup][kLanes] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* key = k + d * width + first + l0;
        for (int64_t g = 0; g < gs; ++g) {
          const float qd = q[(g0 + g) * head_dim + d];
          for (int64_t i = 0; i < lanes; ++i) acc[g][i] += qd * key[i];
        }
      }
      for (int64_t g = 0; g < gs; ++g) std::copy(acc[g], acc[g] + lanes, scores + (g0 + g) * n + l0);
    }
  }
}

// One (row, KV head) pair: softmax over its scores, then the weighted sum of its values v [W, Dh] -> out
// [group, Dh]. `scores` (group × n floats) and `totals` (group) are scratch.
void AttendPair(const float* q, const float* k, const float* v, float* out, const Dims& dims, int64_t first,
                int64_t last, float scale, float cap, float* scores, float* totals) {
  const int64_t n = last - first + 1, group = dims.group, head_dim = dims.head_dim;
  Scores(q, k, group, head_dim, dims.width, first, n, scores);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    for (int64_t i = 0; i < n; ++i) s[i] *= scale;
    if (cap > 0.0f) {
      for (int64_t i = 0; i < n; ++i) s[i] = cap * std::tanh(s[i] / cap);
    }
    const float top = *std::max_element(s, s + n);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
      s[i] = std::exp(s[i] - top);
      total += s[i];
    }
    totals[g] = total;
  }
  std::fill(out, out + group * head_dim, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* value = v + (first + i) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * n + i];
      float* o = out + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] += p * value[d];
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.0f / totals[g];
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] *= inv;
  }
}

// The pairs still to run and how many are done, shared by every worker of one call (a worker scheduled on a
// busy pool may start after the call has returned: it then finds no pair left and touches nothing else).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> first,
                           ffi::Buffer<ffi::S32> last, float scale, float cap, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return ffi::Error::InvalidArgument("q, k, v must be rank 4");
  if (kd[1] != qd[1] || kd[2] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[3] || vd[3] != kd[2] ||
      static_cast<int64_t>(rows.element_count()) != qd[0] || static_cast<int64_t>(first.element_count()) != qd[0] ||
      static_cast<int64_t>(last.element_count()) != qd[0])
    return ffi::Error::InvalidArgument("q [B, KVH, G, Dh], k [S, KVH, Dh, W], v [S, KVH, W, Dh], rows/first/last [B]");
  const Dims dims{qd[0], qd[1], qd[2], qd[3], kd[3]};
  const int64_t slots = kd[0], pairs = dims.rows * dims.kv_heads;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *rp = rows.typed_data(), *fp = first.typed_data(), *lp = last.typed_data();
  float* op = out->typed_data();
  for (int64_t b = 0; b < dims.rows; ++b) {
    if (rp[b] < 0 || rp[b] >= slots || fp[b] < 0 || lp[b] < fp[b] || lp[b] >= dims.width)
      return ffi::Error::InvalidArgument("a row or its attended positions lie outside the cache");
  }
  const int64_t q_pair = dims.group * dims.head_dim, k_head = dims.head_dim * dims.width;
  auto work = std::make_shared<Work>();
  auto run = [=](Work& w) {
    std::vector<float> scores(dims.group * dims.width), totals(dims.group);
    for (int64_t p = w.next.fetch_add(1); p < pairs; p = w.next.fetch_add(1)) {
      const int64_t b = p / dims.kv_heads, h = p % dims.kv_heads;
      const int64_t head = rp[b] * dims.kv_heads + h;
      AttendPair(qp + p * q_pair, kp + head * k_head, vp + head * k_head, op + p * q_pair, dims, fp[b], lp[b],
                 scale, cap, scores.data(), totals.data());
      w.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), pairs) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work, run] { run(*work); });
  run(*work);
  while (work->done.load(std::memory_order_acquire) < pairs) std::this_thread::yield();  // a helper's last pair
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenDecodeAttention, DecodeAttention,
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
