// The product of a few rows by a weight matrix kept in llama.cpp's blocks, as XLA FFI custom calls: a decode
// step's projections and LM head read from Q4_1 blocks (5 bits a weight instead of float32's 32) or Q8_0 blocks
// (8.5 bits), as the GGUF file stores them.
//
// A block holds 32 consecutive weights of one output column along k. Q4_1: float16 scale d and minimum m, then 16
// bytes whose low nibbles are weights 0..15 and high nibbles 16..31; weight i is q_i · d + m. Q8_0: float16 scale
// d, then 32 signed bytes; weight i is q_i · d. The kernel dequantizes each block in registers, rounding every
// product and sum apart as NumPy does (`gguf.quants`), so it multiplies by the very float32 weights the loader
// gives XLA, and accumulates every row of x against it: a tile of up to kRows rows by kTileColumns columns (each
// vector of x loaded once for the tile's columns), one 16-lane accumulator a row and column, summed across its
// lanes at the column's end. A row's sum runs in the same order whatever rows and columns share its tile, so its
// bits do not depend on them. Columns are split into units of kColumns, run in parallel on XLA's intra-op
// thread pool; each column's blocks are one contiguous stream.
//
// Operands: x float32 [M, K]; w uint8 [N, K / 32, bytes] (a column's blocks in k order: 20 bytes a Q4_1 block, 34
// a Q8_0 one). Result: y float32 [M, N]. Written for AVX-512 with F16C: built for any other CPU, the handlers
// refuse every call (`native.CPU_FEATURES` keeps these kernels off there, so the other kernels of the library
// still build and run).
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define JAXGEN_BLOCK_KERNELS 1
#endif

#include <algorithm>
#include <cstdint>

#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef JAXGEN_BLOCK_KERNELS
constexpr int64_t kBlock = 32;    // weights a block holds
constexpr int kRows = 8;          // rows of x one pass over a tile's blocks serves
constexpr int kTileColumns = 2;   // columns a tile computes together: each vector of x is loaded once for both
constexpr int64_t kColumns = 16;  // output columns a work unit computes
constexpr int kAheadBlocks = 8;   // blocks of the column fetched ahead of the one being read
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // explicit rounding: never contracted

// The float16 at `p` as a float32 in every lane.
inline __m512 Broadcast16(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return _mm512_set1_ps(_cvtsh_ss(h));
}

struct Q41 {
  static constexpr int64_t kBytes = 20;  // d, m (float16 each), 16 bytes of nibbles

  // The block's 32 weights as two vectors (0..15, 16..31): q · d, rounded, + m, rounded (no fused multiply-add).
  static void Dequantize(const uint8_t* block, __m512& low, __m512& high) {
    const __m512 d = Broadcast16(block), m = Broadcast16(block + 2);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4)), nibble = _mm_set1_epi8(15);
    const __m512 q_low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, nibble)));
    const __m512 q_high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), nibble)));
    low = _mm512_add_round_ps(_mm512_mul_round_ps(q_low, d, kNearest), m, kNearest);
    high = _mm512_add_round_ps(_mm512_mul_round_ps(q_high, d, kNearest), m, kNearest);
  }
};

struct Q80 {
  static constexpr int64_t kBytes = 34;  // d (float16), 32 signed bytes

  // The block's 32 weights as two vectors (0..15, 16..31): q · d, rounded.
  static void Dequantize(const uint8_t* block, __m512& low, __m512& high) {
    const __m512 d = Broadcast16(block);
    const auto* q = reinterpret_cast<const __m128i*>(block + 2);
    low = _mm512_mul_round_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d, kNearest);
    high = _mm512_mul_round_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d, kNearest);
  }
};

// y[r * ldy + c] = Σ_k x[r * depth + k] · w_k for the R rows of x and the C columns (c < C) whose blocks start
// at `w`, `blocks` blocks a column.
template <class Format, int R, int C>
void ColumnTile(const float* x, int64_t depth, const uint8_t* w, int64_t blocks, float* y, int64_t ldy) {
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    __m512 low[C], high[C];
    for (int c = 0; c < C; ++c) {
      const uint8_t* block = w + (c * blocks + j) * Format::kBytes;
      _mm_prefetch(reinterpret_cast<const char*>(block + kAheadBlocks * Format::kBytes), _MM_HINT_T0);
      Format::Dequantize(block, low[c], high[c]);
    }
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * depth + j * kBlock;
      const __m512 x_low = _mm512_loadu_ps(xr), x_high = _mm512_loadu_ps(xr + 16);
      for (int c = 0; c < C; ++c) {
        acc[c][r] = _mm512_fmadd_ps(x_low, low[c], acc[c][r]);
        acc[c][r] = _mm512_fmadd_ps(x_high, high[c], acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) y[r * ldy + c] = _mm512_reduce_add_ps(acc[c][r]);
}

using ColumnFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, float*, int64_t);

// ColumnTile<Format, R, C> for R = count.
template <class Format, int C>
ColumnFn Column(int count) {
  static constexpr ColumnFn kTiles[kRows] = {
      ColumnTile<Format, 1, C>, ColumnTile<Format, 2, C>, ColumnTile<Format, 3, C>, ColumnTile<Format, 4, C>,
      ColumnTile<Format, 5, C>, ColumnTile<Format, 6, C>, ColumnTile<Format, 7, C>, ColumnTile<Format, 8, C>};
  return kTiles[count - 1];
}

template <class Format>
ffi::Error MatmulBlocks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] * kBlock != xd[1] || wd[2] != Format::kBytes ||
      yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("x [M, K], w [N, K / 32, block bytes] and y [M, N]");
  const int64_t rows = xd[0], depth = xd[1], cols = wd[0], blocks = wd[1];
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  jaxgen::ParallelFor(pool, (cols + kColumns - 1) / kColumns, 0, [=](int64_t u, float*) {
    const int64_t end = std::min(cols, (u + 1) * kColumns);
    for (int64_t c = u * kColumns, tile; c < end; c += tile) {
      tile = c + kTileColumns <= end ? kTileColumns : 1;  // a unit's last, odd column alone
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int count = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
        (tile == kTileColumns ? Column<Format, kTileColumns>(count) : Column<Format, 1>(count))(
            xp + r0 * depth, depth, wp + c * blocks * Format::kBytes, blocks, yp + r0 * cols + c, cols);
      }
    }
  });
  return ffi::Error::Success();
}

#else
struct Q41 {};
struct Q80 {};

template <class Format>
ffi::Error MatmulBlocks(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "the block kernels need AVX-512 and F16C");
}
#endif

// Both block types' handlers take the same operands.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::U8>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenMatmulQ41, MatmulBlocks<Q41>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenMatmulQ80, MatmulBlocks<Q80>, Binding());
