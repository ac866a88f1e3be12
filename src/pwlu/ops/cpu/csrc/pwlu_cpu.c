/* PWLU forward/backward on folded tables: plain C + OpenMP, AVX-512 where the compiler
 * targets it, else AVX2 + FMA + F16C (pwlu_avx2.h) where it targets those. No torch headers:
 * compiled on first use by pwlu/ops/cpu/build.py and called through ctypes with raw pointers.
 * This is the one exported entry file; the kernels are in the headers (pwlu_common.h:
 * constants, dtype access, thread split; pwlu_scalar.h: the portable path;
 * pwlu_avx512_fwd.h / pwlu_avx512_bwd.h; pwlu_avx2.h; pwlu_fold.h: folding and the gradient
 * epilogue). Every exported function returns PWLU_OK or a PWLU_ERR_* code (pwlu_common.h).
 *
 * x is viewed as (outer, C, inner), dense. Per element of channel c (tables have N+2
 * entries per channel, in the compute dtype):
 *   u = (x - left[c]) * inv_d[c]                 (sub, then multiply: bit-exact regions)
 *   i = clamp(floor(u), 0, N-1), NaN -> 0
 *   k = 0 if x < left, N+1 if x >= right, else i + 1
 *   y = slopes[k] * (x - shift[c]) + intercepts[k]   (shift: see folding.fold_tables)
 *       = intercepts[k] where x is +-inf and slopes[k] == 0
 * Backward: dx = g * slopes[k]; hist[c, k] += (g, g * r) with r = x - left (k = 0),
 * x - right (k = N+1), u - i (inner). Each thread owns partial histograms over a static
 * partition of the elements; they are reduced in a fixed order, so the result is
 * bit-identical run to run for a fixed thread count. The AVX-512 paths keep lane-private
 * accumulators (float for at most LANE_TERMS terms per lane, then double); the portable paths
 * scatter each element into double bins (NCOPY copies break store-to-load dependency chains).
 *
 * The drivers: each exported kernel checks its dtype code, picks how the elements are split
 * among the threads (a `pass`), and runs one OpenMP region whose threads call a per-thread
 * function; that function's one `switch (dt)` makes the storage dtype a compile-time constant
 * of the inlined kernels.
 */
#include "pwlu_common.h"
#include "pwlu_scalar.h"
#include "pwlu_avx512_fwd.h"
#include "pwlu_avx512_bwd.h"
#include "pwlu_avx2.h"
#include "pwlu_fold.h"

int pwlu_cpu_abi_version(void) { return PWLU_ABI_VERSION; }
int pwlu_cpu_has_avx512(void) { return PWLU_AVX512; }
int pwlu_cpu_has_avx2(void) { return PWLU_AVX2; }
int pwlu_cpu_has_f16(void) { return PWLU_F16_KERNEL; }
int pwlu_param_summary_f32(const float *const *p, const int64_t *len, int count, const int *pairs, int npairs,
                           float min_width, float *out) {
    return param_summary_f32(p, len, count, pairs, npairs, min_width, out);
}

/* ---- one call's arguments, per compute type ---- */
typedef struct {
    const void *x, *g; /* input, and the gradient of the output (backward) */
    void *out;         /* y (forward) or dx (backward) */
    int dt;
    int64_t outer, C, inner, n;
    const float *sl, *ic, *lo, *hi, *inv, *sh; /* ic, sh: forward only */
} call_f;
typedef struct {
    const void *x, *g;
    void *out;
    int dt;
    int64_t outer, C, inner, n;
    const double *sl, *ic, *lo, *hi, *inv, *sh;
} call_d;

/* How the elements are split among the threads. */
enum {
    PASS_RANGE,    /* the flat element range, row segment by row segment */
    PASS_ROWS,     /* rows of C channels (channels fastest, inner == 1) */
    PASS_CHANNELS, /* channels, each with all its rows (short rows) */
};

static inline int rows_pass(int64_t C, int64_t inner) { return inner == 1 && C > 1; }
static inline int fwd_pass_f(const call_f *a) {
    if (rows_pass(a->C, a->inner)) return PASS_ROWS;
    if (PWLU_AVX512 && a->outer > 1 && a->inner < SHORT_ROW && a->n + 2 <= REG_TABLE) return PASS_CHANNELS;
    return PASS_RANGE;
}
static inline int bwd_pass_f(const call_f *a) {
    if (rows_pass(a->C, a->inner)) return PASS_ROWS;
    /* rows shorter than SHORT_SEG do not amortise the vector histogram's per-segment set-up */
    if (PWLU_AVX512 && a->inner < SHORT_SEG) return PASS_CHANNELS;
    return PASS_RANGE;
}
static inline int scalar_pass(int64_t C, int64_t inner) { return rows_pass(C, inner) ? PASS_ROWS : PASS_RANGE; }

static inline int f32c_dtype_ok(int dt) {
    return dt == PWLU_F32 || dt == PWLU_BF16 || (dt == PWLU_F16 && PWLU_F16_KERNEL);
}

/* ---- per-thread work: part t of nth ---- */
static inline __attribute__((always_inline)) void fwd_work_f(const call_f *a, int pass, int t, int nth, const int dt) {
    int64_t b, e;
    if (pass == PASS_ROWS) {
        split(a->outer, t, nth, 1, &b, &e);
#if PWLU_AVX512
        avx512_fwd_rows(a->x, a->out, b, e, a->C, dt, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
#else
#if PWLU_AVX2
        if (a->n + 2 <= AVX2_TABLE) {
            avx2_fwd_rows(a->x, a->out, b, e, a->C, dt, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
            return;
        }
#endif
        scalar_fwd_rows_f(a->x, a->out, b, e, a->C, dt, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
#endif
        return;
    }
#if PWLU_AVX512
    if (pass == PASS_CHANNELS) {
        split(a->C, t, nth, 1, &b, &e);
        avx512_fwd_channels(a->x, a->out, b, e, a->outer, a->C, a->inner, dt, a->sl, a->ic, a->lo, a->hi, a->inv,
                            a->sh, a->n);
        return;
    }
#endif
    split(a->outer * a->C * a->inner, t, nth, ALIGN_ELEMS, &b, &e);
#if PWLU_AVX512
    avx512_fwd_range(a->x, a->out, b, e, a->inner, a->C, dt, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
#else
#if PWLU_AVX2
    if (a->n + 2 <= AVX2_TABLE) {
        avx2_fwd_range(a->x, a->out, b, e, a->inner, a->C, dt, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
        return;
    }
#endif
    scalar_fwd_range_f(a->x, a->out, b, e, a->inner, a->C, dt, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
#endif
}
static void fwd_thread_f(const void *args, int pass, int t, int nth) {
    const call_f *a = (const call_f *)args;
    switch (a->dt) {
    case PWLU_F32: fwd_work_f(a, pass, t, nth, PWLU_F32); break;
    case PWLU_F16: fwd_work_f(a, pass, t, nth, PWLU_F16); break;
    default: fwd_work_f(a, pass, t, nth, PWLU_BF16); break; /* checked by the caller */
    }
}
static void fwd_thread_d(const void *args, int pass, int t, int nth) {
    const call_d *a = (const call_d *)args;
    int64_t b, e;
    if (pass == PASS_ROWS) {
        split(a->outer, t, nth, 1, &b, &e);
        scalar_fwd_rows_d(a->x, a->out, b, e, a->C, PWLU_F64, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh, a->n);
    } else {
        split(a->outer * a->C * a->inner, t, nth, ALIGN_ELEMS, &b, &e);
        scalar_fwd_range_d(a->x, a->out, b, e, a->inner, a->C, PWLU_F64, a->sl, a->ic, a->lo, a->hi, a->inv, a->sh,
                           a->n);
    }
}

/* h: this thread's histogram (C, N+2, 2), or NCOPY of them hsize doubles apart (scalar paths);
 * with PASS_CHANNELS the shared one, each thread writing only its own channels. */
static inline __attribute__((always_inline)) int bwd_work_f(const call_f *a, int pass, int t, int nth, double *h,
                                                            int64_t hsize, const int dt) {
    int64_t b, e;
    if (pass == PASS_ROWS) {
        split(a->outer, t, nth, 1, &b, &e);
#if PWLU_AVX512
        (void)hsize;
        return avx512_bwd_rows(a->g, a->x, a->out, b, e, a->C, dt, a->sl, a->lo, a->hi, a->inv, a->n, h);
#else
#if PWLU_AVX2
        if (a->n + 2 <= AVX2_TABLE) {
            avx2_bwd_rows(a->g, a->x, a->out, b, e, a->C, dt, a->sl, a->lo, a->hi, a->inv, a->n, h, hsize);
            return PWLU_OK;
        }
#endif
        scalar_bwd_rows_f(a->g, a->x, a->out, b, e, a->C, dt, a->sl, a->lo, a->hi, a->inv, a->n, h, hsize);
        return PWLU_OK;
#endif
    }
#if PWLU_AVX512
    if (pass == PASS_CHANNELS) {
        split(a->C, t, nth, 1, &b, &e);
        avx512_bwd_channels(a->g, a->x, a->out, b, e, a->outer, a->C, a->inner, dt, a->sl, a->lo, a->hi, a->inv,
                            a->n, h);
        return PWLU_OK;
    }
#endif
    split(a->outer * a->C * a->inner, t, nth, ALIGN_ELEMS, &b, &e);
#if PWLU_AVX512
    return avx512_bwd_range(a->g, a->x, a->out, b, e, a->inner, a->C, dt, a->sl, a->lo, a->hi, a->inv, a->n, h);
#else
#if PWLU_AVX2
    if (a->n + 2 <= AVX2_TABLE) {
        avx2_bwd_range(a->g, a->x, a->out, b, e, a->inner, a->C, dt, a->sl, a->lo, a->hi, a->inv, a->n, h, hsize);
        return PWLU_OK;
    }
#endif
    scalar_bwd_range_f(a->g, a->x, a->out, b, e, a->inner, a->C, dt, a->sl, a->lo, a->hi, a->inv, a->n, h, hsize);
    return PWLU_OK;
#endif
}
static int bwd_thread_f(const void *args, int pass, int t, int nth, double *h, int64_t hsize) {
    const call_f *a = (const call_f *)args;
    switch (a->dt) {
    case PWLU_F32: return bwd_work_f(a, pass, t, nth, h, hsize, PWLU_F32);
    case PWLU_F16: return bwd_work_f(a, pass, t, nth, h, hsize, PWLU_F16);
    default: return bwd_work_f(a, pass, t, nth, h, hsize, PWLU_BF16); /* checked by the caller */
    }
}
static int bwd_thread_d(const void *args, int pass, int t, int nth, double *h, int64_t hsize) {
    const call_d *a = (const call_d *)args;
    int64_t b, e;
    if (pass == PASS_ROWS) {
        split(a->outer, t, nth, 1, &b, &e);
        scalar_bwd_rows_d(a->g, a->x, a->out, b, e, a->C, PWLU_F64, a->sl, a->lo, a->hi, a->inv, a->n, h, hsize);
    } else {
        split(a->outer * a->C * a->inner, t, nth, ALIGN_ELEMS, &b, &e);
        scalar_bwd_range_d(a->g, a->x, a->out, b, e, a->inner, a->C, PWLU_F64, a->sl, a->lo, a->hi, a->inv, a->n, h,
                           hsize);
    }
    return PWLU_OK;
}

/* ---- the parallel regions ---- */
typedef void (*fwd_thread_fn)(const void *args, int pass, int t, int nth);
typedef int (*bwd_thread_fn)(const void *args, int pass, int t, int nth, double *h, int64_t hsize);

static int run_forward(fwd_thread_fn work, const void *args, int pass, int nthreads) {
#pragma omp parallel num_threads(clamp_threads(nthreads))
    {
        int t, nth;
        thread_id(&t, &nth);
        work(args, pass, t, nth);
    }
    return PWLU_OK;
}

/* Reduce per-thread, per-copy histograms in a fixed order. */
static void reduce_hist(const double *parts, int nparts, int64_t size, double *out) {
    for (int64_t j = 0; j < size; j++) {
        double s = 0.0;
        for (int p = 0; p < nparts; p++) s += parts[(int64_t)p * size + j];
        out[j] = s;
    }
}

/* hist_out (C, N+2, 2), zeroed by the caller; hsize = C (N+2) 2. A failure inside the region
 * (no memory) is recorded by the failing thread and returned after it. */
static int run_backward(bwd_thread_fn work, const void *args, int pass, int copies, int nthreads, int64_t hsize,
                        double *hist_out) {
    nthreads = clamp_threads(nthreads);
    /* by channel (each thread its own channels), or one thread and one copy: straight into
     * hist_out, no partials */
    const int direct = pass == PASS_CHANNELS || nthreads * copies == 1;
    double *parts = direct ? hist_out : (double *)calloc((size_t)nthreads * copies * hsize, sizeof(double));
    if (!parts) return PWLU_ERR_NOMEM;
    int used = 1, failed = PWLU_OK;
#pragma omp parallel num_threads(nthreads)
    {
        int t, nth;
        thread_id(&t, &nth);
        if (t == 0) used = nth;
        double *h = pass == PASS_CHANNELS ? hist_out : parts + (int64_t)t * copies * hsize;
        const int rc = work(args, pass, t, nth, h, hsize);
        if (rc != PWLU_OK) {
#pragma omp atomic write
            failed = rc;
        }
    }
    if (!direct) {
        if (failed == PWLU_OK) reduce_hist(parts, used * copies, hsize, hist_out);
        free(parts);
    }
    return failed;
}

/* ---- exported kernels on folded tables ---- */
int pwlu_forward_f32c(const void *x, void *y, int dt, int64_t outer, int64_t C, int64_t inner, const float *sl,
                      const float *ic, const float *left, const float *right, const float *invd, const float *shift,
                      int64_t n, int nthreads) {
    if (!f32c_dtype_ok(dt)) return PWLU_ERR_DTYPE;
    if (outer * C * inner == 0) return PWLU_OK;
    const call_f a = {x, NULL, y, dt, outer, C, inner, n, sl, ic, left, right, invd, shift};
    return run_forward(fwd_thread_f, &a, fwd_pass_f(&a), nthreads);
}
int pwlu_forward_f64(const void *x, void *y, int dt, int64_t outer, int64_t C, int64_t inner, const double *sl,
                     const double *ic, const double *left, const double *right, const double *invd,
                     const double *shift, int64_t n, int nthreads) {
    if (dt != PWLU_F64) return PWLU_ERR_DTYPE;
    if (outer * C * inner == 0) return PWLU_OK;
    const call_d a = {x, NULL, y, dt, outer, C, inner, n, sl, ic, left, right, invd, shift};
    return run_forward(fwd_thread_d, &a, scalar_pass(C, inner), nthreads);
}
int pwlu_backward_f32c(const void *gp, const void *x, void *dx, int dt, int64_t outer, int64_t C, int64_t inner,
                       const float *sl, const float *left, const float *right, const float *invd, int64_t n,
                       int nthreads, double *hist_out) {
    if (!f32c_dtype_ok(dt)) return PWLU_ERR_DTYPE;
    if (outer * C * inner == 0) return PWLU_OK;
    const call_f a = {x, gp, dx, dt, outer, C, inner, n, sl, NULL, left, right, invd, NULL};
    return run_backward(bwd_thread_f, &a, bwd_pass_f(&a), F32_COPIES, nthreads, C * (n + 2) * 2, hist_out);
}
int pwlu_backward_f64(const void *gp, const void *x, void *dx, int dt, int64_t outer, int64_t C, int64_t inner,
                      const double *sl, const double *left, const double *right, const double *invd, int64_t n,
                      int nthreads, double *hist_out) {
    if (dt != PWLU_F64) return PWLU_ERR_DTYPE;
    if (outer * C * inner == 0) return PWLU_OK;
    const call_d a = {x, gp, dx, dt, outer, C, inner, n, sl, NULL, left, right, invd, NULL};
    return run_backward(bwd_thread_d, &a, scalar_pass(C, inner), F64_COPIES, nthreads, C * (n + 2) * 2, hist_out);
}

/* ---- folding, and fold + kernel in one call from the raw parameters ----
 * Parameters in channel form, contiguous, in the compute dtype (see pwlu_fold.h). */
int pwlu_fold_f32(const float *pts, const float *bl, const float *br, const float *kl, const float *kr, int64_t C,
                  int64_t n, double min_width, float *out) {
    fold_tables_f(pts, bl, br, kl, kr, C, n, min_width, out);
    return PWLU_OK;
}
int pwlu_fold_f64(const double *pts, const double *bl, const double *br, const double *kl, const double *kr,
                  int64_t C, int64_t n, double min_width, double *out) {
    fold_tables_d(pts, bl, br, kl, kr, C, n, min_width, out);
    return PWLU_OK;
}
/* The fused backward also writes the five parameter gradients (grad_epilogue). FUSED_ENTRIES
 * writes the f32c and f64 twins: T the compute type, SUF the suffix of pwlu_fold.h's functions,
 * KSUF that of the kernels. */
#define FUSED_ENTRIES(T, SUF, KSUF)                                                                          \
    int pwlu_fold_forward_##KSUF(const T *pts, const T *bl, const T *br, const T *kl, const T *kr,           \
                                 double min_width, const void *x, void *y, int dt, int64_t outer, int64_t C, \
                                 int64_t inner, int64_t n, int nthreads) {                                   \
        const int64_t sz = C * (n + 2);                                                                      \
        T *buf = (T *)malloc(sizeof(T) * (size_t)(2 * sz + 4 * C));                                         \
        if (!buf) return PWLU_ERR_NOMEM;                                                                     \
        fold_tables_##SUF(pts, bl, br, kl, kr, C, n, min_width, buf);                                        \
        const T *sl = buf, *ic = buf + sz, *lo = ic + sz, *ro = lo + C, *iv = ro + C, *sh = iv + C;          \
        const int rc = pwlu_forward_##KSUF(x, y, dt, outer, C, inner, sl, ic, lo, ro, iv, sh, n, nthreads);  \
        free(buf);                                                                                           \
        return rc;                                                                                           \
    }                                                                                                        \
    int pwlu_fold_backward_##KSUF(const T *pts, const T *bl, const T *br, const T *kl, const T *kr,          \
                                  double min_width, const void *gp, const void *x, void *dx, int dt,         \
                                  int64_t outer, int64_t C, int64_t inner, int64_t n, int nthreads, T *dp,   \
                                  T *dl, T *dr, T *dkl, T *dkr) {                                            \
        const int64_t sz = C * (n + 2);                                                                      \
        T *buf = (T *)malloc(sizeof(T) * (size_t)(2 * sz + 4 * C));                                          \
        double *hist = (double *)calloc((size_t)(sz * 2), sizeof(double));                                   \
        int rc = PWLU_ERR_NOMEM;                                                                             \
        if (buf && hist) {                                                                                   \
            fold_tables_##SUF(pts, bl, br, kl, kr, C, n, min_width, buf);                                    \
            const T *sl = buf, *lo = buf + 2 * sz, *ro = lo + C, *iv = ro + C;                               \
            rc = pwlu_backward_##KSUF(gp, x, dx, dt, outer, C, inner, sl, lo, ro, iv, n, nthreads, hist);    \
            if (rc == PWLU_OK) grad_epilogue_##SUF(hist, sl, bl, br, kl, kr, C, n, min_width, dp, dl, dr, dkl, dkr); \
        }                                                                                                    \
        free(buf);                                                                                           \
        free(hist);                                                                                          \
        return rc;                                                                                           \
    }
FUSED_ENTRIES(float, f, f32c)
FUSED_ENTRIES(double, d, f64)

/* A forward whose arguments were prepared once (pwlu.ops.cpu.plan.InferencePlan): three
 * arguments per call instead of fourteen, for the many small calls of a model's inference.
 * The five parameter tensors are compared byte for byte with the snapshot the tables were
 * folded from; on any difference nothing is computed and PWLU_PLAN_STALE is returned (the
 * caller rebuilds the plan), so the tables can never be stale, whatever wrote to the
 * parameters. Otherwise: the forward's return code. */
typedef struct {
    int64_t dt, outer, C, inner, n, nthreads;
    const void *sl, *ic, *lo, *ro, *iv, *sh;
    const void *live[5], *snap[5];
    int64_t bytes[5];
} pwlu_plan;
int pwlu_forward_plan(const pwlu_plan *p, const void *x, void *y) {
    if (plan_stale(p->live, p->snap, p->bytes, 5)) return PWLU_PLAN_STALE;
    if (p->dt == PWLU_F64)
        return pwlu_forward_f64(x, y, (int)p->dt, p->outer, p->C, p->inner, p->sl, p->ic, p->lo, p->ro, p->iv, p->sh,
                                p->n, (int)p->nthreads);
    return pwlu_forward_f32c(x, y, (int)p->dt, p->outer, p->C, p->inner, p->sl, p->ic, p->lo, p->ro, p->iv, p->sh,
                             p->n, (int)p->nthreads);
}
