// kvtrt::DecodeAttention, an ONNX Runtime custom op for the CPU: one decode step's attention over an
// in-place KV buffer, replacing com.microsoft::GroupQueryAttention in the `decode_shared` graph.
//
// Two ops: DecodeAttention (float tensors) and DecodeAttention16 (float16 qkv, K/V, bias and attn: the
// graphs of an fp16-KV export; scores, softmax and sums in fp32, as GroupQueryAttention does).
// Inputs   qkv [B,1,(H+2*Hkv)*D] (q and k rotated, q pre-scaled unless `scale` says otherwise),
//          past_key, past_value [B,Hkv,C,D] (bound to the same buffers as the outputs: in place),
//          seqlens [B] int32 (row b's new token goes to slot seqlens[b]; it attends [0, seqlens[b]]),
//          bias [B|1,1,1,T] (added to the scores of slots [0, T); T > every seqlens[b]).
// Outputs  attn [B,1,H*D], present_key, present_value [B,Hkv,C,D] (the inputs with the new slot written).
// Attributes num_heads H, kv_num_heads Hkv, scale (0: 1/sqrt(D)).
//
// Why: GroupQueryAttention reads each KV head's cache once per query head of its group; here the g query
// heads of a KV head share one pass over its keys and one over its values (decode is bound by reading
// the cache). Work items are (row, KV head, chunk of up to CHUNK slots), run on ONNX Runtime's intra-op threads
// (KernelContext_ParallelFor) and merged per row in a fixed order: a row's result depends only on its own
// inputs, never on the other rows of the batch or on the thread count. Vector paths for head size 64:
// AVX-512, else AVX2 (with FMA and F16C); any other shape or CPU takes the portable C loops.
//
// The OrtApi table is used by index (the table only ever grows; indices from onnxruntime_c_api.h), so
// no ONNX Runtime header is needed to build this file: `gcc -O3 -march=native -shared -fPIC`.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>

// Cephes' expf: exp(x) = 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts), p of degree 7.
#define EXP_LOW -87.0f  // below: 0 (masked slots' -inf among them); above it 2^n stays a normal float
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// Request the `bytes` from `p` into L1, one prefetch per cache line, AHEAD keys (values) before they are
// read: the hardware prefetcher alone left the fp16 cache's batch-8 call at ~two thirds of the host's
// read bandwidth (`docs/results/decode_attention.md`).
#define AHEAD 16
static inline __attribute__((always_inline)) void prefetch(const char *p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
}
#endif

#ifndef CHUNK  // (the tests build it smaller, -DCHUNK=64, to merge chunks on short rows)
#define CHUNK 2048  // most slots per work item: fewer, longer items ran faster (docs/results/decode_attention.md)
#endif
#define MAX_GROUP 16 // query heads per KV head
#define MAX_HEAD 256 // values per head

typedef void OrtStatus;
typedef void OrtValue;
typedef void OrtKernelContext;
typedef void OrtKernelInfo;
typedef void OrtSessionOptions;
typedef void OrtCustomOpDomain;
typedef void OrtTensorTypeAndShapeInfo;

typedef struct {
  const void *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum {  // OrtApi entries used here
  API_CREATE_STATUS = 0,
  API_CREATE_CUSTOM_OP_DOMAIN = 26,
  API_CUSTOM_OP_DOMAIN_ADD = 27,
  API_ADD_CUSTOM_OP_DOMAIN = 28,
  API_GET_TENSOR_MUTABLE_DATA = 51,
  API_GET_DIMENSIONS_COUNT = 61,
  API_GET_DIMENSIONS = 62,
  API_GET_TENSOR_TYPE_AND_SHAPE = 65,
  API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
  API_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
  API_KERNEL_CONTEXT_GET_INPUT = 90,
  API_KERNEL_CONTEXT_GET_OUTPUT = 91,
  API_RELEASE_STATUS = 93,
  API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  API_KERNEL_CONTEXT_PARALLEL_FOR = 274,
  API_VERSION = 17,  // the first to serve KernelContext_ParallelFor (ONNX Runtime 1.17)
};

static const void *const *api;
#define CALL(index, type) ((type)api[index])

typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef OrtStatus *(*CreateDomainFn)(const char *, OrtCustomOpDomain **);
typedef OrtStatus *(*DomainAddFn)(OrtCustomOpDomain *, const void *);
typedef OrtStatus *(*AddDomainFn)(OrtSessionOptions *, OrtCustomOpDomain *);
typedef OrtStatus *(*MutableDataFn)(OrtValue *, void **);
typedef OrtStatus *(*DimsCountFn)(const OrtTensorTypeAndShapeInfo *, size_t *);
typedef OrtStatus *(*DimsFn)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t);
typedef OrtStatus *(*TypeAndShapeFn)(const OrtValue *, OrtTensorTypeAndShapeInfo **);
typedef OrtStatus *(*AttrFloatFn)(const OrtKernelInfo *, const char *, float *);
typedef OrtStatus *(*AttrIntFn)(const OrtKernelInfo *, const char *, int64_t *);
typedef OrtStatus *(*GetInputFn)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*GetOutputFn)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef void (*ReleaseStatusFn)(OrtStatus *);
typedef void (*ReleaseInfoFn)(OrtTensorTypeAndShapeInfo *);
typedef OrtStatus *(*ParallelForFn)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);

// The custom op as ONNX Runtime reads it (struct OrtCustomOp, version 9 layout).
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *, const void *, const OrtKernelInfo *);
  const char *(*GetName)(const struct OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
  int (*GetInputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
  int (*GetOutputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
  void (*KernelCompute)(void *, OrtKernelContext *);
  void (*KernelDestroy)(void *);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
} OrtCustomOp;

enum { FLOAT = 1, INT32 = 6, FLOAT16 = 10 };  // ONNXTensorElementDataType

typedef struct {
  int64_t heads, kv_heads;
  float scale;
  int half;  // float16 tensors (DecodeAttention16)
} Kernel;

// One call's shapes and pointers, shared by its work items. qkv, bias, keys, values and attn hold
// float or, with `half`, float16 (uint16_t) elements.
typedef struct {
  const void *qkv, *bias;
  void *keys, *values, *attn;
  float *partial;  // per item g * (D + 2) floats (max, sum, accumulator)
  const int32_t *seqlens;
  const int64_t *item_start;  // [B + 1] first work item of each row
  int64_t B, H, Hkv, g, C, D, T, bias_row;
  float scale;
  int half;
} Call;

static int ok(OrtStatus *status) {
  if (status == NULL) return 1;
  CALL(API_RELEASE_STATUS, ReleaseStatusFn)(status);
  return 0;
}

static int shape(const OrtValue *value, int64_t *dims, size_t want) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  size_t n = 0;
  if (!ok(CALL(API_GET_TENSOR_TYPE_AND_SHAPE, TypeAndShapeFn)(value, &info))) return 0;
  int good = ok(CALL(API_GET_DIMENSIONS_COUNT, DimsCountFn)(info, &n)) && n == want &&
             ok(CALL(API_GET_DIMENSIONS, DimsFn)(info, dims, n));
  CALL(API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseInfoFn)(info);
  return good;
}

// IEEE half <-> float, portable (the AVX-512 path converts 16 at a time with vcvtph2ps).
static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: a normal float
    float f = (float)mantissa * (1.0f / 16777216.0f);  // mantissa * 2^-24
    memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static uint16_t float_to_half(float f) {  // round to nearest even; overflow to inf
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return sign | (abs > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (abs >= 0x477FF000u) return sign | 0x7C00;  // rounds past 65504
  if (abs < 0x38800000u) {                       // below 2^-14: subnormal half (or zero)
    float scaled;
    memcpy(&scaled, &abs, 4);
    return sign | (uint16_t)lrintf(scaled * 16777216.0f);  // units of 2^-24
  }
  const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
  return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}

static inline float element(const void *p, int64_t i, int half) {
  return half ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#ifdef __AVX512F__
// 16 elements from float or float16 storage, as floats.
static inline __attribute__((always_inline)) __m512 load16(const void *p, int64_t i, const int half) {
  return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
              : _mm512_loadu_ps((const float *)p + i);
}

// Sixteen vectors -> one: lane i holds the sum of v[i]'s lanes (a transposing tree of 15 adds).
static inline __attribute__((always_inline)) __m512 sum16(__m512 *v) {
  __m512 w[8], z[4], u[2];
  for (int i = 0; i < 8; i++)  // quarters: v[2i] folded to 8 lanes, then v[2i+1]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)  // quarter q: key 4i+q folded to 4 lanes
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88), _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)  // quarter q: keys 8i+q and 8i+4+q, 2 lanes each
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * i], z[2 * i + 1], 0x44), _mm512_shuffle_ps(z[2 * i], z[2 * i + 1], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
  // lane 4q + k holds key q + 4k: back to key order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// D = 64 with AVX-512; inlined per group size and storage type so the g queries stay in registers.
// Sixteen keys at a time per head (the block stays in L1 across the g heads), summed by `sum16`; an
// fp16 block is converted once into floats for all g heads.
static inline __attribute__((always_inline)) void scores64(const float *q, const void *keys, const float *bias,
                                                           int64_t n, float *s, float scale, const int g,
                                                           const int half) {
  __m512 qv[MAX_GROUP][4];
  float converted[16 * 64] __attribute__((aligned(64)));
  for (int j = 0; j < g; j++)
    for (int k = 0; k < 4; k++) qv[j][k] = _mm512_mul_ps(_mm512_loadu_ps(q + j * 64 + 16 * k), _mm512_set1_ps(scale));
  const int64_t size = half ? 2 : 4;
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    prefetch((const char *)keys + (t + AHEAD) * 64 * size, 16 * 64 * size);
    const float *block = (const float *)keys + t * 64;
    if (half) {
      for (int i = 0; i < 64; i++) _mm512_store_ps(converted + 16 * i, load16(keys, t * 64 + 16 * i, 1));
      block = converted;
    }
    const __m512 b = _mm512_loadu_ps(bias + t);
    for (int j = 0; j < g; j++) {
      __m512 a[16];
      for (int i = 0; i < 16; i++) {
        const float *k = block + i * 64;
        a[i] = _mm512_fmadd_ps(qv[j][3], _mm512_loadu_ps(k + 48), _mm512_fmadd_ps(qv[j][2], _mm512_loadu_ps(k + 32),
               _mm512_fmadd_ps(qv[j][1], _mm512_loadu_ps(k + 16), _mm512_mul_ps(qv[j][0], _mm512_loadu_ps(k)))));
      }
      _mm512_storeu_ps(s + j * CHUNK + t, _mm512_add_ps(sum16(a), b));
    }
  }
  for (; t < n; t++) {
    __m512 k0 = load16(keys, t * 64, half), k1 = load16(keys, t * 64 + 16, half), k2 = load16(keys, t * 64 + 32, half),
           k3 = load16(keys, t * 64 + 48, half);
    for (int j = 0; j < g; j++) {
      __m512 a = _mm512_fmadd_ps(qv[j][3], k3, _mm512_fmadd_ps(qv[j][2], k2,
                 _mm512_fmadd_ps(qv[j][1], k1, _mm512_mul_ps(qv[j][0], k0))));
      s[j * CHUNK + t] = _mm512_reduce_add_ps(a) + bias[t];
    }
  }
}

static inline __attribute__((always_inline)) void weighted_sum64(const float *p, const void *values, int64_t n,
                                                                 float *acc, const int g, const int half) {
  __m512 o[MAX_GROUP][4];
  for (int j = 0; j < g; j++)
    for (int k = 0; k < 4; k++) o[j][k] = _mm512_setzero_ps();
  const int64_t size = half ? 2 : 4;
  for (int64_t t = 0; t < n; t++) {
    prefetch((const char *)values + (t + AHEAD) * 64 * size, 64 * size);
    __m512 v0 = load16(values, t * 64, half), v1 = load16(values, t * 64 + 16, half),
           v2 = load16(values, t * 64 + 32, half), v3 = load16(values, t * 64 + 48, half);
    for (int j = 0; j < g; j++) {
      __m512 pj = _mm512_set1_ps(p[j * CHUNK + t]);
      o[j][0] = _mm512_fmadd_ps(pj, v0, o[j][0]);
      o[j][1] = _mm512_fmadd_ps(pj, v1, o[j][1]);
      o[j][2] = _mm512_fmadd_ps(pj, v2, o[j][2]);
      o[j][3] = _mm512_fmadd_ps(pj, v3, o[j][3]);
    }
  }
  for (int j = 0; j < g; j++)
    for (int k = 0; k < 4; k++) _mm512_storeu_ps(acc + j * 64 + 16 * k, o[j][k]);
}

// exp(x) for x <= 0 (scores minus their max) by the polynomial above; relative error about 1e-7, as expf's.
static inline __m512 exp_nonpositive(__m512 x) {
  const __m512 low = _mm512_set1_ps(EXP_LOW);
  const __mmask16 live = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);
  x = _mm512_max_ps(x, low);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x));
  __m512 p = _mm512_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// s[0, count) -> exp(s - max), returning the max (-inf if every slot is masked) and the sum.
static void softmax_part(float *s, int64_t count, float *max_out, float *sum_out) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < count; t += 16) {
    const __mmask16 in = count - t >= 16 ? 0xFFFF : (__mmask16)((1u << (count - t)) - 1);
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, s + t));
  }
  const float mx = _mm512_reduce_max_ps(m);
  *max_out = mx;
  if (mx == -INFINITY) {
    memset(s, 0, sizeof(float) * count);
    *sum_out = 0.0f;
    return;
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < count; t += 16) {
    const __mmask16 in = count - t >= 16 ? 0xFFFF : (__mmask16)((1u << (count - t)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, s + t), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(s + t, in, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(in, e));
  }
  *sum_out = _mm512_reduce_add_ps(sum);
}

#define FOR_GROUP(call)                                               \
  switch (g * 2 + c->half) {                                          \
    case 2: call(1, 0); return;                                       \
    case 3: call(1, 1); return;                                       \
    case 6: call(3, 0); return;                                       \
    case 7: call(3, 1); return;                                       \
    case 8: call(4, 0); return;                                       \
    case 9: call(4, 1); return;                                       \
    default: if (c->half) call((int)g, 1); else call((int)g, 0); return; \
  }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The same with AVX2 (8 lanes, 16 registers): queries and partial sums stay in L1 instead of registers.
#define VECTOR_AVX2 1

static inline __attribute__((always_inline)) __m256 load8(const void *p, int64_t i, const int half) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
              : _mm256_loadu_ps((const float *)p + i);
}

// Eight vectors -> one: lane i holds the sum of v[i]'s lanes.
static inline __m256 sum8(const __m256 *v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]), t2 = _mm256_hadd_ps(v[4], v[5]),
               t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: keys 0-3 | 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline __attribute__((always_inline)) void scores64(const float *q, const void *keys, const float *bias,
                                                           int64_t n, float *s, float scale, int g, const int half) {
  float qs[MAX_GROUP * 64];
  for (int e = 0; e < g * 64; e++) qs[e] = q[e] * scale;
  int64_t t = 0;
  float converted[8 * 64] __attribute__((aligned(32)));
  const int64_t size = half ? 2 : 4;
  for (; t + 8 <= n; t += 8) {
    prefetch((const char *)keys + (t + AHEAD) * 64 * size, 8 * 64 * size);
    const float *block = (const float *)keys + t * 64;
    if (half) {
      for (int i = 0; i < 64; i++) _mm256_store_ps(converted + 8 * i, load8(keys, t * 64 + 8 * i, 1));
      block = converted;
    }
    const __m256 b = _mm256_loadu_ps(bias + t);
    for (int j = 0; j < g; j++) {
      __m256 a[8];
      for (int i = 0; i < 8; i++) {
        a[i] = _mm256_mul_ps(_mm256_loadu_ps(qs + j * 64), _mm256_loadu_ps(block + i * 64));
        for (int c = 1; c < 8; c++)
          a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + j * 64 + 8 * c), _mm256_loadu_ps(block + i * 64 + 8 * c), a[i]);
      }
      _mm256_storeu_ps(s + j * CHUNK + t, _mm256_add_ps(sum8(a), b));
    }
  }
  for (; t < n; t++)
    for (int j = 0; j < g; j++) {
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qs + j * 64), load8(keys, t * 64, half));
      for (int c = 1; c < 8; c++) a = _mm256_fmadd_ps(_mm256_loadu_ps(qs + j * 64 + 8 * c), load8(keys, t * 64 + 8 * c, half), a);
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      s[j * CHUNK + t] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1))) + bias[t];
    }
}

// acc[j] = sum_t p[j * CHUNK + t] * values[t], sixteen values at a time per head (they stay in L1).
static inline __attribute__((always_inline)) void weighted_sum64(const float *p, const void *values, int64_t n,
                                                                 float *acc, int g, const int half) {
  memset(acc, 0, sizeof(float) * g * 64);
  const int64_t size = half ? 2 : 4;
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t stop = n - t < 16 ? n - t : 16;
    prefetch((const char *)values + (t + AHEAD) * 64 * size, 16 * 64 * size);
    for (int j = 0; j < g; j++) {
      __m256 o[8];
      for (int c = 0; c < 8; c++) o[c] = _mm256_loadu_ps(acc + j * 64 + 8 * c);
      for (int64_t i = 0; i < stop; i++) {
        const __m256 pj = _mm256_set1_ps(p[j * CHUNK + t + i]);
        for (int c = 0; c < 8; c++) o[c] = _mm256_fmadd_ps(pj, load8(values, (t + i) * 64 + 8 * c, half), o[c]);
      }
      for (int c = 0; c < 8; c++) _mm256_storeu_ps(acc + j * 64 + 8 * c, o[c]);
    }
  }
}

// exp(x) for x <= 0, as the AVX-512 path computes it.
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(EXP_LOW), live = _mm256_cmp_ps(x, low, _CMP_GE_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x));
  __m256 p = _mm256_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                             _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(_mm256_mul_ps(p, two_n), live);
}

static void softmax_part(float *s, int64_t count, float *max_out, float *sum_out) {
  float tail[8];
  __m256 m = _mm256_set1_ps(-INFINITY);
  for (int64_t t = 0; t < count; t += 8) {
    const int64_t k = count - t < 8 ? count - t : 8;
    for (int i = 0; i < 8; i++) tail[i] = i < k ? s[t + i] : -INFINITY;
    m = _mm256_max_ps(m, _mm256_loadu_ps(tail));
  }
  _mm256_storeu_ps(tail, m);
  float mx = tail[0];
  for (int i = 1; i < 8; i++) mx = tail[i] > mx ? tail[i] : mx;
  *max_out = mx;
  if (mx == -INFINITY) {
    memset(s, 0, sizeof(float) * count);
    *sum_out = 0.0f;
    return;
  }
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t = 0; t < count; t += 8) {
    const int64_t k = count - t < 8 ? count - t : 8;
    for (int i = 0; i < 8; i++) tail[i] = i < k ? s[t + i] : -INFINITY;  // -inf: exp gives 0
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(tail, e);
    for (int i = 0; i < k; i++) s[t + i] = tail[i];
    sum = _mm256_add_ps(sum, e);
  }
  _mm256_storeu_ps(tail, sum);
  float total = 0.0f;
  for (int i = 0; i < 8; i++) total += tail[i];
  *sum_out = total;
}
#else
static void softmax_part(float *s, int64_t count, float *max_out, float *sum_out) {
  float m = -INFINITY, sum = 0.0f;
  for (int64_t t = 0; t < count; t++) m = s[t] > m ? s[t] : m;
  for (int64_t t = 0; t < count; t++) {
    s[t] = m == -INFINITY ? 0.0f : expf(s[t] - m);  // every slot of the part masked: no weight
    sum += s[t];
  }
  *max_out = m;
  *sum_out = sum;
}
#endif

// Scores of the g query heads (q: g*D floats) against keys [n, D] plus bias [n], into s[j * CHUNK + t].
static void scores(const Call *c, const float *q, const void *keys, const float *bias, int64_t n, float *s) {
  const int64_t D = c->D, g = c->g;
#ifdef __AVX512F__
  if (D == 64) {
#define SCORES(G, HALF) scores64(q, keys, bias, n, s, c->scale, G, HALF)
    FOR_GROUP(SCORES)
  }
#elif defined(VECTOR_AVX2)
  if (D == 64) {
    if (c->half)
      scores64(q, keys, bias, n, s, c->scale, (int)g, 1);
    else
      scores64(q, keys, bias, n, s, c->scale, (int)g, 0);
    return;
  }
#endif
  for (int64_t t = 0; t < n; t++)
    for (int64_t j = 0; j < g; j++) {
      float a = 0.0f;
      for (int64_t d = 0; d < D; d++) a += q[j * D + d] * element(keys, t * D + d, c->half);
      s[j * CHUNK + t] = a * c->scale + bias[t];
    }
}

// acc[j] = sum_t p[j * CHUNK + t] * values[t] for the g heads (acc: g*D floats).
static void weighted_sum(const Call *c, const float *p, const void *values, int64_t n, float *acc) {
  const int64_t D = c->D, g = c->g;
#ifdef __AVX512F__
  if (D == 64) {
#define WEIGHTED(G, HALF) weighted_sum64(p, values, n, acc, G, HALF)
    FOR_GROUP(WEIGHTED)
  }
#elif defined(VECTOR_AVX2)
  if (D == 64) {
    if (c->half)
      weighted_sum64(p, values, n, acc, (int)g, 1);
    else
      weighted_sum64(p, values, n, acc, (int)g, 0);
    return;
  }
#endif
  memset(acc, 0, sizeof(float) * g * D);
  for (int64_t t = 0; t < n; t++)
    for (int64_t j = 0; j < g; j++) {
      const float pj = p[j * CHUNK + t];
      for (int64_t d = 0; d < D; d++) acc[j * D + d] += pj * element(values, t * D + d, c->half);
    }
}

// dst[0, n) = the float or float16 elements [first, first + n) of src, as floats (halves converted in
// vectors where the CPU can: a chunk's 256 bias values one at a time were a visible part of an fp16 call).
static void to_floats(const void *src, int64_t first, int64_t n, int half, float *dst) {
  int64_t i = 0;
  if (half) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + first + i))));
#elif defined(VECTOR_AVX2)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + first + i))));
#endif
    for (; i < n; i++) dst[i] = half_to_float(((const uint16_t *)src)[first + i]);
  } else {
    memcpy(dst, (const float *)src + first, sizeof(float) * n);
  }
}

// Work items per KV head of a row of n slots: ceil(n / CHUNK), and two from CHUNK / 2 slots on (one item per
// head would leave one of two threads idle for a third of a 3-head call: FreeKV's ~1030-slot views).
static int64_t items_of(int64_t n) {
  const int64_t items = (n + CHUNK - 1) / CHUNK;
  return items == 1 && 2 * n > CHUNK ? 2 : items;
}

// Slots per work item of a row of n slots: n split evenly over its items (a multiple of 16, at most CHUNK).
static int64_t even_span(int64_t n) {
  const int64_t items = items_of(n), span = ((n + items - 1) / items + 15) / 16 * 16;
  return span < CHUNK ? span : CHUNK;
}

// Work item i: one chunk (`even_span` slots, the last one fewer) of one (row, KV head); writes its (max, sum,
// unnormalised output) per head.
static void chunk(void *data, size_t i) {
  const Call *c = (const Call *)data;
  int64_t b = 0;
  while (c->item_start[b + 1] <= (int64_t)i) b++;
  const int64_t n = (int64_t)c->seqlens[b] + 1, per_head = items_of(n), span = even_span(n);
  const int64_t local = (int64_t)i - c->item_start[b], h = local / per_head, first = (local % per_head) * span;
  const int64_t count = n - first < span ? (n > first ? n - first : 0) : span;
  const int64_t D = c->D, g = c->g, size = c->half ? 2 : 4;
  const char *keys = (const char *)c->keys + ((b * c->Hkv + h) * c->C + first) * D * size;
  const char *values = (const char *)c->values + ((b * c->Hkv + h) * c->C + first) * D * size;
  float q[MAX_GROUP * MAX_HEAD], acc[MAX_GROUP * MAX_HEAD];
  float *bias = malloc(sizeof(float) * (g + 1) * CHUNK), *s = bias + CHUNK;  // [CHUNK] bias, [g][CHUNK] scores
  if (bias == NULL) {  // out of memory: the item's maxima are NaN, so are its row's outputs
    for (int64_t j = 0; j < g; j++) c->partial[((int64_t)i * g + j) * (D + 2)] = NAN;
    return;
  }
  const int64_t q_first = b * (c->H + 2 * c->Hkv) * D + h * g * D;
  to_floats(c->qkv, q_first, g * D, c->half, q);
  to_floats(c->bias, b * c->bias_row + first, count, c->half, bias);
  scores(c, q, keys, bias, count, s);
  float *out = c->partial + (int64_t)i * g * (D + 2);  // [g][max, sum, D accumulators]
  for (int64_t j = 0; j < g; j++) softmax_part(s + j * CHUNK, count, &out[j * (D + 2)], &out[j * (D + 2) + 1]);
  weighted_sum(c, s, values, count, acc);
  for (int64_t j = 0; j < g; j++) memcpy(out + j * (D + 2) + 2, acc + j * D, sizeof(float) * D);
  free(bias);
}

static void fail(Call *c, const char *why) {  // KernelCompute cannot return an error: say it, poison the output
  fprintf(stderr, "kvtrt::DecodeAttention: %s\n", why);
  if (c != NULL && c->attn != NULL)
    for (int64_t i = 0; i < c->B * c->H * c->D; i++) {
      if (c->half)
        ((uint16_t *)c->attn)[i] = 0x7E00;
      else
        ((float *)c->attn)[i] = NAN;
    }
}

static void *data_of(const OrtValue *value) {
  void *p = NULL;
  return ok(CALL(API_GET_TENSOR_MUTABLE_DATA, MutableDataFn)((OrtValue *)value, &p)) ? p : NULL;
}

// The inline refresh (FreeKV's correction with each layer's own query, `page_ops.c`): installed from Python
// (`kvtrt_set_refresh_hook`) with the address of `kvtrt_refresh_layer`, called before each attention with
// the past-key buffer and the packed qkv; it returns at once unless that buffer is an armed retrieval view's.
typedef void (*ParallelRun)(void *runner, void (*fn)(void *, size_t), size_t n, void *data);
typedef int (*RefreshHook)(const void *past_key, const void *qkv, int half, int64_t batch, int64_t heads,
                           int64_t kv_heads, int64_t dim, ParallelRun run, void *runner);
static RefreshHook refresh_hook;

__attribute__((visibility("default"))) void kvtrt_set_refresh_hook(RefreshHook hook) { refresh_hook = hook; }

static void run_parallel(void *context, void (*fn)(void *, size_t), size_t n, void *data) {
  if (n > 1 && ok(CALL(API_KERNEL_CONTEXT_PARALLEL_FOR, ParallelForFn)(context, fn, n, 0, data))) return;
  for (size_t i = 0; i < n; i++) fn(data, i);
}

static void compute(void *kernel, OrtKernelContext *context) {
  const Kernel *k = (const Kernel *)kernel;
  const OrtValue *in[5];
  for (size_t i = 0; i < 5; i++)
    if (!ok(CALL(API_KERNEL_CONTEXT_GET_INPUT, GetInputFn)(context, i, &in[i]))) return fail(NULL, "cannot read an input");
  int64_t qkv_dims[3], past_dims[4], len_dims[1], bias_dims[4];
  if (!shape(in[0], qkv_dims, 3) || !shape(in[1], past_dims, 4) || !shape(in[3], len_dims, 1) || !shape(in[4], bias_dims, 4))
    return fail(NULL, "an input has an unexpected rank");
  Call c = {0};
  c.half = k->half;
  c.B = qkv_dims[0], c.H = k->heads, c.Hkv = k->kv_heads, c.C = past_dims[2], c.D = past_dims[3], c.T = bias_dims[3];
  c.g = c.H / c.Hkv;
  c.scale = k->scale != 0.0f ? k->scale : 1.0f / sqrtf((float)c.D);
  c.bias_row = bias_dims[0] == 1 ? 0 : c.T;
  int64_t attn_dims[3] = {c.B, 1, c.H * c.D};
  OrtValue *out[3];
  if (!ok(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(context, 0, attn_dims, 3, &out[0])) ||
      !ok(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(context, 1, past_dims, 4, &out[1])) ||
      !ok(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(context, 2, past_dims, 4, &out[2])))
    return fail(NULL, "cannot allocate an output");
  c.attn = data_of(out[0]);
  if (qkv_dims[1] != 1 || qkv_dims[2] != (c.H + 2 * c.Hkv) * c.D || past_dims[0] != c.B || past_dims[1] != c.Hkv ||
      len_dims[0] != c.B || (bias_dims[0] != 1 && bias_dims[0] != c.B) || bias_dims[1] != 1 || bias_dims[2] != 1 ||
      c.g * c.Hkv != c.H || c.g > MAX_GROUP || c.D > MAX_HEAD)
    return fail(&c, "inputs of unexpected shapes (one new token per row, qkv packed, bias [B|1,1,1,T], "
                    "at most 16 query heads per KV head of at most 256 values)");
  c.qkv = data_of(in[0]), c.seqlens = data_of(in[3]), c.bias = data_of(in[4]);
  c.keys = data_of(out[1]), c.values = data_of(out[2]);
  if (refresh_hook != NULL)  // an armed retrieval view: this layer's pages re-selected with its own query first
    refresh_hook(data_of(in[1]), c.qkv, c.half, c.B, c.H, c.Hkv, c.D, run_parallel, context);
  const int64_t size = c.half ? 2 : 4, row = c.D * size;
  const size_t cache = (size_t)(c.B * c.Hkv * c.C) * row;
  for (int which = 0; which < 2; which++) {  // not bound in place (e.g. a checker's run): the outputs start as the past
    const void *past = data_of(in[1 + which]);
    void *present = which ? c.values : c.keys;
    if (past != present) memcpy(present, past, cache);
  }
  int64_t *item_start = malloc(sizeof(int64_t) * (c.B + 1));
  if (item_start == NULL) return fail(&c, "out of memory");
  item_start[0] = 0;
  for (int64_t b = 0; b < c.B; b++) {
    const int64_t slot = c.seqlens[b];
    if (slot < 0 || slot >= c.C || slot >= c.T) {
      free(item_start);
      return fail(&c, "a row's new slot lies outside the cache or the bias");
    }
    for (int64_t h = 0; h < c.Hkv; h++) {  // the new token's K and V into the row's slot
      const char *kv = (const char *)c.qkv + (b * (c.H + 2 * c.Hkv) + c.H + h) * row;
      memcpy((char *)c.keys + ((b * c.Hkv + h) * c.C + slot) * row, kv, row);
      memcpy((char *)c.values + ((b * c.Hkv + h) * c.C + slot) * row, kv + c.Hkv * row, row);
    }
    item_start[b + 1] = item_start[b] + c.Hkv * items_of(slot + 1);
  }
  c.item_start = item_start;
  const int64_t items = item_start[c.B];
  c.partial = malloc(sizeof(float) * items * c.g * (c.D + 2));
  if (c.partial == NULL) {
    free(item_start);
    return fail(&c, "out of memory");
  }
  if (!ok(CALL(API_KERNEL_CONTEXT_PARALLEL_FOR, ParallelForFn)(context, chunk, (size_t)items, 0, &c)))
    for (int64_t i = 0; i < items; i++) chunk(&c, (size_t)i);
  float o[MAX_HEAD];
  for (int64_t b = 0; b < c.B; b++) {  // merge each (row, head)'s chunks, in chunk order
    const int64_t per_head = (item_start[b + 1] - item_start[b]) / c.Hkv, stride = c.g * (c.D + 2);
    for (int64_t h = 0; h < c.Hkv; h++)
      for (int64_t j = 0; j < c.g; j++) {
        const float *first = c.partial + (item_start[b] + h * per_head) * stride + j * (c.D + 2);
        float m = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < per_head; i++) m = first[i * stride] > m ? first[i * stride] : m;
        memset(o, 0, sizeof(float) * c.D);
        for (int64_t i = 0; i < per_head; i++) {
          const float *part = first + i * stride;
          if (part[0] == -INFINITY) continue;
          const float w = expf(part[0] - m);
          sum += w * part[1];
          for (int64_t d = 0; d < c.D; d++) o[d] += w * part[2 + d];
        }
        const float inv = 1.0f / sum;
        const int64_t at = b * c.H * c.D + (h * c.g + j) * c.D;
        for (int64_t d = 0; d < c.D; d++) {
          if (c.half)
            ((uint16_t *)c.attn)[at + d] = float_to_half(o[d] * inv);
          else
            ((float *)c.attn)[at + d] = o[d] * inv;
        }
      }
  }
  free(c.partial);
  free(item_start);
}

static const OrtCustomOp decode_attention, decode_attention16;

static void *create(const OrtCustomOp *op, const void *unused, const OrtKernelInfo *info) {
  (void)unused;
  Kernel *k = calloc(1, sizeof(Kernel));
  k->half = op == &decode_attention16;
  if (!ok(CALL(API_KERNEL_INFO_GET_ATTRIBUTE_INT64, AttrIntFn)(info, "num_heads", &k->heads)) ||
      !ok(CALL(API_KERNEL_INFO_GET_ATTRIBUTE_INT64, AttrIntFn)(info, "kv_num_heads", &k->kv_heads)) ||
      k->kv_heads <= 0)
    k->heads = k->kv_heads = 1;  // compute() reports the shape mismatch
  if (!ok(CALL(API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT, AttrFloatFn)(info, "scale", &k->scale))) k->scale = 0.0f;
  return k;
}

static void destroy(void *kernel) { free(kernel); }
static const char *name(const OrtCustomOp *op) { return op == &decode_attention16 ? "DecodeAttention16" : "DecodeAttention"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return NULL; }  // CPU
static int element_type(const OrtCustomOp *op) { return op == &decode_attention16 ? FLOAT16 : FLOAT; }
static int input_type(const OrtCustomOp *op, size_t i) { return i == 3 ? INT32 : element_type(op); }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 5; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)i; return element_type(op); }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 3; }
static int required(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 1; }  // INPUT_OUTPUT_REQUIRED

static const OrtCustomOp decode_attention = {9, create, name, provider, input_type, input_count, output_type,
                                             output_count, compute, destroy, required, required};
static const OrtCustomOp decode_attention16 = {9, create, name, provider, input_type, input_count, output_type,
                                               output_count, compute, destroy, required, required};

// 1 when this build has a vector path, AVX-512 or AVX2 (the portable one is slower than GroupQueryAttention).
__attribute__((visibility("default"))) int kvtrt_vectorised(void) {
#if defined(__AVX512F__) || defined(VECTOR_AVX2)
  return 1;
#else
  return 0;
#endif
}

// What ONNX Runtime calls when the library is registered (RegisterCustomOpsLibrary_V2).
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  api = (const void *const *)base->GetApi(API_VERSION);
  if (api == NULL) return NULL;  // cannot even make a status; ORT then reports the unknown op
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *status = CALL(API_CREATE_CUSTOM_OP_DOMAIN, CreateDomainFn)("kvtrt", &domain);
  if (status == NULL) status = CALL(API_CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &decode_attention);
  if (status == NULL) status = CALL(API_CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &decode_attention16);
  if (status == NULL) status = CALL(API_ADD_CUSTOM_OP_DOMAIN, AddDomainFn)(options, domain);
  return status;  // the domain lives as long as the process (ORT keeps a pointer to it)
}
