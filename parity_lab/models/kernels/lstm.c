/* ManualLSTM's equations over a whole sequence, forward and backward, in one call each.
 *
 * The same arithmetic as ManualLSTM.step / step_backward (torch's gate order i, f, g, o), for one
 * layer, float32. One call runs every time step: a row's recurrent matmul and its gate math share
 * one pass, so a step launches nothing and allocates nothing. The hidden size H is a compile-time
 * constant (-DHIDDEN=H, one build per size), so a row's gates stay in vector registers.
 * Compiled and loaded by parity_lab/models/native.py.
 *
 * T steps, B rows; G = 4 H gates. x_proj[t, b] is read at x_proj + t * x_t + b * x_b (strides in
 * floats), as is grad_out[t, b] (strides o_t, o_b); every other array is contiguous, time-major.
 */
#include <math.h>

#define H HIDDEN
#define G (4 * HIDDEN)

/* exp's argument is clamped: no overflow to infinity (the build uses -ffast-math), and beyond
 * |x| = 40 a float sigmoid is already 0 or 1 */
static inline float sigmoid(float x) {
    return 1.0f / (1.0f + expf(fminf(fmaxf(-x, -40.0f), 40.0f)));
}
/* tanh(x) = 2 sigmoid(2x) - 1, written with exp so that the loop vectorises */
static inline float tanh_(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }

/* Gates of step t, row b: a = x_proj[t, b] + b_hh + W_hh h[b] (w_hh_t is W_hh transposed, H x G). */
static inline void gates(float *restrict a, const float *restrict x, const float *restrict bias,
                         const float *restrict h, const float *restrict w_hh_t) {
    for (int j = 0; j < G; j++) a[j] = x[j] + bias[j];
    for (int k = 0; k < H; k++)
        for (int j = 0; j < G; j++) a[j] += h[k] * w_hh_t[k * G + j];
}

/* Writes h (T+1,B,H), h[0] given. Training: act (T,B,G) receives i, f, g, o after their
 * activations, tanh_c (T,B,H) receives tanh(c), c is (T+1,B,H) with c[0] given. Inference: act and
 * tanh_c are NULL and c holds two steps, used in turn; the final one is c[T % 2]. */
void lstm_forward(long T, long B, const float *x_proj, long x_t, long x_b, const float *bias_hh,
                  const float *w_hh_t, float *h, float *c, float *act, float *tanh_c) {
    const int keep = act != 0;
    for (long t = 0; t < T; t++) {
        const float *c_prev = c + (keep ? t : t % 2) * B * H;
        float *c_next = c + (keep ? t + 1 : (t + 1) % 2) * B * H;
        for (long b = 0; b < B; b++) {
            float local[G], scratch[H];
            float *restrict a = keep ? act + (t * B + b) * G : local;
            float *restrict tc = keep ? tanh_c + (t * B + b) * H : scratch;
            const float *restrict cp = c_prev + b * H;
            float *restrict cn = c_next + b * H, *restrict hn = h + ((t + 1) * B + b) * H;
            gates(a, x_proj + t * x_t + b * x_b, bias_hh, h + (t * B + b) * H, w_hh_t);
            for (int j = 0; j < H; j++) {
                const float i = sigmoid(a[j]), f = sigmoid(a[H + j]);
                const float g = tanh_(a[2 * H + j]), o = sigmoid(a[3 * H + j]);
                const float cj = f * cp[j] + i * g;
                tc[j] = tanh_(cj);
                a[j] = i, a[H + j] = f, a[2 * H + j] = g, a[3 * H + j] = o;
                cn[j] = cj;
                hn[j] = o * tc[j];
            }
        }
    }
}

/* Backward of a training lstm_forward. grad_out (T,B,H) may be NULL; grad_h and grad_c (B,H) hold
 * the gradient reaching the final state and are overwritten with that of the initial state.
 * w_hh is G x H. Writes grad_pre (T,B,G): the gradient of every step's gate pre-activations, which
 * is also that of x_proj and of W_hh h + b_hh. */
void lstm_backward(long T, long B, const float *act, const float *c, const float *tanh_c,
                   const float *w_hh, const float *grad_out, long o_t, long o_b, float *grad_h,
                   float *grad_c, float *grad_pre) {
    for (long t = T - 1; t >= 0; t--) {
        for (long b = 0; b < B; b++) {
            const float *restrict a = act + (t * B + b) * G;
            const float *restrict tc = tanh_c + (t * B + b) * H;
            const float *restrict cp = c + (t * B + b) * H;
            const float *restrict go = grad_out ? grad_out + t * o_t + b * o_b : 0;
            float *restrict gp = grad_pre + (t * B + b) * G;
            float *restrict gh = grad_h + b * H, *restrict gc = grad_c + b * H;
            float dh[H];
            for (int j = 0; j < H; j++) dh[j] = go ? gh[j] + go[j] : gh[j];
            for (int j = 0; j < H; j++) {
                const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
                const float dc = gc[j] + dh[j] * o * (1.0f - tc[j] * tc[j]);
                gp[j] = dc * g * i * (1.0f - i);
                gp[H + j] = dc * cp[j] * f * (1.0f - f);
                gp[2 * H + j] = dc * i * (1.0f - g * g);
                gp[3 * H + j] = dh[j] * tc[j] * o * (1.0f - o);
                gc[j] = dc * f;
            }
            float acc[H] = {0};
            for (int j = 0; j < G; j++)
                for (int k = 0; k < H; k++) acc[k] += gp[j] * w_hh[j * H + k];
            for (int k = 0; k < H; k++) gh[k] = acc[k];
        }
    }
}
