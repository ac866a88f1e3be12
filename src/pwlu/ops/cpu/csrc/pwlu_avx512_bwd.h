/* AVX-512 backward, float compute (fp32, fp16, bf16 storage): dx = g * slope of the region,
 * and the parameter-gradient histogram hist[c, k] += (g, g * r) in double.
 *
 * Three ways through an (outer, C, inner) tensor, chosen by the driver (pwlu_cpu.c):
 *   avx512_bwd_range     elements [pb, pe) row segment by row segment, a lane-private
 *                        histogram per segment (bwd_seg_f);
 *   avx512_bwd_channels  channels [cb, ce) with short rows: each element added into the
 *                        channel's double bins (one thread per channel, no partials);
 *   avx512_bwd_rows      rows of C channels, channels fastest (inner == 1): lanes are channels
 *                        (the slope lookup of dx on 16 x 16 tiles transposed in registers).
 * The lane-private histogram: acc[k][s][lane] (s = 0: g, s = 1: g*r); region j is added with one
 * compare and two masked adds per 16 elements, REGION_GROUP regions at a time so that their
 * accumulators stay in registers; float accumulators take at most LANE_TERMS terms per lane
 * before they are added into double ones. Functions that allocate return PWLU_OK or
 * PWLU_ERR_NOMEM.
 */
#ifndef PWLU_AVX512_BWD_H
#define PWLU_AVX512_BWD_H

#include "pwlu_common.h"

#if PWLU_AVX512
/* Slopes of one channel, padded to REG_TABLE entries, for the in-register lookup. */
typedef struct {
    __m512 a0, a1;
} table32;
static inline table32 load_table32(const float *sl, int64_t m) {
    /* masked loads: nothing is read past entry m - 1, the padding is 0 */
    const __mmask16 m0 = tail_mask(m), m1 = m > 16 ? tail_mask(m - 16) : (__mmask16)0;
    table32 t = {_mm512_maskz_loadu_ps(m0, sl), _mm512_maskz_loadu_ps(m1, sl + 16)};
    return t;
}

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
    c.t = load_table32(sl, c.m <= REG_TABLE ? c.m : REG_TABLE);
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
    __m512 a = c->m <= REG_TABLE ? _mm512_permutex2var_ps(c->t.a0, k, c->t.a1) : _mm512_i32gather_ps(k, c->sl, 4);
    st16(dx, i, _mm512_mul_ps(g, a), msk, dt);
    __m512 r = _mm512_sub_ps(u, fi);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, c->lo, _CMP_LT_OQ), xl);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, c->hi, _CMP_GE_OQ), _mm512_sub_ps(xv, c->hi));
    *g_out = g;
    *gr_out = _mm512_mul_ps(g, r);
    return k;
}

/* One segment of one channel (x[b:e]) into h, that channel's histogram. */
static inline int bwd_seg_f(const void *gp, const void *x, void *dx, int64_t b, int64_t e, int dt, const float *sl,
                            float lo_s, float hi_s, float inv_s, int64_t n, double *h) {
    const int64_t m = n + 2, mg = (m + REGION_GROUP - 1) / REGION_GROUP * REGION_GROUP;
    /* accumulators: float then double, [region][s][lane], regions padded to a whole group */
    float *accf = (float *)aligned_alloc(64, (size_t)mg * 2 * 16 * sizeof(float));
    double *accd = (double *)aligned_alloc(64, (size_t)mg * 2 * 16 * sizeof(double));
    if (!accf || !accd) {
        free(accf);
        free(accd);
        return PWLU_ERR_NOMEM;
    }
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
    return PWLU_OK;
}

/* Elements [pb, pe) of an (outer, C, inner) tensor, row segment by row segment; h: the
 * thread's histogram of all C channels. */
static inline __attribute__((always_inline)) int avx512_bwd_range(const void *gp, const void *x, void *dx, int64_t pb,
                                                                  int64_t pe, int64_t inner, int64_t C, const int dt,
                                                                  const float *sl, const float *left,
                                                                  const float *right, const float *invd, int64_t n,
                                                                  double *h) {
    const int64_t m = n + 2;
    for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C)) {
        const int64_t c = s.c;
        const int rc = bwd_seg_f(gp, x, dx, s.b, s.e, dt, sl + c * m, left[c], right[c], invd[c], n, h + c * m * 2);
        if (rc != PWLU_OK) return rc;
    }
    return PWLU_OK;
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
/* Channels [cb, ce) of an (outer, C, inner) tensor with short rows; h: the histogram of all C. */
static inline __attribute__((always_inline)) void avx512_bwd_channels(const void *gp, const void *x, void *dx,
                                                                      int64_t cb, int64_t ce, int64_t outer,
                                                                      int64_t C, int64_t inner, const int dt,
                                                                      const float *sl, const float *left,
                                                                      const float *right, const float *invd,
                                                                      int64_t n, double *h) {
    const int64_t m = n + 2;
    for (int64_t c = cb; c < ce; c++) {
        const bwd_chan ch = load_bwd_chan(sl + c * m, left[c], right[c], invd[c], n);
        for (int64_t o = 0; o < outer; o++)
            bwd_short_seg(gp, x, dx, (o * C + c) * inner, (o * C + c + 1) * inner, dt, &ch, h + c * m * 2);
    }
}

#if ROW_CHUNK != 16
#error "bwd_dx_tile transposes ROW_CHUNK x 16 tiles: ROW_CHUNK must be 16"
#endif
/* dx of one tile of the channels-fastest backward, rows r0 .. r0 + nr - 1 (nr <= 16) x channels
 * c0 .. c0 + nc - 1 (nc <= 16), from the regions k and the g that the vector pass wrote to kb and
 * gb (16 lanes per row): the regions are transposed so that each vector holds one channel, that
 * channel's slopes are looked up in registers (no gather), transposed back and multiplied by g.
 * Rows past nr are zeros, channels past nc are not looked up and not stored. N + 2 <= REG_TABLE. */
static inline __attribute__((always_inline)) void bwd_dx_tile(const int32_t *kb, const float *gb, void *dx,
                                                              int64_t r0, const int nr, int64_t c0, const int nc,
                                                              int64_t C, const int dt, const float *sl, int64_t m) {
    const __mmask16 cm = tail_mask(nc);
    __m512 v[16];
    /* fully unrolled (v in registers, as fwd_tile_f) */
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) v[i] = i < nr ? _mm512_castsi512_ps(_mm512_load_si512(kb + 16 * i)) : _mm512_setzero_ps();
    transpose16(v); /* v[j]: the regions of channel c0 + j in rows r0 .. r0 + 15 */
#pragma GCC unroll 16
    for (int j = 0; j < nc; j++) {
        const table32 t = load_table32(sl + (c0 + j) * m, m);
        v[j] = _mm512_permutex2var_ps(t.a0, _mm512_castps_si512(v[j]), t.a1);
    }
    transpose16(v); /* v[i]: the slopes of row r0 + i */
#pragma GCC unroll 16
    for (int i = 0; i < nr; i++) st16(dx, (r0 + i) * C + c0, _mm512_mul_ps(_mm512_load_ps(gb + 16 * i), v[i]), cm, dt);
}

/* Rows [rb, re) of C channels each (inner == 1). Lane l of channel block cb is channel
 * 16 cb + l, so the lane-private accumulators acc[cb][k][s][lane] of bwd_seg_f work here too:
 * channel block by channel block, a vector pass over ROW_CHUNK rows writes k, g and g*r to L1
 * buffers (the block's lines of the next chunk prefetched), dx comes from them as one tile
 * (bwd_dx_tile; by gather in the vector pass where N + 2 > REG_TABLE) and hist_block adds them
 * up (float for at most LANE_TERMS rows, then double). */
static inline int avx512_bwd_rows(const void *gp, const void *x, void *dx, int64_t rb, int64_t re, int64_t C, int dt,
                                  const float *sl, const float *left, const float *right, const float *invd,
                                  int64_t n, double *h) {
    const __m512 nm1 = _mm512_set1_ps((float)(n - 1));
    const __m512i np1 = _mm512_set1_epi32((int)(n + 1));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_m = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)(n + 2)));
    const int64_t m = n + 2, mg = (m + REGION_GROUP - 1) / REGION_GROUP * REGION_GROUP;
    const int64_t nb = (C + 15) / 16, asize = nb * mg * 2 * 16, bsize = ROW_CHUNK * 16;
    float *accf = (float *)aligned_alloc(64, (size_t)asize * sizeof(float));
    double *accd = (double *)aligned_alloc(64, (size_t)asize * sizeof(double));
    int32_t *kbuf = (int32_t *)aligned_alloc(64, (size_t)bsize * sizeof(int32_t));
    float *gbuf = (float *)aligned_alloc(64, (size_t)bsize * sizeof(float));
    float *rbuf = (float *)aligned_alloc(64, (size_t)bsize * sizeof(float));
    int rc = PWLU_ERR_NOMEM;
    if (!accf || !accd || !kbuf || !gbuf || !rbuf) goto done;
    memset(accf, 0, (size_t)asize * sizeof(float));
    memset(accd, 0, (size_t)asize * sizeof(double));
    int chunks = 0;
    for (int64_t r0 = rb; r0 < re; r0 += ROW_CHUNK) {
        const int64_t r1 = r0 + ROW_CHUNK < re ? r0 + ROW_CHUNK : re;
        const int nr = (int)(r1 - r0);
        for (int64_t cb = 0; cb < nb; cb++) {
            const int64_t c = 16 * cb;
            const int nc = C - c < 16 ? (int)(C - c) : 16;
            const __mmask16 msk = tail_mask(nc);
            const __m512 lo = _mm512_maskz_loadu_ps(msk, left + c), hi = _mm512_maskz_loadu_ps(msk, right + c);
            const __m512 inv = _mm512_maskz_loadu_ps(msk, invd + c);
            if (r1 + ROW_CHUNK <= re) /* this channel block's lines of the next chunk (see fwd_tile_f) */
                for (int64_t row = r1; row < r1 + ROW_CHUNK; row++) {
                    _mm_prefetch(elem_ptr(x, row * C + c, dt), _MM_HINT_T0);
                    _mm_prefetch(elem_ptr(gp, row * C + c, dt), _MM_HINT_T0);
                    _mm_prefetch(elem_ptr(dx, row * C + c, dt), _MM_HINT_ET0);
                }
            for (int64_t row = r0; row < r1; row++) {
                const int64_t off = row * C, slot = (row - r0) * 16;
                /* masked-off lanes load x = 0, g = 0 and add nothing */
                __m512 xv = ld16(x, off + c, msk, dt), g = ld16(gp, off + c, msk, dt), xl, u, fi;
                __m512i k = region16(xv, lo, hi, inv, nm1, np1, &xl, &u, &fi);
                if (m > REG_TABLE) { /* dy/dx = slope of region k, by gather */
                    __m512i base = _mm512_add_epi32(lane_m, _mm512_set1_epi32((int)(c * m)));
                    __m512 a = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), msk, _mm512_add_epi32(base, k), sl, 4);
                    st16(dx, off + c, _mm512_mul_ps(g, a), msk, dt);
                }
                __m512 r = _mm512_sub_ps(u, fi);
                r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, lo, _CMP_LT_OQ), xl);
                r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xv, hi, _CMP_GE_OQ), _mm512_sub_ps(xv, hi));
                _mm512_store_si512(kbuf + slot, k);
                _mm512_store_ps(gbuf + slot, g);
                _mm512_store_ps(rbuf + slot, _mm512_mul_ps(g, r));
            }
            if (m <= REG_TABLE) { /* dy/dx = slope of region k, on the transposed tile */
                if (nr == 16 && nc == 16)
                    bwd_dx_tile(kbuf, gbuf, dx, r0, 16, c, 16, C, dt, sl, m);
                else
                    bwd_dx_tile(kbuf, gbuf, dx, r0, nr, c, nc, C, dt, sl, m);
            }
            hist_block(kbuf, gbuf, rbuf, nr, accf + cb * mg * 2 * 16, m);
        }
        if (++chunks == FLUSH_CHUNKS) {
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
    rc = PWLU_OK;
done:
    free(accf);
    free(accd);
    free(kbuf);
    free(gbuf);
    free(rbuf);
    return rc;
}
#endif /* PWLU_AVX512 */

#endif /* PWLU_AVX512_BWD_H */
