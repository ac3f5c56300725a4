// Prototype (not part of kvtrt): GQA decode attention reading each KV head once per step, its g query heads
// sharing the pass over K and over V. Built and timed by decode_attention_kernel.py; see decode_attention.md.
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
