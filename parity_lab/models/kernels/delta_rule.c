/* The delta rule over a whole sequence, forward and backward, in one call each: the arithmetic
 * of DeltaRule in parity_lab/models/deltanet_published.py, float32.
 *
 * Time-major with the batch last (n = batch x heads, the contiguous, vectorised dimension):
 * q, k (T,K,n) (q already scaled), v (T,V,n), beta (T,n), states (T+1,K,V,n) with S_0 given,
 * errors (T,V,n), outputs (T,V,n). Per step:
 *     e_t = v_t - S_{t-1}^T k_t,   S_t = S_{t-1} + k_t (beta_t e_t)^T,   o_t = S_t^T q_t.
 * Backward, the adjoint recurrence on G_t = dL/dS_t (DeltaRule's docstring gives it).
 * HIDDEN (the build's size) is K; V and n are arguments. Compiled by parity_lab/models/native.py.
 */

void delta_forward(long T, long K, long V, long n, const float *restrict q,
                   const float *restrict k, const float *restrict v, const float *restrict beta,
                   float *restrict states, float *restrict errors, float *restrict outputs) {
    const long plane = K * V * n;
    for (long t = 0; t < T; t++) {
        const float *restrict s0 = states + t * plane;
        float *restrict s1 = states + (t + 1) * plane;
        const float *restrict kt = k + t * K * n, *restrict qt = q + t * K * n;
        const float *restrict bt = beta + t * n;
        for (long j = 0; j < V; j++) {
            float *restrict e = errors + (t * V + j) * n;
            const float *restrict vj = v + (t * V + j) * n;
            for (long x = 0; x < n; x++) e[x] = vj[x];
            for (long i = 0; i < K; i++) {
                const float *restrict sij = s0 + (i * V + j) * n;
                const float *restrict ki = kt + i * n;
                for (long x = 0; x < n; x++) e[x] -= sij[x] * ki[x];
            }
            float *restrict o = outputs + (t * V + j) * n;
            for (long x = 0; x < n; x++) o[x] = 0.0f;
            for (long i = 0; i < K; i++) {
                const float *restrict sij = s0 + (i * V + j) * n;
                float *restrict s1ij = s1 + (i * V + j) * n;
                const float *restrict ki = kt + i * n, *restrict qi = qt + i * n;
                for (long x = 0; x < n; x++) {
                    s1ij[x] = sij[x] + ki[x] * (bt[x] * e[x]);
                    o[x] += s1ij[x] * qi[x];
                }
            }
        }
    }
}

/* grad (K,V,n) holds dL/dS_T on entry and dL/dS_0 on return; d_out (T,V,n) the outputs'
 * gradient. Writes d_q, d_k (T,K,n), d_v (T,V,n), d_beta (T,n); d_write (V,n) is scratch. */
void delta_backward(long T, long K, long V, long n, const float *restrict q,
                    const float *restrict k, const float *restrict beta,
                    const float *restrict states, const float *restrict errors,
                    const float *restrict d_out, float *restrict grad, float *restrict d_q,
                    float *restrict d_k, float *restrict d_v, float *restrict d_beta,
                    float *restrict d_write) {
    const long plane = K * V * n;
    for (long t = T - 1; t >= 0; t--) {
        const float *restrict s0 = states + t * plane, *restrict s1 = states + (t + 1) * plane;
        const float *restrict kt = k + t * K * n, *restrict qt = q + t * K * n;
        const float *restrict bt = beta + t * n, *restrict et = errors + t * V * n;
        const float *restrict dot = d_out + t * V * n;
        float *restrict dqt = d_q + t * K * n, *restrict dkt = d_k + t * K * n;
        float *restrict dvt = d_v + t * V * n, *restrict dbt = d_beta + t * n;
        /* d_q_t = S_t d_o_t; G_t = G_{t+1}' + q_t d_o_t^T; d_write = G_t^T k_t; d_k_t's first
         * part G_t (beta_t e_t) */
        for (long j = 0; j < V; j++)
            for (long x = 0; x < n; x++) d_write[j * n + x] = 0.0f;
        for (long i = 0; i < K; i++) {
            float *restrict dqi = dqt + i * n, *restrict dki = dkt + i * n;
            const float *restrict qi = qt + i * n, *restrict ki = kt + i * n;
            for (long x = 0; x < n; x++) dqi[x] = dki[x] = 0.0f;
            for (long j = 0; j < V; j++) {
                const float *restrict s1ij = s1 + (i * V + j) * n, *restrict doj = dot + j * n;
                const float *restrict ej = et + j * n;
                float *restrict gij = grad + (i * V + j) * n, *restrict dwj = d_write + j * n;
                for (long x = 0; x < n; x++) {
                    dqi[x] += s1ij[x] * doj[x];
                    gij[x] += qi[x] * doj[x];
                    dwj[x] += gij[x] * ki[x];
                    dki[x] += gij[x] * (bt[x] * ej[x]);
                }
            }
        }
        /* d_v = beta d_write, d_beta = d_write . e, d_k -= S_{t-1} d_v, G -= k d_v^T */
        for (long x = 0; x < n; x++) dbt[x] = 0.0f;
        for (long j = 0; j < V; j++) {
            const float *restrict dwj = d_write + j * n, *restrict ej = et + j * n;
            float *restrict dvj = dvt + j * n;
            for (long x = 0; x < n; x++) {
                dvj[x] = bt[x] * dwj[x];
                dbt[x] += dwj[x] * ej[x];
            }
        }
        for (long i = 0; i < K; i++) {
            const float *restrict ki = kt + i * n;
            float *restrict dki = dkt + i * n;
            for (long j = 0; j < V; j++) {
                const float *restrict s0ij = s0 + (i * V + j) * n, *restrict dvj = dvt + j * n;
                float *restrict gij = grad + (i * V + j) * n;
                for (long x = 0; x < n; x++) {
                    dki[x] -= s0ij[x] * dvj[x];
                    gij[x] -= ki[x] * dvj[x];
                }
            }
        }
    }
}
