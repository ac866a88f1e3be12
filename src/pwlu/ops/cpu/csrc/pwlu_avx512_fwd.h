/* AVX-512 forward, float compute (fp32, fp16, bf16 storage), 16 elements per vector.
 *
 * Three ways through an (outer, C, inner) tensor, chosen by the driver (pwlu_cpu.c):
 *   avx512_fwd_range     elements [pb, pe) row segment by row segment (long rows);
 *   avx512_fwd_channels  channels [cb, ce), each channel's tables loaded once for its `outer`
 *                        rows (short rows: small feature maps);
 *   avx512_fwd_rows      rows of C channels, channels fastest (inner == 1): 16 x 16 tiles
 *                        transposed in registers (partial tiles at the edges).
 * With N + 2 <= REG_TABLE the slope and intercept are looked up in registers (vpermt2ps), else
 * gathered. `dt` is a compile-time constant in the drivers' dtype switch: these are inlined.
 */
#ifndef PWLU_AVX512_FWD_H
#define PWLU_AVX512_FWD_H

#include "pwlu_common.h"

#if PWLU_AVX512
/* y = a (x - sh) + b; a flat piece gives its value b, also where x - sh is +-inf (not
 * 0 * inf = NaN); NaN x stays NaN. One FMA unless some x - sh of the 16 is infinite (one
 * vfpclassps and a branch that is never taken on finite data). */
PWLU_INLINE __m512 finish16(__m512 x, __m512 sh, __m512 a, __m512 b) {
    const __m512 d = _mm512_sub_ps(x, sh);
    if (__builtin_expect(_mm512_fpclass_ps_mask(d, 0x18 /* +inf, -inf */) == 0, 1)) return _mm512_fmadd_ps(a, d, b);
    const __mmask16 use_fma = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ) |
                              _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask3_fmadd_ps(a, d, b, use_fma);
}

/* Forward lookup of one channel (N + 2 <= REG_TABLE), everything in registers. The tables are
 * rotated so that the region index needs no +1: entry j < N is interval j, entry N is the
 * right piece and entry REG_TABLE - 1 the left one. Per 16 elements: the floor of
 * (x - B_L) / d as an int (one conversion), clamped to N - 1, the two boundary compares, two
 * permutes, one FMA. */
typedef struct { /* per call: depends on N only */
    __mmask16 m0, m1;
    __m512i last, right, minus1;
    int64_t m; /* N + 2: table entries per channel */
} fwd_consts;
typedef struct { /* per channel */
    __m512 a0, a1, b0, b1, lo, hi, inv, sh;
} fwd_chan;
static inline fwd_consts make_fwd_consts(int64_t n) {
    const int64_t cnt = n + 1; /* entries 1 .. N + 1 of the channel's tables */
    fwd_consts k = {tail_mask(cnt), cnt > 16 ? tail_mask(cnt - 16) : (__mmask16)0, _mm512_set1_epi32((int)(n - 1)),
                    _mm512_set1_epi32((int)n), _mm512_set1_epi32(-1), n + 2};
    return k;
}
static inline __attribute__((always_inline)) fwd_chan load_fwd_chan(const float *sl, const float *ic, float lo,
                                                                    float hi, float inv, float sh,
                                                                    const fwd_consts *k) {
    /* masked loads of entries 1 .. N + 1 (nothing read past the channel), entry 0 into the top lane */
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
    /* x < B_L gives x - B_L < 0, so u <= -0 and k <= -1 (entry REG_TABLE - 1 by its low 5 bits
     * once clamped to -1), except where (x - B_L) inv underflows to -0 (both within a subnormal
     * of each other, inv < 1/2): interval 0 there, whose value at x equals the left piece's.
     * NaN, -inf and out-of-range u convert to INT_MIN, clamped to -1 too (NaN x stays NaN in
     * finish16; u >= 2^31 only for x >= B_R, which takes the right piece). */
    __m512i k = _mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    k = _mm512_max_epi32(_mm512_min_epi32(k, c->last), c->minus1);
    k = _mm512_mask_mov_epi32(k, _mm512_cmp_ps_mask(x, t->hi, _CMP_GE_OQ), c->right);
    return finish16(x, t->sh, _mm512_permutex2var_ps(t->a0, k, t->a1), _mm512_permutex2var_ps(t->b0, k, t->b1));
}

/* One segment of one channel (x[b:e], all of channel c), N + 2 > REG_TABLE: tables by gather. */
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

/* Elements [pb, pe) of an (outer, C, inner) tensor, row segment by row segment, no call per
 * row (a 4x4 feature map is one vector per row). The per-call constants are set up once;
 * each row costs its table loads and broadcasts. */
static inline __attribute__((always_inline)) void avx512_fwd_range(const void *x, void *y, int64_t pb, int64_t pe,
                                                                   int64_t inner, int64_t C, const int dt,
                                                                   const float *sl, const float *ic,
                                                                   const float *left, const float *right,
                                                                   const float *invd, const float *shift,
                                                                   int64_t n) {
    const int64_t m = n + 2;
    if (m <= REG_TABLE) {
        const fwd_consts k = make_fwd_consts(n);
        for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C)) {
            const int64_t c = s.c;
            const fwd_chan t = load_fwd_chan(sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], &k);
            fwd_lookup_seg(x, y, s.b, s.e, dt, &t, &k);
        }
    } else {
        for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C)) {
            const int64_t c = s.c;
            fwd_seg_gather_f(x, y, s.b, s.e, dt, sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], n);
        }
    }
}

/* Channels [cb, ce) of an (outer, C, inner) tensor with short rows (small feature maps), channel
 * by channel: each channel's tables are loaded once for its `outer` rows, not once per row.
 * In row order the tables of all C channels stream through the cache once per batch element,
 * which for a 4x4 map is as much traffic as x itself. N + 2 <= REG_TABLE. */
static inline __attribute__((always_inline)) void avx512_fwd_channels(const void *x, void *y, int64_t cb,
                                                                      int64_t ce, int64_t outer, int64_t C,
                                                                      int64_t inner, const int dt, const float *sl,
                                                                      const float *ic, const float *left,
                                                                      const float *right, const float *invd,
                                                                      const float *shift, int64_t n) {
    const int64_t m = n + 2;
    const fwd_consts k = make_fwd_consts(n);
    for (int64_t c = cb; c < ce; c++) {
        const fwd_chan t = load_fwd_chan(sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], &k);
        for (int64_t o = 0; o < outer; o++) fwd_lookup_seg(x, y, (o * C + c) * inner, (o * C + c + 1) * inner, dt, &t, &k);
    }
}

/* Channels fastest (inner == 1), N + 2 > REG_TABLE: a row of C channels, per-lane tables by gather. */
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

/* Channels fastest, forward, one tile of nr <= 16 rows x nc <= 16 channels (rows r0 ..,
 * channels c0 ..): transpose it so that each vector holds one channel, use the in-register
 * table lookup of the NCHW path (no gathers), transpose back. Rows past nr are zeros and
 * channels past nc are not computed; only the tile's own elements are stored. With nr and nc
 * the constant 16 (whole tiles) the compiler keeps the tile in registers. N + 2 <= REG_TABLE. */
static inline __attribute__((always_inline)) void fwd_tile_f(const void *x, void *y, int64_t r0, const int nr,
                                                             int64_t c0, const int nc, int64_t C, const int dt,
                                                             const float *sl, const float *ic, const float *left,
                                                             const float *right, const float *invd,
                                                             const float *shift, const fwd_consts *k, const int pf) {
    const int64_t m = k->m;
    const __mmask16 cm = tail_mask(nc);
    __m512 v[16];
    if (pf) /* this channel block's lines of the next 16 rows: 32 short strided streams defeat the
             * hardware prefetcher */
        for (int i = 0; i < 16; i++) {
            _mm_prefetch(elem_ptr(x, (r0 + 16 + i) * C + c0, dt), _MM_HINT_T0);
            _mm_prefetch(elem_ptr(y, (r0 + 16 + i) * C + c0, dt), _MM_HINT_ET0);
        }
    /* fully unrolled, so that v stays in registers (a loop over j indexes v in memory: a store
     * and a reload per vector) */
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) v[i] = i < nr ? ld16(x, (r0 + i) * C + c0, cm, dt) : _mm512_setzero_ps();
    transpose16(v); /* v[j]: channel c0 + j of rows r0 .. r0 + 15 */
#pragma GCC unroll 16
    for (int j = 0; j < nc; j++) {
        const int64_t c = c0 + j;
        const fwd_chan t = load_fwd_chan(sl + c * m, ic + c * m, left[c], right[c], invd[c], shift[c], k);
        v[j] = fwd16(v[j], &t, k);
    }
    transpose16(v);
#pragma GCC unroll 16
    for (int i = 0; i < nr; i++) st16(y, (r0 + i) * C + c0, v[i], cm, dt);
}

/* Rows [rb, re) of C channels (inner == 1): 16 x 16 tiles transposed in registers, the last
 * row block and the last channel block (C % 16) as partial tiles; N + 2 > REG_TABLE: by gather. */
static inline __attribute__((always_inline)) void avx512_fwd_rows(const void *x, void *y, int64_t rb, int64_t re,
                                                                  int64_t C, const int dt, const float *sl,
                                                                  const float *ic, const float *left,
                                                                  const float *right, const float *invd,
                                                                  const float *shift, int64_t n) {
    if (n + 2 > REG_TABLE) {
        for (int64_t r = rb; r < re; r++) fwd_row_f(x, y, r * C, C, dt, sl, ic, left, right, invd, shift, n);
        return;
    }
    const fwd_consts k = make_fwd_consts(n);
    const int64_t cfull = C / 16 * 16;
    int64_t r0 = rb;
    for (; r0 + 32 <= re; r0 += 16) { /* with a prefetch of the next 16 rows */
        for (int64_t c0 = 0; c0 < cfull; c0 += 16)
            fwd_tile_f(x, y, r0, 16, c0, 16, C, dt, sl, ic, left, right, invd, shift, &k, 1);
        if (cfull < C)
            fwd_tile_f(x, y, r0, 16, cfull, (int)(C - cfull), C, dt, sl, ic, left, right, invd, shift, &k, 1);
    }
    for (; r0 + 16 <= re; r0 += 16) {
        for (int64_t c0 = 0; c0 < cfull; c0 += 16)
            fwd_tile_f(x, y, r0, 16, c0, 16, C, dt, sl, ic, left, right, invd, shift, &k, 0);
        if (cfull < C)
            fwd_tile_f(x, y, r0, 16, cfull, (int)(C - cfull), C, dt, sl, ic, left, right, invd, shift, &k, 0);
    }
    if (r0 < re)
        for (int64_t c0 = 0; c0 < C; c0 += 16)
            fwd_tile_f(x, y, r0, (int)(re - r0), c0, C - c0 < 16 ? (int)(C - c0) : 16, C, dt, sl, ic, left, right,
                       invd, shift, &k, 0);
}
#endif /* PWLU_AVX512 */

#endif /* PWLU_AVX512_FWD_H */
