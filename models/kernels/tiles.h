// What the native kernels share: the register-tiled product of a few rows by a panel of columns, and a parallel
// loop over work units on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxgen {

constexpr int64_t kLanes = 64;  // columns one register tile accumulates
constexpr int kTile = 6;        // rows per register tile (6 × 64 floats: 24 of AVX-512's 32 registers)
constexpr int64_t kAhead = 16;  // rows of the panel fetched ahead of the one being read

// out[g * ldo + i] (+)= Σ_d a[g * lda + d] · b[d * ldb + i] for the Q rows of a [Q, depth] and `lanes` (<= kLanes)
// columns of b (rows `ldb` apart): stored, or added to what out holds (`accumulate`: the sum then continues in the
// same order, as if one call had run the whole depth). With Q and LANES fixed at compile time the accumulators
// stay in registers. The panel's rows lie `ldb` apart, too far for the hardware's prefetcher to follow, so each
// step asks for the row `ahead` rows on (a prefetch past the end of b is harmless).
template <int Q, int64_t LANES>
void ProductTile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, int64_t lanes, float* out,
                 int64_t ldo, int64_t ahead, bool accumulate) {
  const int64_t n = LANES > 0 ? LANES : lanes;
  float acc[Q][kLanes] = {};
  if (accumulate) {
    for (int g = 0; g < Q; ++g) std::copy(out + g * ldo, out + g * ldo + n, acc[g]);
  }
  for (int64_t d = 0; d < depth; ++d) {
    const float* bd = b + d * ldb;
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(bd + ahead * ldb + i);
    for (int g = 0; g < Q; ++g) {
      const float ad = a[g * lda + d];
      for (int64_t i = 0; i < n; ++i) acc[g][i] += ad * bd[i];
    }
  }
  for (int g = 0; g < Q; ++g) std::copy(acc[g], acc[g] + n, out + g * ldo);
}

using ProductFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                          bool);

// ProductTile<Q, kLanes> (whole panels) and ProductTile<Q, 0> (a last, narrower one) for Q = count.
inline ProductFn Product(int count, bool whole) {
  static constexpr ProductFn kWhole[kTile] = {ProductTile<1, kLanes>, ProductTile<2, kLanes>, ProductTile<3, kLanes>,
                                              ProductTile<4, kLanes>, ProductTile<5, kLanes>, ProductTile<6, kLanes>};
  static constexpr ProductFn kPart[kTile] = {ProductTile<1, 0>, ProductTile<2, 0>, ProductTile<3, 0>,
                                             ProductTile<4, 0>, ProductTile<5, 0>, ProductTile<6, 0>};
  return (whole ? kWhole : kPart)[count - 1];
}

// The units still to run and how many are done, shared by every worker of one call (a worker scheduled on a
// busy pool may start after the call has returned: it then finds no unit left and touches nothing else).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs body(u, scratch) for every unit u in [0, units), on the caller and up to num_threads - 1 helpers of the
// pool, each worker with its own `scratch_floats` floats of scratch; returns when every unit is done.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, int64_t scratch_floats, Body body) {
  auto work = std::make_shared<Work>();
  auto run = [=](Work& w) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t u = w.next.fetch_add(1); u < units; u = w.next.fetch_add(1)) {
      body(u, scratch.data());
      w.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work, run] { run(*work); });
  run(*work);
  while (work->done.load(std::memory_order_acquire) < units) std::this_thread::yield();  // a helper's last unit
}

}  // namespace jaxgen
