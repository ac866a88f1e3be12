/* The portable scalar path, one element at a time: fp64 always, and fp32/fp16/bf16 where the
 * compiler does not target AVX-512 (compute in float). The backward scatters each element into
 * double bins; NCOPY copies of the histogram, `copy_stride` doubles apart, break the
 * store-to-load dependency chains of neighbouring elements in the same bin.
 *
 * SCALAR_KERNELS(T, U, SUF, FLOOR, LOAD, STORE) writes the float (SUF f) and double (SUF d) twins:
 * T the compute type, U the unsigned integer of its width, LOAD/STORE(p, i, [v,] dt) the element
 * access in the storage dtype.
 */
#ifndef PWLU_SCALAR_H
#define PWLU_SCALAR_H

#include "pwlu_common.h"

#define SCALAR_KERNELS(T, U, SUF, FLOOR, LOAD, STORE)                                                              \
    /* c ? a : b without a branch (c is 0 or 1); U: the unsigned integer of T's width */                      \
    static inline T select_##SUF(int c, T a, T b) {                                                             \
        U ua, ub;                                                                                               \
        const U m = (U)0 - (U)c;                                                                                \
        memcpy(&ua, &a, sizeof(T));                                                                             \
        memcpy(&ub, &b, sizeof(T));                                                                             \
        ua = (ua & m) | (ub & ~m);                                                                              \
        memcpy(&a, &ua, sizeof(T));                                                                             \
        return a;                                                                                               \
    }                                                                                                           \
    /* region k of x (0: left piece, N + 1: right piece, else interval + 1), u and i */                         \
    static inline int64_t region_##SUF(T xv, T lo, T hi, T inv, int64_t n, T *u_out, T *i_out) {                \
        T u = (xv - lo) * inv;                                                                                  \
        T fi = FLOOR(u);                                                                                        \
        if (!(fi >= (T)0)) fi = (T)0; /* also NaN */                                                            \
        if (fi > (T)(n - 1)) fi = (T)(n - 1);                                                                   \
        *u_out = u;                                                                                             \
        *i_out = fi;                                                                                            \
        return xv < lo ? 0 : (xv >= hi ? n + 1 : (int64_t)fi + 1);                                              \
    }                                                                                                           \
    static inline T fwd_elem_##SUF(T xv, const T *sl, const T *ic, T lo, T hi, T inv, T sh, int64_t n) {        \
        T u, fi;                                                                                                \
        int64_t k = region_##SUF(xv, lo, hi, inv, n, &u, &fi);                                                  \
        T a = sl[k], b = ic[k];                                                                                 \
        /* as finish16, by bits: gcc compiles `flat ? b : y` to a branch, which mispredicts where flat  */        \
        /* and sloped pieces alternate at random (a ReLU-like PWLU on centred data: 8x slower)          */        \
        return select_##SUF((a == (T)0) & (xv == xv), b, a * (xv - sh) + b);                                    \
    }                                                                                                           \
    static inline T bwd_elem_##SUF(T xv, T g, const T *sl, T lo, T hi, T inv, int64_t n, double *h) {           \
        T u, fi;                                                                                                \
        int64_t k = region_##SUF(xv, lo, hi, inv, n, &u, &fi);                                                  \
        T r = k == 0 ? xv - lo : (k == n + 1 ? xv - hi : u - fi);                                               \
        T gr = g * r;                                                                                           \
        h[2 * k] += (double)g;                                                                                  \
        h[2 * k + 1] += (double)gr;                                                                             \
        return g * sl[k];                                                                                       \
    }                                                                                                           \
    /* x[b:e], all of one channel */                                                                            \
    static inline void scalar_fwd_seg_##SUF(const void *x, void *y, int64_t b, int64_t e, int dt, const T *sl,  \
                                            const T *ic, T lo, T hi, T inv, T sh, int64_t n) {                  \
        for (int64_t i = b; i < e; i++) STORE(y, i, fwd_elem_##SUF(LOAD(x, i, dt), sl, ic, lo, hi, inv, sh, n), dt); \
    }                                                                                                           \
    static inline void scalar_bwd_seg_##SUF(const void *gp, const void *x, void *dx, int64_t b, int64_t e,      \
                                            int dt, const T *sl, T lo, T hi, T inv, int64_t n, double *h,       \
                                            int64_t copy_stride) {                                              \
        for (int64_t i = b; i < e; i++)                                                                         \
            STORE(dx, i,                                                                                        \
                  bwd_elem_##SUF(LOAD(x, i, dt), LOAD(gp, i, dt), sl, lo, hi, inv, n,                           \
                                 h + ((i - b) % NCOPY) * copy_stride),                                          \
                  dt);                                                                                          \
    }                                                                                                           \
    /* elements [pb, pe) of an (outer, C, inner) tensor, row segment by row segment */                          \
    static inline void scalar_fwd_range_##SUF(const void *x, void *y, int64_t pb, int64_t pe, int64_t inner,    \
                                              int64_t C, int dt, const T *sl, const T *ic, const T *left,       \
                                              const T *right, const T *invd, const T *shift, int64_t n) {       \
        const int64_t m = n + 2;                                                                                \
        for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C))                    \
            scalar_fwd_seg_##SUF(x, y, s.b, s.e, dt, sl + s.c * m, ic + s.c * m, left[s.c], right[s.c],         \
                                 invd[s.c], shift[s.c], n);                                                     \
    }                                                                                                           \
    static inline void scalar_bwd_range_##SUF(const void *gp, const void *x, void *dx, int64_t pb, int64_t pe,  \
                                              int64_t inner, int64_t C, int dt, const T *sl, const T *left,     \
                                              const T *right, const T *invd, int64_t n, double *h,              \
                                              int64_t hsize) {                                                  \
        const int64_t m = n + 2;                                                                                \
        for (seg_iter s = seg_first(pb, pe, inner, C); s.b < pe; seg_next(&s, pe, inner, C))                    \
            scalar_bwd_seg_##SUF(gp, x, dx, s.b, s.e, dt, sl + s.c * m, left[s.c], right[s.c], invd[s.c], n,    \
                                 h + s.c * m * 2, hsize);                                                       \
    }                                                                                                           \
    /* rows [rb, re) of C channels each (channels fastest, inner == 1) */                                       \
    static inline void scalar_fwd_rows_##SUF(const void *x, void *y, int64_t rb, int64_t re, int64_t C, int dt, \
                                             const T *sl, const T *ic, const T *left, const T *right,           \
                                             const T *invd, const T *shift, int64_t n) {                        \
        const int64_t m = n + 2;                                                                                \
        for (int64_t r = rb; r < re; r++)                                                                       \
            for (int64_t c = 0; c < C; c++)                                                                     \
                STORE(y, r * C + c,                                                                             \
                      fwd_elem_##SUF(LOAD(x, r * C + c, dt), sl + c * m, ic + c * m, left[c], right[c],         \
                                     invd[c], shift[c], n),                                                     \
                      dt);                                                                                      \
    }                                                                                                           \
    static inline void scalar_bwd_rows_##SUF(const void *gp, const void *x, void *dx, int64_t rb, int64_t re,   \
                                             int64_t C, int dt, const T *sl, const T *left, const T *right,     \
                                             const T *invd, int64_t n, double *h, int64_t hsize) {              \
        const int64_t m = n + 2;                                                                                \
        for (int64_t r = rb; r < re; r++)                                                                       \
            for (int64_t c = 0; c < C; c++)                                                                     \
                STORE(dx, r * C + c,                                                                            \
                      bwd_elem_##SUF(LOAD(x, r * C + c, dt), LOAD(gp, r * C + c, dt), sl + c * m, left[c],      \
                                     right[c], invd[c], n, h + (c % NCOPY) * hsize + c * m * 2),                \
                      dt);                                                                                      \
    }

SCALAR_KERNELS(float, uint32_t, f, floorf, load_s, store_s)
SCALAR_KERNELS(double, uint64_t, d, floor, load_d, store_d)

#endif /* PWLU_SCALAR_H */
