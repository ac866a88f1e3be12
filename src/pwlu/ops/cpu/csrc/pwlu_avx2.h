/* AVX2 forward and backward, float compute (fp32, fp16, bf16 storage), 8 elements per vector:
 * the path of x86 CPUs without AVX-512 (AMD Zen 2/3, most Intel client cores) that have AVX2,
 * FMA and F16C. The same arithmetic as the AVX-512 and scalar paths (pwlu_cpu.c's comment):
 * the region index as region16, y = a (x - sh) + b, dx = g a, r as bwd16.
 *
 * The tables of one channel (N + 2 <= AVX2_TABLE entries, original order: 0 left piece,
 * i + 1 interval i, N + 1 right piece) sit in `nreg` = ceil((N + 2) / 8) registers; a lookup is
 * one vpermps per register, merged by the index's high bits. Larger N goes the scalar way.
 * Two ways through an (outer, C, inner) tensor:
 *   avx2_fwd_range / avx2_bwd_range  elements [pb, pe) row segment by row segment;
 *   avx2_fwd_rows / avx2_bwd_rows    rows of C channels (inner == 1): 8 x 8 tiles transposed in
 *                                    registers, so that each vector is one channel's.
 * The backward's histogram: each element's (g, g r) is added into double bins, lane l into copy
 * l % NCOPY (hsize doubles apart), as the scalar path (the copies break store-to-load chains).
 * `dt` and `nreg` are compile-time constants in the drivers' switches: these are inlined.
 */
#ifndef PWLU_AVX2_H
#define PWLU_AVX2_H

#include "pwlu_common.h"

#if PWLU_AVX2
#define AVX2_TABLE 32 /* N + 2 <= AVX2_TABLE: tables in (at most 4) registers */

/* ---- loads and stores of 8 elements: whole vectors, and the first cnt < 8 through a buffer ---- */
static inline __m256 ld8(const void *p, int64_t i, int dt) {
    switch (dt) {
    case PWLU_F32: return _mm256_loadu_ps((const float *)p + i);
    case PWLU_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    default:
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    }
}
static inline void st8(void *p, int64_t i, __m256 v, int dt) {
    switch (dt) {
    case PWLU_F32: _mm256_storeu_ps((float *)p + i, v); break;
    case PWLU_F16:
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        break;
    default: { /* round to nearest even, NaN -> 0x7FC0 (as f32_to_bf16) */
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
    }
}
static inline size_t elem_size(int dt) { return dt == PWLU_F32 ? 4 : 2; }
static inline __m256 ld8n(const void *p, int64_t i, int cnt, int dt) {
    unsigned char buf[32] = {0}; /* zeros past cnt: x = 0, g = 0 */
    memcpy(buf, (const char *)p + i * (int64_t)elem_size(dt), (size_t)cnt * elem_size(dt));
    return ld8(buf, 0, dt);
}
static inline void st8n(void *p, int64_t i, __m256 v, int cnt, int dt) {
    unsigned char buf[32];
    st8(buf, 0, v, dt);
    memcpy((char *)p + i * (int64_t)elem_size(dt), buf, (size_t)cnt * elem_size(dt));
}
static inline __m256 ld8c(const void *p, int64_t i, int cnt, const int dt) {
    return cnt == 8 ? ld8(p, i, dt) : ld8n(p, i, cnt, dt);
}
static inline void st8c(void *p, int64_t i, __m256 v, int cnt, const int dt) {
    if (cnt == 8)
        st8(p, i, v, dt);
    else
        st8n(p, i, v, cnt, dt);
}

/* ---- one channel's table in registers, and the lookup ---- */
typedef struct {
    __m256 t[4]; /* t[q]: entries 8 q .. 8 q + 7, zeros past the table */
} tab8;
static inline __attribute__((always_inline)) tab8 load_tab8(const float *s, int64_t m, const int nreg) {
    tab8 r;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int q = 0; q < nreg; q++) {
        const int64_t cnt = m - 8 * q;
        r.t[q] = cnt >= 8 ? _mm256_loadu_ps(s + 8 * q) /* nothing is read past entry m - 1 */
                          : _mm256_maskload_ps(s + 8 * q, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cnt), lane));
    }
    return r;
}
static inline __attribute__((always_inline)) __m256 lookup8(const tab8 *t, __m256i k, const int nreg) {
    __m256 r = _mm256_permutevar8x32_ps(t->t[0], k);
    for (int q = 1; q < nreg; q++) {
        const __m256 p = _mm256_permutevar8x32_ps(t->t[q], k);
        r = _mm256_blendv_ps(r, p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, _mm256_set1_epi32(8 * q - 1))));
    }
    return r;
}

/* Region index k (0 left, i + 1 interval i, N + 1 right) and x - lo, u, i of 8 elements, as region16. */
static inline __m256i region8(__m256 x, __m256 lo, __m256 hi, __m256 inv, __m256 nm1, __m256i np1, __m256 *xl,
                              __m256 *u, __m256 *fi) {
    *xl = _mm256_sub_ps(x, lo);
    *u = _mm256_mul_ps(*xl, inv);
    __m256 f = _mm256_floor_ps(*u);
    f = _mm256_min_ps(_mm256_max_ps(f, _mm256_setzero_ps()), nm1); /* max(NaN, 0) = 0 */
    *fi = f;
    __m256i k = _mm256_add_epi32(_mm256_cvttps_epi32(f), _mm256_set1_epi32(1));
    k = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(x, lo, _CMP_LT_OQ)), k); /* left: 0 */
    return _mm256_blendv_epi8(k, np1, _mm256_castps_si256(_mm256_cmp_ps(x, hi, _CMP_GE_OQ)));
}

/* Per-channel constants. */
typedef struct {
    tab8 a, b; /* slopes; intercepts (forward only) */
    __m256 lo, hi, inv, sh, nm1;
    __m256i np1;
} chan8;
static inline __attribute__((always_inline)) chan8 load_chan8(const float *sl, const float *ic, float lo, float hi,
                                                              float inv, float sh, int64_t n, const int nreg) {
    chan8 c;
    c.a = load_tab8(sl, n + 2, nreg);
    c.b = ic ? load_tab8(ic, n + 2, nreg) : c.a; /* the backward has no intercepts */
    c.lo = _mm256_set1_ps(lo);
    c.hi = _mm256_set1_ps(hi);
    c.inv = _mm256_set1_ps(inv);
    c.sh = _mm256_set1_ps(sh);
    c.nm1 = _mm256_set1_ps((float)(n - 1));
    c.np1 = _mm256_set1_epi32((int)(n + 1));
    return c;
}

/* y = a (x - sh) + b; a flat piece gives b, also at x = +-inf; NaN stays NaN (as finish16). */
static inline __attribute__((always_inline)) __m256 fwd8(__m256 x, const chan8 *c, const int nreg) {
    __m256 xl, u, fi;
    const __m256i k = region8(x, c->lo, c->hi, c->inv, c->nm1, c->np1, &xl, &u, &fi);
    const __m256 a = lookup8(&c->a, k, nreg), b = lookup8(&c->b, k, nreg);
    const __m256 use_fma = _mm256_or_ps(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_ps(b, _mm256_fmadd_ps(a, _mm256_sub_ps(x, c->sh), b), use_fma);
}

/* dx = g a; returns k, and g r in *gr (r = x - lo left, x - hi right, u - i inside; as bwd16). */
static inline __attribute__((always_inline)) __m256 bwd8(__m256 x, __m256 g, const chan8 *c, const int nreg,
                                                         __m256i *k_out, __m256 *gr_out) {
    __m256 xl, u, fi;
    const __m256i k = region8(x, c->lo, c->hi, c->inv, c->nm1, c->np1, &xl, &u, &fi);
    __m256 r = _mm256_sub_ps(u, fi);
    r = _mm256_blendv_ps(r, xl, _mm256_cmp_ps(x, c->lo, _CMP_LT_OQ));
    r = _mm256_blendv_ps(r, _mm256_sub_ps(x, c->hi), _mm256_cmp_ps(x, c->hi, _CMP_GE_OQ));
    *k_out = k;
    *gr_out = _mm256_mul_ps(g, r);
    return _mm256_mul_ps(g, lookup8(&c->a, k, nreg));
}

/* The first cnt lanes' (g, g r) into h (one channel's bins of copy 0; copy j is j hsize further). */
static inline __attribute__((always_inline)) void scatter8(double *h, int64_t hsize, __m256i k, __m256 g, __m256 gr,
                                                           int cnt) {
    int32_t kk[8];
    float gg[8], rr[8];
    _mm256_storeu_si256((__m256i *)kk, k);
    _mm256_storeu_ps(gg, g);
    _mm256_storeu_ps(rr, gr);
    for (int l = 0; l < cnt; l++) {
        double *b = h + (l % NCOPY) * hsize + 2 * kk[l];
        b[0] += (double)gg[l];
        b[1] += (double)rr[l];
    }
}

/* ---- elements [pb, pe) of an (outer, C, inner) tensor, row segment by row segment ---- */
static inline __attribute__((always_inline)) void avx2_fwd_range_n(const void *x, void *y, int64_t pb, int64_t pe,
                                                                   int64_t inner, int64_t C, const int dt,
                                                                   const float *sl, const float *ic,
                                                                   const float *left, const float *right,
                                                                   const float *invd, const float *shift, int64_t n,
                                                                   const int nreg) {
    const int64_t m = n + 2;
    for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C)) {
        const int64_t c = s.c;
        const chan8 ch = load_chan8(sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n, nreg);
        int64_t i = s.b;
        for (; i + 8 <= s.e; i += 8) st8(y, i, fwd8(ld8(x, i, dt), &ch, nreg), dt);
        if (i < s.e) st8n(y, i, fwd8(ld8n(x, i, (int)(s.e - i), dt), &ch, nreg), (int)(s.e - i), dt);
    }
}
static inline __attribute__((always_inline)) void avx2_bwd_range_n(const void *gp, const void *x, void *dx,
                                                                   int64_t pb, int64_t pe, int64_t inner, int64_t C,
                                                                   const int dt, const float *sl, const float *left,
                                                                   const float *right, const float *invd, int64_t n,
                                                                   double *h, int64_t hsize, const int nreg) {
    const int64_t m = n + 2;
    for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C)) {
        const int64_t c = s.c;
        const chan8 ch = load_chan8(sl + c * m, NULL, left[c], right[c], invd[c], 0.0f, n, nreg);
        double *hc = h + c * m * 2;
        __m256i k;
        __m256 gr;
        int64_t i = s.b;
        for (; i + 8 <= s.e; i += 8) {
            const __m256 g = ld8(gp, i, dt);
            st8(dx, i, bwd8(ld8(x, i, dt), g, &ch, nreg, &k, &gr), dt);
            scatter8(hc, hsize, k, g, gr, 8);
        }
        if (i < s.e) {
            const int cnt = (int)(s.e - i);
            const __m256 g = ld8n(gp, i, cnt, dt);
            st8n(dx, i, bwd8(ld8n(x, i, cnt, dt), g, &ch, nreg, &k, &gr), cnt, dt);
            scatter8(hc, hsize, k, g, gr, cnt);
        }
    }
}

/* In-register transpose of an 8 x 8 float tile (its own inverse). */
static inline __attribute__((always_inline)) void transpose8(__m256 *r) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* ---- rows of C channels (inner == 1): tiles of nr <= 8 rows x nc <= 8 channels; rows past nr
 * are zeros (x = 0, g = 0: they add nothing), channels past nc are not computed ---- */
static inline __attribute__((always_inline)) void fwd_tile8(const void *x, void *y, int64_t r0, const int nr,
                                                            int64_t c0, const int nc, int64_t C, const int dt,
                                                            const float *sl, const float *ic, const float *left,
                                                            const float *right, const float *invd,
                                                            const float *shift, int64_t n, const int nreg) {
    const int64_t m = n + 2;
    __m256 v[8];
    for (int i = 0; i < 8; i++) v[i] = i < nr ? ld8c(x, (r0 + i) * C + c0, nc, dt) : _mm256_setzero_ps();
    transpose8(v); /* v[j]: channel c0 + j of rows r0 .. r0 + 7 */
    for (int j = 0; j < nc; j++) {
        const int64_t c = c0 + j;
        const chan8 ch = load_chan8(sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n, nreg);
        v[j] = fwd8(v[j], &ch, nreg);
    }
    transpose8(v);
    for (int i = 0; i < nr; i++) st8c(y, (r0 + i) * C + c0, v[i], nc, dt);
}
static inline __attribute__((always_inline)) void bwd_tile8(const void *gp, const void *x, void *dx, int64_t r0,
                                                            const int nr, int64_t c0, const int nc, int64_t C,
                                                            const int dt, const float *sl, const float *left,
                                                            const float *right, const float *invd, int64_t n,
                                                            double *h, int64_t hsize, const int nreg) {
    const int64_t m = n + 2;
    __m256 v[8], g[8];
    for (int i = 0; i < 8; i++) {
        v[i] = i < nr ? ld8c(x, (r0 + i) * C + c0, nc, dt) : _mm256_setzero_ps();
        g[i] = i < nr ? ld8c(gp, (r0 + i) * C + c0, nc, dt) : _mm256_setzero_ps();
    }
    transpose8(v);
    transpose8(g);
    for (int j = 0; j < nc; j++) {
        const int64_t c = c0 + j;
        const chan8 ch = load_chan8(sl + c * m, NULL, left[c], right[c], invd[c], 0.0f, n, nreg);
        __m256i k;
        __m256 gr;
        v[j] = bwd8(v[j], g[j], &ch, nreg, &k, &gr);
        scatter8(h + c * m * 2, hsize, k, g[j], gr, nr);
    }
    transpose8(v);
    for (int i = 0; i < nr; i++) st8c(dx, (r0 + i) * C + c0, v[i], nc, dt);
}
static inline __attribute__((always_inline)) void avx2_fwd_rows_n(const void *x, void *y, int64_t rb, int64_t re,
                                                                  int64_t C, const int dt, const float *sl,
                                                                  const float *ic, const float *left,
                                                                  const float *right, const float *invd,
                                                                  const float *shift, int64_t n, const int nreg) {
    const int64_t cfull = C / 8 * 8;
    int64_t r0 = rb;
    for (; r0 + 8 <= re; r0 += 8) {
        for (int64_t c0 = 0; c0 < cfull; c0 += 8)
            fwd_tile8(x, y, r0, 8, c0, 8, C, dt, sl, ic, left, right, invd, shift, n, nreg);
        if (cfull < C) fwd_tile8(x, y, r0, 8, cfull, (int)(C - cfull), C, dt, sl, ic, left, right, invd, shift, n, nreg);
    }
    if (r0 < re)
        for (int64_t c0 = 0; c0 < C; c0 += 8)
            fwd_tile8(x, y, r0, (int)(re - r0), c0, C - c0 < 8 ? (int)(C - c0) : 8, C, dt, sl, ic, left, right, invd,
                      shift, n, nreg);
}
static inline __attribute__((always_inline)) void avx2_bwd_rows_n(const void *gp, const void *x, void *dx, int64_t rb,
                                                                  int64_t re, int64_t C, const int dt,
                                                                  const float *sl, const float *left,
                                                                  const float *right, const float *invd, int64_t n,
                                                                  double *h, int64_t hsize, const int nreg) {
    const int64_t cfull = C / 8 * 8;
    int64_t r0 = rb;
    for (; r0 + 8 <= re; r0 += 8) {
        for (int64_t c0 = 0; c0 < cfull; c0 += 8)
            bwd_tile8(gp, x, dx, r0, 8, c0, 8, C, dt, sl, left, right, invd, n, h, hsize, nreg);
        if (cfull < C)
            bwd_tile8(gp, x, dx, r0, 8, cfull, (int)(C - cfull), C, dt, sl, left, right, invd, n, h, hsize, nreg);
    }
    if (r0 < re)
        for (int64_t c0 = 0; c0 < C; c0 += 8)
            bwd_tile8(gp, x, dx, r0, (int)(re - r0), c0, C - c0 < 8 ? (int)(C - c0) : 8, C, dt, sl, left, right, invd,
                      n, h, hsize, nreg);
}

/* The entry points: nreg as a compile-time constant (N + 2 <= AVX2_TABLE). */
#define AVX2_NREG_SWITCH(n, CALL)                    \
    switch (((n) + 2 + 7) / 8) {                     \
    case 1: CALL(1); break;                          \
    case 2: CALL(2); break;                          \
    case 3: CALL(3); break;                          \
    default: CALL(4); break;                         \
    }
static inline __attribute__((always_inline)) void avx2_fwd_range(const void *x, void *y, int64_t pb, int64_t pe,
                                                                 int64_t inner, int64_t C, const int dt,
                                                                 const float *sl, const float *ic, const float *left,
                                                                 const float *right, const float *invd,
                                                                 const float *shift, int64_t n) {
#define CALL(R) avx2_fwd_range_n(x, y, pb, pe, inner, C, dt, sl, ic, left, right, invd, shift, n, R)
    AVX2_NREG_SWITCH(n, CALL)
#undef CALL
}
static inline __attribute__((always_inline)) void avx2_fwd_rows(const void *x, void *y, int64_t rb, int64_t re,
                                                                int64_t C, const int dt, const float *sl,
                                                                const float *ic, const float *left, const float *right,
                                                                const float *invd, const float *shift, int64_t n) {
#define CALL(R) avx2_fwd_rows_n(x, y, rb, re, C, dt, sl, ic, left, right, invd, shift, n, R)
    AVX2_NREG_SWITCH(n, CALL)
#undef CALL
}
static inline __attribute__((always_inline)) void avx2_bwd_range(const void *gp, const void *x, void *dx, int64_t pb,
                                                                 int64_t pe, int64_t inner, int64_t C, const int dt,
                                                                 const float *sl, const float *left,
                                                                 const float *right, const float *invd, int64_t n,
                                                                 double *h, int64_t hsize) {
#define CALL(R) avx2_bwd_range_n(gp, x, dx, pb, pe, inner, C, dt, sl, left, right, invd, n, h, hsize, R)
    AVX2_NREG_SWITCH(n, CALL)
#undef CALL
}
static inline __attribute__((always_inline)) void avx2_bwd_rows(const void *gp, const void *x, void *dx, int64_t rb,
                                                                int64_t re, int64_t C, const int dt, const float *sl,
                                                                const float *left, const float *right,
                                                                const float *invd, int64_t n, double *h,
                                                                int64_t hsize) {
#define CALL(R) avx2_bwd_rows_n(gp, x, dx, rb, re, C, dt, sl, left, right, invd, n, h, hsize, R)
    AVX2_NREG_SWITCH(n, CALL)
#undef CALL
}
#endif /* PWLU_AVX2 */

#endif /* PWLU_AVX2_H */
