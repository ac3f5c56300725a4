// FreeKV / Quest page work on the host, called from Python (ctypes): the page selection and the recall of
// a step, which numpy and small ONNX Runtime graphs did in ~10 calls each (~4 ms a step at 7680 tokens on
// SmolLM2, most of it per-call overhead, not work).
//
// Layouts (all C-contiguous; "rows" are (layer, sequence, KV head) triples, row = (l * B + b) * Hkv + h):
//   pool        [L, B, cap, Hkv, 2, page, D]  one KV head's page: its K then its V (float32 or float16)
//   kmin, kmax  [L, B, Hkv, cap, D]           per-channel min / max of each page's keys (float16, rounded outward)
//   view        [2, L, B, Hkv, width, D]      K then V; page slot s of a row spans [sink + s*page, +page)
//   slot_pages  [rows, k]                      the page id each of the view's page slots holds (-1: none)
//
// kvtrt_select_pages: Quest's upper bound s_i(p) = q_i+ . kmax_p + q_i- . kmin_p for the g query heads of
// a row, combined over the group (softmax: each head's softmax over the pages of s * scale, averaged;
// mean: s averaged), then the k best pages (ties to the lower id; -1 past the row's pages), as
// `pages.select_pages` computes it (float32; the sums' order may differ in the last bit).
// kvtrt_recall_pages: make each row's page slots hold its selected pages: pages already held stay in
// their slot, the missing ones go to the free slots in ascending order (`freekv._placement`), and only
// those are copied from the pool (widened from float16 when the pool is narrower than the view).
#define _POSIX_C_SOURCE 200809L  // clock_gettime
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define EXPORT __attribute__((visibility("default")))
#define MAX_KV_INLINE 64  // KV heads of a layer the inline refresh takes

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa) {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400)) mantissa <<= 1, exponent--;
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  } else {
    bits = sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// n float16 values widened into float32 (exact)
static void widen(float *dst, const uint16_t *src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
  for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

// q+ . kmax + q- . kmin over d values (kmax, kmin float16)
static float upper_bound(const float *qp, const float *qn, const uint16_t *kmax, const uint16_t *kmin, int64_t d) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 pos = _mm512_setzero_ps(), neg = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    pos = _mm512_fmadd_ps(_mm512_loadu_ps(qp + i), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kmax + i))), pos);
    neg = _mm512_fmadd_ps(_mm512_loadu_ps(qn + i), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kmin + i))), neg);
  }
  s = _mm512_reduce_add_ps(pos) + _mm512_reduce_add_ps(neg);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  __m256 pos = _mm256_setzero_ps(), neg = _mm256_setzero_ps();
  for (; i + 8 <= d; i += 8) {
    pos = _mm256_fmadd_ps(_mm256_loadu_ps(qp + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kmax + i))), pos);
    neg = _mm256_fmadd_ps(_mm256_loadu_ps(qn + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kmin + i))), neg);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(pos, neg));
  for (int j = 0; j < 8; j++) s += lanes[j];
#endif
  for (; i < d; i++) s += qp[i] * half_to_float(kmax[i]) + qn[i] * half_to_float(kmin[i]);
  return s;
}

// An unsigned key that orders as the float does (NaN as -inf, -0 as 0).
static uint32_t order_key(float v) {
  uint32_t u;
  if (isnan(v)) v = -INFINITY;
  if (v == 0.0f) v = 0.0f;
  memcpy(&u, &v, 4);
  return u & 0x80000000u ? ~u : u | 0x80000000u;
}

// The k best of combined[0, n) into out (descending, ties to the lower id; in id order with by_id), -1 after
// the n-th. A radix select finds the k-th best score's key a byte at a time (4 histograms of the
// candidates), the pages above it and the first ones equal to it are taken in id order, then sorted by score
// (stable: ties keep the lower id first) unless by_id. keys: n scratch values; best: k.
static void top_k(const float *combined, int64_t n, int64_t k, int by_id, int64_t *out, uint32_t *keys,
                  uint32_t *best) {
  const int64_t take = k < n ? k : n;
  for (int64_t j = take; j < k; j++) out[j] = -1;
  if (take == 0) return;
  for (int64_t p = 0; p < n; p++) keys[p] = order_key(combined[p]);
  uint32_t prefix = 0, mask = 0;
  int64_t need = take;  // how many of the pages matching prefix the top k still takes
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t count[256] = {0};
    for (int64_t p = 0; p < n; p++) count[(keys[p] >> shift) & 255] += (keys[p] & mask) == prefix;
    int digit = 255;
    while (count[digit] < need) need -= count[digit--];
    prefix |= (uint32_t)digit << shift, mask |= 255u << shift;
  }
  int64_t held = 0;  // prefix is now the k-th best key; `need` pages equal to it are taken, the first ones
  for (int64_t p = 0; p < n; p++)
    if (keys[p] > prefix || (keys[p] == prefix && need-- > 0)) best[held] = keys[p], out[held++] = p;
  for (int64_t i = 1; i < held && !by_id; i++) {  // insertion sort, descending and stable
    const uint32_t key = best[i];
    const int64_t id = out[i];
    int64_t j = i;
    for (; j > 0 && best[j - 1] < key; j--) best[j] = best[j - 1], out[j] = out[j - 1];
    best[j] = key, out[j] = id;
  }
}

#if defined(__AVX512F__)
// r[i] = the sum of v[i]'s 16 lanes: a transpose-and-add tree, 15 adds for 16 sums instead of 16 reductions
static __m512 sum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)  // a[i]: v[2i]'s lanes folded to 8 (lanes 0-7), v[2i+1]'s (8-15)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)  // b[i]: 128-bit lane j holds v[4i + j] folded to 4
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)  // c[i], lane j: v[8i + j] and v[8i + 4 + j] folded to 2 each, interleaved
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  // lane j, element m: v[4m + j]; put v[i] at element i
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// s[p] = qp . kmax_p + qn . kmin_p for the 16 pages p at kmax / kmin (widened; dim a multiple of 16)
static void upper_bounds16(const float *qp, const float *qn, const float *kmax, const float *kmin, int64_t dim,
                           float *s) {
  __m512 acc[16];
  for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    const __m512 pos = _mm512_loadu_ps(qp + i), neg = _mm512_loadu_ps(qn + i);
    for (int p = 0; p < 16; p++)
      acc[p] = _mm512_fmadd_ps(neg, _mm512_loadu_ps(kmin + p * dim + i),
                               _mm512_fmadd_ps(pos, _mm512_loadu_ps(kmax + p * dim + i), acc[p]));
  }
  _mm512_storeu_ps(s, sum16(acc));
}

// exp of 16 floats at most 0 (a softmax's shifted scores), within 1.3 ulp of exp: Cephes' expf polynomial on
// x - n ln 2, scaled by 2^n
static __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // exp(-104) is 0 in float32; keeps -inf out of n
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// s[0, n) = softmax(s * scale), 16 at a time (the last vector masked)
static void softmax16(float *s, int64_t n, float scale) {
  __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
  const __m512 by = _mm512_set1_ps(scale);
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 m = n - p >= 16 ? 0xffff : (__mmask16)((1u << (n - p)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s + p), by);
    _mm512_mask_storeu_ps(s + p, m, v);
    top = _mm512_max_ps(top, v);
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 m = n - p >= 16 ? 0xffff : (__mmask16)((1u << (n - p)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + p), shift));
    _mm512_mask_storeu_ps(s + p, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 m = n - p >= 16 ? 0xffff : (__mmask16)((1u << (n - p)) - 1);
    _mm512_mask_storeu_ps(s + p, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, s + p), total));
  }
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The same with 8 lanes: r[i] = the sum of v[i]'s 8 lanes
static __m256 sum8(const __m256 v[8]) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; i++) a[i] = _mm256_hadd_ps(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 2; i++) b[i] = _mm256_hadd_ps(a[2 * i], a[2 * i + 1]);  // lane L: v[4i..4i+3]'s half L
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

// s[p] = qp . kmax_p + qn . kmin_p for the 8 pages p at kmax / kmin (widened; dim a multiple of 8)
static void upper_bounds8(const float *qp, const float *qn, const float *kmax, const float *kmin, int64_t dim,
                          float *s) {
  __m256 acc[8];
  for (int p = 0; p < 8; p++) acc[p] = _mm256_setzero_ps();
  for (int64_t i = 0; i < dim; i += 8) {
    const __m256 pos = _mm256_loadu_ps(qp + i), neg = _mm256_loadu_ps(qn + i);
    for (int p = 0; p < 8; p++)
      acc[p] = _mm256_fmadd_ps(neg, _mm256_loadu_ps(kmin + p * dim + i),
                               _mm256_fmadd_ps(pos, _mm256_loadu_ps(kmax + p * dim + i), acc[p]));
  }
  _mm256_storeu_ps(s, sum8(acc));
}

// exp of 8 floats at most 0, as exp16 (below -87 it gives exp(-87), ~1e-38, instead of a subnormal or 0)
static __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // 2^n stays a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}
#endif

// s[0, n) = softmax(s * scale): 16 at a time with AVX-512, 8 with AVX2, else one at a time (expf)
static void softmax(float *s, int64_t n, float scale) {
#if defined(__AVX512F__)
  softmax16(s, n, scale);
#else
  float top = -INFINITY, sum = 0.0f;
  for (int64_t p = 0; p < n; p++) s[p] *= scale, top = s[p] > top ? s[p] : top;
  int64_t p = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  __m256 total = _mm256_setzero_ps();
  for (; p + 8 <= n; p += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + p), _mm256_set1_ps(top)));
    _mm256_storeu_ps(s + p, e);
    total = _mm256_add_ps(total, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, total);
  for (int l = 0; l < 8; l++) sum += lanes[l];
#endif
  for (; p < n; p++) s[p] = expf(s[p] - top), sum += s[p];
  for (p = 0; p < n; p++) s[p] /= sum;
#endif
}

typedef struct {  // one thread's share of a selection: rows [r0, r1)
  int64_t r0, r1, batch, kv_heads, group, dim, cap, k;
  const float *query;
  const uint16_t *kmin, *kmax;  // float16
  const int64_t *n_pages;
  int softmax, status;
  float scale;
  const uint8_t *only;
  int64_t *out;
  int by_id;  // picks in page-id order (the inline refresh: its recall needs the set, not the ranking)
} SelectJob;

// A row's selection scratch: scores [g, cap], combined [cap], keys [cap], best [k], q+ / q- [g, D] each.
static size_t scratch_floats(const SelectJob *j) {
  return (size_t)(j->cap * (j->group + 2) + j->k + 2 * j->group * j->dim);
}

// The q+ / q- halves of a row's g query heads (scratch layout above).
static void split_query(const SelectJob *j, int64_t row, float *scratch) {
  const int64_t n = j->group * j->dim;
  float *qp = scratch + j->cap * (j->group + 2) + j->k, *qn = qp + n;
  const float *q = j->query + row * n;
  for (int64_t d = 0; d < n; d++) qp[d] = q[d] > 0.0f ? q[d] : 0.0f, qn[d] = q[d] < 0.0f ? q[d] : 0.0f;
}

#define BLOCK_DIM 256  // head sizes up to this take the vector bounds (a block's widened summaries on the stack)

// Every query head's bound for the row's pages [p0, p1) into scratch's scores (split_query first). Whole
// blocks of 16 pages (8 with AVX2) are widened once and scored for every query head while they are in L1.
static void row_bounds(const SelectJob *j, int64_t row, int64_t p0, int64_t p1, float *scratch) {
  const int64_t cap = j->cap, dim = j->dim, group = j->group;
  const uint16_t *kx = j->kmax + row * cap * dim, *kn = j->kmin + row * cap * dim;
  const float *qp = scratch + cap * (group + 2) + j->k, *qn = qp + group * dim;
  int64_t p = p0;
#if defined(__AVX512F__)
  float hi[16 * BLOCK_DIM], lo[16 * BLOCK_DIM];
  if (dim % 16 == 0 && dim <= BLOCK_DIM)
    for (; p + 16 <= p1; p += 16) {
      widen(hi, kx + p * dim, 16 * dim), widen(lo, kn + p * dim, 16 * dim);
      for (int64_t i = 0; i < group; i++) upper_bounds16(qp + i * dim, qn + i * dim, hi, lo, dim, scratch + i * cap + p);
    }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  float hi[8 * BLOCK_DIM], lo[8 * BLOCK_DIM];
  if (dim % 8 == 0 && dim <= BLOCK_DIM)
    for (; p + 8 <= p1; p += 8) {
      widen(hi, kx + p * dim, 8 * dim), widen(lo, kn + p * dim, 8 * dim);
      for (int64_t i = 0; i < group; i++) upper_bounds8(qp + i * dim, qn + i * dim, hi, lo, dim, scratch + i * cap + p);
    }
#endif
  for (; p < p1; p++)
    for (int64_t i = 0; i < group; i++)
      scratch[i * cap + p] = upper_bound(qp + i * dim, qn + i * dim, kx + p * dim, kn + p * dim, dim);
}

// The row's pages to attend, from its n pages' bounds (row_bounds over [0, n)): the query heads' scores
// combined (softmax each, or as they are) and averaged, the k best into out [k].
static void row_pick(const SelectJob *j, int64_t n, float *scratch, int64_t *out) {
  const int64_t cap = j->cap, group = j->group;
  float *combined = scratch + cap * group, *keys = combined + cap, *best = keys + cap;
  for (int64_t p = 0; p < n; p++) combined[p] = 0.0f;
  for (int64_t i = 0; i < group; i++) {
    float *s = scratch + i * cap;
    if (j->softmax) softmax(s, n, j->scale);
    for (int64_t p = 0; p < n; p++) combined[p] += s[p];
  }
  for (int64_t p = 0; p < n; p++) combined[p] /= (float)group;
  top_k(combined, n, j->k, j->by_id, out, (uint32_t *)keys, (uint32_t *)best);
}

static int64_t pages_of(const SelectJob *j, int64_t row) {
  const int64_t n = j->n_pages[row / j->kv_heads % j->batch];
  return n < j->cap ? n : j->cap;
}

static void *select_rows(void *arg) {
  SelectJob *j = arg;
  float *scratch = malloc(sizeof(float) * scratch_floats(j));
  if (!scratch) {
    j->status = -1;
    return NULL;
  }
  for (int64_t row = j->r0; row < j->r1; row++) {
    if (j->only && !j->only[row]) continue;
    const int64_t n = pages_of(j, row);
    split_query(j, row, scratch);
    row_bounds(j, row, 0, n, scratch);
    row_pick(j, n, scratch, j->out + row * j->k);
  }
  free(scratch);
  return NULL;
}

typedef struct {  // one thread's share of a recall: rows [r0, r1)
  int64_t r0, r1, layer0, layers, batch, kv_heads, k, cap, width, sink, page, dim;
  int64_t *slot_pages;
  const int64_t *selected;
  const void *pool;
  void *view;
  int pool_half, view_half, status;
  int64_t counts[3];
} RecallJob;

static void *recall_rows(void *arg) {
  RecallJob *j = arg;
  const int64_t k = j->k, batch = j->batch, kv_heads = j->kv_heads, page = j->page, dim = j->dim, cap = j->cap;
  const int64_t block = page * dim, plane = j->layers * batch * kv_heads * j->width * dim;
  const int64_t size = j->view_half ? 2 : 4, stored = j->pool_half ? 2 : 4;
  int64_t *missing = malloc(sizeof(int64_t) * (size_t)(2 * k)), *keep = missing + k;
  uint8_t *wanted = calloc((size_t)j->cap, 2), *present = wanted + j->cap;  // by page id, zero between rows
  if (missing == NULL || wanted == NULL) {
    free(missing), free(wanted);
    j->status = -1;
    return NULL;
  }
  for (int64_t r = j->r0; r < j->r1; r++) {
    int64_t *held = j->slot_pages + r * k, n_missing = 0;
    const int64_t *want = j->selected + r * k;
    for (int64_t i = 0; i < k; i++)
      if (want[i] >= 0 && want[i] < cap) wanted[want[i]] = 1;
    for (int64_t s = 0; s < k; s++)
      if (held[s] >= 0 && held[s] < cap) keep[s] = wanted[held[s]], present[held[s]] = 1;
      else keep[s] = 0;
    for (int64_t i = 0; i < k; i++) {
      if (want[i] < 0 || want[i] >= cap) continue;  // not a page of the pool
      j->counts[0]++, j->counts[1] += present[want[i]];
      if (!present[want[i]]) missing[n_missing++] = want[i];
      wanted[want[i]] = 0;
    }
    for (int64_t s = 0; s < k; s++)
      if (held[s] >= 0 && held[s] < cap) present[held[s]] = 0;
    const int64_t row = j->layer0 * batch * kv_heads + r, l = row / (batch * kv_heads), bh = row % (batch * kv_heads);
    const int64_t b = bh / kv_heads, h = bh % kv_heads;
    for (int64_t s = 0, m = 0; s < k; s++) {
      if (keep[s]) continue;
      held[s] = m < n_missing ? missing[m] : -1;
      if (m >= n_missing) continue;
      const int64_t p = missing[m++];
      const char *src = (const char *)j->pool + (((l * batch + b) * j->cap + p) * kv_heads + h) * 2 * block * stored;
      char *dst = (char *)j->view + (row * j->width + j->sink + s * page) * dim * size;
      for (int kv = 0; kv < 2; kv++) {
        const char *from = src + kv * block * stored;
        char *to = dst + kv * plane * size;
        if (j->pool_half && !j->view_half) widen((float *)to, (const uint16_t *)from, block);
        else memcpy(to, from, (size_t)(block * size));
      }
      j->counts[2]++;
    }
  }
  free(missing), free(wanted);
  return NULL;
}

#define MAX_THREADS 8

// Run fn on jobs[0..n) (each a `size`-byte struct), job 0 on this thread; 1 if a thread could not start
// (its share then runs here too).
static void run_jobs(void *(*fn)(void *), char *jobs, size_t size, int n) {
  pthread_t threads[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int i = 1; i < n; i++) started[i] = pthread_create(&threads[i], NULL, fn, jobs + i * size) == 0;
  fn(jobs);
  for (int i = 1; i < n; i++) {
    if (started[i]) pthread_join(threads[i], NULL);
    else fn(jobs + i * size);
  }
}

static int parts(int64_t rows, int threads) {
  int n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
  return rows < n ? (rows > 0 ? (int)rows : 1) : n;
}

// Top-k pages of `rows` rows (row = (l * B + b) * Hkv + h, l counted from the first layer of kmin/kmax) on
// `threads` threads. query [rows, g, D]; kmin/kmax [rows / (B*Hkv) layers, B, Hkv, cap, D]; n_pages [B];
// only rows with only[row] != 0 (all when only is NULL) are written to out [rows, k]. Returns 0, or -1
// when out of memory.
EXPORT int kvtrt_select_pages(int64_t rows, int64_t batch, int64_t kv_heads, int64_t group, int64_t dim, int64_t cap,
                              const float *query, const uint16_t *kmin, const uint16_t *kmax, const int64_t *n_pages,
                              int64_t k, int softmax, float scale, const uint8_t *only, int64_t *out, int threads) {
  SelectJob jobs[MAX_THREADS];
  int n = parts(rows, threads);
  for (int i = 0; i < n; i++)
    jobs[i] = (SelectJob){rows * i / n, rows * (i + 1) / n, batch, kv_heads, group, dim, cap, k, query, kmin, kmax,
                          n_pages, softmax, 0, scale, only, out, 0};
  run_jobs(select_rows, (char *)jobs, sizeof(SelectJob), n);
  for (int i = 0; i < n; i++)
    if (jobs[i].status) return jobs[i].status;
  return 0;
}

// Bring `rows` rows' page slots to `selected` [rows, k] (row = ((layer0 + l) * B + b) * Hkv + h in the
// pool and view; slot_pages and selected count rows from layer0) on `threads` threads. Copies K and V of
// each missing page from the pool (pool_half: float16 pages; view_half: a float16 view, else float32; a
// float32 pool with a float16 view is not a layout kvtrt makes). counts[0..2] += selected, already held,
// copied. Returns 0, or -1 when out of memory (some rows then left as they were).
EXPORT int kvtrt_recall_pages(int64_t rows, int64_t layer0, int64_t layers, int64_t batch, int64_t kv_heads,
                               int64_t k, int64_t *slot_pages, const int64_t *selected, const void *pool,
                               int pool_half, int64_t cap, void *view, int view_half, int64_t width, int64_t sink,
                               int64_t page, int64_t dim, int64_t *counts, int threads) {
  RecallJob jobs[MAX_THREADS];
  int n = parts(rows, threads);
  for (int i = 0; i < n; i++)
    jobs[i] = (RecallJob){rows * i / n, rows * (i + 1) / n, layer0, layers, batch, kv_heads, k, cap, width, sink,
                          page, dim, slot_pages, selected, pool, view, pool_half, view_half, 0, {0, 0, 0}};
  run_jobs(recall_rows, (char *)jobs, sizeof(RecallJob), n);
  int status = 0;
  for (int i = 0; i < n; i++) {
    for (int c = 0; c < 3; c++) counts[c] += jobs[i].counts[c];
    status |= jobs[i].status;
  }
  return status;
}

// ---------------------------------------------------------------------------------------------------------
// Inline refresh: FreeKV's correction inside the decode step, each layer with its own query.
//
// kvtrt::DecodeAttention calls the hook installed by `kvtrt_set_refresh_hook` (decode_attention.c) before
// it attends. When the past-key buffer it was given is a layer of an armed view (`kvtrt_arm_view`), the
// hook does for that layer what `FreeKVRetrieval.refresh` does between decode groups: the KV heads whose
// query heads moved from the query their pages were chosen with (group-mean or least cosine below tau;
// every head with `every`) re-select their pages with this step's query, the missing pages are recalled
// into the view and the basis takes the new query. So one graph call per step chooses every layer's pages
// with the query that attends them (FreeKV's design) instead of the previous step's.
typedef struct {  // mirrored by `page_ops.InlineView` (ctypes): keep the order and the types
  void *view;              // all_kv [2, L, 1, Hkv, width, D] (float32, or float16: view_half)
  const void *pool;        // [L, 1, cap, Hkv, 2, page, D] (float32, or float16: pool_half)
  const uint16_t *kmin, *kmax;  // [L, 1, Hkv, cap, D] float16
  int64_t *slot_pages;     // [L, 1, Hkv, k]
  float *basis;            // [L, 1, H, D]: the query each head's pages were chosen with
  int64_t *counts;         // [6] += heads checked, heads corrected, pages selected, already held, copied, ns
  const uint16_t *smin, *smax;  // [L, 1, Hkv, scap, D] float16: the page summaries' min / max over spans of `span` pages
  int64_t layers, kv_heads, group, dim, width, sink, page, k, cap, n_pages, view_half, pool_half;
  int64_t every, drift_min, softmax;
  int64_t cover, span, scap;  // cover > 0: a head the cosine keeps is corrected when one of its query heads'
                              // `cover` best pages (among the `cover` best spans' pages) is not held
  float tau;
} InlineView;

#define MAX_ARMED 64
static InlineView *armed[MAX_ARMED];
static pthread_mutex_t armed_lock = PTHREAD_MUTEX_INITIALIZER;

// Make `v` visible to the decode attention op (its calls on v's buffers refresh first). 0, or -1 if full.
EXPORT int kvtrt_arm_view(InlineView *v) {
  int at = -1;
  pthread_mutex_lock(&armed_lock);
  for (int i = 0; i < MAX_ARMED && at < 0; i++)
    if (armed[i] == NULL || armed[i] == v) armed[i] = v, at = i;
  pthread_mutex_unlock(&armed_lock);
  return at < 0 ? -1 : 0;
}

EXPORT void kvtrt_disarm_view(InlineView *v) {
  pthread_mutex_lock(&armed_lock);
  for (int i = 0; i < MAX_ARMED; i++)
    if (armed[i] == v) armed[i] = NULL;
  pthread_mutex_unlock(&armed_lock);
}

typedef void (*ParallelRun)(void *runner, void (*fn)(void *, size_t), size_t n, void *data);

#define REFRESH_CHUNK 64  // pages per parallel item of a layer's bounds (a multiple of the 16-page block)

typedef struct {  // one layer's inline refresh: what its parallel items share
  SelectJob select;  // rows: the layer's KV heads (one sequence), fresh picks into select.out
  RecallJob recall[MAX_KV_INLINE];
  const uint8_t *drifted;
  float *scratch;  // per KV head, scratch_floats(&select) each
  int64_t heads[MAX_KV_INLINE], chunks, n;  // the drifted heads, bounds items per head, pages
} LayerRefresh;

// Item i: drifted head heads[i / chunks], pages [c * REFRESH_CHUNK, +REFRESH_CHUNK) with c = i % chunks. The
// pages of every head are split evenly over the threads (3 KV heads on 2 threads would leave one idle half
// the time if a head were an item).
static void bounds_item(void *data, size_t i) {
  LayerRefresh *r = data;
  const int64_t h = r->heads[(int64_t)i / r->chunks], p0 = (int64_t)i % r->chunks * REFRESH_CHUNK;
  const int64_t p1 = p0 + REFRESH_CHUNK < r->n ? p0 + REFRESH_CHUNK : r->n;
  row_bounds(&r->select, h, p0, p1, r->scratch + h * scratch_floats(&r->select));
}

// Item h: a drifted KV head picks its pages from its bounds; then every head's missing pages are recalled.
static void pick_recall_item(void *data, size_t h) {
  LayerRefresh *r = data;
  if (r->drifted[h])
    row_pick(&r->select, r->n, r->scratch + h * scratch_floats(&r->select), r->select.out + h * r->select.k);
  recall_rows(&r->recall[h]);
}

// The cover test of KV head h of a layer: whether each of its query heads' `cover` best pages is held, searched
// coarse to fine: the `cover` best spans by their summaries' bound, then the best pages among those spans'
// pages (ties to the lower id); with no more pages than slots, whether every page is held. q: the layer's queries [H, D]; held: the head's k page ids. It reads
// (n / span + cover * span) summaries per query head instead of a selection's n.
typedef struct {
  const InlineView *v;
  const float *q;
  int64_t layer, n;
  const int64_t *held;  // [Hkv, k]
  const uint8_t *drifted;
  uint8_t missed[MAX_KV_INLINE];
  int status;
} CoverTest;

// the `top` largest of s[0, n) (ties to the lower index) into out, best first (best: their scores); returns
// how many. One pass, each value against the smallest kept: O(n) when few enter.
static int64_t best_of(const float *s, int64_t n, int64_t top, int64_t *out, float *best) {
  int64_t kept = 0;
  for (int64_t p = 0; p < n; p++) {
    if (kept == top && !(s[p] > best[kept - 1])) continue;
    int64_t j = kept < top ? kept++ : top - 1;
    for (; j > 0 && s[p] > best[j - 1]; j--) best[j] = best[j - 1], out[j] = out[j - 1];
    best[j] = s[p], out[j] = p;
  }
  return kept;
}

static void cover_item(void *data, size_t item) {
  CoverTest *c = data;
  const InlineView *v = c->v;
  const int64_t h = (int64_t)item;
  if (c->drifted[h]) return;
  const int64_t g = v->group, D = v->dim, top = v->cover, span = v->span, n = c->n, k = v->k;
  const int64_t spans = (n + span - 1) / span, *held = c->held + h * k;
  if (n <= k) {  // every page fits: missed when one is not held (a page that has just left the window)
    int64_t count = 0;
    for (int64_t s = 0; s < k; s++) count += held[s] >= 0 && held[s] < n;
    c->missed[h] = count < n;
    return;
  }
  // the spans' and the pages' bounds for all g query heads, as a selection computes them (row_bounds)
  const SelectJob over_spans = {0, v->kv_heads, 1, v->kv_heads, g, D, v->scap, top, c->q,
                                v->smin + c->layer * v->kv_heads * v->scap * D,
                                v->smax + c->layer * v->kv_heads * v->scap * D, NULL, 0, 0, 0.0f, NULL, NULL, 0};
  const SelectJob over_pages = {0, v->kv_heads, 1, v->kv_heads, g, D, v->cap, top, c->q,
                                v->kmin + c->layer * v->kv_heads * v->cap * D,
                                v->kmax + c->layer * v->kv_heads * v->cap * D, NULL, 0, 0, 0.0f, NULL, NULL, 0};
  float *ss = malloc(sizeof(float) * (scratch_floats(&over_spans) + scratch_floats(&over_pages) + top * span + top));
  int64_t *ids = malloc(sizeof(int64_t) * (size_t)(g * top + top * span + top + g));
  uint8_t *wanted = calloc((size_t)spans, 1);
  if (ss == NULL || ids == NULL || wanted == NULL) {
    free(ss), free(ids), free(wanted);
    c->status = -1;
    return;
  }
  float *ps = ss + scratch_floats(&over_spans), *pb = ps + scratch_floats(&over_pages), *kept = pb + top * span;
  int64_t *pages = ids + g * top, *best = pages + top * span, *chosen = best + top;
  split_query(&over_spans, h, ss), split_query(&over_pages, h, ps);
  row_bounds(&over_spans, h, 0, spans, ss);  // ss[i * scap + j]: query head i's bound of span j
  for (int64_t i = 0; i < g; i++) {  // each query head's best spans, in id order
    int64_t *mine = ids + i * top;
    chosen[i] = best_of(ss + i * v->scap, spans, top, mine, kept);
    for (int64_t a = 1; a < chosen[i]; a++)
      for (int64_t b = a; b > 0 && mine[b - 1] > mine[b]; b--) {
        const int64_t t = mine[b];
        mine[b] = mine[b - 1], mine[b - 1] = t;
      }
    for (int64_t t = 0; t < chosen[i]; t++) wanted[mine[t]] = 1;
  }
  for (int64_t j = 0; j < spans; j++)  // the pages of every span some query head chose, bounded once
    if (wanted[j]) row_bounds(&over_pages, h, j * span, (j + 1) * span < n ? (j + 1) * span : n, ps);
  int missed = 0;
  for (int64_t i = 0; i < g && !missed; i++) {
    int64_t m = 0;
    for (int64_t t = 0; t < chosen[i]; t++)
      for (int64_t p = ids[i * top + t] * span; p < (ids[i * top + t] + 1) * span && p < n; p++)
        pages[m] = p, pb[m++] = ps[i * v->cap + p];
    const int64_t found = best_of(pb, m, top, best, kept);
    for (int64_t t = 0; t < found && !missed; t++) {
      int is_held = 0;
      for (int64_t s = 0; s < k && !is_held; s++) is_held = held[s] == pages[best[t]];
      missed = !is_held;
    }
  }
  c->missed[h] = (uint8_t)missed;
  free(ss), free(ids), free(wanted);
}

// The cover test alone, for every KV head of `layer` (q [H, D]; the view's held pages and n_pages): missed[h] = 1
// when one of a query head's `cover` best pages is not held. Returns 0, or -1 when out of memory.
EXPORT int kvtrt_cover_test(const InlineView *v, int64_t layer, const float *q, uint8_t *missed) {
  uint8_t none[MAX_KV_INLINE] = {0};
  const int64_t n = v->n_pages < v->cap ? v->n_pages : v->cap;
  if (v->kv_heads > MAX_KV_INLINE) return -1;
  CoverTest c = {.v = v, .q = q, .layer = layer, .n = n, .held = v->slot_pages + layer * v->kv_heads * v->k,
                 .drifted = none, .missed = {0}};
  for (int64_t h = 0; h < v->kv_heads; h++) cover_item(&c, (size_t)h), missed[h] = c.missed[h];
  return c.status;
}

static float norm_of(const float *x, int64_t d) {
  float s = 0.0f;
  for (int64_t i = 0; i < d; i++) s += x[i] * x[i];
  s = sqrtf(s);
  return s > 1e-8f ? s : 1e-8f;
}

// The decode attention op's hook: `past_key` [1, Hkv, C, D] is the buffer it attends, `qkv` [1, 1, (H+2Hkv)*D]
// its packed input (q rotated and pre-scaled). Returns 1 if it refreshed an armed view's layer, 0 if the
// buffer is no armed view's, -1 out of memory (the layer then attends the pages it holds).
EXPORT int kvtrt_refresh_layer(const void *past_key, const void *qkv, int half, int64_t batch, int64_t heads,
                               int64_t kv_heads, int64_t dim, ParallelRun run, void *runner) {
  InlineView *v = NULL;
  int64_t layer = -1;
  if (batch != 1) return 0;
  pthread_mutex_lock(&armed_lock);
  for (int i = 0; i < MAX_ARMED && v == NULL; i++) {
    InlineView *a = armed[i];
    if (a == NULL || a->kv_heads != kv_heads || a->dim != dim || a->kv_heads * a->group != heads) continue;
    const int64_t size = a->view_half ? 2 : 4, plane = kv_heads * a->width * dim * size;
    const char *base = a->view, *at = past_key;
    if (at >= base && at < base + a->layers * plane && (at - base) % plane == 0) v = a, layer = (at - base) / plane;
  }
  pthread_mutex_unlock(&armed_lock);
  if (v == NULL) return 0;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  const int64_t g = v->group, D = dim, H = heads, k = v->k;
  if (kv_heads > MAX_KV_INLINE) return 0;
  float *q = malloc(sizeof(float) * (size_t)(H * D));
  int64_t *fresh = malloc(sizeof(int64_t) * (size_t)(kv_heads * k));
  if (q == NULL || fresh == NULL) {
    free(q), free(fresh);
    return -1;
  }
  if (half) widen(q, qkv, H * D);
  else memcpy(q, qkv, sizeof(float) * H * D);
  float *basis = v->basis + layer * H * D;
  uint8_t drifted[MAX_KV_INLINE];
  int64_t corrected = 0;
  for (int64_t h = 0; h < kv_heads; h++) {
    float combined = v->drift_min ? INFINITY : 0.0f;
    for (int64_t i = 0; i < g && !v->every; i++) {
      const float *a = q + (h * g + i) * D, *b = basis + (h * g + i) * D;
      const float na = norm_of(a, D), nb = norm_of(b, D);
      float cos = 0.0f;
      for (int64_t d = 0; d < D; d++) cos += (a[d] / na) * (b[d] / nb);
      combined = v->drift_min ? (cos < combined ? cos : combined) : combined + cos;
    }
    if (!v->drift_min) combined /= (float)g;
    drifted[h] = v->every || combined < v->tau;
    corrected += drifted[h];
  }
  int64_t *held = v->slot_pages + layer * kv_heads * k, n_pages = v->n_pages < v->cap ? v->n_pages : v->cap;
  if (v->cover > 0 && !v->every && corrected < kv_heads) {
    CoverTest c = {.v = v, .q = q, .layer = layer, .n = n_pages, .held = held, .drifted = drifted, .missed = {0}};
    run(runner, cover_item, (size_t)kv_heads, &c);
    if (c.status) {
      free(q), free(fresh);
      return -1;
    }
    for (int64_t h = 0; h < kv_heads; h++) drifted[h] |= c.missed[h], corrected += c.missed[h];
  }
  if (corrected) {
    const int64_t summaries = layer * kv_heads * v->cap * D;
    LayerRefresh r = {.select = {0, kv_heads, 1, kv_heads, g, D, v->cap, k, q, v->kmin + summaries, v->kmax + summaries,
                                 &n_pages, (int)v->softmax, 0, 1.0f / sqrtf((float)D), NULL, fresh, 1},
                      .drifted = drifted, .chunks = (n_pages + REFRESH_CHUNK - 1) / REFRESH_CHUNK, .n = n_pages};
    r.scratch = malloc(sizeof(float) * scratch_floats(&r.select) * (size_t)kv_heads);
    if (r.scratch == NULL) {
      free(q), free(fresh);
      return -1;
    }
    int64_t n_drifted = 0;
    for (int64_t h = 0; h < kv_heads; h++) {
      memcpy(fresh + h * k, held + h * k, sizeof(int64_t) * k);  // kept heads ask for what they hold
      if (drifted[h]) r.heads[n_drifted++] = h, split_query(&r.select, h, r.scratch + h * scratch_floats(&r.select));
      r.recall[h] = (RecallJob){h, h + 1, layer, v->layers, 1, kv_heads, k, v->cap, v->width, v->sink, v->page, D,
                                held, fresh, v->pool, v->view, (int)v->pool_half, (int)v->view_half, 0, {0, 0, 0}};
    }
    run(runner, bounds_item, (size_t)(n_drifted * r.chunks), &r);
    run(runner, pick_recall_item, (size_t)kv_heads, &r);
    int status = 0;
    for (int64_t h = 0; h < kv_heads; h++) {
      for (int c = 0; c < 3; c++) v->counts[2 + c] += r.recall[h].counts[c];
      status |= r.recall[h].status;
      if (drifted[h]) memcpy(basis + h * g * D, q + h * g * D, sizeof(float) * g * D);
    }
    free(r.scratch);
    if (status) {
      free(q), free(fresh);
      return -1;
    }
  }
  v->counts[0] += kv_heads, v->counts[1] += corrected;
  free(q), free(fresh);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  v->counts[5] += (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
  return 1;
}

EXPORT int kvtrt_page_ops_version(void) { return 2; }
