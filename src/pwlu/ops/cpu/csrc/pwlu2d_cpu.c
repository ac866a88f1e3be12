/* 2-D PWLU (SPEC section 10) on the CPU: forward and backward of z = F(x, y), the learnable
 * merge of two branches. Python side: pwlu/ops/pwlu2d_cpu_backend.py (library "pwlu2d_cpu").
 *
 * Layout: x, y, g, z, dx, dy are dense (outer, C, inner) buffers (C = 1, inner = numel
 * layer-wise). Per channel c: values[c] is (N+1, N+1) and geo[c] the packed geometry of
 * pwlu/ops/pwlu2d_grads.py: (X_L, X_R, 1/dx, Y_L, Y_R, 1/dy, K_XL, K_XR, K_YL, K_YR), the
 * right bounds effective (minimum width applied). float32/float16/bfloat16 compute in float,
 * float64 in double.
 *
 * The backward writes dx and dy and, in double, the per-cell, per-triangle histogram
 * hist[C][N][N][2][3] = (sum g, sum g s, sum g t) and the 12 per-channel sums of
 * pwlu2d_grads.py; every thread fills its own copy, summed at the end (no atomics).
 */
#include "pwlu_common.h"

/* No floating-point traps are ever enabled here: without this, gcc keeps the branch-free
 * selects below as control flow and does not vectorise the loops (results are unchanged). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

int pwlu2d_cpu_abi_version(void) { return PWLU_ABI_VERSION; }
int pwlu2d_cpu_has_f16(void) { return PWLU_F16_KERNEL; }
int pwlu2d_param_summary_f32(const float *const *p, const int64_t *len, int count, const int *pairs, int npairs,
                             float min_width, float *out) {
    return param_summary_f32(p, len, count, pairs, npairs, min_width, out);
}

/* One element's position on one axis, branch-free (the loops vectorise): u in [0, N] (0 left
 * of the range, N right of it), the cell index (0 for NaN: NaN > 0 is false) and u - index. */
static inline float locate_f(float a, float lo, float hi, float inv, int n, int *index, float *frac, int *left,
                             int *right) {
    *left = a < lo;
    *right = a >= hi;
    float u = (a - lo) * inv;
    u = *left ? 0.0f : u;
    u = *right ? (float)n : u;
    float fi = floorf(u);
    fi = fi > 0.0f ? fi : 0.0f;
    fi = fi < (float)(n - 1) ? fi : (float)(n - 1);
    *index = (int)fi;
    *frac = u - fi;
    return u;
}
static inline double locate_d(double a, double lo, double hi, double inv, int n, int *index, double *frac, int *left,
                              int *right) {
    *left = a < lo;
    *right = a >= hi;
    double u = (a - lo) * inv;
    u = *left ? 0.0 : u;
    u = *right ? (double)n : u;
    double fi = floor(u);
    fi = fi > 0.0 ? fi : 0.0;
    fi = fi < (double)(n - 1) ? fi : (double)(n - 1);
    *index = (int)fi;
    *frac = u - fi;
    return u;
}

/* histogram copies per channel and thread in the backward's vector path (see alloc_partials) */
#define HIST_COPIES 2

/* ------------------------------------------------------------------------------ forward */

/* One channel's geometry in locals (loads outside the loops; selects between locals vectorise). */
typedef struct {
    float xl, xr, ix, yl, yr, iy, kxl, kxr, kyl, kyr;
} geo_f;
typedef struct {
    double xl, xr, ix, yl, yr, iy, kxl, kxr, kyl, kyr;
} geo_d;
static inline geo_f geo_load_f(const float *g) {
    const geo_f r = {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9]};
    return r;
}
static inline geo_d geo_load_d(const double *g) {
    const geo_d r = {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9]};
    return r;
}

/* z = V[i,j] + s a + t b + the outer terms; a = dF/ds, b = dF/dt of the triangle (lower: s >= t,
 * vertices V[i,j], V[i+1,j], V[i+1,j+1]; upper: V[i,j], V[i,j+1], V[i+1,j+1]). */
static inline float forward_f(float x, float y, const float *restrict v, const geo_f g, int n) {
    int i, j, xl, xr, yl, yr;
    float s, t;
    locate_f(x, g.xl, g.xr, g.ix, n, &i, &s, &xl, &xr);
    locate_f(y, g.yl, g.yr, g.iy, n, &j, &t, &yl, &yr);
    const int lower = s >= t, base = i * (n + 1) + j;
    const float v00 = v[base], v11 = v[base + n + 2], vm = v[base + 1 + lower * n];
    const float a = lower ? vm - v00 : v11 - vm, b = lower ? v11 - vm : vm - v00;
    /* K (x - B) on the selected outer side; a flat piece maps ±inf to 0 (not inf * 0 = NaN) */
    const float kx = xl ? g.kxl : g.kxr, bx = xl ? g.xl : g.xr;
    const float ky = yl ? g.kyl : g.kyr, by = yl ? g.yl : g.yr;
    const float ox = ((xl | xr) & (kx != 0.0f)) ? kx * (x - bx) : 0.0f;
    const float oy = ((yl | yr) & (ky != 0.0f)) ? ky * (y - by) : 0.0f;
    return v00 + s * a + t * b + ox + oy;
}
static inline double forward_d(double x, double y, const double *restrict v, const geo_d g, int n) {
    int i, j, xl, xr, yl, yr;
    double s, t;
    locate_d(x, g.xl, g.xr, g.ix, n, &i, &s, &xl, &xr);
    locate_d(y, g.yl, g.yr, g.iy, n, &j, &t, &yl, &yr);
    const int lower = s >= t, base = i * (n + 1) + j;
    const double v00 = v[base], v11 = v[base + n + 2], vm = v[base + 1 + lower * n];
    const double a = lower ? vm - v00 : v11 - vm, b = lower ? v11 - vm : vm - v00;
    const double kx = xl ? g.kxl : g.kxr, bx = xl ? g.xl : g.xr;
    const double ky = yl ? g.kyl : g.kyr, by = yl ? g.yl : g.yr;
    const double ox = ((xl | xr) & (kx != 0.0)) ? kx * (x - bx) : 0.0;
    const double oy = ((yl | yr) & (ky != 0.0)) ? ky * (y - by) : 0.0;
    return v00 + s * a + t * b + ox + oy;
}

/* One row segment of the float32 forward (restrict: the loop vectorises, with gathers). */
__attribute__((noinline)) static void forward_seg_f32(const float *restrict x, const float *restrict y, float *restrict z, int64_t len,
                            const float *restrict v, const float *geo, int n) {
    const geo_f g = geo_load_f(geo);
    for (int64_t e = 0; e < len; e++) z[e] = forward_f(x[e], y[e], v, g, n);
}
__attribute__((noinline)) static void forward_seg_f64(const double *restrict x, const double *restrict y, double *restrict z, int64_t len,
                            const double *restrict v, const double *geo, int n) {
    const geo_d g = geo_load_d(geo);
    for (int64_t e = 0; e < len; e++) z[e] = forward_d(x[e], y[e], v, g, n);
}

#if PWLU_AVX512
/* ---- AVX-512 forward and backward for N <= 8: the N^2 <= 64 cells' tables in registers ----
 * Four tables of 64 floats by cell i N + j, four zmm each; a lookup is two vpermt2ps (cells
 * 0-31, 32-63) and a blend: no gathers. */
#define LUT_MAX_N 8
#define KUHN_FLOATS 256 /* floats of one channel's tables: 4 x 64 cells */
#define LUT_MIN_SEG 16 /* shorter row segments (channels fastest: one element) go the scalar way */
#define LUT_MIN_CHAN 64 /* elements per channel below which no tables are built */
#define TILE_ROWS 256   /* channels fastest: rows per block copied into channel-major scratch */

typedef struct {
    __m512 t[4][4];
} cell_tables;

/* The tables, by cell i N + j: V[i,j] and the differences D10 = V[i+1,j] - V[i,j],
 * D01 = V[i,j+1] - V[i,j], D11 = V[i+1,j+1] - V[i,j], so that on either triangle
 * F = V00 + D10 max(s - t, 0) + D01 max(t - s, 0) + D11 min(s, t) (the forward selects no triangle). */
static void kuhn_fill(const float *v, int n, float *out) {
    memset(out, 0, KUHN_FLOATS * sizeof(float));
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            const int cell = i * n + j, base = i * (n + 1) + j;
            const float v00 = v[base];
            out[cell] = v00;
            out[64 + cell] = v[base + n + 1] - v00;
            out[128 + cell] = v[base + 1] - v00;
            out[192 + cell] = v[base + n + 2] - v00;
        }
}
static inline void kuhn_tables_load(const float *t, cell_tables *ct) {
    for (int k = 0; k < 4; k++)
        for (int q = 0; q < 4; q++) ct->t[k][q] = _mm512_loadu_ps(t + 64 * k + 16 * q);
}

/* u = (clamp(a) - lo) / width * N on one axis (N exactly right of the range, NaN stays NaN), its
 * cell index as float (clamped to N - 1; NaN gives N - 1), a - lo, and the lanes outside the
 * range (a < lo or a >= hi; not NaN). */
PWLU_INLINE __m512 grid16(__m512 a, __m512 lo, __m512 hi, __m512 inv, __m512 nf, __m512 nm1, __m512 *fi, __m512 *dl,
                          __mmask16 *out) {
    *dl = _mm512_sub_ps(a, lo);
    __m512 u = _mm512_max_ps(_mm512_setzero_ps(), _mm512_mul_ps(*dl, inv)); /* NaN: the second operand */
    const __mmask16 right = _mm512_cmp_ps_mask(a, hi, _CMP_GE_OQ);
    *out = right | _mm512_cmp_ps_mask(a, lo, _CMP_LT_OQ);
    u = _mm512_mask_mov_ps(u, right, nf);
    *fi = _mm512_min_ps(_mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), nm1);
    return u;
}

/* The constants of one channel's forward: its geometry broadcast, and the masks of its nonzero outer slopes. */
typedef struct {
    __m512 xlo, xhi, ix, ylo, yhi, iy, kxl, kxr, kyl, kyr, nf, nm1;
    __mmask16 mxl, mxr, myl, myr;
} fwd_consts;

/* 16 elements from k (fewer at the segment's end e); returns whether a lane lies outside the grid.
 * The outer terms K min(a - lo, 0) and K max(a - hi, 0) are skipped (not multiplied) where K = 0, so a
 * flat piece maps ±inf to 0; NaN reaches them (min/max return their second operand for NaN). With
 * branchy, they are computed only where some lane is outside (a NaN stays NaN through s or t). */
PWLU_INLINE int forward16(const void *x, const void *y, void *z, const int dt, int64_t k, int64_t e,
                          const cell_tables *ct, const fwd_consts *f, const int branchy) {
    const __m512 zero = _mm512_setzero_ps();
    const __mmask16 m = tail_mask(e - k);
    const __m512 xv = ld16(x, k, m, dt), yv = ld16(y, k, m, dt);
    __m512 fi, fj, dxl, dyl;
    __mmask16 ox, oy;
    const __m512 u = grid16(xv, f->xlo, f->xhi, f->ix, f->nf, f->nm1, &fi, &dxl, &ox);
    const __m512 w = grid16(yv, f->ylo, f->yhi, f->iy, f->nf, f->nm1, &fj, &dyl, &oy);
    const __m512 s = _mm512_sub_ps(u, fi), t = _mm512_sub_ps(w, fj);
    const __m512i cell = _mm512_cvttps_epi32(_mm512_fmadd_ps(fi, f->nf, fj)); /* exact: small integers */
    const __mmask16 upper_half = _mm512_test_epi32_mask(cell, _mm512_set1_epi32(32));
    __m512 lk[4];
    for (int q = 0; q < 4; q++)
        lk[q] = _mm512_mask_blend_ps(upper_half, _mm512_permutex2var_ps(ct->t[q][0], cell, ct->t[q][1]),
                                     _mm512_permutex2var_ps(ct->t[q][2], cell, ct->t[q][3]));
    const __m512 d = _mm512_sub_ps(s, t), p = _mm512_max_ps(zero, d);
    __m512 zv = _mm512_fmadd_ps(lk[1], p, lk[0]);
    zv = _mm512_fmadd_ps(lk[2], _mm512_sub_ps(p, d), zv); /* max(t - s, 0) */
    zv = _mm512_fmadd_ps(lk[3], _mm512_min_ps(s, t), zv);
    const int outside = (ox | oy) != 0;
    if (!branchy || __builtin_expect(outside, 0)) {
        zv = _mm512_mask3_fmadd_ps(f->kxl, _mm512_min_ps(zero, dxl), zv, f->mxl);
        zv = _mm512_mask3_fmadd_ps(f->kxr, _mm512_max_ps(zero, _mm512_sub_ps(xv, f->xhi)), zv, f->mxr);
        zv = _mm512_mask3_fmadd_ps(f->kyl, _mm512_min_ps(zero, dyl), zv, f->myl);
        zv = _mm512_mask3_fmadd_ps(f->kyr, _mm512_max_ps(zero, _mm512_sub_ps(yv, f->yhi)), zv, f->myr);
    }
    st16(z, k, zv, m, dt);
    return outside;
}

#define FWD_WINDOW 32 /* vectors per window of the adaptive loop */

/* The adaptive loop's state, kept by each thread across its row segments (short rows, such as
 * 14x14 maps or the 256-row tiles of the channels-fastest path, fill a window over several). */
typedef struct {
    int branchy, vecs, hits, window;
} fwd_mode;
static inline void fwd_mode_init(fwd_mode *s) {
    s->branchy = 1;
    s->vecs = s->hits = s->window = 0;
}

/* One row segment of channel c, N <= LUT_MAX_N; dt a constant in each instantiation. In windows
 * of FWD_WINDOW vectors: the next window branches around the outer terms where at most 1 in 4
 * vectors of the last measured window had a lane outside the grid (inputs mostly inside: up to
 * 12% less time), and computes them in every vector otherwise (a branch taken at random costs
 * more than it saves: 12-16% more time with 78% of vectors outside, interleaved A/B at
 * 32x64x56x56); branch-free, it measures again every 4th window. */
PWLU_INLINE void forward_seg_lut_dt(const void *x, const void *y, void *z, const int dt, int64_t b, int64_t e,
                                    const cell_tables *ct, const float *geo, int n, fwd_mode *s) {
    fwd_consts f;
    f.xlo = _mm512_set1_ps(geo[0]), f.xhi = _mm512_set1_ps(geo[1]), f.ix = _mm512_set1_ps(geo[2]);
    f.ylo = _mm512_set1_ps(geo[3]), f.yhi = _mm512_set1_ps(geo[4]), f.iy = _mm512_set1_ps(geo[5]);
    f.kxl = _mm512_set1_ps(geo[6]), f.kxr = _mm512_set1_ps(geo[7]);
    f.kyl = _mm512_set1_ps(geo[8]), f.kyr = _mm512_set1_ps(geo[9]);
    f.mxl = geo[6] != 0.0f ? 0xFFFF : 0, f.mxr = geo[7] != 0.0f ? 0xFFFF : 0;
    f.myl = geo[8] != 0.0f ? 0xFFFF : 0, f.myr = geo[9] != 0.0f ? 0xFFFF : 0;
    f.nf = _mm512_set1_ps((float)n), f.nm1 = _mm512_set1_ps((float)(n - 1));
    for (int64_t k = b; k < e;) {
        const int64_t room = (int64_t)(FWD_WINDOW - s->vecs) * 16, k0 = k;
        const int64_t end = e - k > room ? k + room : e;
        const int counting = s->branchy || s->window % 4 == 0;
        int hits = 0;
        if (s->branchy) {
            for (; k < end; k += 16) hits += forward16(x, y, z, dt, k, e, ct, &f, 1);
        } else if (counting) {
            for (; k < end; k += 16) hits += forward16(x, y, z, dt, k, e, ct, &f, 0);
        } else {
            for (; k < end; k += 16) (void)forward16(x, y, z, dt, k, e, ct, &f, 0);
        }
        s->hits += hits;
        s->vecs += (int)((end - k0 + 15) / 16);
        if (s->vecs >= FWD_WINDOW) {
            if (counting) s->branchy = s->hits * 4 <= FWD_WINDOW;
            s->vecs = s->hits = 0;
            s->window++;
        }
    }
}

static void forward_seg_lut(const void *x, const void *y, void *z, int dt, int64_t b, int64_t e,
                            const cell_tables *ct, const float *geo, int n, fwd_mode *mode) {
    switch (dt) {
    case PWLU_F32: forward_seg_lut_dt(x, y, z, PWLU_F32, b, e, ct, geo, n, mode); break;
    case PWLU_F16: forward_seg_lut_dt(x, y, z, PWLU_F16, b, e, ct, geo, n, mode); break;
    default: forward_seg_lut_dt(x, y, z, PWLU_BF16, b, e, ct, geo, n, mode);
    }
}

/* Rows r0 .. r0 + nr - 1 x channels c0 .. c0 + nc - 1 of a (rows, C) tensor into channel-major
 * float32 scratch (channel j at b + j * R), by 16 x 16 in-register transposes; the rest
 * (nc < 16, a row tail) element by element. */
static void rows_to_channels(const void *src, float *b, int64_t r0, int64_t nr, int64_t c0, int nc, int64_t C,
                             int dt, int64_t R) {
    int64_t r = 0;
    if (nc == 16)
        for (; r + 16 <= nr; r += 16) {
            __m512 v[16];
            /* the next tile's lines: 16 streams at a stride of C elements defeat the prefetcher */
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) _mm_prefetch(elem_ptr(src, (r0 + r + 16 + i) * C + c0, dt), _MM_HINT_T0);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) v[i] = ld16(src, (r0 + r + i) * C + c0, (__mmask16)0xFFFF, dt);
            transpose16(v);
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) _mm512_storeu_ps(b + j * R + r, v[j]);
        }
    for (; r < nr; r++)
        for (int j = 0; j < nc; j++) b[j * R + r] = load_s(src, (r0 + r) * C + c0 + j, dt);
}
static void channels_to_rows(const float *b, void *dst, int64_t r0, int64_t nr, int64_t c0, int nc, int64_t C,
                             int dt, int64_t R) {
    int64_t r = 0;
    if (nc == 16)
        for (; r + 16 <= nr; r += 16) {
            __m512 v[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) v[j] = _mm512_loadu_ps(b + j * R + r);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) _mm_prefetch(elem_ptr(dst, (r0 + r + 16 + i) * C + c0, dt), _MM_HINT_ET0);
            transpose16(v);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) st16(dst, (r0 + r + i) * C + c0, v[i], (__mmask16)0xFFFF, dt);
        }
    for (; r < nr; r++)
        for (int j = 0; j < nc; j++) store_s(dst, (r0 + r) * C + c0 + j, b[j * R + r], dt);
}
/* Channels fastest, rows [rb, re): channel block by channel block, chunks of TILE_ROWS rows of x
 * and y copied into channel-major float32 scratch, forward_seg_lut per channel there (its tables
 * in registers: no gathers), z copied back (see backward_rows_lut). PWLU_OK or PWLU_ERR_NOMEM. */
static int forward_rows_lut(const void *x, const void *y, void *z, int dt, int64_t rb, int64_t re, int64_t C,
                            const float *tabs, const float *geometry, int n) {
    const int64_t R = TILE_ROWS;
    float *buf = (float *)aligned_alloc(64, (size_t)(3 * 16 * R) * sizeof(float));
    if (!buf) return PWLU_ERR_NOMEM;
    float *bx = buf, *by = bx + 16 * R, *bz = by + 16 * R;
    fwd_mode mode;
    fwd_mode_init(&mode);
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int nc = C - c0 < 16 ? (int)(C - c0) : 16;
        for (int64_t r0 = rb; r0 < re; r0 += R) {
            const int64_t nr = re - r0 < R ? re - r0 : R;
            rows_to_channels(x, bx, r0, nr, c0, nc, C, dt, R);
            rows_to_channels(y, by, r0, nr, c0, nc, C, dt, R);
            for (int j = 0; j < nc; j++) {
                cell_tables ct;
                kuhn_tables_load(tabs + (c0 + j) * KUHN_FLOATS, &ct);
                forward_seg_lut(bx + j * R, by + j * R, bz + j * R, PWLU_F32, 0, nr, &ct, geometry + (c0 + j) * 10, n,
                                &mode);
            }
            channels_to_rows(bz, z, r0, nr, c0, nc, C, dt, R);
        }
    }
    free(buf);
    return PWLU_OK;
}
#endif /* PWLU_AVX512 */

/* The vector path's tables of all C channels (KUHN_FLOATS each), built once per call (or once
 * per inference plan): the number of floats they take on this build for N and an (outer, C,
 * inner) tensor (0: no vector path: rows shorter than LUT_MIN_SEG, or fewer than LUT_MIN_CHAN
 * elements per channel, for which building a channel's tables costs more than it saves), and
 * the tables themselves. */
int64_t pwlu2d_tables_size(int64_t outer, int64_t C, int64_t inner, int n) {
#if PWLU_AVX512
    const int rows = inner == 1 && C >= LUT_MIN_SEG && outer >= LUT_MIN_CHAN; /* channels fastest */
    const int segs = inner >= LUT_MIN_SEG && outer * inner >= LUT_MIN_CHAN;
    return n <= LUT_MAX_N && (rows || segs) ? C * KUHN_FLOATS : 0;
#else
    (void)outer, (void)C, (void)inner, (void)n;
    return 0;
#endif
}
int pwlu2d_tables(const float *values, int64_t C, int n, float *out) {
#if PWLU_AVX512
    const int64_t vsize = (int64_t)(n + 1) * (n + 1);
    if (n > LUT_MAX_N) return PWLU_ERR_SHAPE;
    for (int64_t c = 0; c < C; c++) kuhn_fill(values + c * vsize, n, out + c * KUHN_FLOATS);
    return PWLU_OK;
#else
    (void)values, (void)C, (void)n, (void)out;
    return PWLU_ERR_SHAPE;
#endif
}

/* Forward, float compute: dt is the storage dtype of x, y and z (F32, F16 or BF16); tabs the
 * tables of pwlu2d_tables, or NULL (the scalar loop). */
static int forward_f32c_tabs(const void *x, const void *y, void *z, int dt, int64_t outer, int64_t C, int64_t inner,
                             const float *values, const float *geometry, int n, int nthreads, const float *tabs) {
    if (dt != PWLU_F32 && dt != PWLU_BF16 && !(dt == PWLU_F16 && PWLU_F16_KERNEL)) return PWLU_ERR_DTYPE;
    const int64_t total = outer * C * inner, vsize = (int64_t)(n + 1) * (n + 1);
#if PWLU_AVX512
    if (tabs && inner == 1) { /* channels fastest: blocks of rows x 16 channels, transposed */
        int rc = PWLU_OK;
#pragma omp parallel num_threads(clamp_threads(nthreads))
        {
            int th, nth;
            thread_id(&th, &nth);
            int64_t rb, re;
            split(outer, th, nth, 1, &rb, &re);
            if (rb < re && forward_rows_lut(x, y, z, dt, rb, re, C, tabs, geometry, n) != PWLU_OK) {
#pragma omp atomic write
                rc = PWLU_ERR_NOMEM;
            }
        }
        return rc;
    }
#endif
#pragma omp parallel num_threads(clamp_threads(nthreads))
    {
        int th, nth;
        thread_id(&th, &nth);
        int64_t pb, pe;
        split(total, th, nth, ALIGN_ELEMS, &pb, &pe);
        if (pb < pe) {
#if PWLU_AVX512
            fwd_mode mode;
            fwd_mode_init(&mode);
#endif
            for (seg_iter sg = seg_first(pb, pe, inner, C); sg.b < pe; seg_next(&sg, pe, inner, C)) {
                const float *v = values + sg.c * vsize, *geo = geometry + sg.c * 10;
#if PWLU_AVX512
                if (tabs && sg.e - sg.b >= LUT_MIN_SEG) {
                    cell_tables ct;
                    kuhn_tables_load(tabs + sg.c * KUHN_FLOATS, &ct);
                    forward_seg_lut(x, y, z, dt, sg.b, sg.e, &ct, geo, n, &mode);
                    continue;
                }
#endif
                if (dt == PWLU_F32) {
                    forward_seg_f32((const float *)x + sg.b, (const float *)y + sg.b, (float *)z + sg.b, sg.e - sg.b,
                                    v, geo, n);
                } else {
                    const geo_f gf = geo_load_f(geo);
                    for (int64_t e = sg.b; e < sg.e; e++)
                        store_s(z, e, forward_f(load_s(x, e, dt), load_s(y, e, dt), v, gf, n), dt);
                }
            }
        }
    }
    return PWLU_OK;
}

/* Tables of every channel for this call (NULL where the vector path does not apply); *rc is
 * PWLU_ERR_NOMEM when they could not be allocated. */
static float *call_tables(const float *values, int64_t outer, int64_t C, int64_t inner, int n, int *rc) {
    const int64_t size = pwlu2d_tables_size(outer, C, inner, n);
    *rc = PWLU_OK;
    if (size == 0) return NULL;
    float *tabs = (float *)aligned_alloc(64, (size_t)size * sizeof(float));
    if (!tabs) *rc = PWLU_ERR_NOMEM;
    else pwlu2d_tables(values, C, n, tabs);
    return tabs;
}

int pwlu2d_forward_f32c(const void *x, const void *y, void *z, int dt, int64_t outer, int64_t C, int64_t inner,
                        const float *values, const float *geometry, int n, int nthreads) {
    int rc;
    float *tabs = call_tables(values, outer, C, inner, n, &rc);
    if (rc == PWLU_OK) rc = forward_f32c_tabs(x, y, z, dt, outer, C, inner, values, geometry, n, nthreads, tabs);
    free(tabs);
    return rc;
}

int pwlu2d_forward_f64(const double *x, const double *y, double *z, int64_t outer, int64_t C, int64_t inner,
                       const double *values, const double *geometry, int n, int nthreads) {
    const int64_t total = outer * C * inner, vsize = (int64_t)(n + 1) * (n + 1);
#pragma omp parallel num_threads(clamp_threads(nthreads))
    {
        int th, nth;
        thread_id(&th, &nth);
        int64_t pb, pe;
        split(total, th, nth, ALIGN_ELEMS, &pb, &pe);
        if (pb < pe) {
            for (seg_iter sg = seg_first(pb, pe, inner, C); sg.b < pe; seg_next(&sg, pe, inner, C)) {
                const double *v = values + sg.c * vsize, *geo = geometry + sg.c * 10;
                forward_seg_f64(x + sg.b, y + sg.b, z + sg.b, sg.e - sg.b, v, geo, n);
            }
        }
    }
    return PWLU_OK;
}

/* An inference plan (pwlu.ops.pwlu2d_cpu_backend.make_plan): the kernel arguments besides x, y
 * and z, and the nine parameter tensors with the snapshots their values and geometry were made
 * from, compared byte for byte before every call (an optimizer step or a write through .data
 * makes the call return PWLU_PLAN_STALE, nothing computed). */
typedef struct {
    int64_t dt, outer, C, inner, n, nthreads;
    const void *values, *geometry, *tables; /* tables: pwlu2d_tables, or NULL */
    const void *live[9], *snap[9];
    int64_t bytes[9];
} pwlu2d_plan;
int pwlu2d_forward_plan(const pwlu2d_plan *p, const void *x, const void *y, void *z) {
    if (plan_stale(p->live, p->snap, p->bytes, 9)) return PWLU_PLAN_STALE;
    if (p->dt == PWLU_F64)
        return pwlu2d_forward_f64(x, y, z, p->outer, p->C, p->inner, p->values, p->geometry, (int)p->n,
                                  (int)p->nthreads);
    return forward_f32c_tabs(x, y, z, (int)p->dt, p->outer, p->C, p->inner, p->values, p->geometry, (int)p->n,
                             (int)p->nthreads, p->tables);
}

/* ----------------------------------------------------------------------------- backward */

/* One element of the backward: writes dx, dy; adds into the channel's histogram h
 * ([N][N][2][HQ], HQ = 4: (g, g s, g t) and a pad, so that the AVX-512 path adds a bin as one
 * 4-double vector) and sums s12 (12 accumulators, see pwlu2d_grads.py). */
#define HQ 4
static inline void backward_f(float g, float x, float y, const float *v, const float *geo, int n, float *dx, float *dy,
                              double *h, double *s12) {
    int i, j, xl, xr, yl, yr;
    float s, t;
    const float u = locate_f(x, geo[0], geo[1], geo[2], n, &i, &s, &xl, &xr);
    const float w = locate_f(y, geo[3], geo[4], geo[5], n, &j, &t, &yl, &yr);
    const int lower = s >= t, base = i * (n + 1) + j;
    const float v00 = v[base], v11 = v[base + n + 2], vm = v[base + (lower ? n + 1 : 1)];
    const float a = lower ? vm - v00 : v11 - vm, b = lower ? v11 - vm : vm - v00;
    /* dz/dx: K_XL or K_XR outside the range, the triangle's slope a / dx inside */
    *dx = g * (xl ? geo[6] : (xr ? geo[7] : a * geo[2]));
    *dy = g * (yl ? geo[8] : (yr ? geo[9] : b * geo[5]));
    double *cell = h + ((int64_t)(i * n + j) * 2 + !lower) * HQ;
    cell[0] += g;
    cell[1] += g * s;
    cell[2] += g * t;
    if (xl) {
        s12[0] += g;
        s12[1] += g * (x - geo[0]);
    } else if (xr) {
        s12[2] += g;
        s12[3] += g * (x - geo[1]);
    } else {
        s12[8] += g * a;
        s12[9] += g * a * u;
    }
    if (yl) {
        s12[4] += g;
        s12[5] += g * (y - geo[3]);
    } else if (yr) {
        s12[6] += g;
        s12[7] += g * (y - geo[4]);
    } else {
        s12[10] += g * b;
        s12[11] += g * b * w;
    }
}
static inline void backward_d(double g, double x, double y, const double *v, const double *geo, int n, double *dx,
                              double *dy, double *h, double *s12) {
    int i, j, xl, xr, yl, yr;
    double s, t;
    const double u = locate_d(x, geo[0], geo[1], geo[2], n, &i, &s, &xl, &xr);
    const double w = locate_d(y, geo[3], geo[4], geo[5], n, &j, &t, &yl, &yr);
    const int lower = s >= t, base = i * (n + 1) + j;
    const double v00 = v[base], v11 = v[base + n + 2], vm = v[base + (lower ? n + 1 : 1)];
    const double a = lower ? vm - v00 : v11 - vm, b = lower ? v11 - vm : vm - v00;
    *dx = g * (xl ? geo[6] : (xr ? geo[7] : a * geo[2]));
    *dy = g * (yl ? geo[8] : (yr ? geo[9] : b * geo[5]));
    double *cell = h + ((int64_t)(i * n + j) * 2 + !lower) * HQ;
    cell[0] += g;
    cell[1] += g * s;
    cell[2] += g * t;
    if (xl) {
        s12[0] += g;
        s12[1] += g * (x - geo[0]);
    } else if (xr) {
        s12[2] += g;
        s12[3] += g * (x - geo[1]);
    } else {
        s12[8] += g * a;
        s12[9] += g * a * u;
    }
    if (yl) {
        s12[4] += g;
        s12[5] += g * (y - geo[3]);
    } else if (yr) {
        s12[6] += g;
        s12[7] += g * (y - geo[4]);
    } else {
        s12[10] += g * b;
        s12[11] += g * b * w;
    }
}

/* The float32 backward in blocks of BWD_BLOCK elements: a vector pass (below) writes dx, dy and
 * each element's histogram bin, g s and g t, and adds the 12 sums into lane-private float
 * accumulators; a scalar pass adds (g, g s, g t) into the double histogram. */
#define BWD_BLOCK 256
#define LANES 16

__attribute__((noinline)) static void backward_block_f32(const float *restrict gp, const float *restrict xp,
                                                         const float *restrict yp, float *restrict dxp,
                                                         float *restrict dyp, int64_t len, const float *restrict v,
                                                         const float *geo, int n, int32_t *restrict bin,
                                                         float *restrict gs, float *restrict gt,
                                                         float (*restrict acc)[LANES]) {
    const geo_f G = geo_load_f(geo);
    for (int64_t k0 = 0; k0 < len; k0 += LANES) {
        for (int l = 0; l < LANES; l++) {
            const int64_t e = k0 + l;
            const float g = gp[e], x = xp[e], y = yp[e];
            int i, j, xl, xr, yl, yr;
            float s, t;
            const float u = locate_f(x, G.xl, G.xr, G.ix, n, &i, &s, &xl, &xr);
            const float w = locate_f(y, G.yl, G.yr, G.iy, n, &j, &t, &yl, &yr);
            const int lower = s >= t, base = i * (n + 1) + j;
            const float v00 = v[base], v11 = v[base + n + 2], vm = v[base + 1 + lower * n];
            const float a = lower ? vm - v00 : v11 - vm, b = lower ? v11 - vm : vm - v00;
            /* dz/dx: K_XL or K_XR outside the range, the triangle's slope a / dx inside */
            dxp[e] = g * (xl ? G.kxl : (xr ? G.kxr : a * G.ix));
            dyp[e] = g * (yl ? G.kyl : (yr ? G.kyr : b * G.iy));
            bin[e] = (i * n + j) * 2 + 1 - lower;
            gs[e] = g * s;
            gt[e] = g * t;
            const int xin = !(xl | xr), yin = !(yl | yr);
            acc[0][l] += xl ? g : 0.0f;
            acc[1][l] += xl ? g * (x - G.xl) : 0.0f;
            acc[2][l] += xr ? g : 0.0f;
            acc[3][l] += xr ? g * (x - G.xr) : 0.0f;
            acc[4][l] += yl ? g : 0.0f;
            acc[5][l] += yl ? g * (y - G.yl) : 0.0f;
            acc[6][l] += yr ? g : 0.0f;
            acc[7][l] += yr ? g * (y - G.yr) : 0.0f;
            acc[8][l] += xin ? g * a : 0.0f;
            acc[9][l] += xin ? g * a * u : 0.0f;
            acc[10][l] += yin ? g * b : 0.0f;
            acc[11][l] += yin ? g * b * w : 0.0f;
        }
    }
}

/* One row segment of channel c, float32 storage: blocks through the vector pass, the rest
 * (fewer than LANES elements) through the scalar backward_f. */
static void backward_seg_f32(const float *g, const float *x, const float *y, float *dx, float *dy, int64_t len,
                             const float *v, const float *geo, int n, double *h, double *s12) {
    int32_t bin[BWD_BLOCK];
    float gs[BWD_BLOCK], gt[BWD_BLOCK], acc[12][LANES];
    for (int64_t b0 = 0; b0 < len; b0 += BWD_BLOCK) {
        const int64_t rest = len - b0 < BWD_BLOCK ? len - b0 : BWD_BLOCK;
        const int64_t vec = rest / LANES * LANES;
        memset(acc, 0, sizeof(acc));
        backward_block_f32(g + b0, x + b0, y + b0, dx + b0, dy + b0, vec, v, geo, n, bin, gs, gt, acc);
        for (int64_t k = 0; k < vec; k++) {
            double *cell = h + (int64_t)bin[k] * HQ;
            cell[0] += g[b0 + k];
            cell[1] += gs[k];
            cell[2] += gt[k];
        }
        for (int m = 0; m < 12; m++) {
            double total = 0.0;
            for (int l = 0; l < LANES; l++) total += acc[m][l];
            s12[m] += total;
        }
        for (int64_t k = b0 + vec; k < b0 + rest; k++) backward_f(g[k], x[k], y[k], v, geo, n, dx + k, dy + k, h, s12);
    }
}

#if PWLU_AVX512
/* The backward for N <= LUT_MAX_N (dt a constant in each instantiation): blocks of BWD_BLOCK
 * elements, a vector pass with the in-register tables of kuhn_tables_build (dx, dy, bins, the
 * quads (g, g s, g t, 0) and the 12 sums in zmm accumulators), then the histogram pass, one
 * 4-double add per element. The triangle's slopes: dz/ds = D10 (lower) or D11 - D01 (upper),
 * dz/dt = D11 - D10 (lower) or D01 (upper). */
PWLU_INLINE void backward_seg_lut_dt(const void *gp, const void *xp, const void *yp, void *dxp, void *dyp, const int dt,
                                     int64_t b, int64_t e, const cell_tables *ct, const float *geo, int n, double *h,
                                     double *s12) {
    double *h2 = h + (int64_t)n * n * 2 * HQ; /* the channel's second histogram copy (HIST_COPIES) */
    const __m512 xlo = _mm512_set1_ps(geo[0]), xhi = _mm512_set1_ps(geo[1]), ix = _mm512_set1_ps(geo[2]);
    const __m512 ylo = _mm512_set1_ps(geo[3]), yhi = _mm512_set1_ps(geo[4]), iy = _mm512_set1_ps(geo[5]);
    const __m512 kxl = _mm512_set1_ps(geo[6]), kxr = _mm512_set1_ps(geo[7]);
    const __m512 kyl = _mm512_set1_ps(geo[8]), kyr = _mm512_set1_ps(geo[9]);
    const __m512 nf = _mm512_set1_ps((float)n), nm1 = _mm512_set1_ps((float)(n - 1)), zero = _mm512_setzero_ps();
    const __m512i half = _mm512_set1_epi32(32), one = _mm512_set1_epi32(1);
    /* the quad of element 4 L + r of a vector sits at position 4 r + L (see below) */
    const __m512i quad_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    int32_t bin[BWD_BLOCK];
    float quad[BWD_BLOCK * HQ] __attribute__((aligned(64)));
    for (int64_t b0 = b; b0 < e; b0 += BWD_BLOCK) {
        const int64_t rest = e - b0 < BWD_BLOCK ? e - b0 : BWD_BLOCK;
        __m512 acc[12];
        for (int q = 0; q < 12; q++) acc[q] = zero;
        for (int64_t k = 0; k < rest; k += 16) {
            const __mmask16 m = tail_mask(rest - k);
            const __m512 g = ld16(gp, b0 + k, m, dt), xv = ld16(xp, b0 + k, m, dt), yv = ld16(yp, b0 + k, m, dt);
            const __mmask16 xl = _mm512_cmp_ps_mask(xv, xlo, _CMP_LT_OQ), xr = _mm512_cmp_ps_mask(xv, xhi, _CMP_GE_OQ);
            const __mmask16 yl = _mm512_cmp_ps_mask(yv, ylo, _CMP_LT_OQ), yr = _mm512_cmp_ps_mask(yv, yhi, _CMP_GE_OQ);
            const __m512 dxl = _mm512_sub_ps(xv, xlo), dyl = _mm512_sub_ps(yv, ylo);
            const __m512 u = _mm512_mask_mov_ps(_mm512_max_ps(zero, _mm512_mul_ps(dxl, ix)), xr, nf);
            const __m512 w = _mm512_mask_mov_ps(_mm512_max_ps(zero, _mm512_mul_ps(dyl, iy)), yr, nf);
            /* cell 0 for NaN (max(NaN, 0) = 0), as the reference */
            const __m512 fi = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), zero), nm1);
            const __m512 fj = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(w, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), zero), nm1);
            const __m512 s = _mm512_sub_ps(u, fi), t = _mm512_sub_ps(w, fj);
            const __m512i cell = _mm512_cvttps_epi32(_mm512_fmadd_ps(fi, nf, fj));
            const __mmask16 upper_half = _mm512_test_epi32_mask(cell, half), lower = _mm512_cmp_ps_mask(s, t, _CMP_GE_OQ);
            __m512 lk[4];
            for (int q = 1; q < 4; q++)
                lk[q] = _mm512_mask_blend_ps(upper_half, _mm512_permutex2var_ps(ct->t[q][0], cell, ct->t[q][1]),
                                             _mm512_permutex2var_ps(ct->t[q][2], cell, ct->t[q][3]));
            const __m512 a = _mm512_mask_blend_ps(lower, _mm512_sub_ps(lk[3], lk[2]), lk[1]);
            const __m512 bb = _mm512_mask_blend_ps(lower, lk[2], _mm512_sub_ps(lk[3], lk[1]));
            /* dz/dx: K_XL or K_XR outside the range, the triangle's slope a / dx inside (likewise y) */
            const __m512 sx = _mm512_mask_blend_ps(xl, _mm512_mask_blend_ps(xr, _mm512_mul_ps(a, ix), kxr), kxl);
            const __m512 sy = _mm512_mask_blend_ps(yl, _mm512_mask_blend_ps(yr, _mm512_mul_ps(bb, iy), kyr), kyl);
            st16(dxp, b0 + k, _mm512_mul_ps(g, sx), m, dt);
            st16(dyp, b0 + k, _mm512_mul_ps(g, sy), m, dt);
            /* bin (i N + j) * 2 + upper, and the quads (g, g s, g t, 0) for the histogram pass:
             * unpacks within 128-bit lanes put element 4 L + r's quad in lane L of vector r;
             * the bins are stored in that order (lanes past a tail: g = 0, bin 0) */
            const __m512i upper = _mm512_mask_mov_epi32(one, lower, _mm512_setzero_si512());
            const __m512i bn = _mm512_maskz_add_epi32(m, _mm512_slli_epi32(cell, 1), upper);
            _mm512_storeu_si512(bin + k, _mm512_permutexvar_epi32(quad_order, bn));
            const __m512 gz = _mm512_maskz_mov_ps(m, g), gs = _mm512_mul_ps(gz, s), gt = _mm512_mul_ps(gz, t);
            const __m512 p0 = _mm512_unpacklo_ps(gz, gt), p1 = _mm512_unpackhi_ps(gz, gt);
            const __m512 q0 = _mm512_unpacklo_ps(gs, zero), q1 = _mm512_unpackhi_ps(gs, zero);
            float *qd = quad + k * HQ;
            _mm512_store_ps(qd, _mm512_unpacklo_ps(p0, q0));
            _mm512_store_ps(qd + 16, _mm512_unpackhi_ps(p0, q0));
            _mm512_store_ps(qd + 32, _mm512_unpacklo_ps(p1, q1));
            _mm512_store_ps(qd + 48, _mm512_unpackhi_ps(p1, q1));
            const __mmask16 xin = (__mmask16)~(xl | xr) & m, yin = (__mmask16)~(yl | yr) & m;
            const __m512 ga = _mm512_mul_ps(g, a), gb = _mm512_mul_ps(g, bb);
            acc[0] = _mm512_mask_add_ps(acc[0], xl, acc[0], g);
            acc[1] = _mm512_mask3_fmadd_ps(g, dxl, acc[1], xl);
            acc[2] = _mm512_mask_add_ps(acc[2], xr, acc[2], g);
            acc[3] = _mm512_mask3_fmadd_ps(g, _mm512_sub_ps(xv, xhi), acc[3], xr);
            acc[4] = _mm512_mask_add_ps(acc[4], yl, acc[4], g);
            acc[5] = _mm512_mask3_fmadd_ps(g, dyl, acc[5], yl);
            acc[6] = _mm512_mask_add_ps(acc[6], yr, acc[6], g);
            acc[7] = _mm512_mask3_fmadd_ps(g, _mm512_sub_ps(yv, yhi), acc[7], yr);
            acc[8] = _mm512_mask_add_ps(acc[8], xin, acc[8], ga);
            acc[9] = _mm512_mask3_fmadd_ps(ga, u, acc[9], xin);
            acc[10] = _mm512_mask_add_ps(acc[10], yin, acc[10], gb);
            acc[11] = _mm512_mask3_fmadd_ps(gb, w, acc[11], yin);
        }
        const int64_t full = (rest + 15) / 16 * 16; /* even: the 16 elements of each vector */
        for (int64_t k = 0; k < full; k += 2) {   /* alternate elements into the two copies */
            double *c0 = h + (int64_t)bin[k] * HQ, *c1 = h2 + (int64_t)bin[k + 1] * HQ;
            _mm256_storeu_pd(c0, _mm256_add_pd(_mm256_loadu_pd(c0), _mm256_cvtps_pd(_mm_load_ps(quad + k * HQ))));
            _mm256_storeu_pd(c1, _mm256_add_pd(_mm256_loadu_pd(c1), _mm256_cvtps_pd(_mm_load_ps(quad + (k + 1) * HQ))));
        }
        for (int q = 0; q < 12; q++) s12[q] += (double)_mm512_reduce_add_ps(acc[q]);
    }
}

static void backward_seg_lut(const void *gp, const void *xp, const void *yp, void *dxp, void *dyp, int dt, int64_t b,
                             int64_t e, const cell_tables *ct, const float *geo, int n, double *h, double *s12) {
    switch (dt) {
    case PWLU_F32: backward_seg_lut_dt(gp, xp, yp, dxp, dyp, PWLU_F32, b, e, ct, geo, n, h, s12); break;
    case PWLU_F16: backward_seg_lut_dt(gp, xp, yp, dxp, dyp, PWLU_F16, b, e, ct, geo, n, h, s12); break;
    default: backward_seg_lut_dt(gp, xp, yp, dxp, dyp, PWLU_BF16, b, e, ct, geo, n, h, s12);
    }
}
#endif /* PWLU_AVX512 */

/* Thread copies of the histogram and sums: per thread C * (copies HQ N^2 * 2 + 12) doubles, 64-byte
 * aligned, so that no bin of HQ = 4 doubles straddles a cache line (calloc's large blocks start 16
 * bytes into a page: every other bin did). The vector path (copies = HIST_COPIES) adds alternate
 * elements into two copies of a channel's histogram, so that consecutive elements in one bin do not
 * wait for each other's store; the scalar paths use one. Each thread zeroes its own part (first
 * touch) in the parallel region. */
static double *alloc_partials(int nth, int64_t per_thread) {
    const size_t bytes = ((size_t)nth * (size_t)per_thread * sizeof(double) + 63) / 64 * 64;
    return (double *)aligned_alloc(64, bytes);
}

/* Sum the first nth threads' histograms (copies per channel, bins of HQ doubles) into hist
 * ([C][N][N][2][3]) and their sums into sums ([C][12]). */
static void reduce_partials(const double *part, int nth, int64_t C, int64_t bins, int copies, double *hist,
                            double *sums) {
    const int64_t hsize = bins * HQ, per = C * (copies * hsize + 12);
    for (int64_t c = 0; c < C; c++) {
        for (int64_t k = 0; k < bins; k++)
            for (int q = 0; q < 3; q++) {
                double acc = 0.0;
                for (int th = 0; th < nth; th++)
                    for (int cp = 0; cp < copies; cp++) acc += part[th * per + (c * copies + cp) * hsize + k * HQ + q];
                hist[(c * bins + k) * 3 + q] = acc;
            }
        for (int k = 0; k < 12; k++) {
            double acc = 0.0;
            for (int th = 0; th < nth; th++) acc += part[th * per + C * copies * hsize + c * 12 + k];
            sums[c * 12 + k] = acc;
        }
    }
}

/* Channels fastest (inner == 1), rows [rb, re) of C channels, scalar: chunks of BWD_ROWS rows,
 * walked channel by channel, so that one channel's histogram serves BWD_ROWS elements in a row.
 * In element order each element went to another channel's histogram, C of them at one 4 KB
 * stride: cache-set conflicts on every access (40x the time of the same tensor with the
 * channels outermost). The chunk's lines of x, y, g, dx, dy stay in cache across the channels. */
#define BWD_ROWS 512
static void backward_rows_f32c(const void *g, const void *x, const void *y, void *dx, void *dy, int dt, int64_t rb,
                               int64_t re, int64_t C, const float *values, const float *geometry, int n,
                               double *hist_t, double *sums_t, int64_t cstride) {
    const int64_t vsize = (int64_t)(n + 1) * (n + 1);
    for (int64_t r0 = rb; r0 < re; r0 += BWD_ROWS) {
        const int64_t r1 = r0 + BWD_ROWS < re ? r0 + BWD_ROWS : re;
        for (int64_t c = 0; c < C; c++) {
            const float *v = values + c * vsize, *geo = geometry + c * 10;
            double *h = hist_t + c * cstride, s12[12] = {0};
            for (int64_t e = r0 * C + c; e < r1 * C; e += C) {
                float ddx, ddy;
                backward_f(load_s(g, e, dt), load_s(x, e, dt), load_s(y, e, dt), v, geo, n, &ddx, &ddy, h, s12);
                store_s(dx, e, ddx, dt);
                store_s(dy, e, ddy, dt);
            }
            for (int k = 0; k < 12; k++) sums_t[c * 12 + k] += s12[k];
        }
    }
}
static void backward_rows_d(const double *g, const double *x, const double *y, double *dx, double *dy, int64_t rb,
                            int64_t re, int64_t C, const double *values, const double *geometry, int n,
                            double *hist_t, double *sums_t, int64_t cstride) {
    const int64_t vsize = (int64_t)(n + 1) * (n + 1);
    for (int64_t r0 = rb; r0 < re; r0 += BWD_ROWS) {
        const int64_t r1 = r0 + BWD_ROWS < re ? r0 + BWD_ROWS : re;
        for (int64_t c = 0; c < C; c++) {
            const double *v = values + c * vsize, *geo = geometry + c * 10;
            double *h = hist_t + c * cstride, s12[12] = {0};
            for (int64_t e = r0 * C + c; e < r1 * C; e += C) backward_d(g[e], x[e], y[e], v, geo, n, dx + e, dy + e, h, s12);
            for (int k = 0; k < 12; k++) sums_t[c * 12 + k] += s12[k];
        }
    }
}

#if PWLU_AVX512
/* Channels fastest with the vector tables (N <= LUT_MAX_N): channel block by channel block (16
 * channels), rows [rb, re) in chunks of TILE_ROWS: x, y and g of the chunk are copied into
 * channel-major float32 scratch, each channel runs the vector backward of the channels-outermost
 * layout (backward_seg_lut) there, and dx, dy are copied back. A block's 16 histograms stay in
 * cache for all its rows; each 64-byte line of x, y, g, dx, dy holds one row of one block (C a
 * multiple of 16), read or written once, at a constant stride. PWLU_OK or PWLU_ERR_NOMEM. */
static int backward_rows_lut(const void *g, const void *x, const void *y, void *dx, void *dy, int dt, int64_t rb,
                             int64_t re, int64_t C, const float *tabs, const float *geometry, int n, double *hist_t,
                             double *sums_t, int64_t cstride) {
    const int64_t R = TILE_ROWS;
    float *buf = (float *)aligned_alloc(64, (size_t)(5 * 16 * R) * sizeof(float));
    if (!buf) return PWLU_ERR_NOMEM;
    float *bx = buf, *by = bx + 16 * R, *bg = by + 16 * R, *bdx = bg + 16 * R, *bdy = bdx + 16 * R;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int nc = C - c0 < 16 ? (int)(C - c0) : 16;
        for (int64_t r0 = rb; r0 < re; r0 += R) {
            const int64_t nr = re - r0 < R ? re - r0 : R;
            rows_to_channels(x, bx, r0, nr, c0, nc, C, dt, R);
            rows_to_channels(y, by, r0, nr, c0, nc, C, dt, R);
            rows_to_channels(g, bg, r0, nr, c0, nc, C, dt, R);
            for (int j = 0; j < nc; j++) {
                const int64_t c = c0 + j;
                cell_tables ct;
                kuhn_tables_load(tabs + c * KUHN_FLOATS, &ct);
                double s12[12] = {0};
                backward_seg_lut(bg + j * R, bx + j * R, by + j * R, bdx + j * R, bdy + j * R, PWLU_F32, 0, nr, &ct,
                                 geometry + c * 10, n, hist_t + c * cstride, s12);
                for (int k = 0; k < 12; k++) sums_t[c * 12 + k] += s12[k];
            }
            channels_to_rows(bdx, dx, r0, nr, c0, nc, C, dt, R);
            channels_to_rows(bdy, dy, r0, nr, c0, nc, C, dt, R);
        }
    }
    free(buf);
    return PWLU_OK;
}
#endif

int pwlu2d_backward_f32c(const void *g, const void *x, const void *y, void *dx, void *dy, int dt, int64_t outer,
                         int64_t C, int64_t inner, const float *values, const float *geometry, int n, int nthreads,
                         double *hist, double *sums) {
    if (dt != PWLU_F32 && dt != PWLU_BF16 && !(dt == PWLU_F16 && PWLU_F16_KERNEL)) return PWLU_ERR_DTYPE;
    const int64_t total = outer * C * inner, vsize = (int64_t)(n + 1) * (n + 1), bins = (int64_t)n * n * 2, hsize = bins * HQ;
    const int nth_max = clamp_threads(nthreads);
    int rc = PWLU_OK, used = 1;
    float *tabs = call_tables(values, outer, C, inner, n, &rc);
    const int copies = tabs ? HIST_COPIES : 1; /* the second copy: the vector path only */
    const int64_t cstride = copies * hsize, per = C * (cstride + 12);
    double *part = rc == PWLU_OK ? alloc_partials(nth_max, per) : NULL;
    if (!part) {
        free(tabs);
        return PWLU_ERR_NOMEM;
    }
#pragma omp parallel num_threads(nth_max)
    {
        int th, nth;
        thread_id(&th, &nth);
        if (th == 0) used = nth;
        double *hist_t = part + th * per, *sums_t = hist_t + C * cstride;
        memset(hist_t, 0, (size_t)per * sizeof(double));
        int64_t pb, pe;
        if (inner == 1 && C > 1) {
            split(outer, th, nth, 1, &pb, &pe);
#if PWLU_AVX512
            if (tabs) {
                if (backward_rows_lut(g, x, y, dx, dy, dt, pb, pe, C, tabs, geometry, n, hist_t, sums_t, cstride) != PWLU_OK) {
#pragma omp atomic write
                    rc = PWLU_ERR_NOMEM;
                }
            } else
#endif
                backward_rows_f32c(g, x, y, dx, dy, dt, pb, pe, C, values, geometry, n, hist_t, sums_t, cstride);
            pb = pe = 0; /* done */
        } else
            split(total, th, nth, ALIGN_ELEMS, &pb, &pe);
        if (pb < pe) {
            for (seg_iter sg = seg_first(pb, pe, inner, C); sg.b < pe; seg_next(&sg, pe, inner, C)) {
                const float *v = values + sg.c * vsize, *geo = geometry + sg.c * 10;
                double *h = hist_t + sg.c * cstride, s12[12] = {0};
#if PWLU_AVX512
                if (tabs && sg.e - sg.b >= LUT_MIN_SEG) {
                    cell_tables ct;
                    kuhn_tables_load(tabs + sg.c * KUHN_FLOATS, &ct);
                    backward_seg_lut(g, x, y, dx, dy, dt, sg.b, sg.e, &ct, geo, n, h, s12);
                } else
#endif
                if (dt == PWLU_F32) {
                    backward_seg_f32((const float *)g + sg.b, (const float *)x + sg.b, (const float *)y + sg.b,
                                     (float *)dx + sg.b, (float *)dy + sg.b, sg.e - sg.b, v, geo, n, h, s12);
                } else {
                    for (int64_t e = sg.b; e < sg.e; e++) {
                        float ddx, ddy;
                        backward_f(load_s(g, e, dt), load_s(x, e, dt), load_s(y, e, dt), v, geo, n, &ddx, &ddy, h, s12);
                        store_s(dx, e, ddx, dt);
                        store_s(dy, e, ddy, dt);
                    }
                }
                for (int k = 0; k < 12; k++) sums_t[sg.c * 12 + k] += s12[k];
            }
        }
    }
    reduce_partials(part, used, C, bins, copies, hist, sums);
    free(tabs);
    free(part);
    return rc;
}

int pwlu2d_backward_f64(const double *g, const double *x, const double *y, double *dx, double *dy, int64_t outer,
                        int64_t C, int64_t inner, const double *values, const double *geometry, int n, int nthreads,
                        double *hist, double *sums) {
    const int64_t total = outer * C * inner, vsize = (int64_t)(n + 1) * (n + 1), bins = (int64_t)n * n * 2, hsize = bins * HQ;
    const int nth_max = clamp_threads(nthreads);
    const int64_t cstride = hsize, per = C * (cstride + 12); /* one copy: scalar paths */
    int used = 1;
    double *part = alloc_partials(nth_max, per);
    if (!part) return PWLU_ERR_NOMEM;
#pragma omp parallel num_threads(nth_max)
    {
        int th, nth;
        thread_id(&th, &nth);
        if (th == 0) used = nth;
        double *hist_t = part + th * per, *sums_t = hist_t + C * cstride;
        memset(hist_t, 0, (size_t)per * sizeof(double));
        int64_t pb, pe;
        if (inner == 1 && C > 1) {
            split(outer, th, nth, 1, &pb, &pe);
            backward_rows_d(g, x, y, dx, dy, pb, pe, C, values, geometry, n, hist_t, sums_t, cstride);
            pb = pe = 0; /* done */
        } else
            split(total, th, nth, ALIGN_ELEMS, &pb, &pe);
        if (pb < pe) {
            for (seg_iter sg = seg_first(pb, pe, inner, C); sg.b < pe; seg_next(&sg, pe, inner, C)) {
                const double *v = values + sg.c * vsize, *geo = geometry + sg.c * 10;
                double *h = hist_t + sg.c * cstride, s12[12] = {0};
                for (int64_t e = sg.b; e < sg.e; e++) backward_d(g[e], x[e], y[e], v, geo, n, dx + e, dy + e, h, s12);
                for (int k = 0; k < 12; k++) sums_t[sg.c * 12 + k] += s12[k];
            }
        }
    }
    reduce_partials(part, used, C, bins, 1, hist, sums);
    free(part);
    return PWLU_OK;
}

/* ------------------------------------------------------------------ geometry and parameter gradients */

/* pwlu.ops.pwlu2d_grads.pwlu2d_geometry in one call, for parameters already in the compute dtype
 * (float32): p[0..7] = X_L, X_R, Y_L, Y_R, K_XL, K_XR, K_YL, K_YR (C each, or 1 layer-wise);
 * geometry [C][10] as documented there, the width floor as folding.effective_bounds (a NaN
 * width stays NaN; 1 / dx = (1 / width) N, as torch's N / width). */
int pwlu2d_geometry_f32(const float *const *p, int64_t C, int n, float min_width, float *geometry) {
    for (int64_t c = 0; c < C; c++) {
        float *geo = geometry + c * 10;
        for (int axis = 0; axis < 2; axis++) {
            const float lo = p[2 * axis][c], hi = p[2 * axis + 1][c], raw = hi - lo;
            const int ok = !(raw < min_width);
            const float width = ok ? raw : min_width;
            geo[3 * axis] = lo;
            geo[3 * axis + 1] = ok ? hi : lo + min_width;
            geo[3 * axis + 2] = (1.0f / width) * (float)n;
        }
        for (int k = 0; k < 4; k++) geo[6 + k] = p[4 + k][c];
    }
    return PWLU_OK;
}

/* pwlu.ops.pwlu2d_grads.pwlu2d_param_grads in one call, in double: from hist ([C][N][N][2][3])
 * and sums ([C][12]) of a backward, the geometry it used and the parameters p of
 * pwlu2d_geometry_f32 (a width below min_width, in float32 as there, sends the right bound's
 * gradient to the left one), writes d_values ([C][N+1][N+1]) and d_rest ([C][8]: X_L, X_R,
 * Y_L, Y_R, K_XL, K_XR, K_YL, K_YR). */
int pwlu2d_param_grads_f64(const double *hist, const double *sums, const float *geometry, const float *const *p,
                           int64_t C, int n, float min_width, double *d_values, double *d_rest) {
    const int64_t n1 = n + 1;
    for (int64_t c = 0; c < C; c++) {
        double *dv = d_values + c * n1 * n1;
        memset(dv, 0, (size_t)(n1 * n1) * sizeof(double));
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                const double *lo = hist + (((c * n + i) * n + j) * 2) * 3, *up = lo + 3;
                /* lower: weights 1-s, s-t, t on V[i,j], V[i+1,j], V[i+1,j+1];
                 * upper: 1-t, t-s, s on V[i,j], V[i,j+1], V[i+1,j+1] */
                dv[i * n1 + j] += (lo[0] - lo[1]) + (up[0] - up[2]);
                dv[(i + 1) * n1 + j] += lo[1] - lo[2];
                dv[i * n1 + j + 1] += up[2] - up[1];
                dv[(i + 1) * n1 + j + 1] += lo[2] + up[1];
            }
        const double *s = sums + c * 12;
        const float *geo = geometry + c * 10;
        double *d = d_rest + c * 8;
        for (int axis = 0; axis < 2; axis++) {
            const double inv = geo[3 * axis + 2], k_left = geo[6 + 2 * axis], k_right = geo[7 + 2 * axis];
            const double g_left = s[4 * axis], g_right = s[4 * axis + 2], ga = s[8 + 2 * axis], gau = s[9 + 2 * axis];
            const double d_left = -inv * (ga - gau / n) - k_left * g_left;
            const double d_right = -inv * gau / n - k_right * g_right;
            /* a range below MIN_WIDTH has X_R = X_L + MIN_WIDTH: its gradient goes to X_L */
            const int cl = p[2 * axis + 1][c] - p[2 * axis][c] < min_width;
            d[2 * axis] = cl ? d_left + d_right : d_left;
            d[2 * axis + 1] = cl ? 0.0 : d_right;
            d[4 + 2 * axis] = s[4 * axis + 1];
            d[5 + 2 * axis] = s[4 * axis + 3];
        }
    }
    return PWLU_OK;
}
