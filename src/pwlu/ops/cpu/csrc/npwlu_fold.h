/* N-PWLU parameter folding (pwlu.ops.npwlu_folding.npwlu_fold_tables in C) and the gradient
 * epilogue (npwlu_param_grads_from_histogram in C, in double): a training call of an N-PWLU ran
 * about 90 small torch ops around its two kernels, which cost more than the kernels on small
 * tensors. The softmax of the width logits and its cumulative sum stay in torch (two ops), so
 * that the breakpoints equal npwlu_breakpoints' (and the reference's) bit for bit: an element
 * placed exactly on a breakpoint must fall in the same interval here as there.
 *
 * NPWLU_FOLD(T, SUF) / NPWLU_GRADS(T, SUF) write the float (f) and double (d) twins. Channel
 * form, contiguous: points (C, N+1), omega = softmax(theta) (C, N), fr = cumsum(omega)[:, :N-1]
 * (C, N-1), the bounds and slopes (C).
 *
 * npwlu_fold_SUF writes one buffer: slopes (C, N+2), intercepts (C, N+2), breakpoints (C, N+1),
 * inv_widths (C, N), shift (C); with exactly the operations of npwlu_fold_tables (compiled
 * without fused multiply-adds): B_L + W c_j, the width floors, 1 / w_j, the pieces' values at
 * the shift. NaN propagates as torch.maximum / torch.minimum do.
 *
 * npwlu_grads_SUF: from hist (C, N+2, 2) in double (h[2k] = sum g, h[2k+1] = sum g r in region
 * k), the six gradients, each to its own buffer: d_points (C, N+1), d_logits (C, N), then
 * d_left_bound, d_right_bound, d_left_slope, d_right_slope (C each).
 */
#ifndef NPWLU_FOLD_H
#define NPWLU_FOLD_H

#include "pwlu_common.h"

#define NPWLU_FOLD(T, SUF)                                                                                   \
    static __attribute__((noinline)) void npwlu_fold_##SUF(const T *pts, const T *fr, const T *bl, const T *br, \
                                                           const T *kl, const T *kr, int64_t C, int64_t n,  \
                                                           double min_width, double min_iw, T *out) {      \
        const T minw = (T)min_width, miniw = (T)min_iw;                                                      \
        T *sl = out, *ic = sl + C * (n + 2), *bp = ic + C * (n + 2), *iw = bp + C * (n + 1), *sh = iw + C * n; \
        for (int64_t c = 0; c < C; c++) {                                                                    \
            const T *Y = pts + c * (n + 1), *f = fr + c * (n - 1);                                           \
            T *b = bp + c * (n + 1), *a = sl + c * (n + 2), *q = ic + c * (n + 2), *w = iw + c * n;          \
            const T L = bl[c], R = br[c], raw = R - L;                                                       \
            const int ok = !(raw < minw); /* a NaN range stays NaN (folding.effective_bounds) */           \
            const T width = ok ? raw : minw, Re = ok ? R : L + minw;                                         \
            b[0] = L;                                                                                        \
            for (int64_t j = 1; j < n; j++) b[j] = L + width * f[j - 1];                                     \
            b[n] = Re;                                                                                       \
            /* shift = min(max(0, B_L), b_N), NaN in either gives NaN (torch.maximum/minimum) */            \
            T s = isnan(L) ? L : (L > 0 ? L : (T)0);                                                         \
            s = isnan(Re) ? Re : (s < Re ? s : Re);                                                          \
            sh[c] = s;                                                                                       \
            a[0] = kl[c];                                                                                    \
            q[0] = Y[0] + (s - L) * kl[c];                                                                   \
            for (int64_t j = 0; j < n; j++) {                                                                \
                const T r = b[j + 1] - b[j];                                                                 \
                const T wj = r < miniw ? miniw : r; /* NaN stays NaN */                                      \
                w[j] = (T)1 / wj;                                                                            \
                const T k = (Y[j + 1] - Y[j]) * w[j];                                                        \
                a[j + 1] = k;                                                                                \
                q[j + 1] = Y[j] + (s - b[j]) * k;                                                            \
            }                                                                                                \
            a[n + 1] = kr[c];                                                                                \
            q[n + 1] = Y[n] + (s - Re) * kr[c];                                                              \
        }                                                                                                    \
    }

#define NPWLU_GRADS(T, SUF)                                                                                  \
    static void npwlu_grads_##SUF(const double *hist, const T *pts, const T *omega, const T *fr, const T *bl, \
                                  const T *br, const T *kl, const T *kr, const T *bp, int64_t C, int64_t n,  \
                                  double min_width, double min_iw, double *work, T *dp, T *dlog, T *dl,      \
                                  T *dr, T *dkl, T *dkr) {                                                   \
        const T minw = (T)min_width, miniw = (T)min_iw;                                                      \
        double *db = work, *dom = work + (n + 1); /* d breakpoints (N+1), d omega (N) */                     \
        for (int64_t c = 0; c < C; c++) {                                                                    \
            const double *h = hist + c * (n + 2) * 2;                                                        \
            const T *Y = pts + c * (n + 1), *b = bp + c * (n + 1), *om = omega + c * n, *f = fr + c * (n - 1); \
            T *p = dp + c * (n + 1);                                                                         \
            /* dY[j] += sum g (1 - t), dY[j+1] += sum g t over interval j; the outer pieces: sum g */       \
            double prev = h[0];                                                                              \
            for (int64_t j = 0; j <= n; j++) db[j] = 0;                                                      \
            for (int64_t j = 0; j < n; j++) {                                                                \
                const double g = h[2 * (j + 1)], gt = h[2 * (j + 1) + 1];                                    \
                p[j] = (T)(prev + (g - gt));                                                                 \
                prev = gt;                                                                                   \
                /* dy/db_j = -K_j (1 - t), dy/db_{j+1} = -K_j t; a floored width is a constant:          \
                 * then dy/db_j = -K_j and nothing reaches b_{j+1} */                                       \
                const T r = b[j + 1] - b[j];                                                                 \
                const int ok = r >= miniw;                                                                   \
                const double k = (double)(Y[j + 1] - Y[j]) / (double)(ok ? r : miniw);                       \
                db[j] -= k * (ok ? g - gt : g);                                                              \
                db[j + 1] -= k * (ok ? gt : 0.0);                                                            \
            }                                                                                                \
            p[n] = (T)(prev + h[2 * (n + 1)]);                                                               \
            dkl[c] = (T)h[1];               /* sum g (x - B_L) over x < B_L */                               \
            dkr[c] = (T)h[2 * (n + 1) + 1]; /* sum g (x - B_R) over x >= B_R */                              \
            db[0] -= (double)kl[c] * h[0];                                                                   \
            db[n] -= (double)kr[c] * h[2 * (n + 1)];                                                         \
            /* b_j = B_L + W c_j (0 < j < N), c = cumsum(softmax(theta)) */                                  \
            const int clamped = (br[c] - bl[c]) < minw;                                                      \
            const double width = clamped ? (double)minw : (double)(br[c] - bl[c]);                           \
            double sl = 0, sr = 0;                                                                           \
            for (int64_t m = 0; m + 1 < n; m++) {                                                            \
                sl += db[m + 1] * (1.0 - (double)f[m]);                                                      \
                sr += db[m + 1] * (double)f[m];                                                              \
            }                                                                                                \
            const double d_left = db[0] + sl, d_right_eff = db[n] + sr;                                      \
            /* omega_m is in c_j for every j > m: d_omega_m = sum_{j >= m} W d_b_{j+1}; the softmax */      \
            double run = 0, dot = 0;                                                                         \
            dom[n - 1] = 0;                                                                                  \
            for (int64_t m = n - 2; m >= 0; m--) {                                                           \
                run += db[m + 1] * width;                                                                    \
                dom[m] = run;                                                                                \
            }                                                                                                \
            for (int64_t m = 0; m < n; m++) dot += (double)om[m] * dom[m];                                   \
            for (int64_t m = 0; m < n; m++) dlog[c * n + m] = (T)((double)om[m] * (dom[m] - dot));           \
            /* a range below MIN_WIDTH: B_R_eff = B_L + MIN_WIDTH, the gradient goes to B_L */               \
            dl[c] = (T)(clamped ? d_left + d_right_eff : d_left);                                            \
            dr[c] = (T)(clamped ? 0.0 : d_right_eff);                                                        \
        }                                                                                                    \
    }

/* no fused multiply-adds in the folding (noinline: it keeps these options wherever it is called) */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
NPWLU_FOLD(float, f)
NPWLU_FOLD(double, d)
#pragma GCC pop_options
NPWLU_GRADS(float, f)
NPWLU_GRADS(double, d)

#endif /* NPWLU_FOLD_H */
