/* The published sLSTM cell (SLSTMBlock's recurrence) over a whole sequence, forward and backward,
 * in one call each.
 *
 * The same arithmetic as the PyTorch loop of SLSTMBlock.forward, for one block, float32, gates in
 * the order i, f, z, o. Per step and row, with raw = gx[t] + R y:
 *     lfm = m + log sigmoid(f~),   m' = max(i~, lfm) (m' = i~ on a fresh state's first step)
 *     i = min(exp(i~ - m'), 1),    f = min(exp(lfm - m'), 1)
 *     c' = f c + i tanh(z~),       n' = f n + i,       y' = sigmoid(o~) c' / n'
 * The backward is autograd's for that loop, ties included: torch.maximum and torch.minimum send
 * half the gradient to each argument when they are equal (i = exp(0) = 1 whenever the input gate
 * sets the stabiliser), and so does this kernel. D (the block's width) is a compile-time constant
 * (-DHIDDEN=D); G = 4 D gates. Compiled and loaded by parity_lab/models/native.py.
 *
 * Arrays are contiguous and time-major: gx (T,B,G), r_t (D,G) (R transposed: raw += y r_t),
 * y, c, n, m (T+1,B,D) with step 0 given, raw (T,B,G) receives the pre-activations (NULL: not kept).
 */
#include <math.h>

#include "fast_math.h"

#define D HIDDEN
#define G (4 * HIDDEN)

/* Every transcendental function through fast_math.h's exp and log1p, inline (libmvec's calls,
 * one per 8 floats, were most of a step at D = 16); exp's argument is clamped there, so nothing
 * overflows to infinity (the build uses -ffast-math). */
static inline float exp_(float x) { return fast_exp(x); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_(-x)); }
static inline float tanh_(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }
/* torch's log_sigmoid, min(x, 0) - log1p(exp(-|x|)) */
static inline float log_sigmoid(float x) {
    return fminf(x, 0.0f) - fast_log1p_unit(fast_exp(-fabsf(x)));
}

/* raw = gx + y r_t for one row */
static inline void gates(float *restrict raw, const float *restrict gx, const float *restrict y,
                         const float *restrict r_t) {
    for (int j = 0; j < G; j++) raw[j] = gx[j];
    for (int k = 0; k < D; k++)
        for (int j = 0; j < G; j++) raw[j] += y[k] * r_t[k * G + j];
}

/* One row's step: the new c, n, m and y from the pre-activations and the old c, n, m. */
static inline void cell(const float *restrict raw, int first, const float *restrict c0,
                        const float *restrict n0, const float *restrict m0, float *restrict c1,
                        float *restrict n1, float *restrict m1, float *restrict y1) {
#pragma omp simd
    for (int j = 0; j < D; j++) {
        const float i_raw = raw[j], lfm = m0[j] + log_sigmoid(raw[D + j]);
        const float m_new = first ? i_raw : fmaxf(i_raw, lfm);
        const float i = fminf(exp_(i_raw - m_new), 1.0f);
        const float f = fminf(exp_(lfm - m_new), 1.0f);
        c1[j] = f * c0[j] + i * tanh_(raw[2 * D + j]);
        n1[j] = f * n0[j] + i;
        m1[j] = m_new;
        y1[j] = sigmoid(raw[3 * D + j]) * c1[j] / n1[j];
    }
}

void slstm_forward(long T, long B, int fresh, const float *gx, const float *r_t, float *y,
                   float *c, float *n, float *m, float *raw_out) {
    const unsigned int caller = denormals_off();
    for (long t = 0; t < T; t++) {
        const int first = fresh && t == 0;
        for (long b = 0; b < B; b++) {
            float local[G];
            float *restrict raw = raw_out ? raw_out + (t * B + b) * G : local;
            const long now = (t * B + b) * D, next = ((t + 1) * B + b) * D;
            gates(raw, gx + (t * B + b) * G, y + now, r_t);
            if (first) /* two calls, each with a constant flag, so that each loop vectorises */
                cell(raw, 1, c + now, n + now, m + now, c + next, n + next, m + next, y + next);
            else
                cell(raw, 0, c + now, n + now, m + now, c + next, n + next, m + next, y + next);
        }
    }
    denormals_restore(caller);
}

/* The share of a gradient that torch.minimum(x, other) / torch.maximum send to x: all of it
 * where x wins, half on a tie, none where it loses. */
static inline float wins(float x, float other, int larger) {
    const float won = (larger ? x > other : x < other) ? 1.0f : 0.0f;
    return x == other ? 0.5f : won;
}

/* From the forward's y, c, n, m and raw: d_raw (T,B,G), the gradient of every step's
 * pre-activations (its transpose times y gives R's gradient), and the gradients of the initial
 * state, written over d_y, d_c, d_n, d_m (B,D), which hold the final state's on entry. d_out
 * (T,B,D): the gradient of every step's output y[t + 1]. */
void slstm_backward(long T, long B, int fresh, const float *r_t, const float *c, const float *n,
                    const float *m, const float *y, const float *raw_all, const float *d_out,
                    float *d_raw, float *d_y, float *d_c, float *d_n, float *d_m) {
    const unsigned int caller = denormals_off();
    for (long t = T - 1; t >= 0; t--) {
        const int first = fresh && t == 0;
        for (long b = 0; b < B; b++) {
            const long now = (t * B + b) * D, next = ((t + 1) * B + b) * D, row = b * D;
            const float *restrict raw = raw_all + (t * B + b) * G;
            float *restrict dr = d_raw + (t * B + b) * G;
#pragma omp simd
            for (int j = 0; j < D; j++) {
                const float i_raw = raw[j], f_raw = raw[D + j];
                const float ls = log_sigmoid(f_raw), lfm = m[now + j] + ls;
                const float m_new = m[next + j];
                const float ei = exp_(i_raw - m_new), ef = exp_(lfm - m_new);
                const float i = fminf(ei, 1.0f), f = fminf(ef, 1.0f);
                const float z = tanh_(raw[2 * D + j]), o = sigmoid(raw[3 * D + j]);
                const float cj = c[next + j], nj = n[next + j];
                /* y' = (o c') / n' */
                const float dy = d_y[row + j] + d_out[now + j];
                const float dyn = dy / nj;
                const float dn = d_n[row + j] - dy * (o * cj) / (nj * nj);
                const float dc = d_c[row + j] + dyn * o;
                const float d_o = dyn * cj;
                /* c' = f c + i z, n' = f n + i */
                const float df = dc * c[now + j] + dn * n[now + j];
                const float di = dc * z + dn;
                const float dz = dc * i;
                /* i = min(exp(i~ - m'), 1), f = min(exp(lfm - m'), 1) */
                const float d_iexp = di * wins(ei, 1.0f, 0) * ei;
                const float d_fexp = df * wins(ef, 1.0f, 0) * ef;
                float d_i_raw = d_iexp, d_lfm = d_fexp;
                const float d_m_new = d_m[row + j] - d_iexp - d_fexp;
                /* m' = max(i~, lfm), or i~ on a fresh first step */
                const float share = first ? 1.0f : wins(i_raw, lfm, 1);
                d_i_raw += d_m_new * share;
                d_lfm += d_m_new * (1.0f - share);
                dr[j] = d_i_raw;
                dr[D + j] = d_lfm * sigmoid(-f_raw); /* d log sigmoid(x) / dx = sigmoid(-x) */
                dr[2 * D + j] = dz * (1.0f - z * z);
                dr[3 * D + j] = d_o * o * (1.0f - o);
                d_c[row + j] = dc * f;
                d_n[row + j] = dn * f;
                d_m[row + j] = d_lfm;
            }
            /* y feeds the next step's gates: d_y = r_t d_raw */
            for (int k = 0; k < D; k++) {
                float s = 0.0f;
                for (int g = 0; g < G; g++) s += r_t[k * G + g] * dr[g];
                d_y[row + k] = s;
            }
        }
    }
    denormals_restore(caller);
}
