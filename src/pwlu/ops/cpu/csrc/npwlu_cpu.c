/* N-PWLU (non-uniform PWLU, SPEC section 9) forward/backward on folded tables: plain C + OpenMP,
 * AVX-512 where the compiler targets it. Its own library (pwlu/ops/npwlu_cpu_backend.py,
 * NativeLibrary "npwlu_cpu"); it shares pwlu_common.h (dtype codes, return codes, loads and
 * stores, the thread split, the row-segment iterator) with the PWLU kernels.
 *
 * x is viewed as (outer, C, inner), dense. Tables per channel c (compute dtype):
 *   slopes, intercepts [C][N+2]   region k: y = slopes[k] * (x - shift[c]) + intercepts[k]
 *   bp [C][N+1]                   breakpoints b_0 = B_L .. b_N = B_R (effective)
 *   inv_w [C][N]                  1 / w_j of the (floored) interval widths (backward)
 * Region: k = 0 if x < b_0, N+1 if x >= b_N, else 1 + #{j in 1..N-1 : x >= b_j} (the N-1
 * interior breakpoints; exact, closed on the left; NaN: 1). A flat piece maps +-inf to its
 * intercept. Backward: dx = g * slopes[k]; hist[c][k] += (g, g * r), r = x - b_0 (k = 0),
 * x - b_N (k = N+1), (x - b_{k-1}) * inv_w[k-1] (inner). Each thread fills its own double
 * histogram over a static partition; they are summed in thread order (bit-identical run to
 * run for a fixed thread count). The AVX-512 path (float compute) keeps lane-private float
 * accumulators per region for at most LANE_TERMS terms per lane, then adds them into double.
 * Where the channels are the fastest axis (channels-last, (B, T, C)) it takes 16 channels per
 * vector, with tables transposed once per call (avx_fwd_rows, avx_bwd_rows); elsewhere, and
 * without AVX-512, the scalar loop walks each channel (stride C there).
 * Every exported function returns PWLU_OK or a PWLU_ERR_* code.
 */
#include "pwlu_common.h"
#include "npwlu_fold.h"

int npwlu_cpu_abi_version(void) { return PWLU_ABI_VERSION; }
int npwlu_cpu_has_avx512(void) { return PWLU_AVX512; }
int npwlu_cpu_has_f16(void) { return PWLU_F16_KERNEL; }

typedef struct {
    const void *x, *g;
    void *out;
    int dt;
    int64_t outer, C, inner, n;
    const float *sl, *ic, *bp, *iw, *sh;
    const void *rows; /* channels fastest with AVX-512: the transposed tables (np_rows_t), else NULL */
} ncall_f;
typedef struct {
    const void *x, *g;
    void *out;
    int dt;
    int64_t outer, C, inner, n;
    const double *sl, *ic, *bp, *iw, *sh;
} ncall_d;

static inline int nf32c_dtype_ok(int dt) { return dt == PWLU_F32 || dt == PWLU_BF16 || (dt == PWLU_F16 && PWLU_F16_KERNEL); }

/* ---- scalar region search (both compute types) ---- */
static inline int64_t region_f(float x, const float *b, int64_t n) {
    if (x < b[0]) return 0;
    if (x >= b[n]) return n + 1;
    int64_t k = 1;
    for (int64_t j = 1; j < n; j++) k += x >= b[j]; /* interior breakpoints */
    return k;
}
static inline int64_t region_d(double x, const double *b, int64_t n) {
    if (x < b[0]) return 0;
    if (x >= b[n]) return n + 1;
    int64_t k = 1;
    for (int64_t j = 1; j < n; j++) k += x >= b[j];
    return k;
}

/* ---- scalar forward/backward of one element run [b, e) of channel c, stride 1 or C ---- */
static void scalar_fwd_f(const ncall_f *a, int64_t c, int64_t b, int64_t e, int64_t stride) {
    const int64_t n = a->n;
    const float *sl = a->sl + c * (n + 2), *ic = a->ic + c * (n + 2), *bp = a->bp + c * (n + 1);
    const float sh = a->sh[c];
    for (int64_t i = b; i < e; i += stride) {
        const float x = load_s(a->x, i, a->dt);
        const int64_t k = region_f(x, bp, n);
        const float d = x - sh;
        float y = sl[k] * d + ic[k];
        if (isinf(d) && sl[k] == 0.0f) y = ic[k]; /* x = +-inf, or x - sh overflowing */
        store_s(a->out, i, y, a->dt);
    }
}
static void scalar_fwd_d(const ncall_d *a, int64_t c, int64_t b, int64_t e, int64_t stride) {
    const int64_t n = a->n;
    const double *sl = a->sl + c * (n + 2), *ic = a->ic + c * (n + 2), *bp = a->bp + c * (n + 1);
    const double sh = a->sh[c];
    for (int64_t i = b; i < e; i += stride) {
        const double x = load_d(a->x, i, a->dt);
        const int64_t k = region_d(x, bp, n);
        const double d = x - sh;
        double y = sl[k] * d + ic[k];
        if (isinf(d) && sl[k] == 0.0) y = ic[k];
        store_d(a->out, i, y, a->dt);
    }
}
static void scalar_bwd_f(const ncall_f *a, int64_t c, int64_t b, int64_t e, int64_t stride, double *hist) {
    const int64_t n = a->n;
    const float *sl = a->sl + c * (n + 2), *bp = a->bp + c * (n + 1), *iw = a->iw + c * n;
    double *h = hist + c * (n + 2) * 2;
    for (int64_t i = b; i < e; i += stride) {
        const float x = load_s(a->x, i, a->dt), g = load_s(a->g, i, a->dt);
        const int64_t k = region_f(x, bp, n);
        store_s(a->out, i, g * sl[k], a->dt); /* dy/dx = slope of region k */
        const float r = k == 0 ? x - bp[0] : k == n + 1 ? x - bp[n] : (x - bp[k - 1]) * iw[k - 1];
        h[2 * k] += g;
        h[2 * k + 1] += g * r;
    }
}
static void scalar_bwd_d(const ncall_d *a, int64_t c, int64_t b, int64_t e, int64_t stride, double *hist) {
    const int64_t n = a->n;
    const double *sl = a->sl + c * (n + 2), *bp = a->bp + c * (n + 1), *iw = a->iw + c * n;
    double *h = hist + c * (n + 2) * 2;
    for (int64_t i = b; i < e; i += stride) {
        const double x = load_d(a->x, i, a->dt), g = load_d(a->g, i, a->dt);
        const int64_t k = region_d(x, bp, n);
        store_d(a->out, i, g * sl[k], a->dt);
        const double r = k == 0 ? x - bp[0] : k == n + 1 ? x - bp[n] : (x - bp[k - 1]) * iw[k - 1];
        h[2 * k] += g;
        h[2 * k + 1] += g * r;
    }
}

#if PWLU_AVX512
/* ---- AVX-512 (float compute): a table of up to 32 entries in two registers ---- */
typedef struct {
    __m512 lo, hi;
    const float *mem; /* tables longer than 32: gathered */
    int64_t len;
} table16;
static inline table16 table_load(const float *t, int64_t len) {
    table16 r;
    r.mem = t;
    r.len = len;
    r.lo = _mm512_maskz_loadu_ps(tail_mask(len), t);
    r.hi = len > 16 ? _mm512_maskz_loadu_ps(tail_mask(len - 16), t + 16) : _mm512_setzero_ps();
    return r;
}
static inline __m512 table_get(const table16 *t, __m512i k) {
    if (t->len <= 16) return _mm512_permutexvar_ps(k, t->lo);
    if (t->len <= 32) return _mm512_permutex2var_ps(t->lo, k, t->hi);
    return _mm512_i32gather_ps(k, t->mem, 4);
}

/* Region k of 16 elements: 1 + the interior breakpoints <= x, 0 left of b_0, N+1 from b_N on. */
static inline __m512i region16_np(__m512 x, const float *bp, int64_t n, __m512 lo, __m512 hi) {
    const __m512i one = _mm512_set1_epi32(1);
    __m512i k = one;
    for (int64_t j = 1; j < n; j++)
        k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(x, _mm512_set1_ps(bp[j]), _CMP_GE_OQ), k, one);
    k = _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_si512());
    return _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ), _mm512_set1_epi32((int)n + 1));
}

static inline __attribute__((always_inline)) void avx_fwd_seg(const ncall_f *a, int64_t c, int64_t b, int64_t e,
                                                              const int dt) {
    const int64_t n = a->n;
    const float *bp = a->bp + c * (n + 1);
    const table16 ts = table_load(a->sl + c * (n + 2), n + 2), ti = table_load(a->ic + c * (n + 2), n + 2);
    const __m512 lo = _mm512_set1_ps(bp[0]), hi = _mm512_set1_ps(bp[n]), sh = _mm512_set1_ps(a->sh[c]);
    const __m512 inf = _mm512_set1_ps(INFINITY);
    for (int64_t i = b; i < e; i += 16) {
        const __mmask16 m = tail_mask(e - i);
        const __m512 x = ld16(a->x, i, m, dt);
        const __m512i k = region16_np(x, bp, n, lo, hi);
        const __m512 s = table_get(&ts, k), t = table_get(&ti, k);
        const __m512 d = _mm512_sub_ps(x, sh);
        __m512 y = _mm512_fmadd_ps(s, d, t); /* y = a[k] (x - shift) + b[k] */
        /* a flat piece maps +-inf (x, or an overflowing x - shift) to its constant */
        const __mmask16 flat = _mm512_cmp_ps_mask(_mm512_abs_ps(d), inf, _CMP_EQ_OQ) &
                               _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_EQ_OQ);
        y = _mm512_mask_mov_ps(y, flat, t);
        st16(a->out, i, y, m, dt);
    }
}

/* lane-private float accumulators of a region, added into double every LANE_TERMS vectors */
static inline void flush_acc(__m512 *acc, int64_t regions, double *h) {
    for (int64_t k = 0; k < 2 * regions; k++) {
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(acc[k]));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[k]), 1)));
        h[k] += _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
        acc[k] = _mm512_setzero_ps();
    }
}

#define NP_MAX_ACC 2 * 130 /* accumulators of N + 2 <= 130 regions on the stack; more: scalar path */

static inline __attribute__((always_inline)) void avx_bwd_seg(const ncall_f *a, int64_t c, int64_t b, int64_t e,
                                                              double *hist, const int dt) {
    const int64_t n = a->n, regions = n + 2;
    const float *bp = a->bp + c * (n + 1);
    const table16 ts = table_load(a->sl + c * (n + 2), n + 2);
    const table16 tb = table_load(bp, n + 1), tw = table_load(a->iw + c * n, n);
    const __m512 lo = _mm512_set1_ps(bp[0]), hi = _mm512_set1_ps(bp[n]);
    const __m512i one = _mm512_set1_epi32(1), nm1 = _mm512_set1_epi32((int)n - 1);
    __m512 acc[NP_MAX_ACC]; /* acc[2k]: sum g, acc[2k+1]: sum g r of region k */
    for (int64_t k = 0; k < 2 * regions; k++) acc[k] = _mm512_setzero_ps();
    double *h = hist + c * regions * 2;
    int64_t terms = 0;
    for (int64_t i = b; i < e; i += 16) {
        const __mmask16 m = tail_mask(e - i);
        const __m512 x = ld16(a->x, i, m, dt), g = ld16(a->g, i, m, dt); /* masked lanes: x = g = 0 */
        const __m512i k = region16_np(x, bp, n, lo, hi);
        st16(a->out, i, _mm512_mul_ps(g, table_get(&ts, k)), m, dt); /* dy/dx = slope of region k */
        /* r: x - b_0 (left), x - b_N (right), (x - b_j) / w_j in interval j = k - 1 */
        const __m512i j = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(k, one), _mm512_setzero_si512()), nm1);
        __m512 r = _mm512_mul_ps(_mm512_sub_ps(x, table_get(&tb, j)), table_get(&tw, j));
        r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_sub_ps(x, lo));
        r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ), _mm512_sub_ps(x, hi));
        const __m512 gr = _mm512_maskz_mul_ps(m, g, r);
        for (int64_t q = 0; q < regions; q++) { /* one compare and two masked adds per region */
            const __mmask16 hit = _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32((int)q));
            acc[2 * q] = _mm512_mask_add_ps(acc[2 * q], hit, acc[2 * q], g);
            acc[2 * q + 1] = _mm512_mask_add_ps(acc[2 * q + 1], hit, acc[2 * q + 1], gr);
        }
        if (++terms == LANE_TERMS) {
            flush_acc(acc, regions, h);
            terms = 0;
        }
    }
    flush_acc(acc, regions, h);
}

/* ---- channels fastest (inner == 1), AVX-512: lanes are 16 consecutive channels ----
 * The tables transposed once per call (entry j of channels c0 .. c0 + 15 is one vector, see
 * np_rows_tables); each thread walks its rows channel block by channel block. The region needs no
 * lookup: a lane's slope and intercept are selected while its interior breakpoints are compared
 * (they are sorted, so the last one passed wins), and the backward's lane-private accumulators
 * are per channel already (added into double after each chunk of NP_ROW_CHUNK rows, which every
 * channel block walks before the next chunk: the chunk stays in the cache). */
typedef struct {
    float *bp, *sl, *ic, *iw; /* [N+1][C], [N+2][C], [N+2][C], [N][C]; NULL where not needed */
} np_rows_t;
#define NP_ROW_CHUNK 128 /* rows per pass over the channel blocks (<= LANE_TERMS: one flush each) */

static void np_transpose(const float *src, float *dst, int64_t C, int64_t len) {
    for (int64_t c = 0; c < C; c++)
        for (int64_t j = 0; j < len; j++) dst[j * C + c] = src[c * len + j];
}
/* The transposed tables in one allocation (NULL: out of memory); free(t->bp) releases them. */
static int np_rows_tables(const ncall_f *a, np_rows_t *t) {
    const int64_t n = a->n, C = a->C;
    const int64_t len = (n + 1) + (a->ic ? n + 2 : 0) + (n + 2) + (a->iw ? n : 0);
    float *buf = (float *)malloc((size_t)(len * C) * sizeof(float));
    if (buf == NULL) return PWLU_ERR_NOMEM;
    t->bp = buf;
    t->sl = buf + (n + 1) * C;
    t->ic = a->ic ? t->sl + (n + 2) * C : NULL;
    t->iw = a->iw ? t->sl + (n + 2) * C * (a->ic ? 2 : 1) : NULL;
    np_transpose(a->bp, t->bp, C, n + 1);
    np_transpose(a->sl, t->sl, C, n + 2);
    if (t->ic) np_transpose(a->ic, t->ic, C, n + 2);
    if (t->iw) np_transpose(a->iw, t->iw, C, n);
    return PWLU_OK;
}

static inline __attribute__((always_inline)) void avx_fwd_rows(const ncall_f *a, const np_rows_t *t, int64_t rb,
                                                               int64_t re, const int dt) {
    const int64_t n = a->n, C = a->C;
    const __m512 inf = _mm512_set1_ps(INFINITY);
    for (int64_t r0 = rb; r0 < re; r0 += NP_ROW_CHUNK) /* a chunk of rows stays in the cache for all blocks */
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t r1 = re - r0 < NP_ROW_CHUNK ? re : r0 + NP_ROW_CHUNK;
        const __mmask16 m = tail_mask(C - c0);
        const __m512 lo = _mm512_maskz_loadu_ps(m, t->bp + c0), hi = _mm512_maskz_loadu_ps(m, t->bp + n * C + c0);
        const __m512 sh = _mm512_maskz_loadu_ps(m, a->sh + c0);
        for (int64_t r = r0; r < r1; r++) {
            const __m512 x = ld16(a->x, r * C + c0, m, dt);
            /* region 1 (also NaN), then each interior breakpoint passed moves one region up */
            __m512 s = _mm512_maskz_loadu_ps(m, t->sl + C + c0), b = _mm512_maskz_loadu_ps(m, t->ic + C + c0);
            for (int64_t j = 1; j < n; j++) {
                const __mmask16 ge = _mm512_cmp_ps_mask(x, _mm512_maskz_loadu_ps(m, t->bp + j * C + c0), _CMP_GE_OQ);
                s = _mm512_mask_loadu_ps(s, ge & m, t->sl + (j + 1) * C + c0);
                b = _mm512_mask_loadu_ps(b, ge & m, t->ic + (j + 1) * C + c0);
            }
            const __mmask16 left = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ) & m;
            const __mmask16 right = _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ) & m;
            s = _mm512_mask_loadu_ps(_mm512_mask_loadu_ps(s, left, t->sl + c0), right, t->sl + (n + 1) * C + c0);
            b = _mm512_mask_loadu_ps(_mm512_mask_loadu_ps(b, left, t->ic + c0), right, t->ic + (n + 1) * C + c0);
            const __m512 d = _mm512_sub_ps(x, sh);
            __m512 y = _mm512_fmadd_ps(s, d, b); /* y = a[k] (x - shift) + b[k] */
            const __mmask16 flat = _mm512_cmp_ps_mask(_mm512_abs_ps(d), inf, _CMP_EQ_OQ) &
                                   _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_EQ_OQ);
            st16(a->out, r * C + c0, _mm512_mask_mov_ps(y, flat, b), m, dt);
        }
    }
}

/* acc[2q + s] of lanes 0 .. lanes - 1 into channels c0 + l's double bins, then zero */
static inline void flush_rows(__m512 *acc, int64_t regions, double *hist, int64_t c0, int lanes) {
    float buf[16];
    for (int64_t k = 0; k < 2 * regions; k++) {
        _mm512_storeu_ps(buf, acc[k]);
        for (int l = 0; l < lanes; l++) hist[(c0 + l) * regions * 2 + k] += (double)buf[l];
        acc[k] = _mm512_setzero_ps();
    }
}

static inline __attribute__((always_inline)) void avx_bwd_rows(const ncall_f *a, const np_rows_t *t, int64_t rb,
                                                               int64_t re, double *hist, const int dt) {
    const int64_t n = a->n, C = a->C, regions = n + 2;
    const __m512i one = _mm512_set1_epi32(1);
    __m512 acc[NP_MAX_ACC]; /* acc[2k]: sum g, acc[2k+1]: sum g r of region k, lane = channel */
    for (int64_t r0 = rb; r0 < re; r0 += NP_ROW_CHUNK) /* a chunk of rows stays in the cache for all blocks */
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t r1 = re - r0 < NP_ROW_CHUNK ? re : r0 + NP_ROW_CHUNK;
        const __mmask16 m = tail_mask(C - c0);
        const int lanes = C - c0 < 16 ? (int)(C - c0) : 16;
        const __m512 lo = _mm512_maskz_loadu_ps(m, t->bp + c0), hi = _mm512_maskz_loadu_ps(m, t->bp + n * C + c0);
        for (int64_t k = 0; k < 2 * regions; k++) acc[k] = _mm512_setzero_ps();
        for (int64_t r = r0; r < r1; r++) {
            const __m512 x = ld16(a->x, r * C + c0, m, dt), g = ld16(a->g, r * C + c0, m, dt); /* lanes past C: 0 */
            /* as the forward: region 1 (also NaN), each interior breakpoint passed one up; with it
             * the slope and the start and inverse width of the interval */
            __m512i k = one;
            __m512 s = _mm512_maskz_loadu_ps(m, t->sl + C + c0), b0 = lo, iw = _mm512_maskz_loadu_ps(m, t->iw + c0);
            for (int64_t j = 1; j < n; j++) {
                const __mmask16 ge =
                    _mm512_cmp_ps_mask(x, _mm512_maskz_loadu_ps(m, t->bp + j * C + c0), _CMP_GE_OQ) & m;
                k = _mm512_mask_add_epi32(k, ge, k, one);
                s = _mm512_mask_loadu_ps(s, ge, t->sl + (j + 1) * C + c0);
                b0 = _mm512_mask_loadu_ps(b0, ge, t->bp + j * C + c0);
                iw = _mm512_mask_loadu_ps(iw, ge, t->iw + j * C + c0);
            }
            __m512 rr = _mm512_mul_ps(_mm512_sub_ps(x, b0), iw); /* (x - b_j) / w_j in interval j = k - 1 */
            const __mmask16 left = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ) & m;
            const __mmask16 right = _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ) & m;
            k = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(k, left, _mm512_setzero_si512()), right,
                                      _mm512_set1_epi32((int)n + 1));
            s = _mm512_mask_loadu_ps(_mm512_mask_loadu_ps(s, left, t->sl + c0), right, t->sl + (n + 1) * C + c0);
            rr = _mm512_mask_mov_ps(_mm512_mask_mov_ps(rr, left, _mm512_sub_ps(x, lo)), right, _mm512_sub_ps(x, hi));
            st16(a->out, r * C + c0, _mm512_mul_ps(g, s), m, dt); /* dy/dx = slope of region k */
            const __m512 gr = _mm512_maskz_mul_ps(m, g, rr);
            for (int64_t q = 0; q < regions; q++) {
                const __mmask16 hit = _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32((int)q));
                acc[2 * q] = _mm512_mask_add_ps(acc[2 * q], hit, acc[2 * q], g);
                acc[2 * q + 1] = _mm512_mask_add_ps(acc[2 * q + 1], hit, acc[2 * q + 1], gr);
            }
        }
        flush_rows(acc, regions, hist, c0, lanes); /* at most NP_ROW_CHUNK <= LANE_TERMS float terms */
    }
}
#endif /* PWLU_AVX512 */

/* ---- per-thread work over part t of nth ---- */
static inline int rows_layout(int64_t C, int64_t inner) { return inner == 1 && C > 1; }

static inline __attribute__((always_inline)) void fwd_work_f(const ncall_f *a, int t, int nth, const int dt) {
    int64_t b, e;
    if (rows_layout(a->C, a->inner)) { /* channels fastest: rows of C */
        split(a->outer, t, nth, 1, &b, &e);
#if PWLU_AVX512
        if (a->rows) {
            avx_fwd_rows(a, (const np_rows_t *)a->rows, b, e, dt);
            return;
        }
#endif
        for (int64_t c = 0; c < a->C; c++) scalar_fwd_f(a, c, b * a->C + c, e * a->C, a->C);
        return;
    }
    split(a->outer * a->C * a->inner, t, nth, ALIGN_ELEMS, &b, &e);
    for (seg_iter s = seg_first(b, e, a->inner, a->C); s.b < e; seg_next(&s, e, a->inner, a->C)) {
#if PWLU_AVX512
        avx_fwd_seg(a, s.c, s.b, s.e, dt);
#else
        (void)dt;
        scalar_fwd_f(a, s.c, s.b, s.e, 1);
#endif
    }
}
static inline __attribute__((always_inline)) void bwd_work_f(const ncall_f *a, int t, int nth, double *hist,
                                                             const int dt) {
    int64_t b, e;
    if (rows_layout(a->C, a->inner)) {
        split(a->outer, t, nth, 1, &b, &e);
#if PWLU_AVX512
        if (a->rows) {
            avx_bwd_rows(a, (const np_rows_t *)a->rows, b, e, hist, dt);
            return;
        }
#endif
        for (int64_t c = 0; c < a->C; c++) scalar_bwd_f(a, c, b * a->C + c, e * a->C, a->C, hist);
        return;
    }
    split(a->outer * a->C * a->inner, t, nth, ALIGN_ELEMS, &b, &e);
    for (seg_iter s = seg_first(b, e, a->inner, a->C); s.b < e; seg_next(&s, e, a->inner, a->C)) {
#if PWLU_AVX512
        if (2 * (a->n + 2) <= NP_MAX_ACC) {
            avx_bwd_seg(a, s.c, s.b, s.e, hist, dt);
            continue;
        }
#endif
        (void)dt;
        scalar_bwd_f(a, s.c, s.b, s.e, 1, hist);
    }
}
static void fwd_thread_f(const ncall_f *a, int t, int nth) {
    switch (a->dt) {
    case PWLU_F32: fwd_work_f(a, t, nth, PWLU_F32); break;
    case PWLU_F16: fwd_work_f(a, t, nth, PWLU_F16); break;
    default: fwd_work_f(a, t, nth, PWLU_BF16); break;
    }
}
static void bwd_thread_f(const ncall_f *a, int t, int nth, double *hist) {
    switch (a->dt) {
    case PWLU_F32: bwd_work_f(a, t, nth, hist, PWLU_F32); break;
    case PWLU_F16: bwd_work_f(a, t, nth, hist, PWLU_F16); break;
    default: bwd_work_f(a, t, nth, hist, PWLU_BF16); break;
    }
}
static void fwd_thread_d(const ncall_d *a, int t, int nth) {
    int64_t b, e;
    if (rows_layout(a->C, a->inner)) {
        split(a->outer, t, nth, 1, &b, &e);
        for (int64_t c = 0; c < a->C; c++) scalar_fwd_d(a, c, b * a->C + c, e * a->C, a->C);
        return;
    }
    split(a->outer * a->C * a->inner, t, nth, 1, &b, &e);
    for (seg_iter s = seg_first(b, e, a->inner, a->C); s.b < e; seg_next(&s, e, a->inner, a->C))
        scalar_fwd_d(a, s.c, s.b, s.e, 1);
}
static void bwd_thread_d(const ncall_d *a, int t, int nth, double *hist) {
    int64_t b, e;
    if (rows_layout(a->C, a->inner)) {
        split(a->outer, t, nth, 1, &b, &e);
        for (int64_t c = 0; c < a->C; c++) scalar_bwd_d(a, c, b * a->C + c, e * a->C, a->C, hist);
        return;
    }
    split(a->outer * a->C * a->inner, t, nth, 1, &b, &e);
    for (seg_iter s = seg_first(b, e, a->inner, a->C); s.b < e; seg_next(&s, e, a->inner, a->C))
        scalar_bwd_d(a, s.c, s.b, s.e, 1, hist);
}

/* ---- drivers: one OpenMP region; backward partial histograms summed in thread order ---- */
static int run_fwd(const void *args, int is_double, int nthreads) {
    nthreads = clamp_threads(nthreads);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int t, nth;
        thread_id(&t, &nth);
        if (is_double)
            fwd_thread_d((const ncall_d *)args, t, nth);
        else
            fwd_thread_f((const ncall_f *)args, t, nth);
    }
    return PWLU_OK;
}
static int run_bwd(const void *args, int is_double, int64_t hist_len, int nthreads, double *hist) {
    nthreads = clamp_threads(nthreads);
    double *partial = nthreads > 1 ? (double *)calloc((size_t)nthreads * (size_t)hist_len, sizeof(double)) : NULL;
    if (nthreads > 1 && partial == NULL) return PWLU_ERR_NOMEM;
    memset(hist, 0, (size_t)hist_len * sizeof(double));
    int used = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int t, nth;
        thread_id(&t, &nth);
        double *mine = nth > 1 ? partial + (int64_t)t * hist_len : hist;
        if (t == 0) used = nth;
        if (is_double)
            bwd_thread_d((const ncall_d *)args, t, nth, mine);
        else
            bwd_thread_f((const ncall_f *)args, t, nth, mine);
    }
    if (used > 1)
        for (int t = 0; t < used; t++)
            for (int64_t i = 0; i < hist_len; i++) hist[i] += partial[(int64_t)t * hist_len + i];
    free(partial);
    return PWLU_OK;
}

/* ---- exported ---- */
int npwlu_forward_f32c(const void *x, void *y, int dt, int64_t outer, int64_t C, int64_t inner, int64_t n,
                       const float *slopes, const float *intercepts, const float *bp, const float *shift,
                       int nthreads) {
    if (!nf32c_dtype_ok(dt)) return PWLU_ERR_DTYPE;
    ncall_f a = {x, NULL, y, dt, outer, C, inner, n, slopes, intercepts, bp, NULL, shift, NULL};
#if PWLU_AVX512
    if (rows_layout(C, inner) && outer > 0) {
        np_rows_t t;
        if (np_rows_tables(&a, &t) != PWLU_OK) return PWLU_ERR_NOMEM;
        a.rows = &t;
        const int rc = run_fwd(&a, 0, nthreads);
        free(t.bp);
        return rc;
    }
#endif
    return run_fwd(&a, 0, nthreads);
}
int npwlu_forward_f64(const void *x, void *y, int dt, int64_t outer, int64_t C, int64_t inner, int64_t n,
                      const double *slopes, const double *intercepts, const double *bp, const double *shift,
                      int nthreads) {
    if (dt != PWLU_F64) return PWLU_ERR_DTYPE;
    const ncall_d a = {x, NULL, y, dt, outer, C, inner, n, slopes, intercepts, bp, NULL, shift};
    return run_fwd(&a, 1, nthreads);
}
int npwlu_backward_f32c(const void *g, const void *x, void *dx, int dt, int64_t outer, int64_t C, int64_t inner,
                        int64_t n, const float *slopes, const float *bp, const float *inv_w, int nthreads,
                        double *hist) {
    if (!nf32c_dtype_ok(dt)) return PWLU_ERR_DTYPE;
    ncall_f a = {x, g, dx, dt, outer, C, inner, n, slopes, NULL, bp, inv_w, NULL, NULL};
#if PWLU_AVX512
    if (rows_layout(C, inner) && outer > 0 && 2 * (n + 2) <= NP_MAX_ACC) {
        np_rows_t t;
        if (np_rows_tables(&a, &t) != PWLU_OK) return PWLU_ERR_NOMEM;
        a.rows = &t;
        const int rc = run_bwd(&a, 0, C * (n + 2) * 2, nthreads, hist);
        free(t.bp);
        return rc;
    }
#endif
    return run_bwd(&a, 0, C * (n + 2) * 2, nthreads, hist);
}
int npwlu_backward_f64(const void *g, const void *x, void *dx, int dt, int64_t outer, int64_t C, int64_t inner,
                       int64_t n, const double *slopes, const double *bp, const double *inv_w, int nthreads,
                       double *hist) {
    if (dt != PWLU_F64) return PWLU_ERR_DTYPE;
    const ncall_d a = {x, g, dx, dt, outer, C, inner, n, slopes, NULL, bp, inv_w, NULL};
    return run_bwd(&a, 1, C * (n + 2) * 2, nthreads, hist);
}

/* An inference plan (pwlu.ops.npwlu_cpu_backend.make_plan): the folded tables and the kernel
 * arguments, and the six parameter tensors with the snapshots the tables were folded from,
 * compared byte for byte before every call (PWLU_PLAN_STALE: nothing computed). */
typedef struct {
    int64_t dt, outer, C, inner, n, nthreads;
    const void *slopes, *intercepts, *bp, *shift;
    const void *live[6], *snap[6];
    int64_t bytes[6];
} npwlu_plan;
int npwlu_forward_plan(const npwlu_plan *p, const void *x, void *y) {
    if (plan_stale(p->live, p->snap, p->bytes, 6)) return PWLU_PLAN_STALE;
    if (p->dt == PWLU_F64)
        return npwlu_forward_f64(x, y, (int)p->dt, p->outer, p->C, p->inner, p->n, p->slopes, p->intercepts, p->bp,
                                 p->shift, (int)p->nthreads);
    return npwlu_forward_f32c(x, y, (int)p->dt, p->outer, p->C, p->inner, p->n, p->slopes, p->intercepts, p->bp,
                              p->shift, (int)p->nthreads);
}

/* Folding and gradient epilogue (npwlu_fold.h): the CPU backend's forward_from_params and
 * backward_from_params run them around the kernels above. */
int npwlu_fold_tables_f32(const float *pts, const float *fr, const float *bl, const float *br, const float *kl,
                          const float *kr, int64_t C, int64_t n, double min_width, double min_iw, float *out) {
    npwlu_fold_f(pts, fr, bl, br, kl, kr, C, n, min_width, min_iw, out);
    return PWLU_OK;
}
int npwlu_fold_tables_f64(const double *pts, const double *fr, const double *bl, const double *br, const double *kl,
                          const double *kr, int64_t C, int64_t n, double min_width, double min_iw, double *out) {
    npwlu_fold_d(pts, fr, bl, br, kl, kr, C, n, min_width, min_iw, out);
    return PWLU_OK;
}
int npwlu_param_grads_f32(const double *hist, const float *pts, const float *omega, const float *fr, const float *bl,
                          const float *br, const float *kl, const float *kr, const float *bp, int64_t C, int64_t n,
                          double min_width, double min_iw, float *dp, float *dlog, float *dl, float *dr, float *dkl,
                          float *dkr) {
    double *work = (double *)malloc((size_t)(2 * n + 1) * sizeof(double));
    if (!work) return PWLU_ERR_NOMEM;
    npwlu_grads_f(hist, pts, omega, fr, bl, br, kl, kr, bp, C, n, min_width, min_iw, work, dp, dlog, dl, dr, dkl, dkr);
    free(work);
    return PWLU_OK;
}
int npwlu_param_grads_f64(const double *hist, const double *pts, const double *omega, const double *fr,
                          const double *bl, const double *br, const double *kl, const double *kr, const double *bp,
                          int64_t C, int64_t n, double min_width, double min_iw, double *dp, double *dlog, double *dl,
                          double *dr, double *dkl, double *dkr) {
    double *work = (double *)malloc((size_t)(2 * n + 1) * sizeof(double));
    if (!work) return PWLU_ERR_NOMEM;
    npwlu_grads_d(hist, pts, omega, fr, bl, br, kl, kr, bp, C, n, min_width, min_iw, work, dp, dlog, dl, dr, dkl, dkr);
    free(work);
    return PWLU_OK;
}
