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
// MeshnodePagedAttention(q [B, N, D], k_arena [L, pages, P, K, D], v_arena (same),
//                        layer: int32 scalar, positions: int32 [B], tables: int32 [B, M],
//                        window: int32 scalar) -> out [B, N, D]
//
// The same attention for a batch of sessions, each at its own position: row b
// attends to its positions [lo_b, positions[b]], position i being offset
// i % P of page tables[b, i / P] of the shared arena (meshnode/model/paged.py).
// Each row runs exactly the arithmetic it would run alone (the same loops in
// the same order over its own positions), so its output never depends on the
// other rows of the batch.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Query heads [g * groups, (g + 1) * groups) of batch row b, over kv head g, positions
// [first, last]; at(i) is the offset of position i's kv head 0 in the caches.
template <typename At>
void attend(const Problem& p, int64_t b, int64_t g, int64_t first, int64_t last, At at,
            std::vector<float>& scores) {
  const int64_t groups = p.heads / p.kv_heads;
  const int64_t d = p.dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t count = last - first + 1;
  scores.resize(static_cast<size_t>(count));
  for (int64_t h = 0; h < groups; ++h) {
    const float* q = p.q + (b * p.heads + g * groups + h) * d;
    float* s = scores.data();
    float best = -INFINITY;
    for (int64_t i = 0; i < count; ++i) {
      s[i] = dot(q, p.k + at(first + i) + g * d, d) * scale;
      best = std::max(best, s[i]);
    }
    const float inverse = 1.0f / exp_and_sum(s, count, best);
    float* out = p.out + (b * p.heads + g * groups + h) * d;
    std::fill(out, out + d, 0.f);
    for (int64_t i = 0; i < count; ++i) {
      const float weight = s[i] * inverse;
      const float* value = p.v + at(first + i) + g * d;
      for (int64_t j = 0; j < d; ++j) out[j] += weight * value[j];
    }
  }
}

// One session's cache [L, B, S, K, D]: position i of row b.
void attend(const Problem& p, int64_t b, int64_t g, std::vector<float>& scores) {
  const int64_t row_stride = p.kv_heads * p.dim;  // between positions
  const int64_t base = ((p.layer * p.batch + b) * p.length) * row_stride;
  attend(p, b, g, p.first, p.last, [&](int64_t i) { return base + i * row_stride; }, scores);
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
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t g = 0; g < p.kv_heads; ++g) attend(p, b, g, scores);
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q,
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
  std::vector<float> scores;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t at = positions.typed_data()[b];
    if (at < 0 || at >= width * p.length) {
      return ffi::Error::InvalidArgument("a position is past its page table");
    }
    const int32_t* row = table + b * width;
    auto address = [&](int64_t i) {
      return layer_base + row[i / p.length] * page_stride + (i % p.length) * row_stride;
    };
    const int64_t first = span > 0 ? std::max<int64_t>(0, at - span + 1) : 0;
    for (int64_t g = 0; g < p.kv_heads; ++g) attend(p, b, g, first, at, address, scores);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodePagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
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
