/* Shared by every PWLU kernel file: includes, the ABI version, dtype and return codes, the
 * tuning constants (all in this one place), dtype loads/stores and the thread split.
 *
 * pwlu/ops/cpu/build.py reads the integer `#define PWLU_*` lines of this file (the ABI version,
 * the dtype codes, the return codes): they are defined here only. Change the ABI version
 * whenever an exported signature, struct or return convention changes.
 */
#ifndef PWLU_COMMON_H
#define PWLU_COMMON_H

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
/* AVX2 (with FMA and F16C) where AVX-512 is not targeted: pwlu_avx2.h */
#if !PWLU_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PWLU_AVX2 1
#include <immintrin.h>
#else
#define PWLU_AVX2 0
#endif
/* fp16 storage: the vector paths convert with F16C (AVX-512: its own conversions); the scalar
 * loads and stores (load_s, store_s), which every build runs somewhere (N + 2 > the register
 * tables on AVX2, the N-PWLU and 2-D PWLU kernels), need _Float16 or F16C. A build with neither
 * (old compilers, no -mf16c) has no fp16 kernels: the Python side computes in fp32 there. */
#if defined(__FLT16_MAX__) || defined(__F16C__)
#define PWLU_F16_KERNEL 1
#if !defined(__FLT16_MAX__)
#include <immintrin.h>
#endif
#else
#define PWLU_F16_KERNEL 0
#endif

#define PWLU_ABI_VERSION 8

/* ---- storage dtype codes (the `dt` argument) ---- */
#define PWLU_F32 0
#define PWLU_F64 1
#define PWLU_F16 2
#define PWLU_BF16 3

/* ---- return codes of the exported functions ---- */
#define PWLU_OK 0
#define PWLU_ERR_NOMEM 1   /* a scratch buffer could not be allocated */
#define PWLU_PLAN_STALE 2  /* pwlu_forward_plan: the parameters differ from the snapshot, nothing computed */
#define PWLU_ERR_DTYPE 3   /* a dtype code this function (or this build) does not handle */
#define PWLU_ERR_SHAPE 4   /* pwlu2d_tables: N > 8, or a build without the vector path */

/* ---- tuning constants ---- */
#define NCOPY 4          /* histogram copies of the scalar paths (break store-to-load chains) */
/* histogram copies per thread: the vector paths keep lane-private sums (and a short row is too
 * short for long store-to-load chains), the scalar ones scatter into NCOPY copies */
#define F32_COPIES (PWLU_AVX512 ? 1 : NCOPY)
#define F64_COPIES NCOPY
#define ALIGN_ELEMS 16   /* thread partitions of the flat element range start at multiples of this */
#define REG_TABLE 32     /* N + 2 <= REG_TABLE: tables looked up in registers (vpermt2ps), else gathered */
#define SEG_BLOCK 256    /* elements per block of the vector histogram (L1 buffers of k, g, g*r) */
#define REGION_GROUP 6   /* regions whose 12 accumulators are kept in registers at once */
#define LANE_TERMS 256   /* terms a lane's float accumulator takes before it is added into double */
#define FLUSH_BLOCKS (LANE_TERMS / (SEG_BLOCK / 16)) /* SEG_BLOCK blocks per flush */
#define ROW_CHUNK 16     /* rows per vector pass of the channels-fastest backward */
#define FLUSH_CHUNKS (LANE_TERMS / ROW_CHUNK)        /* ROW_CHUNK chunks per flush */
#define SHORT_ROW 256    /* forward: rows shorter than this go channel by channel */
#define SHORT_SEG 512    /* backward: rows shorter than this go channel by channel */

/* Loads, stores and tile helpers are forced inline: a call from a vector loop clobbers every
 * zmm register (all are caller-saved), so the loop would spill and reload its tables. */
#define PWLU_INLINE static inline __attribute__((always_inline))

/* ---- scalar loads/stores (any storage dtype, compute float; double is stored as double) ---- */
PWLU_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
PWLU_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0; /* NaN, as torch */
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}
PWLU_INLINE float load_s(const void *p, int64_t i, int dt) {
    switch (dt) {
    case PWLU_F32: return ((const float *)p)[i];
#if defined(__FLT16_MAX__)
    case PWLU_F16: return (float)((const _Float16 *)p)[i];
#elif defined(__F16C__)
    case PWLU_F16: return _cvtsh_ss(((const uint16_t *)p)[i]);
#endif
    default: return bf16_to_f32(((const uint16_t *)p)[i]);
    }
}
PWLU_INLINE void store_s(void *p, int64_t i, float v, int dt) {
    switch (dt) {
    case PWLU_F32: ((float *)p)[i] = v; break;
#if defined(__FLT16_MAX__)
    case PWLU_F16: ((_Float16 *)p)[i] = (_Float16)v; break;
#elif defined(__F16C__)
    case PWLU_F16: ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); break;
#endif
    default: ((uint16_t *)p)[i] = f32_to_bf16(v); break;
    }
}
PWLU_INLINE double load_d(const void *p, int64_t i, int dt) {
    (void)dt;
    return ((const double *)p)[i];
}
PWLU_INLINE void store_d(void *p, int64_t i, double v, int dt) {
    (void)dt;
    ((double *)p)[i] = v;
}

#if PWLU_AVX512
/* ---- AVX-512 loads/stores of 16 elements and the region index (forward and backward) ---- */
PWLU_INLINE __m512 ld16(const void *p, int64_t i, __mmask16 m, int dt) {
    switch (dt) {
    case PWLU_F32: return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    case PWLU_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    default:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    }
}
PWLU_INLINE void st16(void *p, int64_t i, __m512 v, __mmask16 m, int dt) {
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
/* The address of element i of a 4-byte (fp32) or 2-byte (fp16, bf16) array, for prefetches. */
PWLU_INLINE const char *elem_ptr(const void *p, int64_t i, int dt) {
    return (const char *)p + i * (dt == PWLU_F32 ? 4 : 2);
}
PWLU_INLINE __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

/* Region index k (int32) and the offsets x - lo, u and i of 16 elements. */
PWLU_INLINE __m512i region16(__m512 x, __m512 lo, __m512 hi, __m512 inv, __m512 nm1, __m512i np1, __m512 *xl,
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

/* In-register transpose of a 16x16 float tile (its own inverse): after it, r[j] holds
 * element j of each of the 16 input vectors. */
PWLU_INLINE void transpose16(__m512 *r) {
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
#endif /* PWLU_AVX512 */

/* An inference plan's guard: whether any of the count parameter tensors (live) differs byte for
 * byte from the snapshot its tables were made from (then the plan returns PWLU_PLAN_STALE). */
static inline int plan_stale(const void *const *live, const void *const *snap, const int64_t *bytes, int count) {
    for (int i = 0; i < count; i++)
        if (memcmp(live[i], snap[i], (size_t)bytes[i]) != 0) return 1;
    return 0;
}

/* ---- threads and static partitions ---- */
static inline int clamp_threads(int nthreads) { return nthreads < 1 ? 1 : nthreads; }

/* This thread's number and the team size (0 and 1 outside OpenMP). */
static inline void thread_id(int *t, int *nth) {
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *nth = omp_get_num_threads();
#else
    *t = 0;
    *nth = 1;
#endif
}

/* Part t of nth of [0, total); inner boundaries rounded down to a multiple of align. */
static inline void split(int64_t total, int t, int nth, int64_t align, int64_t *b, int64_t *e) {
    int64_t lo = total * t / nth, hi = total * (t + 1) / nth;
    if (align > 1) {
        lo = t == 0 ? 0 : lo / align * align;
        hi = t == nth - 1 ? total : hi / align * align;
    }
    *b = lo;
    *e = hi;
}

/* The row segments of elements [pb, pe) of an (outer, C, inner) tensor: [b, e) lies in one row
 * (o, c) of channel c. One division per thread, not per row:
 *     for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C)) ... */
typedef struct {
    int64_t b, e, row, c;
} seg_iter;
static inline int64_t seg_end(int64_t row, int64_t inner, int64_t pe) {
    const int64_t se = (row + 1) * inner;
    return se > pe ? pe : se;
}
static inline seg_iter seg_first(int64_t pb, int64_t pe, int64_t inner, int64_t C) {
    const int64_t row = pb / inner;
    const seg_iter s = {pb, seg_end(row, inner, pe), row, row % C};
    return s;
}
static inline void seg_next(seg_iter *s, int64_t pe, int64_t inner, int64_t C) {
    s->b = s->e;
    s->row++;
    if (++s->c == C) s->c = 0;
    s->e = seg_end(s->row, inner, pe);
}

/* ---- parameter check (pwlu.ops.validation.native_summary) ----
 * Over `count` float32 arrays p[k] of len[k] values and the widths p[hi] - p[lo] of `npairs`
 * pairs (lo, hi) of equal length: out[0] = 1 if every value and width is finite (else 0),
 * out[1] = the largest magnitude of all of them, out[2] = the smallest width floored at
 * min_width (+inf without widths). The widths are float32 differences, as torch computes them.
 * Replaces some fifteen small torch ops, run after every optimizer step. */
static inline int param_summary_f32(const float *const *p, const int64_t *len, int count, const int *pairs,
                                    int npairs, float min_width, float *out) {
    int finite = 1;
    float big = 0.0f, narrow = INFINITY;
    for (int k = 0; k < count; k++)
        for (int64_t i = 0; i < len[k]; i++) {
            const float a = fabsf(p[k][i]);
            finite &= isfinite(a) != 0;
            big = a > big ? a : big;
        }
    for (int q = 0; q < npairs; q++) {
        const float *lo = p[pairs[2 * q]], *hi = p[pairs[2 * q + 1]];
        for (int64_t i = 0; i < len[pairs[2 * q]]; i++) {
            const float w = hi[i] - lo[i], a = fabsf(w), floored = w < min_width ? min_width : w;
            finite &= isfinite(w) != 0;
            big = a > big ? a : big;
            narrow = floored < narrow ? floored : narrow;
        }
    }
    out[0] = (float)finite;
    out[1] = big;
    out[2] = narrow;
    return PWLU_OK;
}

#endif /* PWLU_COMMON_H */
