// Float32 dense matmul for XLA:CPU whose rows do not depend on each other's
// presence (batch invariance): a row's result is bitwise the same alone or in a
// call of any number of rows, which XLA's own dot does not promise.
//
// MeshnodeDenseMatmul(x [N, in], w [in, out]) -> y [N, out]:
//   y[n, o] = sum_i x[n, i] * w[i, o], one FMA chain over i in order per output.
//   Columns go in vectors (64 at a time with AVX-512, 16 with AVX2); each weight
//   row segment is loaded once for a tile of input rows, each row with its
//   own accumulators (up to 6 rows with AVX-512, 4 otherwise). Threads take
//   groups of columns (parallel.h). Rows of zeros (a bucketed batch's padding)
//   are not computed: their outputs are exactly zero (rows.h).
//
// Vector paths: AVX-512, AVX2 + FMA, else portable C++.

#include <algorithm>
#include <cmath>
#include <cstdint>

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

// Input rows that share each weight load: 6 rows x 4 vectors of AVX-512 hold 24
// accumulators of 32 registers; AVX2's 16 registers take 4 rows x 2 vectors.
#if defined(MESHNODE_AVX512)
constexpr int64_t kDenseTile = 6;
#else
constexpr int64_t kDenseTile = 4;
#endif

struct Dense {
  const float* x;
  const float* w;
  float* y;
  int64_t rows, in, out;
};

// Inputs i in [i0, i1) of one pass: a tile's accumulators start at zero on the
// first pass and from y after it, which holds them exactly (float32), so the
// FMA chain of each output is the same as in one pass over every input.
struct Depth {
  int64_t i0, i1;
};

#if defined(MESHNODE_AVX512)
constexpr int64_t kDenseWidth = 64;  // columns per group: 4 vectors of 16

// Columns [o, o + 16 * V) of a tile of R rows; the last vector takes `tail` columns.
template <int R, int V>
inline void dense_tile(const Dense& d, int64_t n, int64_t o, __mmask16 tail, Depth depth) {
  __m512 acc[R][V];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float* yr = d.y + (n + r) * d.out + o;
    #pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 mask = v + 1 < V ? 0xFFFF : tail;
      acc[r][v] = depth.i0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, yr + 16 * v);
    }
  }
  for (int64_t i = depth.i0; i < depth.i1; ++i) {
    const float* wi = d.w + i * d.out + o;
    __m512 wv[V];
    #pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      wv[v] = v + 1 < V ? _mm512_loadu_ps(wi + 16 * v) : _mm512_maskz_loadu_ps(tail, wi + 16 * v);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(d.x[(n + r) * d.in + i]);
      #pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* yr = d.y + (n + r) * d.out + o;
    #pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      if (v + 1 < V) {
        _mm512_storeu_ps(yr + 16 * v, acc[r][v]);
      } else {
        _mm512_mask_storeu_ps(yr + 16 * v, tail, acc[r][v]);
      }
    }
  }
}

template <int R>
void dense_columns(const Dense& d, int64_t n, int64_t first, int64_t last, Depth depth) {
  for (int64_t o = first; o < last;) {
    if (last - o >= 64) {
      dense_tile<R, 4>(d, n, o, 0xFFFF, depth);
      o += 64;
    } else {
      const int64_t width = std::min<int64_t>(16, last - o);
      dense_tile<R, 1>(d, n, o, static_cast<__mmask16>((1u << width) - 1), depth);
      o += width;
    }
  }
}
#elif defined(MESHNODE_AVX2)
constexpr int64_t kDenseWidth = 16;  // 2 vectors of 8: 4 rows x 2 accumulators fit 16 ymm

template <int R>
void dense_columns(const Dense& d, int64_t n, int64_t first, int64_t last, Depth depth) {
  int64_t o = first;
  for (; o + 16 <= last; o += 16) {
    __m256 acc[R][2];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* yr = d.y + (n + r) * d.out + o;
      acc[r][0] = depth.i0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(yr);
      acc[r][1] = depth.i0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(yr + 8);
    }
    for (int64_t i = depth.i0; i < depth.i1; ++i) {
      const float* wi = d.w + i * d.out + o;
      const __m256 w0 = _mm256_loadu_ps(wi), w1 = _mm256_loadu_ps(wi + 8);
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_set1_ps(d.x[(n + r) * d.in + i]);
        acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(d.y + (n + r) * d.out + o, acc[r][0]);
      _mm256_storeu_ps(d.y + (n + r) * d.out + o + 8, acc[r][1]);
    }
  }
  for (; o < last; ++o) {  // std::fma: the same rounding as the vector lanes
    for (int r = 0; r < R; ++r) {
      float* y = d.y + (n + r) * d.out + o;
      float acc = depth.i0 == 0 ? 0.f : *y;
      for (int64_t i = depth.i0; i < depth.i1; ++i) {
        acc = std::fma(d.x[(n + r) * d.in + i], d.w[i * d.out + o], acc);
      }
      *y = acc;
    }
  }
}
#else
constexpr int64_t kDenseWidth = 64;

template <int R>
void dense_columns(const Dense& d, int64_t n, int64_t first, int64_t last, Depth depth) {
  for (int r = 0; r < R; ++r) {
    float* yr = d.y + (n + r) * d.out;
    if (depth.i0 == 0) {
      for (int64_t o = first; o < last; ++o) yr[o] = 0.f;
    }
    for (int64_t i = depth.i0; i < depth.i1; ++i) {
      const float xi = d.x[(n + r) * d.in + i];
      const float* wi = d.w + i * d.out;
      for (int64_t o = first; o < last; ++o) yr[o] += xi * wi[o];
    }
  }
}
#endif

// Blocking: kDenseDepth inputs per pass, so each pass reads kDenseDepth whole
// weight rows of a block of kDenseBlock column groups in order (a pass over one
// column group alone would read every weight row 256 bytes at a time, a page
// apart, which the prefetchers do not follow), and every tile of rows reuses
// the pass's weights from L1.
constexpr int64_t kDenseDepth = 8;
constexpr int64_t kDenseBlock = 16;

// Every row times the columns [first, last).
void dense_rows(const Dense& d, int64_t first, int64_t last) {
  for (int64_t block = first; block < last; block += kDenseBlock * kDenseWidth) {
    const int64_t block_end = std::min(last, block + kDenseBlock * kDenseWidth);
    for (int64_t i0 = 0; i0 < d.in; i0 += kDenseDepth) {
      const Depth depth{i0, std::min(d.in, i0 + kDenseDepth)};
      for (int64_t lo = block; lo < block_end; lo += kDenseWidth) {
        const int64_t hi = std::min(block_end, lo + kDenseWidth);
        for (int64_t n = 0; n < d.rows; n += kDenseTile) {
          switch (std::min(kDenseTile, d.rows - n)) {
            case 6: dense_columns<6>(d, n, lo, hi, depth); break;
            case 5: dense_columns<5>(d, n, lo, hi, depth); break;
            case 4: dense_columns<4>(d, n, lo, hi, depth); break;
            case 3: dense_columns<3>(d, n, lo, hi, depth); break;
            case 2: dense_columns<2>(d, n, lo, hi, depth); break;
            default: dense_columns<1>(d, n, lo, hi, depth); break;
          }
        }
      }
    }
  }
}

ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("x must be [rows, in] and w [in, out]");
  }
  meshnode::LiveRows live(x.typed_data(), xd[0], xd[1]);  // a bucket's zero rows: not computed
  const Dense d{live.inputs(), w.typed_data(), live.outputs(y->typed_data(), wd[1]),
                live.count(), xd[1], wd[1]};
  if (d.in == 0) {  // no pass writes y
    std::fill(d.y, d.y + d.rows * d.out, 0.f);
  } else if (d.rows > 0) {
    const int64_t groups = (d.out + kDenseWidth - 1) / kDenseWidth;
    meshnode::parallel_rows(pool, groups, 4, [&d](int64_t first, int64_t last) {
      dense_rows(d, first * kDenseWidth, std::min(d.out, last * kDenseWidth));
    });
  }
  live.scatter(y->typed_data(), wd[1]);
  return ffi::Error::Success();
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodeDenseMatmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [rows, in]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [in, out]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [rows, out]

