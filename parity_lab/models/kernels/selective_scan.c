/* Mamba's selective scan over a chunk, forward and backward, in one call each.
 *
 * Per row r, channel c and state n (N = HIDDEN states, E channels), with dt_t = softplus(raw_t):
 *   h_t[n, c] = a_t[n, c] h_{t-1}[n, c] + dt_t[c] u_t[c] B_t[n],
 *   a_t[n, c] = exp(dt_t[c] A[n, c]) (signed: 2 exp(dt_t[c] A[n, c]) - 1),
 *   y_t[c] = (sum_n C_t[n] h_t[n, c] + D[c] u_t[c]) silu(z_t[c]).
 * The same arithmetic as MambaMixer.scan (parity_lab/models/mamba.py), which stays the reference.
 * Loops run over channels innermost (contiguous, vectorised, no horizontal sums), and a row's
 * N x E states stay in the L1 cache: nothing of size (time, channels, states) goes to memory
 * in the forward, and the backward recomputes one row's states and transitions into a buffer.
 * Compiled and loaded by parity_lab/models/native.py (-DHIDDEN=N).
 *
 * Layouts, all contiguous float32: raw, dt, u, z, y_inner, y, g_y, g_raw, g_u, g_z (R,T,E); Bm,
 * Cm, g_B, g_C (R,T,N); A, g_A (N,E) (transposed from the module's (E,N)); D, g_D (E); h0,
 * h_last, g_h_last, g_h0 (R,N,E).
 * Packed rows (offsets not NULL, training under a loss read at the answer): row r is the tokens
 * offsets[r] .. offsets[r + 1] - 1 of (tokens, E) and (tokens, N) tensors, every one of them
 * wanted (no padding to skip); T is then the longest row's length. With last_only, y, y_inner,
 * z, g_y and g_z are (R, E): the output (and its gate) at each row's last step alone, the only
 * one a loss read there needs (the C . h sum and the gate are skipped at the others, and so are
 * their gradients).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"

#define N HIDDEN

/* exp(dt A), dt A <= 0, inline (fast_math.h): libmvec's expf, a call per 8 floats, was a third
 * of the scan */
static inline float exp_(float x) { return fast_exp(x); }

/* One step of one row: h (N,E) from h_prev; e (N,E) receives exp(dt A). The transition is
 * e + sign * (e - 1): e, or 2 e - 1 when signed (no branch in the loop). */
static inline void step(long E, float sign, const float *restrict d, const float *restrict x,
                        const float *restrict Bt, const float *restrict A,
                        const float *restrict h_prev, float *restrict h, float *restrict e) {
    for (int n = 0; n < N; n++) {
        const float b = Bt[n];
        const float *restrict An = A + n * E, *restrict hp = h_prev + n * E;
        float *restrict hn = h + n * E, *restrict en = e + n * E;
        for (long c = 0; c < E; c++) {
            en[c] = exp_(d[c] * An[c]);
            hn[c] = (en[c] + sign * (en[c] - 1.0f)) * hp[c] + d[c] * x[c] * b;
        }
    }
}

/* exp's argument clamped above too: the vectorised division is a reciprocal estimate, and 1/inf
 * through it would be NaN */
static inline float sigmoid_(float x) { return 1.0f / (1.0f + expf(fminf(-x, 80.0f))); }

/* torch's softplus (threshold 20): log(1 + exp(x)), and x itself above 20 */
static inline float softplus_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* Row r's last wanted step, live[r] within [-1, T - 1] (-1: none), or T - 1 without live; a
 * packed row's last step */
static inline long wanted(const int64_t *live, const int64_t *offsets, long r, long T) {
    if (offsets) return (long)(offsets[r + 1] - offsets[r]) - 1;
    if (!live) return T - 1;
    return live[r] < -1 ? -1 : (live[r] > T - 1 ? T - 1 : (long)live[r]);
}

/* Where row r's first step is, in steps: r T, or its packed offset */
static inline long first(const int64_t *offsets, long r, long T) {
    return offsets ? (long)offsets[r] : r * T;
}

/* The step dt = softplus(raw) and the gate, y = (C . h + D u) silu(z), are done here too: as
 * PyTorch operations on (rows, time, channels) tensors they cost as much as the scan.
 * live (NULL: every step) holds each row's last step that is wanted (a loss read at the answer
 * wants nothing after it): later steps are not computed, their dt, y_inner and y are 0 and
 * h_last is the state after the last step computed. dt and y_inner (the output before the gate)
 * are kept for the backward. Returns 0, or -1 when the two rows of state cannot be allocated. */
int scan_forward(long R, long T, long E, int sign, const float *raw, const float *u,
                 const float *Bm, const float *Cm, const float *A, const float *D,
                 const float *h0, const float *z, const int64_t *live, const int64_t *offsets,
                 int last_only, float *dt, float *y_inner, float *y, float *h_last) {
    float *buffer = malloc(sizeof(float) * 3 * N * (size_t)E);
    if (!buffer) return -1;
    const unsigned int caller = denormals_off();
    for (long r = 0; r < R; r++) {
        float *h = buffer, *h_next = buffer + N * E;
        const long last = wanted(live, offsets, r, T), row = first(offsets, r, T);
        if (!offsets && last < T - 1) {
            const size_t from = (r * T + last + 1) * E, bytes = sizeof(float) * (T - 1 - last) * E;
            memset(dt + from, 0, bytes);
            memset(y_inner + from, 0, bytes);
            memset(y + from, 0, bytes);
        }
        memcpy(h, h0 + r * N * E, sizeof(float) * N * E);
        for (long t = 0; t <= last; t++) {
            const long i = (row + t) * E;
            const float *restrict Ct = Cm + (row + t) * N;
            float *restrict d = dt + i;
            for (long c = 0; c < E; c++) d[c] = softplus_(raw[i + c]);
            step(E, (float)sign, d, u + i, Bm + (row + t) * N, A, h, h_next,
                 buffer + 2 * N * E);
            float *swap = h;
            h = h_next;
            h_next = swap;
            if (last_only && t < last) continue;
            const long o = last_only ? r * E : i;
            float *restrict yi = y_inner + o, *restrict yt = y + o;
            const float *restrict zt = z + o;
            for (long c = 0; c < E; c++) yi[c] = D[c] * u[i + c];
            for (int n = 0; n < N; n++)
                for (long c = 0; c < E; c++) yi[c] += Ct[n] * h[n * E + c];
            for (long c = 0; c < E; c++) yt[c] = yi[c] * zt[c] * sigmoid_(zt[c]);
        }
        memcpy(h_last + r * N * E, h, sizeof(float) * N * E);
    }
    free(buffer);
    denormals_restore(caller);
    return 0;
}

/* One step of the backward: from gh, the gradient of the state after the step (updated in place
 * to the state's before it), and gy, that of the output before the gate, to dt (before softplus'),
 * u, B, C, A and D. reads = 0 at a step where no output is read (gy 0: its terms are skipped, and
 * g_C is 0); always_inline, so that each call site's constant reads compiles its own loop. */
static inline __attribute__((always_inline)) void
step_backward(long E, float s, float fsign, int reads, const float *restrict h_prev,
              const float *restrict h, const float *restrict e, const float *restrict A,
              const float *restrict D, const float *restrict d, const float *restrict x,
              const float *restrict Bt, const float *restrict Ct, const float *restrict gy,
              float *restrict gh, float *restrict g_A, float *restrict g_D, float *restrict gdt,
              float *restrict gu, float *restrict gBt, float *restrict gCt) {
#pragma omp simd
    for (long c = 0; c < E; c++) {
        gdt[c] = 0.0f;
        gu[c] = reads ? gy[c] * D[c] : 0.0f;
        if (reads) g_D[c] += gy[c] * x[c];
    }
    for (int n = 0; n < N; n++) {
        const float *restrict hp = h_prev + n * E, *restrict hc = h + n * E;
        const float *restrict et = e + n * E, *restrict An = A + n * E;
        float *restrict ghn = gh + n * E, *restrict gAn = g_A + n * E;
        const float b = Bt[n], cn = Ct[n];
        float gb = 0.0f, gc = 0.0f;
#pragma omp simd reduction(+ : gb, gc)
        for (long c = 0; c < E; c++) {
            const float g = reads ? ghn[c] + gy[c] * cn : ghn[c]; /* dL/dh_t */
            const float ga = g * hp[c] * s * et[c]; /* dL/d(dt A) through a_t */
            if (reads) gc += gy[c] * hc[c];
            gdt[c] += ga * An[c] + g * x[c] * b;
            gAn[c] += ga * d[c];
            gu[c] += g * d[c] * b;
            gb += g * d[c] * x[c];
            ghn[c] = g * (et[c] + fsign * (et[c] - 1.0f));
        }
        gBt[n] = gb;
        gCt[n] = gc;
    }
}

/* The last step of row r whose gradient is not all zero (-1: none). A loss read at one position
 * (the answer) leaves every later step of g_y zero, and the backward starts there. */
static long last_live_step(long r, long T, long E, const float *g_y, const float *g_h_last,
                           long S) {
    if (g_h_last)
        for (long k = 0; k < S; k++)
            if (g_h_last[r * S + k] != 0.0f) return T - 1;
    for (long t = T - 1; t >= 0; t--)
        for (long c = 0; c < E; c++)
            if (g_y[(r * T + t) * E + c] != 0.0f) return t;
    return -1;
}

/* Gradients of everything from g_y (the gated output's) and g_h_last (NULL: zero): g_raw is
 * dt's pre-softplus input's; live_steps, offsets and last_only are the forward's (the backward
 * starts no later than its last step). g_A and g_D are accumulated into (the caller zeroes
 * them); the others are written. Steps after a row's last non-zero gradient get zero gradients
 * without arithmetic (their contributions are exactly zero), and its states are recomputed only
 * up to that step. Returns 0, or -1 when the buffer cannot be allocated. */
int scan_backward(long R, long T, long E, int sign, const float *raw, const float *dt,
                  const float *u, const float *Bm, const float *Cm, const float *A,
                  const float *D, const float *h0, const float *z, const float *y_inner,
                  const int64_t *live_steps, const int64_t *offsets, int last_only,
                  const float *g_y, const float *g_h_last, float *g_raw, float *g_u, float *g_B,
                  float *g_C, float *g_A, float *g_D, float *g_h0, float *g_z) {
    const long S = N * E;
    float *hs = malloc(sizeof(float) * ((size_t)(2 * T + 2) * S + (size_t)T * E));
    if (!hs) return -1;
    const unsigned int caller = denormals_off();
    float *es = hs + (T + 1) * S; /* es[t] = exp(dt_t A), hs[t + 1] = h_t */
    float *gh = es + T * S;
    float *gys = gh + S; /* the gradient of y_inner, row r's steps */
    float *g_dt = g_raw;  /* written as dt's gradient, then times softplus' = sigmoid(raw) */
    const float s = sign ? 2.0f : 1.0f, fsign = (float)sign;
    for (long r = 0; r < R; r++) {
        /* no further than the forward went: h_last is the state there, and nothing later was
         * computed */
        const long stop = wanted(live_steps, offsets, r, T), row = first(offsets, r, T);
        /* a packed row is wanted to its end (g_y nonzero there, or the answer's is 0 anyway) */
        const long found = offsets ? stop : last_live_step(r, T, E, g_y, g_h_last, S);
        const long live = found < stop ? found : stop;
        if (!offsets && live < T - 1) { /* the steps after it: zero gradients */
            const long from = r * T + live + 1, steps = T - 1 - live;
            memset(g_dt + from * E, 0, sizeof(float) * steps * E);
            memset(g_u + from * E, 0, sizeof(float) * steps * E);
            memset(g_z + from * E, 0, sizeof(float) * steps * E);
            memset(g_B + from * N, 0, sizeof(float) * steps * N);
            memset(g_C + from * N, 0, sizeof(float) * steps * N);
        }
        for (long t = 0; t <= live; t++) { /* through the gate: y = y_inner silu(z) */
            const long i = (row + t) * E, o = last_only ? r * E : i;
            if (last_only && t < stop) { /* no output read here */
                memset(gys + t * E, 0, sizeof(float) * E);
                continue;
            }
            for (long c = 0; c < E; c++) {
                const float zc = z[o + c], sg = sigmoid_(zc);
                gys[t * E + c] = g_y[o + c] * zc * sg;
                g_z[o + c] = g_y[o + c] * y_inner[o + c] * sg * (1.0f + zc * (1.0f - sg));
            }
        }
        memcpy(hs, h0 + r * S, sizeof(float) * S);
        for (long t = 0; t <= live; t++) {
            const long i = (row + t) * E;
            step(E, (float)sign, dt + i, u + i, Bm + (row + t) * N, A, hs + t * S,
                 hs + (t + 1) * S, es + t * S);
        }
        if (g_h_last)
            memcpy(gh, g_h_last + r * S, sizeof(float) * S);
        else
            memset(gh, 0, sizeof(float) * S);
        for (long t = live; t >= 0; t--) {
            const long i = (row + t) * E;
            const float *restrict d = dt + i, *restrict x = u + i, *restrict gy = gys + t * E;
            const float *restrict Bt = Bm + (row + t) * N, *restrict Ct = Cm + (row + t) * N;
            float *restrict gBt = g_B + (row + t) * N, *restrict gCt = g_C + (row + t) * N;
            float *restrict gdt = g_dt + i, *restrict gu = g_u + i;
            const float *hp = hs + t * S, *hc = hs + (t + 1) * S, *et = es + t * S;
            if (last_only && t < stop) /* no output read at this step */
                step_backward(E, s, fsign, 0, hp, hc, et, A, D, d, x, Bt, Ct, gy, gh, g_A, g_D,
                              gdt, gu, gBt, gCt);
            else
                step_backward(E, s, fsign, 1, hp, hc, et, A, D, d, x, Bt, Ct, gy, gh, g_A, g_D,
                              gdt, gu, gBt, gCt);
#pragma omp simd
            for (long c = 0; c < E; c++) /* softplus' (1 above torch's threshold, 20) */
                gdt[c] *= raw[i + c] > 20.0f ? 1.0f : sigmoid_(raw[i + c]);
        }
        memcpy(g_h0 + r * S, gh, sizeof(float) * S);
    }
    free(hs);
    denormals_restore(caller);
    return 0;
}
