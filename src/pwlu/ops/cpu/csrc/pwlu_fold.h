/* Parameter folding (pwlu.ops.folding.fold_tables in C) and the gradient epilogue
 * (pwlu.ops.folding.param_grads_from_histogram in C, in double): the per-call cost of a PWLU on
 * small tensors is the Python around the kernel, so the fused entry points do both here instead
 * of in ~20 and ~30 small torch ops.
 *
 * FOLD_KERNELS(T, SUF) writes the float (SUF f) and double (SUF d) twins.
 *
 * fold_tables_SUF: parameters in channel form, contiguous: points (C, N+1), the others (C,).
 * Output: one buffer holding slopes (C, N+2), intercepts (C, N+2), then left, right_eff, inv_d,
 * shift (C each). left/right_eff/inv_d use exactly the float operations of
 * folding.effective_bounds (width floor, B_L + MIN_WIDTH, (1 / width) * N), so regions agree bit
 * for bit with the reference at breakpoints; compiled without fused multiply-adds so that the
 * tables equal folding.fold_tables' bit for bit.
 *
 * grad_epilogue_SUF: from hist (C, N+2, 2), h[2k] = sum g and h[2k+1] = sum g r in region k,
 * and the folded slopes, the five parameter gradients, each to its own buffer:
 * d_points (C, N+1), then d_left_bound, d_right_bound, d_left_slope, d_right_slope (C each).
 */
#ifndef PWLU_FOLD_H
#define PWLU_FOLD_H

#include "pwlu_common.h"

#define FOLD_TABLES(T, SUF)                                                                             \
    static __attribute__((noinline)) void fold_tables_##SUF(const T *pts, const T *bl, const T *br,     \
                                                            const T *kl, const T *kr, int64_t C,        \
                                                            int64_t n, double min_width, T *out) {      \
        const T minw = (T)min_width;                                                                    \
        T *sl = out, *ic = out + C * (n + 2), *lo = ic + C * (n + 2), *ro = lo + C, *iv = ro + C,       \
          *sh = iv + C;                                                                                 \
        for (int64_t c = 0; c < C; c++) {                                                               \
            const T *Y = pts + c * (n + 1);                                                             \
            const T L = bl[c], R = br[c], raw = R - L;                                                  \
            const int ok = !(raw < minw); /* a NaN range stays NaN, as folding.effective_bounds */    \
            const T width = ok ? raw : minw;                                                            \
            const T Re = ok ? R : L + minw;                                                             \
            const T inv = ((T)1 / width) * (T)n;                                                        \
            T s = L > 0 ? L : (T)0;                                                                     \
            s = s < Re ? s : Re; /* the point of [B_L, B_R] nearest 0 */                                \
            const T d = width / (T)n, s_l = s - L;                                                      \
            T *a = sl + c * (n + 2), *b = ic + c * (n + 2);                                             \
            lo[c] = L;                                                                                  \
            ro[c] = Re;                                                                                 \
            iv[c] = inv;                                                                                \
            sh[c] = s;                                                                                  \
            a[0] = kl[c];                                                                               \
            b[0] = Y[0] + s_l * kl[c];                                                                  \
            for (int64_t i = 0; i < n; i++) { /* K_i = (Y[i+1] - Y[i]) / d, value at shift */           \
                const T k = (Y[i + 1] - Y[i]) * inv;                                                    \
                a[i + 1] = k;                                                                           \
                b[i + 1] = Y[i] + (s_l - (T)i * d) * k;                                                 \
            }                                                                                           \
            a[n + 1] = kr[c];                                                                           \
            b[n + 1] = Y[n] + (s - Re) * kr[c];                                                         \
        }                                                                                               \
    }

#define GRAD_EPILOGUE(T, SUF)                                                                           \
    static void grad_epilogue_##SUF(const double *hist, const T *sl, const T *bl, const T *br,          \
                                    const T *kl, const T *kr, int64_t C, int64_t n, double min_width,   \
                                    T *dp, T *dl, T *dr, T *dkl, T *dkr) {                              \
        const int64_t m = n + 2;                                                                        \
        const T minw = (T)min_width;                                                                    \
        const double inv_n = 1.0 / (double)n; /* exact for N a power of two */                          \
        for (int64_t c = 0; c < C; c++) {                                                               \
            const double *h = hist + c * m * 2; /* h[2k] = sum g, h[2k+1] = sum g r in region k */      \
            const T *a = sl + c * m;                                                                    \
            double acc_l = -(double)kl[c] * h[0], acc_r = -(double)kr[c] * h[2 * (n + 1)];              \
            for (int64_t j = 0; j <= n; j++) dp[c * (n + 1) + j] = 0;                                   \
            /* dY[i] += sum g (1 - t), dY[i+1] += sum g t over interval i; outer pieces: sum g */       \
            double prev = h[0];                                                                         \
            for (int64_t i = 0; i < n; i++) {                                                           \
                const double g = h[2 * (i + 1)], gt = h[2 * (i + 1) + 1];                               \
                dp[c * (n + 1) + i] = (T)(prev + (g - gt));                                             \
                prev = gt;                                                                              \
                /* dB_L += -K_i sum g (1 - u/N), dB_R += -K_i sum g u/N, u = i + t */                   \
                const double gu_n = ((double)i * g + gt) * inv_n;                                       \
                acc_l -= (double)a[i + 1] * (g - gu_n);                                                 \
                acc_r -= (double)a[i + 1] * gu_n;                                                       \
            }                                                                                           \
            dp[c * (n + 1) + n] = (T)(prev + h[2 * (n + 1)]);                                           \
            dkl[c] = (T)h[1];               /* sum g (x - B_L) over x < B_L */                          \
            dkr[c] = (T)h[2 * (n + 1) + 1]; /* sum g (x - B_R) over x >= B_R */                         \
            if (br[c] - bl[c] < minw) {     /* clamped to the minimum width: B_R follows B_L */         \
                dl[c] = (T)(acc_l + acc_r);                                                             \
                dr[c] = 0;                                                                              \
            } else {                                                                                    \
                dl[c] = (T)acc_l;                                                                       \
                dr[c] = (T)acc_r;                                                                       \
            }                                                                                           \
        }                                                                                               \
    }

/* no fused multiply-adds in the folding (noinline: it keeps these options wherever it is called) */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
FOLD_TABLES(float, f)
FOLD_TABLES(double, d)
#pragma GCC pop_options
GRAD_EPILOGUE(float, f)
GRAD_EPILOGUE(double, d)

#endif /* PWLU_FOLD_H */
