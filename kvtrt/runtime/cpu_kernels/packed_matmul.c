// kvtrt::PackedMatMul, an ONNX Runtime custom op for the CPU: Y = A @ B for a constant weight B stored in
// column panels, replacing the MatMul nodes of an export's projections (`cpu_kernels.with_packed_matmul`).
//
// Inputs   A [..., K] float (M = the product of the leading dims rows),
//          B [K, N] float, its bytes in panels of PANEL columns: panel p (columns p*PANEL onwards, the last
//          one narrower when PANEL does not divide N) is K rows of its width, one row after the other, and
//          the panels follow each other (`cpu_kernels.pack_panels` writes it).
// Output   Y [..., N] float.
//
// Why: ONNX Runtime's MatMul (MLAS, weights prepacked) reads the weights at memory speed for one row but
// costs ~1.4x that for the 8 rows of an 8-sequence decode step (SmolLM2 on 2 cores,
// `docs/results/packed_matmul.md`); here a panel is streamed once per call and every row's 48 outputs of
// it stay in registers over the whole K, so 8 rows cost little more than one. For long A (prefill) the
// same tiles run block after block of 8 rows while the panel stays in L2, at ~0.95x MLAS.
//
// Each output Y[m, n] is one chain of fused multiply-adds over k = 0 .. K-1 in order, whatever M, the
// tile a row falls in or the thread that computes it: a row's result never depends on the other rows of
// the call (a sequence decodes the same tokens alone or in a batch). Work items (panel, block of rows)
// run on ONNX Runtime's intra-op threads (KernelContext_ParallelFor). Vector path: AVX-512; elsewhere
// the portable loops, which the engine runs only when forced (`kvtrt_vectorised`).
//
// The OrtApi table is used by index, as in decode_attention.c (no ONNX Runtime header needed).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PANEL 48  // columns per panel: 3 AVX-512 vectors; 8 rows x 3 accumulators + 3 panel vectors fit 32 registers
#define TILE 8    // rows per tile
#define BLOCK 64  // rows per work item (8 tiles): a panel is reused from L2 by each of them

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

enum {  // OrtApi entries used here (indices from onnxruntime_c_api.h)
  API_CREATE_STATUS = 0,
  API_CREATE_CUSTOM_OP_DOMAIN = 26,
  API_CUSTOM_OP_DOMAIN_ADD = 27,
  API_ADD_CUSTOM_OP_DOMAIN = 28,
  API_GET_TENSOR_MUTABLE_DATA = 51,
  API_GET_DIMENSIONS_COUNT = 61,
  API_GET_DIMENSIONS = 62,
  API_GET_TENSOR_TYPE_AND_SHAPE = 65,
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
typedef OrtStatus *(*GetInputFn)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*GetOutputFn)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef void (*ReleaseStatusFn)(OrtStatus *);
typedef void (*ReleaseInfoFn)(OrtTensorTypeAndShapeInfo *);
typedef OrtStatus *(*ParallelForFn)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);

typedef struct OrtCustomOp {  // struct OrtCustomOp, version 9 layout
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

enum { FLOAT = 1 };  // ONNXTensorElementDataType

typedef struct {  // one call, shared by its work items
  const float *a, *b;
  float *y;
  int64_t M, K, N, blocks;  // blocks: work items per panel
} Call;

// Rows [0, rows) of A (row stride K) times the panel at `p` (K x width, width <= PANEL) into Y (row stride N).
#ifdef __AVX512F__
static inline __attribute__((always_inline)) void tile(const float *a, int64_t K, const float *p, int64_t width,
                                                       float *y, int64_t N, int rows) {
  const __mmask16 m0 = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
  const __mmask16 m1 = width >= 32 ? 0xFFFF : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
  const __mmask16 m2 = width >= 48 ? 0xFFFF : width <= 32 ? 0 : (__mmask16)((1u << (width - 32)) - 1);
  __m512 c[TILE][3];
#pragma GCC unroll 8
  for (int r = 0; r < TILE; r++) c[r][0] = c[r][1] = c[r][2] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const float *row = p + k * width;
    _mm_prefetch((const char *)(row + 16 * width), _MM_HINT_T0);  // 16 panel rows ahead: the next lines
    _mm_prefetch((const char *)(row + 16 * width + 16), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + 16 * width + 32), _MM_HINT_T0);
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, row), b1 = _mm512_maskz_loadu_ps(m1, row + 16),
                 b2 = _mm512_maskz_loadu_ps(m2, row + 32);
#pragma GCC unroll 8
    for (int r = 0; r < TILE; r++) {
      if (r < rows) {
        const __m512 x = _mm512_set1_ps(a[r * K + k]);
        c[r][0] = _mm512_fmadd_ps(x, b0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(x, b1, c[r][1]);
        c[r][2] = _mm512_fmadd_ps(x, b2, c[r][2]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < TILE; r++) {
    if (r < rows) {
      _mm512_mask_storeu_ps(y + r * N, m0, c[r][0]);
      _mm512_mask_storeu_ps(y + r * N + 16, m1, c[r][1]);
      _mm512_mask_storeu_ps(y + r * N + 32, m2, c[r][2]);
    }
  }
}

// `rows` as a constant in each branch, so the row loops unroll into straight code.
static void tile_rows(const float *a, int64_t K, const float *p, int64_t width, float *y, int64_t N, int rows) {
  switch (rows) {
    case 1: tile(a, K, p, width, y, N, 1); break;
    case 2: tile(a, K, p, width, y, N, 2); break;
    case 3: tile(a, K, p, width, y, N, 3); break;
    case 4: tile(a, K, p, width, y, N, 4); break;
    case 5: tile(a, K, p, width, y, N, 5); break;
    case 6: tile(a, K, p, width, y, N, 6); break;
    case 7: tile(a, K, p, width, y, N, 7); break;
    default: tile(a, K, p, width, y, N, 8); break;
  }
}
#else
static void tile_rows(const float *a, int64_t K, const float *p, int64_t width, float *y, int64_t N, int rows) {
  for (int r = 0; r < rows; r++)
    for (int64_t j = 0; j < width; j++) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; k++) sum += a[r * K + k] * p[k * width + j];
      y[r * N + j] = sum;
    }
}
#endif

static void item(void *data, size_t i) {  // panel i / blocks, rows [BLOCK * (i % blocks), +BLOCK)
  const Call *c = (const Call *)data;
  const int64_t panel = (int64_t)i / c->blocks, first = ((int64_t)i % c->blocks) * BLOCK;
  const int64_t col = panel * PANEL, width = c->N - col < PANEL ? c->N - col : PANEL;
  const float *p = c->b + col * c->K;  // the panels before this one hold col columns of K rows
  const int64_t end = first + BLOCK < c->M ? first + BLOCK : c->M;
  for (int64_t m = first; m < end; m += TILE)
    tile_rows(c->a + m * c->K, c->K, p, width, c->y + m * c->N + col, c->N, end - m < TILE ? (int)(end - m) : TILE);
}

static int ok(OrtStatus *status) {
  if (status == NULL) return 1;
  CALL(API_RELEASE_STATUS, ReleaseStatusFn)(status);
  return 0;
}

static int shape(const OrtValue *value, int64_t *dims, size_t *rank) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  if (!ok(CALL(API_GET_TENSOR_TYPE_AND_SHAPE, TypeAndShapeFn)(value, &info))) return 0;
  int good = ok(CALL(API_GET_DIMENSIONS_COUNT, DimsCountFn)(info, rank)) && *rank >= 1 && *rank <= 8 &&
             ok(CALL(API_GET_DIMENSIONS, DimsFn)(info, dims, *rank));
  CALL(API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseInfoFn)(info);
  return good;
}

static void *data_of(const OrtValue *value) {
  void *p = NULL;
  return ok(CALL(API_GET_TENSOR_MUTABLE_DATA, MutableDataFn)((OrtValue *)value, &p)) ? p : NULL;
}

// ONNX Runtime has no way for a custom op's compute to return a status (kernel version 9): an error is
// reported on stderr and the output is left unwritten; the shapes are checked before any work.
static void fail(const char *why) { fprintf(stderr, "kvtrt::PackedMatMul: %s\n", why); }

static void compute(void *kernel, OrtKernelContext *context) {
  (void)kernel;
  const OrtValue *in[2];
  for (size_t i = 0; i < 2; i++)
    if (!ok(CALL(API_KERNEL_CONTEXT_GET_INPUT, GetInputFn)(context, i, &in[i]))) return fail("cannot read an input");
  int64_t a_dims[8], b_dims[8];
  size_t a_rank = 0, b_rank = 0;
  if (!shape(in[0], a_dims, &a_rank) || !shape(in[1], b_dims, &b_rank) || b_rank != 2 || a_dims[a_rank - 1] != b_dims[0])
    return fail("A must be [..., K] and B [K, N]");
  Call c = {0};
  c.K = b_dims[0], c.N = b_dims[1], c.M = 1;
  for (size_t d = 0; d + 1 < a_rank; d++) c.M *= a_dims[d];
  int64_t y_dims[8];
  memcpy(y_dims, a_dims, sizeof(int64_t) * a_rank);
  y_dims[a_rank - 1] = c.N;
  OrtValue *out = NULL;
  if (!ok(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(context, 0, y_dims, a_rank, &out)))
    return fail("cannot allocate the output");
  c.a = data_of(in[0]), c.b = data_of(in[1]), c.y = data_of(out);
  if (c.M == 0 || c.N == 0) return;
  if (c.K == 0) {
    memset(c.y, 0, sizeof(float) * c.M * c.N);
    return;
  }
  c.blocks = (c.M + BLOCK - 1) / BLOCK;
  const size_t items = (size_t)(((c.N + PANEL - 1) / PANEL) * c.blocks);
  if (items < 2 || !ok(CALL(API_KERNEL_CONTEXT_PARALLEL_FOR, ParallelForFn)(context, item, items, 0, &c)))
    for (size_t i = 0; i < items; i++) item(&c, i);
}

static void *create(const OrtCustomOp *op, const void *unused, const OrtKernelInfo *info) {
  (void)op, (void)unused, (void)info;
  return calloc(1, 1);
}

static void destroy(void *kernel) { free(kernel); }
static const char *name(const OrtCustomOp *op) { (void)op; return "PackedMatMul"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return NULL; }  // CPU
static int float_type(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 2; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static int required(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 1; }  // INPUT_OUTPUT_REQUIRED

static const OrtCustomOp packed_matmul = {9, create, name, provider, float_type, input_count, float_type,
                                          output_count, compute, destroy, required, required};

// 1 when this build has the AVX-512 path (the portable loops are far slower than ONNX Runtime's MatMul).
__attribute__((visibility("default"))) int kvtrt_vectorised(void) {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

// Y = A @ B for `rows` x K rows of A and a panel-packed B (tests call the op's arithmetic through this).
__attribute__((visibility("default"))) void kvtrt_packed_matmul(const float *a, const float *b, float *y,
                                                                 int64_t rows, int64_t K, int64_t N) {
  Call c = {a, b, y, rows, K, N, (rows + BLOCK - 1) / BLOCK};
  const size_t items = (size_t)(((N + PANEL - 1) / PANEL) * c.blocks);
  for (size_t i = 0; i < items; i++) item(&c, i);
}

// What ONNX Runtime calls when the library is registered (RegisterCustomOpsLibrary_V2).
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  api = (const void *const *)base->GetApi(API_VERSION);
  if (api == NULL) return NULL;
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *status = CALL(API_CREATE_CUSTOM_OP_DOMAIN, CreateDomainFn)("kvtrt.matmul", &domain);
  if (status == NULL) status = CALL(API_CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &packed_matmul);
  if (status == NULL) status = CALL(API_ADD_CUSTOM_OP_DOMAIN, AddDomainFn)(options, domain);
  return status;  // the domain lives as long as the process (ORT keeps a pointer to it)
}
