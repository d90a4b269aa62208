// Attention of one new position over a layer's KV cache, as an XLA FFI handler.
//
// MeshnodeDecodeAttention(q [B, N, D], k_cache [L, B, S, K, D], v_cache (same),
//                         layer, position, window: int32 scalars) -> out [B, N, D]
//
// Query head n reads kv head n / (N / K) (grouped-query attention) of layer
// `layer`, over cache positions [lo, position], lo = position - window + 1 when
// window > 0 (sliding window), else 0: the causal mask of one position. The
// caches are read in place: XLA's path sliced and transposed each layer's
// window of the cache first, which cost more than the attention itself
// (a 30-layer decode step over 1024 positions took 12 ms longer than over 64).
// Scores and softmax are float32, scaled by D^-0.5. One thread: handing
// (batch row, kv head) pairs to XLA's thread pool measured slower, as the
// pool's threads wake later than this work takes.
//
// Under load a cache is read from memory, not from the CPU's caches (between two
// steps of a session the other sessions' caches and the weights went through them):
// the kernel is bound by how fast it reads. So a row reads each position's keys of all
// kv heads at once (a contiguous run), then per kv head each position's value whole,
// every output lane of the group in registers, and asks for the lines of the position
// kAhead further on while it computes (scripts/bench_attention.py: 14-19 against 8-9
// GB/s, 8 and 32 rows at 110-420 positions, a cache far larger than the CPU's).
//
// MeshnodePagedAttention(q [B, N, D], k_arena [L, pages, P, K, D], v_arena (same),
//                        layer: int32 scalar, positions: int32 [B], tables: int32 [B, M],
//                        window: int32 scalar) -> out [B, N, D]
//
// The same attention for a batch of sessions, each at its own position: row b
// attends to its positions [lo_b, positions[b]], position i being offset
// i % P of page tables[b, i / P] of the shared arena (meshnode/model/paged.py).
// Each row runs exactly the arithmetic it would run alone (the same loops in
// the same order over its own positions), so its output never depends on the
// other rows of the batch. A prefill chunk comes as one row per query position
// (its table repeated): each query reads only its causal prefix, in place, and
// computes what a decode step at that position would. When the rows together
// read many positions (a chunk, a large batch at long positions), the rows are
// shared with XLA's thread pool (parallel.h); which thread runs a row never
// changes its result.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Positions x query heads read by one call above which it is shared among threads.
constexpr int64_t kParallelPositions = 1 << 16;

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t batch, heads, kv_heads, dim, length;  // length = S
  int64_t layer, first, last;                   // positions [first, last] attended
};

#if defined(__AVX512F__)
// e^x for x <= 0 to about 1 ulp: Cody-Waite reduction by ln 2 and Cephes'
// expf polynomial, scaled back by 2^n with scalef.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__)
// The sums of the 16 lanes of a, b, c and d, as [a, b, c, d]: the same tree of adds for
// each of the four, so a sum does not depend on its slot or on the other three.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], and the same of c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // per 128-bit lane: [a0123, b0123, c0123, d0123]
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 lanes = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                     _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(lanes),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                        _mm512_castps_pd(lanes), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
#endif

// exp(s[i] - best) in place; returns their sum.
inline float exp_and_sum(float* s, int64_t count, float best) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(best);
  for (; i + 16 <= count; i += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), shift));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < count; ++i) {
    s[i] = std::exp(s[i] - best);
    total += s[i];
  }
  return total;
}

// Positions ahead whose keys (values) are fetched into the second-level cache while one
// is computed (8 and 32 measured slower).
constexpr int64_t kAhead = 16;

// Asks for the cache lines of x[0, n) (no effect on any result).
inline void prefetch(const float* x, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(x);
  for (int64_t at = 0; at < n * 4; at += 64) __builtin_prefetch(bytes + at, 0, 2);
}

// sum_j a[j] * b[j].
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

void weigh_values(const Problem& p, int64_t g, const int64_t* at, int64_t count,
                  const float* weights, float* out);

// Every query head of batch row b at the `count` cache offsets `at` (of each attended
// position's kv head 0), in order; query head n reads kv head n / groups. A position's
// keys of all kv heads are read together (they are contiguous; one kv head's alone are
// 256 of every 768 bytes for SmolLM2, and a pass per kv head read memory at half speed),
// its values per kv head (weigh_values). Per query head the arithmetic is fixed: a score
// is a 16-lane fused multiply-add chain over D then one horizontal sum (sum4's tree,
// whichever slot of four it takes, the four being positions i..i+3 from i = 0), an output
// lane sums weight * value over positions in order.
void attend(const Problem& p, int64_t b, const int64_t* at, int64_t count,
            std::vector<float>& scores) {
  const int64_t groups = p.heads / p.kv_heads;
  const int64_t d = p.dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  scores.resize(static_cast<size_t>(count * p.heads));  // [heads, count]
  const float* q0 = p.q + b * p.heads * d;  // [heads, d]; head n = g * groups + h
  float* out0 = p.out + b * p.heads * d;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (d % 16 == 0) {  // four positions a pass, their four sums reduced together
    for (; i < count; i += 4) {
      const int64_t n = std::min<int64_t>(4, count - i);
      for (int64_t m = i + kAhead; m < std::min<int64_t>(count, i + kAhead + 4); ++m) {
        prefetch(p.k + at[m], p.kv_heads * d);
      }
      for (int64_t g = 0; g < p.kv_heads; ++g) {
        for (int64_t h = 0; h < groups; ++h) {
          __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                           _mm512_setzero_ps()};  // a missing position's stays zero
          const int64_t head = g * groups + h;
          const float* q = q0 + head * d;
          for (int64_t j = 0; j < d; j += 16) {
            const __m512 qj = _mm512_loadu_ps(q + j);
            for (int64_t m = 0; m < n; ++m) {
              acc[m] = _mm512_fmadd_ps(qj, _mm512_loadu_ps(p.k + at[i + m] + g * d + j),
                                       acc[m]);
            }
          }
          float sums[4];
          _mm_storeu_ps(sums, sum4(acc[0], acc[1], acc[2], acc[3]));
          for (int64_t m = 0; m < n; ++m) scores[head * count + i + m] = sums[m] * scale;
        }
      }
    }
  }
#endif
  for (; i < count; ++i) {  // no AVX-512, or a head dim not a multiple of 16
    for (int64_t g = 0; g < p.kv_heads; ++g) {
      const float* key = p.k + at[i] + g * d;
      for (int64_t h = 0; h < groups; ++h) {
        const int64_t head = g * groups + h;
        scores[head * count + i] = dot(q0 + head * d, key, d) * scale;
      }
    }
  }
  for (int64_t head = 0; head < p.heads; ++head) {
    float* s = scores.data() + head * count;
    const float best = *std::max_element(s, s + count);
    const float inverse = 1.0f / exp_and_sum(s, count, best);
    for (int64_t i = 0; i < count; ++i) s[i] *= inverse;
  }
  // out[n, lane] = sum over i, in order, of weight[n, i] * value[i, n / groups, lane]
  for (int64_t g = 0; g < p.kv_heads; ++g) {
    weigh_values(p, g, at, count, scores.data() + g * groups * count, out0 + g * groups * d);
  }
}

#if defined(__AVX512F__)
// Query heads of one kv head whose output lanes weigh_lanes keeps in registers, and the
// accumulators it may use (of the 32 registers; the C values and a weight take others).
constexpr int64_t kRegisterHeads = 8, kAccumulators = 24;

// Output lanes [j, j + 16 * C) of the `groups` query heads of kv head g, in registers: one
// pass over the positions, each reading C * 16 lanes of its value (a contiguous run).
template <int C>
void weigh_lanes(const Problem& p, int64_t g, const int64_t* at, int64_t count,
                 const float* weights, float* out, int64_t j) {
  const int64_t groups = p.heads / p.kv_heads, d = p.dim;
  __m512 acc[kRegisterHeads][C];
  for (int64_t h = 0; h < groups; ++h) {
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) prefetch(p.v + at[i + kAhead] + g * d + j, C * 16);
    const float* row = p.v + at[i] + g * d + j;
    __m512 value[C];
    for (int c = 0; c < C; ++c) value[c] = _mm512_loadu_ps(row + c * 16);
    for (int64_t h = 0; h < groups; ++h) {
      const __m512 weight = _mm512_set1_ps(weights[h * count + i]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(weight, value[c], acc[h][c]);
    }
  }
  for (int64_t h = 0; h < groups; ++h) {
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + h * d + j + c * 16, acc[h][c]);
  }
}
#endif

// out [groups, d] of kv head g's query heads: each lane sums weight * value over the
// positions in order (the same arithmetic however many lanes a pass takes).
void weigh_values(const Problem& p, int64_t g, const int64_t* at, int64_t count,
                  const float* weights, float* out) {
  const int64_t groups = p.heads / p.kv_heads, d = p.dim;
  int64_t j = 0;
#if defined(__AVX512F__)
  if (groups <= kRegisterHeads) {
    if (groups * 4 <= kAccumulators) {
      for (; j + 64 <= d; j += 64) weigh_lanes<4>(p, g, at, count, weights, out, j);
    }
    for (; j + 32 <= d; j += 32) weigh_lanes<2>(p, g, at, count, weights, out, j);
    for (; j + 16 <= d; j += 16) weigh_lanes<1>(p, g, at, count, weights, out, j);
  }
#endif
  for (; j < d; ++j) {  // lanes left (no AVX-512, more than 8 heads a group, or D % 16)
    for (int64_t h = 0; h < groups; ++h) out[h * d + j] = 0.f;
    for (int64_t i = 0; i < count; ++i) {
      const float value = p.v[at[i] + g * d + j];
      for (int64_t h = 0; h < groups; ++h) out[h * d + j] += weights[h * count + i] * value;
    }
  }
}

// One session's cache [L, B, S, K, D]: the offsets of positions [p.first, p.last] of row b.
void session_offsets(const Problem& p, int64_t b, std::vector<int64_t>& at) {
  const int64_t row_stride = p.kv_heads * p.dim;  // between positions
  const int64_t base = ((p.layer * p.batch + b) * p.length) * row_stride;
  at.resize(static_cast<size_t>(p.last - p.first + 1));
  for (int64_t i = p.first; i <= p.last; ++i) at[i - p.first] = base + i * row_stride;
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> position,
                           ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || vd.size() != 5) {
    return ffi::Error::InvalidArgument("q must be [B, N, D] and the caches [L, B, S, K, D]");
  }
  for (size_t i = 0; i < 5; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("k and v caches differ in shape");
  }
  Problem p;
  p.batch = qd[0];
  p.heads = qd[1];
  p.dim = qd[2];
  p.kv_heads = kd[3];
  p.length = kd[2];
  if (kd[1] != p.batch || kd[4] != p.dim || p.kv_heads < 1 || p.heads % p.kv_heads != 0) {
    return ffi::Error::InvalidArgument("q does not match the caches' batch, heads or dim");
  }
  p.layer = layer.typed_data()[0];
  const int64_t at = position.typed_data()[0], span = window.typed_data()[0];
  if (p.layer < 0 || p.layer >= kd[0] || at < 0 || at >= p.length) {
    return ffi::Error::InvalidArgument("layer or position outside the cache");
  }
  p.first = span > 0 ? std::max<int64_t>(0, at - span + 1) : 0;
  p.last = at;
  p.q = q.typed_data();
  p.k = k_cache.typed_data();
  p.v = v_cache.typed_data();
  p.out = out->typed_data();

  std::vector<float> scores;
  std::vector<int64_t> offsets;
  for (int64_t b = 0; b < p.batch; ++b) {
    session_offsets(p, b, offsets);
    attend(p, b, offsets.data(), p.last - p.first + 1, scores);
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> k_arena, ffi::Buffer<ffi::F32> v_arena,
                          ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> positions,
                          ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> window,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_arena.dimensions(), vd = v_arena.dimensions();
  auto pd = positions.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || vd.size() != 5 || pd.size() != 1 || td.size() != 2) {
    return ffi::Error::InvalidArgument(
        "q must be [B, N, D], the arenas [L, pages, P, K, D], positions [B], tables [B, M]");
  }
  for (size_t i = 0; i < 5; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("k and v arenas differ in shape");
  }
  Problem p;
  p.batch = qd[0];
  p.heads = qd[1];
  p.dim = qd[2];
  p.kv_heads = kd[3];
  p.length = kd[2];  // positions per page
  const int64_t pages = kd[1], width = td[1];
  if (pd[0] != p.batch || td[0] != p.batch || kd[4] != p.dim || p.kv_heads < 1 ||
      p.heads % p.kv_heads != 0) {
    return ffi::Error::InvalidArgument("q does not match the arenas, positions or tables");
  }
  p.layer = layer.typed_data()[0];
  if (p.layer < 0 || p.layer >= kd[0]) return ffi::Error::InvalidArgument("layer outside");
  const int32_t* table = tables.typed_data();
  for (int64_t i = 0; i < p.batch * width; ++i) {
    if (table[i] < 0 || table[i] >= pages) {
      return ffi::Error::InvalidArgument("a page table names a page outside the arena");
    }
  }
  const int64_t span = window.typed_data()[0];
  p.q = q.typed_data();
  p.k = k_arena.typed_data();
  p.v = v_arena.typed_data();
  p.out = out->typed_data();
  const int64_t row_stride = p.kv_heads * p.dim, page_stride = p.length * row_stride;
  const int64_t layer_base = p.layer * pages * page_stride;
  const int32_t* at = positions.typed_data();
  int64_t attended = 0;  // positions read by all rows together
  for (int64_t b = 0; b < p.batch; ++b) {
    if (at[b] < 0 || at[b] >= width * p.length) {
      return ffi::Error::InvalidArgument("a position is past its page table");
    }
    attended += span > 0 ? std::min<int64_t>(span, at[b] + 1) : at[b] + 1;
  }
  auto rows = [&, table, at, span](int64_t first_row, int64_t last_row) {
    std::vector<float> scores;
    std::vector<int64_t> offsets;  // of row b's positions, page by page
    for (int64_t b = first_row; b < last_row; ++b) {
      const int64_t first = span > 0 ? std::max<int64_t>(0, at[b] - span + 1) : 0;
      const int32_t* row = table + b * width;
      offsets.resize(static_cast<size_t>(at[b] - first + 1));
      int64_t page = first / p.length, slot = first % p.length;
      for (int64_t i = 0; i <= at[b] - first; ++i) {
        offsets[i] = layer_base + row[page] * page_stride + slot * row_stride;
        if (++slot == p.length) slot = 0, ++page;
      }
      attend(p, b, offsets.data(), at[b] - first + 1, scores);
    }
  };
  if (attended * p.heads < kParallelPositions) {
    rows(0, p.batch);  // a decode step: waking the pool costs more than it saves
  } else {
    meshnode::parallel_rows(pool, p.batch, 1, rows);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodePagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_arena [L, pages, P, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_arena
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tables [B, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window (0: none)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [B, N, D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodeDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_cache [L, B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // position
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window (0: none)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [B, N, D]
