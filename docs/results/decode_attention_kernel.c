// Prototype (not part of kvtrt): GQA decode attention reading each KV head once per step, its g query heads
// sharing the pass over K and over V. Built and timed by decode_attention_kernel.py; see decode_attention.md.
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>
#define D 64
void attend(const float *q, const float *k, const float *v, const long *lens, float *out,
            int B, int Hkv, int g, long C, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(dynamic, 1) collapse(2)
  for (int b = 0; b < B; b++) for (int h = 0; h < Hkv; h++) {
    long n = lens[b];
    const float *K = k + ((long)b * Hkv + h) * C * D, *V = v + ((long)b * Hkv + h) * C * D;
    const float *Q = q + ((long)b * Hkv + h) * g * D;
    float *s = malloc(sizeof(float) * g * n), mx[8], sum[8], acc[8][D];
    float scale = 1.0f / sqrtf((float)D);
    for (int j = 0; j < g; j++) { mx[j] = -INFINITY; sum[j] = 0; for (int d = 0; d < D; d++) acc[j][d] = 0; }
    for (long t = 0; t < n; t++) {
      const float *kt = K + t * D;
      for (int j = 0; j < g; j++) {
        float a = 0; const float *qj = Q + j * D;
        for (int d = 0; d < D; d++) a += qj[d] * kt[d];
        a *= scale; s[j * n + t] = a; if (a > mx[j]) mx[j] = a;
      }
    }
    for (int j = 0; j < g; j++) for (long t = 0; t < n; t++) { float e = expf(s[j * n + t] - mx[j]); s[j * n + t] = e; sum[j] += e; }
    for (long t = 0; t < n; t++) {
      const float *vt = V + t * D;
      for (int j = 0; j < g; j++) { float p = s[j * n + t]; for (int d = 0; d < D; d++) acc[j][d] += p * vt[d]; }
    }
    float *O = out + ((long)b * Hkv + h) * g * D;
    for (int j = 0; j < g; j++) for (int d = 0; d < D; d++) O[j * D + d] = acc[j][d] / sum[j];
    free(s);
  }
}

// The same for g == 3 with AVX-512 intrinsics (4 registers per 64-float row; online max, then exp, then P @ V).
__attribute__((target("avx512f,fma"))) void attend_avx512(const float *q, const float *k, const float *v, const long *lens, float *out,
            int B, int Hkv, int g, long C, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(dynamic, 1) collapse(2)
  for (int b = 0; b < B; b++) for (int h = 0; h < Hkv; h++) {
    long n = lens[b];
    const float *K = k + ((long)b * Hkv + h) * C * D, *V = v + ((long)b * Hkv + h) * C * D;
    const float *Q = q + ((long)b * Hkv + h) * 3 * D;
    float *s = aligned_alloc(64, sizeof(float) * 3 * ((n + 15) & ~15L));
    const float scale = 0.125f;
    __m512 q0[4], q1[4], q2[4];
    for (int c = 0; c < 4; c++) { q0[c] = _mm512_mul_ps(_mm512_loadu_ps(Q + c * 16), _mm512_set1_ps(scale));
      q1[c] = _mm512_mul_ps(_mm512_loadu_ps(Q + D + c * 16), _mm512_set1_ps(scale));
      q2[c] = _mm512_mul_ps(_mm512_loadu_ps(Q + 2 * D + c * 16), _mm512_set1_ps(scale)); }
    float m0 = -INFINITY, m1 = -INFINITY, m2 = -INFINITY;
    for (long t = 0; t < n; t++) {
      const float *kt = K + t * D;
      __m512 k0 = _mm512_loadu_ps(kt), k1 = _mm512_loadu_ps(kt + 16), k2 = _mm512_loadu_ps(kt + 32), k3 = _mm512_loadu_ps(kt + 48);
      __m512 a0 = _mm512_fmadd_ps(q0[3], k3, _mm512_fmadd_ps(q0[2], k2, _mm512_fmadd_ps(q0[1], k1, _mm512_mul_ps(q0[0], k0))));
      __m512 a1 = _mm512_fmadd_ps(q1[3], k3, _mm512_fmadd_ps(q1[2], k2, _mm512_fmadd_ps(q1[1], k1, _mm512_mul_ps(q1[0], k0))));
      __m512 a2 = _mm512_fmadd_ps(q2[3], k3, _mm512_fmadd_ps(q2[2], k2, _mm512_fmadd_ps(q2[1], k1, _mm512_mul_ps(q2[0], k0))));
      float x0 = _mm512_reduce_add_ps(a0), x1 = _mm512_reduce_add_ps(a1), x2 = _mm512_reduce_add_ps(a2);
      s[t] = x0; s[n + t] = x1; s[2 * n + t] = x2;
      m0 = x0 > m0 ? x0 : m0; m1 = x1 > m1 ? x1 : m1; m2 = x2 > m2 ? x2 : m2;
    }
    float sum0 = 0, sum1 = 0, sum2 = 0;
    for (long t = 0; t < n; t++) { float e0 = expf(s[t] - m0), e1 = expf(s[n + t] - m1), e2 = expf(s[2 * n + t] - m2);
      s[t] = e0; s[n + t] = e1; s[2 * n + t] = e2; sum0 += e0; sum1 += e1; sum2 += e2; }
    __m512 o0[4], o1[4], o2[4];
    for (int c = 0; c < 4; c++) { o0[c] = _mm512_setzero_ps(); o1[c] = _mm512_setzero_ps(); o2[c] = _mm512_setzero_ps(); }
    for (long t = 0; t < n; t++) {
      const float *vt = V + t * D;
      __m512 p0 = _mm512_set1_ps(s[t]), p1 = _mm512_set1_ps(s[n + t]), p2 = _mm512_set1_ps(s[2 * n + t]);
      for (int c = 0; c < 4; c++) { __m512 vv = _mm512_loadu_ps(vt + c * 16);
        o0[c] = _mm512_fmadd_ps(p0, vv, o0[c]); o1[c] = _mm512_fmadd_ps(p1, vv, o1[c]); o2[c] = _mm512_fmadd_ps(p2, vv, o2[c]); }
    }
    float *O = out + ((long)b * Hkv + h) * 3 * D;
    for (int c = 0; c < 4; c++) { _mm512_storeu_ps(O + c * 16, _mm512_div_ps(o0[c], _mm512_set1_ps(sum0)));
      _mm512_storeu_ps(O + D + c * 16, _mm512_div_ps(o1[c], _mm512_set1_ps(sum1)));
      _mm512_storeu_ps(O + 2 * D + c * 16, _mm512_div_ps(o2[c], _mm512_set1_ps(sum2))); }
    free(s);
  }
}
