// Block-quantized weights for XLA:CPU: matmul and dequantize as XLA FFI handlers.
//
// A weight matrix W [out, in] is stored row-major, its codes in chunks of 32
// inputs and its scales in groups of G = 32 or 16 inputs:
//
//   W[o, i] = scale[o, i / G] * code(o, i) + offset[o, i / G]
//
// codes, bits = 4: uint8 [out, in / 2]; chunk b of row o is 16 bytes whose low
//                  nibbles are codes 32b + 0..15 and high nibbles 32b + 16..31
//                  (ggml's Q4_0 / Q4_1 layout); G = 32.
// codes, bits = 8: int8 [out, in]; code i is byte i (ggml's Q8_0 layout);
//                  G = 32, or 16 (Q6_K's sub-blocks).
// scale, offset:   float32 [out, in / G]; G is read off their shape.
//
// MeshnodeQMatmul: y[n, o] = sum_i x[n, i] * W[o, i] without forming W, which
// reads 4-8x fewer bytes than a float32 matvec; a decode step is bound by them.
// MeshnodeQDequant: W as float32 [out, in], for long inputs (prefill), where a
// float32 matmul by XLA wins. Its first operand, the input the weight will
// multiply, is not read: depending on it keeps XLA from hoisting every layer's
// dequantization to the start of the program, where all would be live at once.
//
// Batch invariance: the matmul decodes each block once for a tile of up to 4
// input rows, each with its own accumulators; a row's arithmetic (accumulator
// pattern, final reduction) is the same in a tile of any size, so its result is
// bitwise the same whatever other rows share the call.
//
// Rows of zeros (a bucketed batch's padding) are not computed: their outputs are
// exactly zero (rows.h).
//
// Vector paths: AVX-512, AVX2 + FMA, else portable C++ (the compiler's choice).
// Weight rows are split among threads (parallel.h).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MESHNODE_AVX2 1
#endif
#if defined(MESHNODE_AVX2) && defined(__AVX512F__)
#define MESHNODE_AVX512 1
#endif

#include "parallel.h"
#include "rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using meshnode::parallel_rows;

constexpr int64_t kBlock = 32;
// Products (tokens x in x out) from which a matmul is a long call for parallel_rows,
// about 1.5 ms on 2 cores: SmolLM2's head over 8 rows is 3.4x this; its blocks'
// weights reach it only at 64 rows (w_gate_up).
constexpr int64_t kLongCallProducts = int64_t{1} << 26;

// Codes of one block as 32 floats.
template <int Bits>
inline void unpack_block(const uint8_t* codes, float* out) {
  if (Bits == 4) {
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(codes[j] & 0x0F);
      out[j + 16] = static_cast<float>(codes[j] >> 4);
    }
  } else {
    const int8_t* signed_codes = reinterpret_cast<const int8_t*>(codes);
    for (int j = 0; j < kBlock; ++j) out[j] = static_cast<float>(signed_codes[j]);
  }
}

struct Weights {
  const uint8_t* codes;
  const float* scale;
  const float* offset;
  int64_t out, in, blocks, row_bytes;  // blocks: 32-input chunks per row
  int64_t group, groups;                // inputs per scale (32 or 16), scales per row
};

#ifdef MESHNODE_AVX2
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int Bits>
inline void unpack_block_avx2(const uint8_t* codes, __m256 c[4]) {
  if (Bits == 4) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(raw, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
    c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)));
    c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
    c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)));
  } else {
    #pragma GCC unroll 8
    for (int k = 0; k < 4; ++k) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * k));
      c[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
  }
}
#endif

#ifdef MESHNODE_AVX512
// 32 signed 8-bit codes as two vectors of 16 floats (4-bit rows use the table
// lookup in tile_dot instead).
inline void unpack_int8_avx512(const uint8_t* codes, __m512 c[2]) {
  #pragma GCC unroll 8
  for (int k = 0; k < 2; ++k) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * k));
    c[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
}
#endif

// sum_b offset[b] * sums[b], in four independent chains.
inline float offset_term(const float* offset, const float* sums, int64_t blocks) {
  float partial[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4) {
    #pragma GCC unroll 8
    for (int k = 0; k < 4; ++k) partial[k] += offset[b + k] * sums[b + k];
  }
  for (; b < blocks; ++b) partial[0] += offset[b] * sums[b];
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// Row o of W times the R inputs of a tile: x [R, in] (row stride w.in) whose sums per
// scale group are sums [R, groups]; y[r * y_stride] = W[o] . x[r]. Each block is
// decoded once for the whole tile, and each input row keeps its own accumulators,
// whose pattern and final reduction do not depend on R: a row's result is bitwise
// the same in a tile of any size (batch invariance). Within a row, independent
// accumulators take alternate blocks, so consecutive blocks' FMAs do not wait on
// each other.
template <int Bits, int R>
inline void tile_dot(const Weights& w, int64_t o, const float* x, const float* sums, float* y,
                     int64_t y_stride) {
  const int64_t block_bytes = Bits * kBlock / 8;
  const uint8_t* row = w.codes + o * w.row_bytes;
  const float* scale = w.scale + o * w.groups;
  const float* offset = w.offset + o * w.groups;
  const int64_t per = kBlock / w.group;  // scales per 32-input chunk: 1 or 2 (8 bits only)
#if defined(MESHNODE_AVX512)
  if constexpr (Bits == 4) {
    // Per block, a 16-entry table of its dequantized values, in which vpermps
    // looks each code up (it reads only an index's low 4 bits: no masking).
    // 7 vector uops per 32 weights, multiplying by the exact float32 weights;
    // the table and the two looked-up vectors serve every row of the tile.
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[R][4];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 8
      for (int k = 0; k < 4; ++k) acc[r][k] = _mm512_setzero_ps();
    }
    auto step = [&](int64_t b, int k) {
      const __m512i bytes = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * block_bytes)));
      const __m512 table =
          _mm512_fmadd_ps(iota, _mm512_set1_ps(scale[b]), _mm512_set1_ps(offset[b]));
      const __m512 low = _mm512_permutexvar_ps(bytes, table);
      const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float* xb = x + r * w.in + b * kBlock;
        acc[r][k] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xb), acc[r][k]);
        acc[r][k + 1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xb + 16), acc[r][k + 1]);
      }
    };
    int64_t b = 0;
    for (; b + 2 <= w.blocks; b += 2) {  // even blocks into acc 0-1, odd ones into 2-3
      step(b, 0);
      step(b + 1, 2);
    }
    if (b < w.blocks) step(b, 0);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      y[r * y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                           _mm512_add_ps(acc[r][2], acc[r][3])));
    }
  } else {
    // The block's 32 weights, scaled once for the tile (their offsets are summed
    // apart, over the inputs' group sums); alternate blocks as above.
    __m512 acc[R][4];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 8
      for (int k = 0; k < 4; ++k) acc[r][k] = _mm512_setzero_ps();
    }
    auto step = [&](int64_t b, int k) {
      __m512 c[2];
      unpack_int8_avx512(row + b * block_bytes, c);
      const __m512 low = _mm512_mul_ps(c[0], _mm512_set1_ps(scale[b * per]));  // 16 inputs each
      const __m512 high = _mm512_mul_ps(c[1], _mm512_set1_ps(scale[b * per + per / 2]));
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float* xb = x + r * w.in + b * kBlock;
        acc[r][k] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xb), acc[r][k]);
        acc[r][k + 1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xb + 16), acc[r][k + 1]);
      }
    };
    int64_t b = 0;
    for (; b + 2 <= w.blocks; b += 2) {
      step(b, 0);
      step(b + 1, 2);
    }
    if (b < w.blocks) step(b, 0);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      y[r * y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                           _mm512_add_ps(acc[r][2], acc[r][3]))) +
                        offset_term(offset, sums + r * w.groups, w.groups);
    }
  }
#elif defined(MESHNODE_AVX2)
  __m256 acc[R][2];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m256 c[4];
    unpack_block_avx2<Bits>(row + b * block_bytes, c);
    const __m256 s[2] = {_mm256_set1_ps(scale[b * per]),  // 16 inputs each
                         _mm256_set1_ps(scale[b * per + per / 2])};
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * w.in + b * kBlock;
      #pragma GCC unroll 8
      for (int half = 0; half < 2; ++half) {
        __m256 dot = _mm256_mul_ps(c[2 * half], _mm256_loadu_ps(xb + 16 * half));
        dot = _mm256_fmadd_ps(c[2 * half + 1], _mm256_loadu_ps(xb + 16 * half + 8), dot);
        acc[r][half] = _mm256_fmadd_ps(s[half], dot, acc[r][half]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    y[r * y_stride] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1])) +
                      offset_term(offset, sums + r * w.groups, w.groups);
  }
#else
  float codes[kBlock];
  float total[R];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) total[r] = offset_term(offset, sums + r * w.groups, w.groups);
  for (int64_t b = 0; b < w.blocks; ++b) {
    unpack_block<Bits>(row + b * block_bytes, codes);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * w.in + b * kBlock;
      #pragma GCC unroll 8
      for (int half = 0; half < 2; ++half) {
        float dot = 0.f;
        for (int j = 16 * half; j < 16 * half + 16; ++j) dot += codes[j] * xb[j];
        total[r] += scale[b * per + half * per / 2] * dot;
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) y[r * y_stride] = total[r];
#endif
}

// Input rows that share each decoded block. 4 rows of the 4-bit AVX-512 path hold 16
// accumulators, half the vector registers.
constexpr int64_t kTile = 4;
// Weight rows visited per tile before the next tile: their codes stay in L1 while
// every tile of inputs passes over them.
constexpr int64_t kRowBlock = 16;

template <int Bits, int R>
void tile_rows(const Weights& w, const float* x, const float* sums, float* y, int64_t first,
               int64_t last) {
  for (int64_t o = first; o < last; ++o) tile_dot<Bits, R>(w, o, x, sums, y + o, w.out);
}

// y[n, o] for weight rows [first, last): x [tokens, in], x_sums [tokens, groups].
template <int Bits>
void matmul_rows(const Weights& w, const float* x, const float* x_sums, int64_t tokens, float* y,
                 int64_t first, int64_t last) {
  for (int64_t lo = first; lo < last; lo += kRowBlock) {
    const int64_t hi = std::min(last, lo + kRowBlock);
    for (int64_t n = 0; n < tokens; n += kTile) {
      const float* xt = x + n * w.in;
      const float* st = x_sums + n * w.groups;
      float* yt = y + n * w.out;
      switch (std::min(kTile, tokens - n)) {
        case 4: tile_rows<Bits, 4>(w, xt, st, yt, lo, hi); break;
        case 3: tile_rows<Bits, 3>(w, xt, st, yt, lo, hi); break;
        case 2: tile_rows<Bits, 2>(w, xt, st, yt, lo, hi); break;
        default: tile_rows<Bits, 1>(w, xt, st, yt, lo, hi); break;
      }
    }
  }
}

template <int Bits>
void dequantize_rows(const Weights& w, float* out, int64_t first, int64_t last) {
  const int64_t block_bytes = Bits * kBlock / 8;
  for (int64_t o = first; o < last; ++o) {
    for (int64_t b = 0; b < w.blocks; ++b) {
      const uint8_t* codes = w.codes + o * w.row_bytes + b * block_bytes;
      const float* scale = w.scale + o * w.groups + b * kBlock / w.group;
      const float* offset = w.offset + o * w.groups + b * kBlock / w.group;
      float* dst = out + o * w.in + b * kBlock;
#ifdef MESHNODE_AVX2
      __m256 c[4];
      unpack_block_avx2<Bits>(codes, c);
      #pragma GCC unroll 8
      for (int k = 0; k < 4; ++k) {  // 8 inputs each, in group 8k / G of the chunk
        const int64_t g = 8 * k / w.group;
        const __m256 s = _mm256_set1_ps(scale[g]), m = _mm256_set1_ps(offset[g]);
        _mm256_storeu_ps(dst + 8 * k, _mm256_fmadd_ps(c[k], s, m));
      }
#else
      float values[kBlock];
      unpack_block<Bits>(codes, values);
      for (int j = 0; j < kBlock; ++j) {
        dst[j] = scale[j / w.group] * values[j] + offset[j / w.group];
      }
#endif
    }
  }
}

ffi::Error check_weights(const ffi::AnyBuffer& codes, const ffi::Buffer<ffi::F32>& scale,
                         const ffi::Buffer<ffi::F32>& offset, int32_t bits, Weights* w) {
  if (bits != 4 && bits != 8) {
    return ffi::Error::InvalidArgument("bits must be 4 or 8, got " + std::to_string(bits));
  }
  const auto expected = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  if (codes.element_type() != expected) {
    return ffi::Error::InvalidArgument("codes have the wrong element type for these bits");
  }
  auto cd = codes.dimensions(), sd = scale.dimensions(), od = offset.dimensions();
  if (cd.size() != 2 || sd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument("codes, scale and offset must be matrices");
  }
  w->out = cd[0];
  w->row_bytes = cd[1];
  w->in = cd[1] * 8 / bits;
  w->blocks = w->in / kBlock;
  w->groups = sd[1];
  w->group = w->groups > 0 ? w->in / w->groups : 0;
  const bool group_ok = w->group == kBlock || (bits == 8 && w->group == 16);
  if (w->in % kBlock != 0 || !group_ok || w->groups * w->group != w->in || sd[0] != w->out ||
      od[0] != w->out || od[1] != w->groups) {
    return ffi::Error::InvalidArgument("scale and offset do not match the codes' blocks");
  }
  w->codes = static_cast<const uint8_t*>(codes.untyped_data());
  w->scale = scale.typed_data();
  w->offset = offset.typed_data();
  return ffi::Error::Success();
}

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                   ffi::ResultBuffer<ffi::F32> y, int32_t bits) {
  Weights w;
  if (ffi::Error error = check_weights(codes, scale, offset, bits, &w); error.failure()) {
    return error;
  }
  auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != w.in) {
    return ffi::Error::InvalidArgument("x must be [tokens, in] with the weights' in");
  }
  meshnode::LiveRows live(x.typed_data(), xd[0], w.in);  // a bucket's zero rows: not computed
  const int64_t tokens = live.count();
  const float* xs = live.inputs();
  std::unique_ptr<float[]> sums(new float[std::max<int64_t>(1, tokens * w.groups)]);
  for (int64_t i = 0; i < tokens * w.groups; ++i) {
    float s = 0.f;
    for (int64_t j = 0; j < w.group; ++j) s += xs[i * w.group + j];
    sums[i] = s;
  }
  const float* ss = sums.get();
  float* out = live.outputs(y->typed_data(), w.out);
  if (tokens > 0) {
    const bool long_call = tokens * w.in * w.out >= kLongCallProducts;
    parallel_rows(pool, w.out, 16, [&, xs, ss, out, tokens](int64_t first, int64_t last) {
      if (bits == 4) {
        matmul_rows<4>(w, xs, ss, tokens, out, first, last);
      } else {
        matmul_rows<8>(w, xs, ss, tokens, out, first, last);
      }
    }, long_call ? meshnode::Call::kLong : meshnode::Call::kShort);
  }
  live.scatter(y->typed_data(), w.out);
  return ffi::Error::Success();
}

ffi::Error QDequant(ffi::ThreadPool pool, ffi::AnyBuffer /*after*/, ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> out, int32_t bits) {
  Weights w;
  if (ffi::Error error = check_weights(codes, scale, offset, bits, &w); error.failure()) {
    return error;
  }
  float* dst = out->typed_data();
  parallel_rows(pool, w.out, 16, [&, dst](int64_t first, int64_t last) {
    if (bits == 4) {
      dequantize_rows<4>(w, dst, first, last);
    } else {
      dequantize_rows<8>(w, dst, first, last);
    }
  });
  return ffi::Error::Success();
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodeQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [tokens, in]
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [out, in / 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset [out, in / 32]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [tokens, out]
                                  .Attr<int32_t>("bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodeQDequant, QDequant,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // after: not read
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset
                                  .Ret<ffi::Buffer<ffi::F32>>()  // W [out, in]
                                  .Attr<int32_t>("bits"));
