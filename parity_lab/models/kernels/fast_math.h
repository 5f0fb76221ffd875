/* exp and log(1 + e) inline, for the kernels' vectorised loops.
 *
 * With -ffast-math GCC vectorises expf and logf through glibc's libmvec, one call per vector of
 * 8 floats; at the kernels' short loops (16 to 32 floats a row) those calls were a third of a
 * step. These are plain arithmetic the loop vectorises in place. Included by the kernels;
 * parity_lab/models/native.py hashes this file into each build's key.
 */
#ifndef PARITY_LAB_FAST_MATH_H
#define PARITY_LAB_FAST_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) as 2^k exp(f), x = k ln 2 + f with |f| <= ln 2 / 2, exp(f) by Cephes' degree-6
 * polynomial. ln 2 is split in two (0.693359375 - 2.12194440e-4, the first exact in few bits)
 * and f is reduced with fused multiply-adds: -ffast-math may reorder a plain sum, which undid
 * the split (3.7e-6 relative error in a scalar build). x is clamped to [-86, 88]: 2^k stays a
 * normal float (exp(-86) is 4.5e-38, returned for anything below; exp(88) 1.7e38). Relative
 * error below 1e-7 on every 7th float in [-86, 88] (320 M values, against float64 exp, in
 * native, portable and unoptimised builds); NaN comes out as a finite number (the clamp), as
 * from the kernels' former clamped expf. */
static inline float fast_exp(float x) {
    x = fminf(fmaxf(x, -86.0f), 88.0f);
    const float k = rintf(x * 1.44269504088896341f);
    const float f = fmaf(k, 2.12194440e-4f, fmaf(k, -0.693359375f, x));
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)((uint32_t)(int32_t)k << 23); /* 2^k (a shift of a negative is undefined) */
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) in [0, 1/3], its series to s^13
 * (the next term is below 2e-8 relative). */
static inline float fast_log1p_unit(float e) {
    const float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    return 2.0f * s * (p * s2 + 1.0f);
}

/* Denormals flushed to zero within a kernel call, the caller's setting restored on return
 * (x86's MXCSR: flush-to-zero and denormals-are-zero). fast_exp returns down to 4.5e-38, and
 * products of such values go subnormal, which x86 computes some hundred times slower: the sLSTM
 * step took 15-19 ms without, 13-14 with. Set per call, never for the process: a library that
 * set it on load (GCC's crtfastmath.o) changed PyTorch's own float32 results. Elsewhere a no-op. */
#if defined(__SSE__)
#include <xmmintrin.h>
static inline unsigned int denormals_off(void) {
    const unsigned int caller = _mm_getcsr();
    _mm_setcsr(caller | 0x8040u);
    return caller;
}
static inline void denormals_restore(unsigned int caller) { _mm_setcsr(caller); }
#else
static inline unsigned int denormals_off(void) { return 0; }
static inline void denormals_restore(unsigned int caller) { (void)caller; }
#endif

#endif
