// The product of a few rows by a weight matrix on the CPU, as an XLA FFI custom call: a decode step's
// projections, y [M, N] = x [M, K] @ w [K, N] for M up to a few dozen rows.
//
// XLA CPU runs such a skinny product at well under the memory's streaming rate (at 8 rows the default model's
// layers read their weights at ~6-9 GB/s). Here the columns are split into panels of kLanes, the work units,
// run in parallel on XLA's intra-op thread pool. A unit walks its panel in blocks of kDepth rows: every tile of
// kTile rows of x runs over a block (the accumulators in registers, the panel's rows fetched ahead:
// `jaxgen::ProductTile`), the first tile reading it from memory and the rest from the L1 cache, where a whole
// panel would have fallen out to L2 (at 32 rows 44 against 52 ms for the default model's 30 layers). Every
// output is one sum over k in order, whatever M and the unit it falls in.
//
// Operands (float32, row-major): x [M, K], w [K, N]. Result: y [M, N].
#include <algorithm>
#include <cstdint>

#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxgen::kLanes;
using jaxgen::kTile;
constexpr int64_t kDepth = 128;  // rows of a panel (32 KB) every row tile runs over before the next block

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] || yd[0] != xd[0] || yd[1] != wd[1])
    return ffi::Error::InvalidArgument("x [M, K], w [K, N] and y [M, N]");
  const int64_t rows = xd[0], depth = xd[1], cols = wd[1];
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t panels = (cols + kLanes - 1) / kLanes;
  jaxgen::ParallelFor(pool, panels, 0, [=](int64_t u, float*) {
    const int64_t c0 = u * kLanes, lanes = std::min(kLanes, cols - c0);
    for (int64_t d0 = 0; d0 < depth; d0 += kDepth) {  // every row tile over one block of the panel's rows
      const int64_t d1 = std::min(depth, d0 + kDepth);
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int count = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
        jaxgen::Product(count, lanes == kLanes)(xp + r0 * depth + d0, depth, wp + d0 * cols + c0, cols, d1 - d0, lanes,
                                                yp + r0 * cols + c0, cols, jaxgen::kAhead, d0 > 0);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
