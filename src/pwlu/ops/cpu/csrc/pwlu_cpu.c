/* PWLU forward/backward on folded tables: plain C + OpenMP, AVX-512 where the compiler
 * targets it. No torch headers: compiled on first use by pwlu/ops/cpu/build.py and
 * called through ctypes with raw pointers.
 *
 * x is viewed as (outer, C, inner), dense. Per element of channel c (tables have N+2
 * entries per channel, in the compute dtype):
 *   u = (x - left[c]) * inv_d[c]                 (sub, then multiply: bit-exact regions)
 *   i = clamp(floor(u), 0, N-1), NaN -> 0
 *   k = 0 if x < left, N+1 if x >= right, else i + 1
 *   y = slopes[k] * (x - shift[c]) + intercepts[k]   (shift: see common.fold_tables)
 *       = intercepts[k] where x is +-inf and slopes[k] == 0
 * Backward: dx = g * slopes[k]; hist[c, k] += (g, g * r) with r = x - left (k = 0),
 * x - right (k = N+1), u - i (inner). Each thread owns partial histograms over a static
 * partition of the elements; they are reduced in a fixed order, so the result is
 * bit-identical run to run for a fixed thread count. The AVX-512 paths keep lane-private
 * accumulators (one compare and two masked adds per region and 16 elements, float for at
 * most 256 terms per lane, then double); the portable paths scatter each element into
 * double bins (NCOPY copies break store-to-load dependency chains).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PWLU_AVX512 1
#include <immintrin.h>
#else
#define PWLU_AVX512 0
#endif

enum { PWLU_F32 = 0, PWLU_F64 = 1, PWLU_F16 = 2, PWLU_BF16 = 3 };
#define NCOPY 4
#define ALIGN_ELEMS 16

int pwlu_cpu_abi_version(void) { return 6; }
int pwlu_cpu_has_avx512(void) { return PWLU_AVX512; }
#ifdef __FLT16_MAX__
int pwlu_cpu_has_f16(void) { return 1; }
#else
int pwlu_cpu_has_f16(void) { return 0; }
#endif

/* ---- scalar loads/stores (any storage dtype, compute float) ---- */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0; /* NaN, as torch */
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}
static inline float load_s(const void *p, int64_t i, int dt) {
    switch (dt) {
    case PWLU_F32: return ((const float *)p)[i];
#ifdef __FLT16_MAX__
    case PWLU_F16: return (float)((const _Float16 *)p)[i];
#endif
    default: return bf16_to_f32(((const uint16_t *)p)[i]);
    }
}
static inline void store_s(void *p, int64_t i, float v, int dt) {
    switch (dt) {
    case PWLU_F32: ((float *)p)[i] = v; break;
#ifdef __FLT16_MAX__
    case PWLU_F16: ((_Float16 *)p)[i] = (_Float16)v; break;
#endif
    default: ((uint16_t *)p)[i] = f32_to_bf16(v); break;
    }
}

/* ---- scalar element kernels, float and double ---- */
#define DEFINE_SCALAR(T, SUF, FLOOR)                                                                        \
    static inline int64_t region_##SUF(T xv, T lo, T hi, T inv, int64_t n, T *u_out, T *i_out) {            \
        T u = (xv - lo) * inv;                                                                              \
        T fi = FLOOR(u);                                                                                    \
        if (!(fi >= (T)0)) fi = (T)0; /* also NaN */                                                        \
        if (fi > (T)(n - 1)) fi = (T)(n - 1);                                                               \
        *u_out = u;                                                                                         \
        *i_out = fi;                                                                                        \
        return xv < lo ? 0 : (xv >= hi ? n + 1 : (int64_t)fi + 1);                                          \
    }                                                                                                       \
    static inline T fwd_elem_##SUF(T xv, const T *sl, const T *ic, T lo, T hi, T inv, T sh, int64_t n) {    \
        T u, fi;                                                                                            \
        int64_t k = region_##SUF(xv, lo, hi, inv, n, &u, &fi);                                              \
        T a = sl[k], b = ic[k];                                                                             \
        return (a == (T)0 && !isnan(xv)) ? b : a * (xv - sh) + b; /* as finish16 */                       \
    }                                                                                                       \
    static inline T bwd_elem_##SUF(T xv, T g, const T *sl, T lo, T hi, T inv, int64_t n, double *h) {       \
        T u, fi;                                                                                            \
        int64_t k = region_##SUF(xv, lo, hi, inv, n, &u, &fi);                                              \
        T r = k == 0 ? xv - lo : (k == n + 1 ? xv - hi : u - fi);                                           \
        T gr = g * r;                                                                                       \
        h[2 * k] += (double)g;                                                                              \
        h[2 * k + 1] += (double)gr;                                                                         \
        return g * sl[k];                                                                                   \
    }
DEFINE_SCALAR(float, f, floorf)
DEFINE_SCALAR(double, d, floor)

/* ---- static partitions ---- */
static inline void split(int64_t total, int t, int nth, int64_t align, int64_t *b, int64_t *e) {
    int64_t lo = total * t / nth, hi = total * (t + 1) / nth;
    if (align > 1) {
        lo = t == 0 ? 0 : lo / align * align;
        hi = t == nth - 1 ? total : hi / align * align;
    }
    *b = lo;
    *e = hi;
}

/* rows (o, c) of inner elements from pb to pe; one division per thread, not per row */
#define SEG_LOOP(SEG)                                                                                             \
    do {                                                                                                          \
        int64_t row = pb / inner, c = row % C;                                                                    \
        while (pb < pe) {                                                                                         \
            int64_t se = (row + 1) * inner;                                                                       \
            if (se > pe) se = pe;                                                                                 \
            SEG;                                                                                                  \
            pb = se;                                                                                              \
            row++;                                                                                                \
            if (++c == C) c = 0;                                                                                  \
        }                                                                                                         \
    } while (0)

#if PWLU_AVX512
/* ---- AVX-512, float compute ---- */
static inline __m512 ld16(const void *p, int64_t i, __mmask16 m, int dt) {
    switch (dt) {
    case PWLU_F32: return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    case PWLU_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    default:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    }
}
static inline void st16(void *p, int64_t i, __m512 v, __mmask16 m, int dt) {
    switch (dt) {
    case PWLU_F32: _mm512_mask_storeu_ps((float *)p + i, m, v); break;
    case PWLU_F16:
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        break;
    default: {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(r));
    }
    }
}
static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

/* Region index k (int32) and the offsets x - lo, u and i of 16 elements. */
static inline __m512i region16(__m512 x, __m512 lo, __m512 hi, __m512 inv, __m512 nm1, __m512i np1, __m512 *xl,
                               __m512 *u, __m512 *fi) {
    *xl = _mm512_sub_ps(x, lo);
    *u = _mm512_mul_ps(*xl, inv);
    __m512 f = _mm512_roundscale_ps(*u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    f = _mm512_min_ps(_mm512_max_ps(f, _mm512_setzero_ps()), nm1); /* max(NaN, 0) = 0 */
    *fi = f;
    __m512i k = _mm512_add_epi32(_mm512_cvttps_epi32(f), _mm512_set1_epi32(1));
    k = _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_si512());
    return _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ), np1);
}
/* y = a (x - sh) + b; a flat piece gives its value b, also at x = +-inf (not 0 * inf = NaN);
 * NaN x stays NaN. */
static inline __m512 finish16(__m512 x, __m512 sh, __m512 a, __m512 b) {
    const __mmask16 use_fma = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ) |
                              _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask3_fmadd_ps(a, _mm512_sub_ps(x, sh), b, use_fma);
}

/* Tables of one channel, padded to 32 entries, for the in-register lookup (N+2 <= 32). */
typedef struct {
    __m512 a0, a1, b0, b1;
} table32;
static inline table32 load_table32(const float *sl, const float *ic, int64_t m) {
    /* masked loads: nothing is read past entry m - 1, the padding is 0 */
    const __mmask16 m0 = tail_mask(m), m1 = m > 16 ? tail_mask(m - 16) : (__mmask16)0;
    const __m512 z = _mm512_setzero_ps();
    table32 t = {_mm512_maskz_loadu_ps(m0, sl), _mm512_maskz_loadu_ps(m1, sl + 16),
                 ic ? _mm512_maskz_loadu_ps(m0, ic) : z, ic ? _mm512_maskz_loadu_ps(m1, ic + 16) : z};
    return t;
}

/* Forward lookup of one channel (N + 2 <= 32), everything in registers. The tables are
 * rotated so that the region index needs no +1: entry j < N is interval j, entry N is the
 * right piece and entry 31 the left one. Per 16 elements: the floor of (x - B_L) / d as an
 * int (one conversion), clamped to N - 1, the two boundary compares, two permutes, one FMA. */
typedef struct { /* per call: depends on N only */
    __mmask16 m0, m1;
    __m512i last, right, left;
} fwd_consts;
typedef struct { /* per channel */
    __m512 a0, a1, b0, b1, lo, hi, inv, sh;
} fwd_chan;
static inline fwd_consts make_fwd_consts(int64_t n) {
    const int64_t cnt = n + 1; /* entries 1 .. N + 1 of the channel's tables */
    fwd_consts k = {tail_mask(cnt), cnt > 16 ? tail_mask(cnt - 16) : (__mmask16)0, _mm512_set1_epi32((int)(n - 1)),
                    _mm512_set1_epi32((int)n), _mm512_set1_epi32(31)};
    return k;
}
static inline __attribute__((always_inline)) fwd_chan load_fwd_chan(const float *sl, const float *ic, float lo,
                                                                    float hi, float inv, float sh,
                                                                    const fwd_consts *k) {
    /* masked loads of entries 1 .. N + 1 (nothing read past the channel), entry 0 into lane 31 */
    const __mmask16 top = (__mmask16)0x8000;
    fwd_chan t;
    t.a0 = _mm512_maskz_loadu_ps(k->m0, sl + 1);
    t.a1 = _mm512_mask_mov_ps(_mm512_maskz_loadu_ps(k->m1, sl + 17), top, _mm512_set1_ps(sl[0]));
    t.b0 = _mm512_maskz_loadu_ps(k->m0, ic + 1);
    t.b1 = _mm512_mask_mov_ps(_mm512_maskz_loadu_ps(k->m1, ic + 17), top, _mm512_set1_ps(ic[0]));
    t.lo = _mm512_set1_ps(lo);
    t.hi = _mm512_set1_ps(hi);
    t.inv = _mm512_set1_ps(inv);
    t.sh = _mm512_set1_ps(sh);
    return t;
}
static inline __attribute__((always_inline)) __m512 fwd16(__m512 x, const fwd_chan *t, const fwd_consts *c) {
    const __m512 u = _mm512_mul_ps(_mm512_sub_ps(x, t->lo), t->inv);
    /* NaN and out-of-range u convert to INT_MIN: the permutes read its low 5 bits (entry 0) */
    __m512i k = _mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    k = _mm512_min_epi32(k, c->last);
    k = _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, t->lo, _CMP_LT_OQ), c->left);
    k = _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, t->hi, _CMP_GE_OQ), c->right);
    return finish16(x, t->sh, _mm512_permutex2var_ps(t->a0, k, t->a1), _mm512_permutex2var_ps(t->b0, k, t->b1));
}

/* One segment of one channel (x[b:e], all of channel c), N + 2 > 32: tables by gather. */
static inline void fwd_seg_gather_f(const void *x, void *y, int64_t b, int64_t e, int dt, const float *sl,
                                    const float *ic, float lo_s, float hi_s, float inv_s, float sh_s, int64_t n) {
    const __m512 lo = _mm512_set1_ps(lo_s), hi = _mm512_set1_ps(hi_s), inv = _mm512_set1_ps(inv_s);
    const __m512 sh = _mm512_set1_ps(sh_s);
    const __m512 nm1 = _mm512_set1_ps((float)(n - 1));
    const __m512i np1 = _mm512_set1_epi32((int)(n + 1));
    for (int64_t i = b; i < e; i += 16) {
        __mmask16 m = tail_mask(e - i);
        __m512 xv = ld16(x, i, m, dt), xl, u, fi;
        __m512i k = region16(xv, lo, hi, inv, nm1, np1, &xl, &u, &fi);
        __m512 a = _mm512_i32gather_ps(k, sl, 4);
        __m512 bb = _mm512_i32gather_ps(k, ic, 4);
        st16(y, i, finish16(xv, sh, a, bb), m, dt);
    }
}

/* x[b:e], all of one channel, with the in-register lookup. */
static inline __attribute__((always_inline)) void fwd_lookup_seg(const void *x, void *y, int64_t b, int64_t e,
                                                                 const int dt, const fwd_chan *t,
                                                                 const fwd_consts *k) {
    const __mmask16 all = (__mmask16)0xFFFF;
    int64_t i = b;
    for (; i + 16 <= e; i += 16) st16(y, i, fwd16(ld16(x, i, all, dt), t, k), all, dt);
    if (i < e) {
        const __mmask16 tm = tail_mask(e - i);
        st16(y, i, fwd16(ld16(x, i, tm, dt), t, k), tm, dt);
    }
}

/* One channel's segment x[b:e]: its tables into registers, then the lookup. */
static inline __attribute__((always_inline)) void fwd_chan_seg(const void *x, void *y, int64_t b, int64_t e,
                                                               const int dt, const float *sl, const float *ic,
                                                               float lo, float hi, float inv, float sh,
                                                               const fwd_consts *k) {
    const fwd_chan t = load_fwd_chan(sl, ic, lo, hi, inv, sh, k);
    fwd_lookup_seg(x, y, b, e, dt, &t, k);
}

/* Elements [pb, pe) of an (outer, C, inner) tensor, row by row; one body per dtype (the
 * dtype switch leaves the loop) and no call per row, which matters for short rows (a 4x4
 * feature map is one vector per row). */
/* (the per-call constants are set up once; each row costs its table loads and broadcasts) */
#define FWD_RANGE_BODY(DT)                                                                                       \
    if (n + 2 <= 32) {                                                                                           \
        const fwd_consts k = make_fwd_consts(n);                                                                 \
        SEG_LOOP(fwd_chan_seg(x, y, pb, se, DT, sl + c * (n + 2), ic + c * (n + 2), left[c], right[c], invd[c],  \
                              shift[c], &k));                                                                    \
    } else                                                                                                       \
        SEG_LOOP(fwd_seg_gather_f(x, y, pb, se, DT, sl + c * (n + 2), ic + c * (n + 2), left[c], right[c], invd[c], \
                                  shift[c], n))
static void fwd_range_f(const void *x, void *y, int64_t pb, int64_t pe, int64_t inner, int64_t C, int dt,
                        const float *sl, const float *ic, const float *left, const float *right, const float *invd,
                        const float *shift, int64_t n) {
    switch (dt) {
    case PWLU_F32: FWD_RANGE_BODY(PWLU_F32); break;
    case PWLU_F16: FWD_RANGE_BODY(PWLU_F16); break;
    default: FWD_RANGE_BODY(PWLU_BF16); break;
    }
}

/* Channels [cb, ce) of an (outer, C, inner) tensor with short rows (small feature maps), channel
 * by channel: each channel's tables are loaded once for its `outer` rows, not once per row.
 * In row order the tables of all C channels stream through the cache once per batch element,
 * which for a 4x4 map is as much traffic as x itself. N + 2 <= 32. */
#define FWD_CHANNELS_BODY(DT)                                                                                    \
    do {                                                                                                         \
        const fwd_consts k = make_fwd_consts(n);                                                                 \
        for (int64_t c = cb; c < ce; c++) {                                                                      \
            const fwd_chan t =                                                                                   \
                load_fwd_chan(sl + c * (n + 2), ic + c * (n + 2), left[c], right[c], invd[c], shift[c], &k);     \
            for (int64_t o = 0; o < outer; o++) fwd_lookup_seg(x, y, (o * C + c) * inner, (o * C + c + 1) * inner, DT, &t, &k); \
        }                                                                                                        \
    } while (0)
static void fwd_channels_f(const void *x, void *y, int64_t cb, int64_t ce, int64_t outer, int64_t C, int64_t inner,
                           int dt, const float *sl, const float *ic, const float *left, const float *right,
                           const float *invd, const float *shift, int64_t n) {
    switch (dt) {
    case PWLU_F32: FWD_CHANNELS_BODY(PWLU_F32); break;
    case PWLU_F16: FWD_CHANNELS_BODY(PWLU_F16); break;
    default: FWD_CHANNELS_BODY(PWLU_BF16); break;
    }
}

/* Histogram of one channel segment, vectorised: lane-private accumulators acc[k][s][lane]
 * (s = 0: g, s = 1: g*r); region j is added with one compare and two masked adds per 16
 * elements, 6 regions at a time so that their 12 accumulators stay in registers. float
 * accumulators hold at most FLUSH_BLOCKS * SEG_BLOCK / 16 terms per lane before they are
 * added into double ones. */
#define SEG_BLOCK 256
#define REGION_GROUP 6
#define FLUSH_BLOCKS 16

static inline void hist_block(const int32_t *kbuf, const float *gbuf, const float *rbuf, int64_t nvec, float *accf,
                              int64_t m) {
    for (int64_t j0 = 0; j0 < m; j0 += REGION_GROUP) {
        __m512 ag[REGION_GROUP], ar[REGION_GROUP];
        for (int jj = 0; jj < REGION_GROUP; jj++) {
            ag[jj] = _mm512_loadu_ps(accf + ((j0 + jj) * 2) * 16);
            ar[jj] = _mm512_loadu_ps(accf + ((j0 + jj) * 2 + 1) * 16);
        }
        for (int64_t v = 0; v < nvec; v++) {
            __m512i k = _mm512_loadu_si512(kbuf + 16 * v);
            __m512 g = _mm512_loadu_ps(gbuf + 16 * v), gr = _mm512_loadu_ps(rbuf + 16 * v);
            for (int jj = 0; jj < REGION_GROUP; jj++) {
                __mmask16 in_j = _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32((int)(j0 + jj)));
                ag[jj] = _mm512_mask_add_ps(ag[jj], in_j, ag[jj], g);
                ar[jj] = _mm512_mask_add_ps(ar[jj], in_j, ar[jj], gr);
            }
        }
        for (int jj = 0; jj < REGION_GROUP; jj++) {
            _mm512_storeu_ps(accf + ((j0 + jj) * 2) * 16, ag[jj]);
            _mm512_storeu_ps(accf + ((j0 + jj) * 2 + 1) * 16, ar[jj]);
        }
    }
}

static inline void flush_acc(float *accf, double *accd, int64_t m) {
    for (int64_t j = 0; j < 2 * m; j++) {
        __m512 f = _mm512_loadu_ps(accf + 16 * j);
        _mm512_storeu_pd(accd + 16 * j, _mm512_add_pd(_mm512_loadu_pd(accd + 16 * j), _mm512_cvtps_pd(_mm512_castps512_ps256(f))));
        _mm512_storeu_pd(accd + 16 * j + 8,
                         _mm512_add_pd(_mm512_loadu_pd(accd + 16 * j + 8), _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1))));
        _mm512_storeu_ps(accf + 16 * j, _mm512_setzero_ps());
    }
}

/* Per-channel constants of the backward's vector pass. */
typedef struct {
    __m512 lo, hi, inv, nm1;
    __m512i np1;
    table32 t;
    const float *sl;
    int64_t m;
} bwd_chan;
static inline bwd_chan load_bwd_chan(const float *sl, float lo, float hi, float inv, int64_t n) {
    bwd_chan c;
    c.lo = _mm512_set1_ps(lo);
    c.hi = _mm512_set1_ps(hi);
    c.inv = _mm512_set1_ps(inv);
    c.nm1 = _mm512_set1_ps((float)(n - 1));
    c.np1 = _mm512_set1_epi32((int)(n + 1));
    c.m = n + 2;
    c.t = load_table32(sl, NULL, c.m <= 32 ? c.m : 32);
    c.sl = sl;
    return c;
}
/* 16 elements from i (masked-off lanes load x = 0, g = 0 and add nothing): stores
 * dx = g * slope of region k, returns k, and g and g * r with r = x - lo (k = 0),
 * x - hi (k = N+1), u - i (inner). */
static inline __attribute__((always_inline)) __m512i bwd16(const void *gp, const void *x, void *dx, int64_t i,
                                                           __mmask16 msk, int dt, const bwd_chan *c, __m512 *g_out,
                                                           __m512 *gr_out) {
    __m512 xv = ld16(x, i, msk, dt), g = ld16(gp, i, msk, dt), xl, u, fi;
    __m512i k = region16(xv, c->lo, c->hi, c->inv, c->nm1, c->np1, &xl, &u, &fi);
    __m512 a = c->m <= 32 ? _mm512_permutex2var_ps(c->t.a0, k, c->t.a1) : _mm512_i32gather_ps(k, c->sl, 4);
    st16(dx, i, _mm512_mul_ps(g, a), msk, dt);
    __m512 r = _mm512_sub_ps(u, fi);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, c->lo, _CMP_LT_OQ), xl);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, c->hi, _CMP_GE_OQ), _mm512_sub_ps(xv, c->hi));
    *g_out = g;
    *gr_out = _mm512_mul_ps(g, r);
    return k;
}

static inline void bwd_seg_f(const void *gp, const void *x, void *dx, int64_t b, int64_t e, int dt, const float *sl,
                             float lo_s, float hi_s, float inv_s, int64_t n, double *h) {
    const int64_t m = n + 2, mg = (m + REGION_GROUP - 1) / REGION_GROUP * REGION_GROUP;
    /* accumulators: float then double, [region][s][lane], regions padded to a whole group */
    float *accf = (float *)aligned_alloc(64, (size_t)mg * 2 * 16 * sizeof(float));
    double *accd = (double *)aligned_alloc(64, (size_t)mg * 2 * 16 * sizeof(double));
    if (!accf || !accd) abort();
    memset(accf, 0, (size_t)mg * 2 * 16 * sizeof(float));
    memset(accd, 0, (size_t)mg * 2 * 16 * sizeof(double));
    const bwd_chan ch = load_bwd_chan(sl, lo_s, hi_s, inv_s, n);
    int32_t kbuf[SEG_BLOCK] __attribute__((aligned(64)));
    float gbuf[SEG_BLOCK] __attribute__((aligned(64))), rbuf[SEG_BLOCK] __attribute__((aligned(64)));
    int blocks = 0;
    for (int64_t bb = b; bb < e; bb += SEG_BLOCK) {
        const int64_t be = bb + SEG_BLOCK < e ? bb + SEG_BLOCK : e;
        for (int64_t i = bb; i < be; i += 16) {
            __m512 g, gr;
            __m512i k = bwd16(gp, x, dx, i, tail_mask(be - i), dt, &ch, &g, &gr);
            _mm512_store_si512(kbuf + (i - bb), k);
            _mm512_store_ps(gbuf + (i - bb), g);
            _mm512_store_ps(rbuf + (i - bb), gr);
        }
        hist_block(kbuf, gbuf, rbuf, (be - bb + 15) / 16, accf, m);
        if (++blocks == FLUSH_BLOCKS) {
            flush_acc(accf, accd, m);
            blocks = 0;
        }
    }
    flush_acc(accf, accd, m);
    /* lanes into the thread's histogram of this channel, in a fixed order */
    for (int64_t k = 0; k < m; k++)
        for (int s = 0; s < 2; s++) {
            double acc = 0.0;
            for (int l = 0; l < 16; l++) acc += accd[(k * 2 + s) * 16 + l];
            h[2 * k + s] += acc;
        }
    free(accf);
    free(accd);
}

/* Short rows (a small feature map: few elements per row of one channel), channel by channel:
 * the vector pass of bwd16 over the channel's `outer` rows, then each element's region, g and
 * g * r are added into the channel's double histogram one at a time, without branches (the
 * lane-private histogram's set-up would cost more than a short row). The channel's tables
 * are loaded and its histogram is touched by one thread only, in element order. */
static inline __attribute__((always_inline)) void bwd_short_seg(const void *gp, const void *x, void *dx, int64_t b,
                                                                int64_t e, const int dt, const bwd_chan *ch,
                                                                double *h) {
    int32_t kb[16] __attribute__((aligned(64)));
    float gb[16] __attribute__((aligned(64))), rb[16] __attribute__((aligned(64)));
    for (int64_t i = b; i < e; i += 16) {
        __m512 g, gr;
        _mm512_store_si512(kb, bwd16(gp, x, dx, i, tail_mask(e - i), dt, ch, &g, &gr));
        _mm512_store_ps(gb, g);
        _mm512_store_ps(rb, gr);
        const int cnt = e - i < 16 ? (int)(e - i) : 16;
        for (int j = 0; j < cnt; j++) {
            double *hk = h + 2 * kb[j];
            hk[0] += (double)gb[j];
            hk[1] += (double)rb[j];
        }
    }
}
#define BWD_CHANNELS_BODY(DT)                                                                                    \
    for (int64_t c = cb; c < ce; c++) {                                                                          \
        const bwd_chan ch = load_bwd_chan(sl + c * (n + 2), left[c], right[c], invd[c], n);                      \
        for (int64_t o = 0; o < outer; o++)                                                                      \
            bwd_short_seg(gp, x, dx, (o * C + c) * inner, (o * C + c + 1) * inner, DT, &ch, h + c * (n + 2) * 2); \
    }
/* Channels [cb, ce) of an (outer, C, inner) tensor with short rows; h: the histogram of all C. */
static void bwd_channels_f(const void *gp, const void *x, void *dx, int64_t cb, int64_t ce, int64_t outer,
                           int64_t C, int64_t inner, int dt, const float *sl, const float *left, const float *right,
                           const float *invd, int64_t n, double *h) {
    switch (dt) {
    case PWLU_F32: BWD_CHANNELS_BODY(PWLU_F32); break;
    case PWLU_F16: BWD_CHANNELS_BODY(PWLU_F16); break;
    default: BWD_CHANNELS_BODY(PWLU_BF16); break;
    }
}

/* Channels fastest (inner == 1): a row of C channels, per-lane tables by gather. */
static inline void fwd_row_f(const void *x, void *y, int64_t off, int64_t C, int dt, const float *sl,
                             const float *ic, const float *left, const float *right, const float *invd,
                             const float *shift, int64_t n) {
    const __m512 nm1 = _mm512_set1_ps((float)(n - 1));
    const __m512i np1 = _mm512_set1_epi32((int)(n + 1));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_m = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)(n + 2)));
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 m = tail_mask(C - c);
        __m512 lo = _mm512_maskz_loadu_ps(m, left + c), hi = _mm512_maskz_loadu_ps(m, right + c);
        __m512 inv = _mm512_maskz_loadu_ps(m, invd + c), sh = _mm512_maskz_loadu_ps(m, shift + c);
        __m512 xv = ld16(x, off + c, m, dt), xl, u, fi;
        __m512i k = region16(xv, lo, hi, inv, nm1, np1, &xl, &u, &fi);
        /* table entry of lane l: (c + l) * (N+2) + k, with lane * (N+2) hoisted out of the loop */
        __m512i idx = _mm512_add_epi32(k, _mm512_add_epi32(lane_m, _mm512_set1_epi32((int)(c * (n + 2)))));
        __m512 a = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, sl, 4);
        __m512 bb = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, ic, 4);
        st16(y, off + c, finish16(xv, sh, a, bb), m, dt);
    }
}
/* In-register transpose of a 16x16 float tile (its own inverse): after it, r[j] holds
 * element j of each of the 16 input vectors. */
static inline void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}

/* Channels fastest, forward, 16 rows x 16 channels at a time: transpose the tile so that each
 * vector holds one channel, use the in-register table lookup of the NCHW path (no gathers),
 * transpose back. Needs C % 16 == 0 and N + 2 <= 32; returns the first row it did not do. */
static inline int64_t fwd_tiles_f(const void *x, void *y, int64_t rb, int64_t re, int64_t C, int dt,
                                  const float *sl, const float *ic, const float *left, const float *right,
                                  const float *invd, const float *shift, int64_t n) {
    const int64_t m = n + 2;
    if (C % 16 != 0 || m > 32) return rb;
    const fwd_consts k = make_fwd_consts(n);
    const __mmask16 all = (__mmask16)0xFFFF;
    int64_t r0 = rb;
    for (; r0 + 16 <= re; r0 += 16) {
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            __m512 v[16];
            for (int j = 0; j < 16; j++) v[j] = ld16(x, (r0 + j) * C + c0, all, dt);
            transpose16(v); /* v[j]: channel c0 + j of rows r0 .. r0 + 15 */
            for (int j = 0; j < 16; j++) {
                const int64_t c = c0 + j;
                const fwd_chan t = load_fwd_chan(sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], &k);
                v[j] = fwd16(v[j], &t, &k);
            }
            transpose16(v);
            for (int j = 0; j < 16; j++) st16(y, (r0 + j) * C + c0, v[j], all, dt);
        }
    }
    return r0;
}

/* Rows [rb, re) of C channels each. Lane l of channel block cb is channel 16 cb + l, so the
 * lane-private accumulators acc[cb][k][s][lane] of bwd_seg_f work here too: a vector pass
 * over ROW_CHUNK rows writes k, g and g*r per channel block to L1 buffers, then hist_block
 * adds them up block by block (float for at most 256 rows, then double). */
#define ROW_CHUNK 16
static inline void bwd_rows_f(const void *gp, const void *x, void *dx, int64_t rb, int64_t re, int64_t C, int dt,
                              const float *sl, const float *left, const float *right, const float *invd, int64_t n,
                              double *h) {
    const __m512 nm1 = _mm512_set1_ps((float)(n - 1));
    const __m512i np1 = _mm512_set1_epi32((int)(n + 1));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_m = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)(n + 2)));
    const int64_t m = n + 2, mg = (m + REGION_GROUP - 1) / REGION_GROUP * REGION_GROUP;
    const int64_t nb = (C + 15) / 16, asize = nb * mg * 2 * 16, bsize = nb * ROW_CHUNK * 16;
    float *accf = (float *)aligned_alloc(64, (size_t)asize * sizeof(float));
    double *accd = (double *)aligned_alloc(64, (size_t)asize * sizeof(double));
    int32_t *kbuf = (int32_t *)aligned_alloc(64, (size_t)bsize * sizeof(int32_t));
    float *gbuf = (float *)aligned_alloc(64, (size_t)bsize * sizeof(float));
    float *rbuf = (float *)aligned_alloc(64, (size_t)bsize * sizeof(float));
    if (!accf || !accd || !kbuf || !gbuf || !rbuf) abort();
    memset(accf, 0, (size_t)asize * sizeof(float));
    memset(accd, 0, (size_t)asize * sizeof(double));
    int chunks = 0;
    for (int64_t r0 = rb; r0 < re; r0 += ROW_CHUNK) {
        const int64_t r1 = r0 + ROW_CHUNK < re ? r0 + ROW_CHUNK : re;
        for (int64_t row = r0; row < r1; row++) {
            const int64_t off = row * C;
            for (int64_t cb = 0; cb < nb; cb++) {
                const int64_t c = 16 * cb, slot = (cb * ROW_CHUNK + (row - r0)) * 16;
                __mmask16 msk = tail_mask(C - c);
                __m512 lo = _mm512_maskz_loadu_ps(msk, left + c), hi = _mm512_maskz_loadu_ps(msk, right + c);
                __m512 inv = _mm512_maskz_loadu_ps(msk, invd + c);
                /* masked-off lanes load x = 0, g = 0 and add nothing */
                __m512 xv = ld16(x, off + c, msk, dt), g = ld16(gp, off + c, msk, dt), xl, u, fi;
                __m512i k = region16(xv, lo, hi, inv, nm1, np1, &xl, &u, &fi);
                __m512i base = _mm512_add_epi32(lane_m, _mm512_set1_epi32((int)(c * m)));
                __m512 a = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), msk, _mm512_add_epi32(base, k), sl, 4);
                /* dy/dx = slope of region k */
                st16(dx, off + c, _mm512_mul_ps(g, a), msk, dt);
                __m512 r = _mm512_sub_ps(u, fi);
                r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, lo, _CMP_LT_OQ), xl);
                r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, hi, _CMP_GE_OQ), _mm512_sub_ps(xv, hi));
                _mm512_store_si512(kbuf + slot, k);
                _mm512_store_ps(gbuf + slot, g);
                _mm512_store_ps(rbuf + slot, _mm512_mul_ps(g, r));
            }
        }
        for (int64_t cb = 0; cb < nb; cb++) {
            const int64_t slot = cb * ROW_CHUNK * 16;
            hist_block(kbuf + slot, gbuf + slot, rbuf + slot, r1 - r0, accf + cb * mg * 32, m);
        }
        if (++chunks == 256 / ROW_CHUNK) {
            flush_acc(accf, accd, nb * mg);
            chunks = 0;
        }
    }
    flush_acc(accf, accd, nb * mg);
    /* lanes are channels: acc[cb][k][s][l] belongs to channel 16 cb + l */
    for (int64_t cb = 0; cb < nb; cb++)
        for (int l = 0; l < 16 && 16 * cb + l < C; l++)
            for (int64_t k = 0; k < m; k++)
                for (int s2 = 0; s2 < 2; s2++)
                    h[((16 * cb + l) * m + k) * 2 + s2] += accd[((cb * mg + k) * 2 + s2) * 16 + l];
    free(accf);
    free(accd);
    free(kbuf);
    free(gbuf);
    free(rbuf);
}
#endif /* PWLU_AVX512 */

/* ---- generic (portable) segment/row kernels ---- */
static inline void fwd_seg_generic_f(const void *x, void *y, int64_t b, int64_t e, int dt, const float *sl,
                                     const float *ic, float lo, float hi, float inv, float sh, int64_t n) {
    for (int64_t i = b; i < e; i++) store_s(y, i, fwd_elem_f(load_s(x, i, dt), sl, ic, lo, hi, inv, sh, n), dt);
}
static inline void bwd_seg_generic_f(const void *gp, const void *x, void *dx, int64_t b, int64_t e, int dt,
                                     const float *sl, float lo, float hi, float inv, int64_t n, double *h,
                                     int64_t copy_stride) {
    for (int64_t i = b; i < e; i++)
        store_s(dx, i,
                bwd_elem_f(load_s(x, i, dt), load_s(gp, i, dt), sl, lo, hi, inv, n, h + ((i - b) % NCOPY) * copy_stride),
                dt);
}

/* ---- drivers ---- */
static int clamp_threads(int nthreads) { return nthreads < 1 ? 1 : nthreads; }

/* Reduce per-thread, per-copy histograms in a fixed order. */
static void reduce_hist(const double *parts, int nparts, int64_t size, double *out) {
    for (int64_t j = 0; j < size; j++) {
        double s = 0.0;
        for (int p = 0; p < nparts; p++) s += parts[(int64_t)p * size + j];
        out[j] = s;
    }
}

#define FWD_DRIVER(T, SUF, RANGE_FN, ROW_FN, ROWS_PRE, CHANNELS_OK, CHANNELS_FN)                               \
    int pwlu_forward_##SUF(const void *x, void *y, int dt, int64_t outer, int64_t C, int64_t inner, const T *sl, \
                           const T *ic, const T *left, const T *right, const T *invd, const T *shift, int64_t n,     \
                           int nthreads) {                                                                  \
        const int64_t m = n + 2;                                                                                \
        (void)dt;                                                                                               \
        nthreads = clamp_threads(nthreads);                                                                     \
        if (inner == 1 && C > 1) {                                                                              \
            _Pragma("omp parallel num_threads(nthreads)") {                                                     \
                int t = 0, nth = 1;                                                                             \
                PWLU_TID(t, nth);                                                                               \
                int64_t rb, re;                                                                                 \
                split(outer, t, nth, 1, &rb, &re);                                                              \
                int64_t r = rb;                                                                                 \
                ROWS_PRE;                                                                                       \
                for (; r < re; r++) ROW_FN;                                                                     \
            }                                                                                                   \
        } else if (CHANNELS_OK) {                                                                               \
            _Pragma("omp parallel num_threads(nthreads)") {                                                     \
                int t = 0, nth = 1;                                                                             \
                PWLU_TID(t, nth);                                                                               \
                int64_t cb, ce;                                                                                 \
                split(C, t, nth, 1, &cb, &ce);                                                                  \
                CHANNELS_FN;                                                                                    \
            }                                                                                                   \
        } else {                                                                                                \
            const int64_t total = outer * C * inner;                                                            \
            _Pragma("omp parallel num_threads(nthreads)") {                                                     \
                int t = 0, nth = 1;                                                                             \
                PWLU_TID(t, nth);                                                                               \
                int64_t pb, pe;                                                                                 \
                split(total, t, nth, ALIGN_ELEMS, &pb, &pe);                                                    \
                RANGE_FN;                                                                                       \
            }                                                                                                   \
        }                                                                                                       \
        (void)m;                                                                                                \
        return 0;                                                                                               \
    }

#ifdef _OPENMP
#define PWLU_TID(t, nth) (t = omp_get_thread_num(), nth = omp_get_num_threads())
#else
#define PWLU_TID(t, nth) ((void)0)
#endif

#if PWLU_AVX512
#define F_RANGE fwd_range_f(x, y, pb, pe, inner, C, dt, sl, ic, left, right, invd, shift, n)
/* rows shorter than this, several per channel: channel by channel (fwd_channels_f) */
#define SHORT_ROW 256
#define F_CHANNELS_OK (outer > 1 && inner < SHORT_ROW && n + 2 <= 32)
#define F_CHANNELS fwd_channels_f(x, y, cb, ce, outer, C, inner, dt, sl, ic, left, right, invd, shift, n)
#define F_ROW fwd_row_f(x, y, r * C, C, dt, sl, ic, left, right, invd, shift, n)
#define F_ROWS_PRE r = fwd_tiles_f(x, y, rb, re, C, dt, sl, ic, left, right, invd, shift, n)
#else
#define F_CHANNELS_OK 0
#define F_CHANNELS (void)0
#define F_ROWS_PRE (void)0
#define F_RANGE SEG_LOOP(fwd_seg_generic_f(x, y, pb, se, dt, sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n))
#define F_ROW                                                                                                    \
    for (int64_t c = 0; c < C; c++)                                                                              \
        store_s(y, r * C + c, fwd_elem_f(load_s(x, r * C + c, dt), sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n), dt)
#endif
FWD_DRIVER(float, f32c, F_RANGE, F_ROW, F_ROWS_PRE, F_CHANNELS_OK, F_CHANNELS)

#define D_SEG                                                                                                    \
    for (int64_t i = pb; i < se; i++)                                                                            \
        ((double *)y)[i] = fwd_elem_d(((const double *)x)[i], sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n)
#define D_ROW                                                                                                    \
    for (int64_t c = 0; c < C; c++)                                                                              \
        ((double *)y)[r * C + c] =                                                                               \
            fwd_elem_d(((const double *)x)[r * C + c], sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n)
FWD_DRIVER(double, f64, SEG_LOOP(D_SEG), D_ROW, (void)0, 0, (void)0)

#define BWD_DRIVER(T, SUF, RANGE_FN, ROWS_FN, COPIES, CHANNELS_OK, CHANNELS_FN)                                      \
    int pwlu_backward_##SUF(const void *gp, const void *x, void *dx, int dt, int64_t outer, int64_t C,             \
                            int64_t inner, const T *sl, const T *left, const T *right, const T *invd, int64_t n,  \
                            int nthreads, double *hist_out) {                                                     \
        const int64_t m = n + 2, hsize = C * m * 2;                                                               \
        (void)dt;                                                                                                 \
        nthreads = clamp_threads(nthreads);                                                                       \
        const int rows_mode = inner == 1 && C > 1;                                                                \
        const int channels_mode = !rows_mode && (CHANNELS_OK);                                                    \
        /* by channel (each thread its own channels), or one thread and one copy: straight into                  \
         * hist_out (zeroed by the caller), no partials */                                                        \
        const int direct = channels_mode || nthreads * (COPIES) == 1;                                             \
        double *parts = direct ? hist_out : (double *)calloc((size_t)nthreads * (COPIES) * hsize, sizeof(double)); \
        if (!parts) return 1;                                                                                     \
        int used = 1;                                                                                             \
        const int64_t total = outer * C * inner;                                                                  \
        _Pragma("omp parallel num_threads(nthreads)") {                                                           \
            int t = 0, nth = 1;                                                                                   \
            PWLU_TID(t, nth);                                                                                     \
            if (t == 0) used = nth;                                                                               \
            double *h = channels_mode ? hist_out : parts + (int64_t)t * (COPIES) * hsize;                           \
            if (channels_mode) {                                                                                  \
                int64_t cb, ce;                                                                                   \
                split(C, t, nth, 1, &cb, &ce);                                                                    \
                CHANNELS_FN;                                                                                      \
            } else if (rows_mode) {                                                                               \
                int64_t rb, re;                                                                                   \
                split(outer, t, nth, 1, &rb, &re);                                                                \
                ROWS_FN;                                                                                          \
            } else {                                                                                              \
                int64_t pb, pe;                                                                                   \
                split(total, t, nth, ALIGN_ELEMS, &pb, &pe);                                                      \
                RANGE_FN;                                                                                         \
            }                                                                                                     \
        }                                                                                                         \
        if (!direct) {                                                                                            \
            reduce_hist(parts, used * (COPIES), hsize, hist_out);                                                  \
            free(parts);                                                                                          \
        }                                                                                                         \
        return 0;                                                                                                 \
    }

#if PWLU_AVX512
/* Rows shorter than SHORT_SEG (small spatial maps) do not amortise the vector histogram's
 * per-segment set-up (accumulators, flush, lane sums): they go channel by channel through
 * bwd_channels_f. */
#define SHORT_SEG 512
#define FB_RANGE SEG_LOOP(bwd_seg_f(gp, x, dx, pb, se, dt, sl + c * m, left[c], right[c], invd[c], n, h + c * m * 2))
#define FB_CHANNELS_OK (inner < SHORT_SEG)
#define FB_CHANNELS bwd_channels_f(gp, x, dx, cb, ce, outer, C, inner, dt, sl, left, right, invd, n, h)
#define FB_ROWS bwd_rows_f(gp, x, dx, rb, re, C, dt, sl, left, right, invd, n, h)
/* one histogram per thread (no NCOPY copies: the vector paths keep lane-private sums, and a
 * short row is too short for long store-to-load chains) */
#define F32_COPIES 1
#else
#define FB_RANGE SEG_LOOP(bwd_seg_generic_f(gp, x, dx, pb, se, dt, sl + c * m, left[c], right[c], invd[c], n, h + c * m * 2, hsize))
#define FB_ROWS                                                                                                  \
    for (int64_t r = rb; r < re; r++)                                                                            \
    for (int64_t c = 0; c < C; c++)                                                                              \
        store_s(dx, r * C + c,                                                                                   \
                bwd_elem_f(load_s(x, r * C + c, dt), load_s(gp, r * C + c, dt), sl + c * m, left[c], right[c],   \
                           invd[c], n, h + (c % NCOPY) * hsize + c * m * 2),                                      \
                dt)
#define FB_CHANNELS_OK 0
#define FB_CHANNELS (void)0
#define F32_COPIES NCOPY
#endif
BWD_DRIVER(float, f32c, FB_RANGE, FB_ROWS, F32_COPIES, FB_CHANNELS_OK, FB_CHANNELS)

#define DB_SEG                                                                                                   \
    for (int64_t i = pb; i < se; i++)                                                                            \
        ((double *)dx)[i] = bwd_elem_d(((const double *)x)[i], ((const double *)gp)[i], sl + c * m, left[c],      \
                                       right[c], invd[c], n, h + ((i - pb) % NCOPY) * hsize + c * m * 2)
#define DB_ROWS                                                                                                  \
    for (int64_t r = rb; r < re; r++)                                                                            \
    for (int64_t c = 0; c < C; c++)                                                                              \
        ((double *)dx)[r * C + c] =                                                                              \
            bwd_elem_d(((const double *)x)[r * C + c], ((const double *)gp)[r * C + c], sl + c * m, left[c],     \
                       right[c], invd[c], n, h + (c % NCOPY) * hsize + c * m * 2)
BWD_DRIVER(double, f64, SEG_LOOP(DB_SEG), DB_ROWS, NCOPY, 0, (void)0)

/* Folding (common.fold_tables in C, to take ~20 tiny torch ops off every call).
 * Parameters in channel form: points (C, N+1), the others (C,), contiguous. Output: one
 * buffer holding slopes (C, N+2), intercepts (C, N+2), then left, right_eff, inv_d, shift
 * (C each). left/right_eff/inv_d use exactly the float operations of
 * common.effective_bounds (width floor, B_L + MIN_WIDTH, (1 / width) * N), so regions
 * agree bit for bit with the reference at breakpoints. */
#define PWLU_FOLD(T, NAME)                                                                          \
    int NAME(const T *pts, const T *bl, const T *br, const T *kl, const T *kr, int64_t C, int64_t n, \
             double min_width, T *out) {                                                            \
        const T minw = (T)min_width;                                                                \
        T *sl = out, *ic = out + C * (n + 2), *lo = ic + C * (n + 2), *ro = lo + C, *iv = ro + C,   \
          *sh = iv + C;                                                                             \
        for (int64_t c = 0; c < C; c++) {                                                           \
            const T *Y = pts + c * (n + 1);                                                         \
            const T L = bl[c], R = br[c], raw = R - L;                                              \
            const int ok = raw >= minw;                                                             \
            const T width = ok ? raw : minw;                                                        \
            const T Re = ok ? R : L + minw;                                                         \
            const T inv = ((T)1 / width) * (T)n;                                                    \
            T s = L > 0 ? L : (T)0;                                                                 \
            s = s < Re ? s : Re; /* the point of [B_L, B_R] nearest 0 */                            \
            const T d = width / (T)n, s_l = s - L;                                                  \
            T *a = sl + c * (n + 2), *b = ic + c * (n + 2);                                         \
            lo[c] = L;                                                                              \
            ro[c] = Re;                                                                             \
            iv[c] = inv;                                                                            \
            sh[c] = s;                                                                              \
            a[0] = kl[c];                                                                           \
            b[0] = Y[0] + s_l * kl[c];                                                              \
            for (int64_t i = 0; i < n; i++) { /* K_i = (Y[i+1] - Y[i]) / d, value at shift */       \
                const T k = (Y[i + 1] - Y[i]) * inv;                                                \
                a[i + 1] = k;                                                                       \
                b[i + 1] = Y[i] + (s_l - (T)i * d) * k;                                             \
            }                                                                                       \
            a[n + 1] = kr[c];                                                                       \
            b[n + 1] = Y[n] + (s - Re) * kr[c];                                                     \
        }                                                                                           \
        return 0;                                                                                   \
    }
/* no fused multiply-adds here: the tables equal common.fold_tables' bit for bit */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
PWLU_FOLD(float, pwlu_fold_f32)
PWLU_FOLD(double, pwlu_fold_f64)
#pragma GCC pop_options

/* Fold + kernel in one call, from the raw parameters (channel form, contiguous, in the
 * compute dtype): the per-call cost of a PWLU on small tensors is the Python around the
 * kernel, so the tables are built here, in a scratch buffer, instead of in ~20 torch ops.
 * The backward also does the gradient epilogue of common.param_grads_from_histogram, in
 * double, and writes the five parameter gradients, each to its own buffer:
 * d_points (C, N+1), then d_left_bound, d_right_bound, d_left_slope, d_right_slope (C each). */
#define PWLU_FUSED(T, SUF, FOLD)                                                                          \
    int pwlu_fold_forward_##SUF(const T *pts, const T *bl, const T *br, const T *kl, const T *kr,         \
                                double min_width, const void *x, void *y, int dt, int64_t outer,          \
                                int64_t C, int64_t inner, int64_t n, int nthreads) {                      \
        const int64_t sz = C * (n + 2);                                                                   \
        T *buf = (T *)malloc(sizeof(T) * (size_t)(2 * sz + 4 * C));                                       \
        if (!buf) return 1;                                                                               \
        FOLD(pts, bl, br, kl, kr, C, n, min_width, buf);                                                  \
        const T *sl = buf, *ic = buf + sz, *lo = ic + sz, *ro = lo + C, *iv = ro + C, *sh = iv + C;       \
        int rc = pwlu_forward_##SUF##_k(x, y, dt, outer, C, inner, sl, ic, lo, ro, iv, sh, n, nthreads);  \
        free(buf);                                                                                        \
        return rc;                                                                                        \
    }                                                                                                     \
    int pwlu_fold_backward_##SUF(const T *pts, const T *bl, const T *br, const T *kl, const T *kr,        \
                                 double min_width, const void *gp, const void *x, void *dx, int dt,       \
                                 int64_t outer, int64_t C, int64_t inner, int64_t n, int nthreads,        \
                                 T *dp, T *dl, T *dr, T *dkl, T *dkr) {                                   \
        const int64_t m = n + 2, sz = C * m;                                                              \
        T *buf = (T *)malloc(sizeof(T) * (size_t)(2 * sz + 4 * C));                                       \
        double *hist = (double *)calloc((size_t)(sz * 2), sizeof(double));                                \
        if (!buf || !hist) {                                                                              \
            free(buf);                                                                                    \
            free(hist);                                                                                   \
            return 1;                                                                                     \
        }                                                                                                 \
        FOLD(pts, bl, br, kl, kr, C, n, min_width, buf);                                                  \
        const T *sl = buf, *lo = buf + 2 * sz, *ro = lo + C, *iv = ro + C;                                \
        int rc = 0;                                                                                       \
        if (outer * C * inner > 0)                                                                        \
            rc = pwlu_backward_##SUF##_k(gp, x, dx, dt, outer, C, inner, sl, lo, ro, iv, n, nthreads, hist); \
        if (rc == 0) {                                                                                    \
            const T minw = (T)min_width;                                                                  \
            const double inv_n = 1.0 / (double)n; /* exact for N a power of two */                        \
            for (int64_t c = 0; c < C; c++) {                                                             \
                const double *h = hist + c * m * 2; /* h[2k] = sum g, h[2k+1] = sum g r in region k */    \
                const T *a = sl + c * m;                                                                  \
                double acc_l = -(double)kl[c] * h[0], acc_r = -(double)kr[c] * h[2 * (n + 1)];            \
                for (int64_t j = 0; j <= n; j++) dp[c * (n + 1) + j] = 0;                                 \
                /* dY[i] += sum g (1 - t), dY[i+1] += sum g t over interval i; outer pieces: sum g */     \
                double prev = h[0];                                                                       \
                for (int64_t i = 0; i < n; i++) {                                                         \
                    const double g = h[2 * (i + 1)], gt = h[2 * (i + 1) + 1];                             \
                    dp[c * (n + 1) + i] = (T)(prev + (g - gt));                                           \
                    prev = gt;                                                                            \
                    /* dB_L += -K_i sum g (1 - u/N), dB_R += -K_i sum g u/N, u = i + t */                 \
                    const double gu_n = ((double)i * g + gt) * inv_n;                                     \
                    acc_l -= (double)a[i + 1] * (g - gu_n);                                               \
                    acc_r -= (double)a[i + 1] * gu_n;                                                     \
                }                                                                                         \
                dp[c * (n + 1) + n] = (T)(prev + h[2 * (n + 1)]);                                         \
                dkl[c] = (T)h[1];           /* sum g (x - B_L) over x < B_L */                             \
                dkr[c] = (T)h[2 * (n + 1) + 1]; /* sum g (x - B_R) over x >= B_R */                       \
                if (br[c] - bl[c] < minw) { /* clamped to the minimum width: B_R follows B_L */           \
                    dl[c] = (T)(acc_l + acc_r);                                                           \
                    dr[c] = 0;                                                                            \
                } else {                                                                                  \
                    dl[c] = (T)acc_l;                                                                     \
                    dr[c] = (T)acc_r;                                                                     \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        free(buf);                                                                                        \
        free(hist);                                                                                       \
        return rc;                                                                                        \
    }
#define pwlu_forward_f32c_k pwlu_forward_f32c
#define pwlu_forward_f64_k pwlu_forward_f64
#define pwlu_backward_f32c_k pwlu_backward_f32c
#define pwlu_backward_f64_k pwlu_backward_f64
PWLU_FUSED(float, f32c, pwlu_fold_f32)
PWLU_FUSED(double, f64, pwlu_fold_f64)

/* A forward whose arguments were prepared once (pwlu.ops.cpu.plan.InferencePlan): three
 * arguments per call instead of fourteen, for the many small calls of a model's inference.
 * The five parameter tensors are compared byte for byte with the snapshot the tables were
 * folded from; on any difference nothing is computed and 2 is returned (the caller rebuilds
 * the plan), so the tables can never be stale, whatever wrote to the parameters. */
typedef struct {
    int64_t dt, outer, C, inner, n, nthreads;
    const void *sl, *ic, *lo, *ro, *iv, *sh;
    const void *live[5], *snap[5];
    int64_t bytes[5];
} pwlu_plan;
int pwlu_forward_plan(const pwlu_plan *p, const void *x, void *y) {
    for (int i = 0; i < 5; i++)
        if (memcmp(p->live[i], p->snap[i], (size_t)p->bytes[i]) != 0) return 2;
    if (p->dt == PWLU_F64)
        return pwlu_forward_f64(x, y, (int)p->dt, p->outer, p->C, p->inner, p->sl, p->ic, p->lo, p->ro, p->iv, p->sh,
                                p->n, (int)p->nthreads);
    return pwlu_forward_f32c(x, y, (int)p->dt, p->outer, p->C, p->inner, p->sl, p->ic, p->lo, p->ro, p->iv, p->sh,
                             p->n, (int)p->nthreads);
}
