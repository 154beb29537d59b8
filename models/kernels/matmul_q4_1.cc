// The product of a few rows by a weight matrix kept in llama.cpp's Q4_1 blocks, as an XLA FFI custom call: a
// decode step's projections read 5 bits a weight instead of float32's 32.
//
// A block holds 32 consecutive weights of one output column along k: float16 scale d and minimum m, then 16 bytes
// whose low nibbles are weights 0..15 and high nibbles 16..31; weight i is q_i · d + m. The kernel dequantizes each
// block in registers, rounding the product and the sum apart as NumPy does (`gguf.quants`), so it multiplies by
// the very float32 weights the loader gives XLA, and accumulates every row of x against it: a tile of up to kRows
// rows, one 16-lane accumulator a row, summed across its lanes at the column's end. A row's sum runs in the same
// order whatever rows share its tile, so its bits do not depend on them. Columns are split into units of
// kColumns, run in parallel on XLA's intra-op thread pool; each column's blocks are one contiguous stream.
//
// Operands: x float32 [M, K]; w uint8 [N, K / 32, 20] (a column's blocks in k order). Result: y float32 [M, N].
// Written for AVX-512 with F16C: built for any other CPU, the handler refuses every call (`native.CPU_FEATURES`
// keeps the kernel off there, so the other kernels of the library still build and run).
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define JAXGEN_Q4_1_KERNEL 1
#endif

#include <algorithm>
#include <cstdint>

#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef JAXGEN_Q4_1_KERNEL
constexpr int64_t kBlock = 32;    // weights a block holds
constexpr int64_t kBytes = 20;    // bytes a block takes: d, m (float16 each), 16 bytes of nibbles
constexpr int kRows = 8;          // rows of x one pass over a column's blocks serves
constexpr int64_t kColumns = 16;  // output columns a work unit computes
constexpr int kAheadBlocks = 8;   // blocks of the column fetched ahead of the one being read

// The block's 32 weights as two vectors (0..15, 16..31): q · d, rounded, + m, rounded (no fused multiply-add).
inline void Dequantize(const uint8_t* block, __m512& low, __m512& high) {
  uint16_t d16, m16;
  __builtin_memcpy(&d16, block, 2);
  __builtin_memcpy(&m16, block + 2, 2);
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(d16)), m = _mm512_set1_ps(_cvtsh_ss(m16));
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4)), nibble = _mm_set1_epi8(15);
  const __m512 q_low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, nibble)));
  const __m512 q_high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), nibble)));
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // explicit rounding: never contracted
  low = _mm512_add_round_ps(_mm512_mul_round_ps(q_low, d, kNearest), m, kNearest);
  high = _mm512_add_round_ps(_mm512_mul_round_ps(q_high, d, kNearest), m, kNearest);
}

// y[r * ldy] = Σ_k x[r * depth + k] · w_k for the R rows of x and the column whose `blocks` blocks start at `w`.
template <int R>
void ColumnTile(const float* x, int64_t depth, const uint8_t* w, int64_t blocks, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (j + kAheadBlocks) * kBytes), _MM_HINT_T0);
    __m512 low, high;
    Dequantize(w + j * kBytes, low, high);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * depth + j * kBlock;
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), low, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), high, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

using ColumnFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, float*, int64_t);

// ColumnTile<R> for R = count.
ColumnFn Column(int count) {
  static constexpr ColumnFn kTiles[kRows] = {ColumnTile<1>, ColumnTile<2>, ColumnTile<3>, ColumnTile<4>,
                                             ColumnTile<5>, ColumnTile<6>, ColumnTile<7>, ColumnTile<8>};
  return kTiles[count - 1];
}

ffi::Error MatmulQ41(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] * kBlock != xd[1] || wd[2] != kBytes ||
      yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("x [M, K], w [N, K / 32, 20] and y [M, N]");
  const int64_t rows = xd[0], depth = xd[1], cols = wd[0], blocks = wd[1];
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  jaxgen::ParallelFor(pool, (cols + kColumns - 1) / kColumns, 0, [=](int64_t u, float*) {
    for (int64_t c = u * kColumns; c < std::min(cols, (u + 1) * kColumns); ++c) {
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int count = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
        Column(count)(xp + r0 * depth, depth, wp + c * blocks * kBytes, blocks, yp + r0 * cols + c, cols);
      }
    }
  });
  return ffi::Error::Success();
}
#else
ffi::Error MatmulQ41(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "the Q4_1 kernel needs AVX-512 and F16C");
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenMatmulQ41, MatmulQ41,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
