/* The bidirectional HGRU scan on the CPU: both directions' recurrences, forward and backward, in one pass each.
 *
 * Built by `cpu.py` at first use, once with -DREAL=float and once with -DREAL=double. Tensors are row-major
 * (B, N, C) planes, channels innermost, so that the loops over a block of channels vectorise. The work is cut into
 * items, (sequence, block of BLOCK channels) pairs; `cpu.py` shares ranges of them among threads.
 *
 * Names: a = lam e^{i theta} the gate, hf / hr the forward / reverse states, *_re / *_im their parts, d* adjoints.
 */
#include <stddef.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define BLOCK 64

typedef struct {
    long B, N, C;
    const REAL *lam, *v_re, *v_im, *rot;  /* rot (4, C): cos theta_f, sin theta_f, cos theta_r, sin theta_r */
    REAL *out;                            /* forward: (B, N, 2C) [Re h | Im h]; backward: the incoming gradient */
    REAL *h;                              /* (4, B, N, C) hf_re, hf_im, hr_re, hr_im, or NULL in inference */
    REAL *dlam, *dv_re, *dv_im, *dtheta;  /* backward: (B, N, C) x 3 and (2, B, C) */
} args_t;

/* One token of one direction over w channels: s = a s + v with a = lam (cs + i sn); then o = s, or o += s. */
static void scan_step(long w, int add, const REAL *restrict lam, const REAL *restrict cs, const REAL *restrict sn,
                      const REAL *restrict v_re, const REAL *restrict v_im, REAL *restrict s_re, REAL *restrict s_im,
                      REAL *restrict o_re, REAL *restrict o_im) {
    for (long j = 0; j < w; j++) {
        const REAL a_re = lam[j] * cs[j], a_im = lam[j] * sn[j];
        const REAL re = a_re * s_re[j] - a_im * s_im[j] + v_re[j];
        const REAL im = a_re * s_im[j] + a_im * s_re[j] + v_im[j];
        s_re[j] = re;
        s_im[j] = im;
        o_re[j] = add ? o_re[j] + re : re;
        o_im[j] = add ? o_im[j] + im : im;
    }
}

/* Forward: hf_t = a_t hf_{t-1} + v_t over t = 0 .. N-1, then hr_t = a_t hr_{t+1} + v_t back, out = hf + hr; the
 * states kept in h when it is given. */
static void forward_item(const args_t *p, long b, long c0, long w) {
    const long N = p->N, C = p->C, NC = p->B * N * C;
    REAL s_re[BLOCK], s_im[BLOCK];
    for (int reverse = 0; reverse < 2; reverse++) {
        const REAL *cs = p->rot + 2 * reverse * C + c0, *sn = cs + C;
        memset(s_re, 0, sizeof s_re);
        memset(s_im, 0, sizeof s_im);
        for (long n = 0; n < N; n++) {
            const long t = reverse ? N - 1 - n : n, i = (b * N + t) * C + c0;
            REAL *o_re = p->out + (b * N + t) * 2 * C + c0;
            scan_step(w, reverse, p->lam + i, cs, sn, p->v_re + i, p->v_im + i, s_re, s_im, o_re, o_re + C);
            if (p->h) {
                memcpy(p->h + 2 * reverse * NC + i, s_re, w * sizeof(REAL));
                memcpy(p->h + (2 * reverse + 1) * NC + i, s_im, w * sizeof(REAL));
            }
        }
    }
}

/* One token of one direction's adjoint over w channels: d = conj(a) d + g with a the gate of the token after this one
 * in the direction's order; then a = this token's gate, dv = d (or dv += d), and with the state before this token
 * hp (NULL at the direction's first token), da = d conj(hp): dlam = Re(da e^{-i theta}) (or +=), acc += Re(conj(da) i a).
 */
static void adjoint_step(long w, int add, const REAL *restrict lam, const REAL *restrict cs, const REAL *restrict sn,
                         const REAL *restrict g_re, const REAL *restrict g_im, const REAL *restrict hp_re,
                         const REAL *restrict hp_im, REAL *restrict a_re, REAL *restrict a_im, REAL *restrict d_re,
                         REAL *restrict d_im, REAL *restrict dlam, REAL *restrict dv_re, REAL *restrict dv_im,
                         REAL *restrict acc) {
    for (long j = 0; j < w; j++) {
        const REAL re = a_re[j] * d_re[j] + a_im[j] * d_im[j] + g_re[j];
        const REAL im = a_re[j] * d_im[j] - a_im[j] * d_re[j] + g_im[j];
        d_re[j] = re;
        d_im[j] = im;
        a_re[j] = lam[j] * cs[j];
        a_im[j] = lam[j] * sn[j];
        dv_re[j] = add ? dv_re[j] + re : re;
        dv_im[j] = add ? dv_im[j] + im : im;
    }
    if (!hp_re) {
        if (!add)
            memset(dlam, 0, w * sizeof(REAL));
        return;
    }
    for (long j = 0; j < w; j++) {
        const REAL da_re = d_re[j] * hp_re[j] + d_im[j] * hp_im[j];
        const REAL da_im = d_im[j] * hp_re[j] - d_re[j] * hp_im[j];
        const REAL dl = da_re * cs[j] + da_im * sn[j];
        dlam[j] = add ? dlam[j] + dl : dl;
        acc[j] += da_im * a_re[j] - da_re * a_im[j];
    }
}

/* Backward: the forward direction's adjoint dh_t = g_t + conj(a_{t+1}) dh_{t+1} from t = N-1 down, then the reverse
 * one's, dh_t = g_t + conj(a_{t-1}) dh_{t-1} from t = 0 up; dv = the sum of both, dlam and dtheta from da. */
static void backward_item(const args_t *p, long b, long c0, long w) {
    const long N = p->N, C = p->C, NC = p->B * N * C;
    REAL d_re[BLOCK], d_im[BLOCK], a_re[BLOCK], a_im[BLOCK], acc[BLOCK];
    for (int reverse = 0; reverse < 2; reverse++) {
        const REAL *cs = p->rot + 2 * reverse * C + c0, *sn = cs + C;
        const REAL *h_re = p->h + 2 * reverse * NC, *h_im = h_re + NC;
        const long before = reverse ? C : -C;  /* the state before a token in the direction's order */
        memset(d_re, 0, sizeof d_re);
        memset(d_im, 0, sizeof d_im);
        memset(a_re, 0, sizeof a_re);  /* no token after the last */
        memset(a_im, 0, sizeof a_im);
        memset(acc, 0, sizeof acc);
        for (long n = 0; n < N; n++) {
            const long t = reverse ? n : N - 1 - n, i = (b * N + t) * C + c0;
            const REAL *g_re = p->out + (b * N + t) * 2 * C + c0;
            const int first = n == N - 1;  /* the direction's first token: the state before it is 0 */
            adjoint_step(w, reverse, p->lam + i, cs, sn, g_re, g_re + C, first ? NULL : h_re + i + before,
                         first ? NULL : h_im + i + before, a_re, a_im, d_re, d_im, p->dlam + i, p->dv_re + i,
                         p->dv_im + i, acc);
        }
        memcpy(p->dtheta + (reverse * p->B + b) * C + c0, acc, w * sizeof(REAL));
    }
}

/* Items [begin, end) of the B * ceil(C / BLOCK) (sequence, block of channels) pairs, under the floating-point
 * control word `csr` (x86: a worker thread takes the caller's, so denormals flush as they do there). */
static void run(const args_t *p, int backward, long begin, long end, unsigned int csr) {
#if defined(__SSE__)
    const unsigned int own = _mm_getcsr();
    _mm_setcsr(csr);
#endif
    const long blocks = (p->C + BLOCK - 1) / BLOCK;
    for (long item = begin; item < end; item++) {
        const long b = item / blocks, c0 = (item % blocks) * BLOCK;
        (backward ? backward_item : forward_item)(p, b, c0, p->C - c0 < BLOCK ? p->C - c0 : BLOCK);
    }
#if defined(__SSE__)
    _mm_setcsr(own);
#endif
    (void)csr;
}

long bihgru_items(long B, long C) { return B * ((C + BLOCK - 1) / BLOCK); }

unsigned int bihgru_csr(void) {
#if defined(__SSE__)
    return _mm_getcsr();
#else
    return 0;
#endif
}

void bihgru_forward(long B, long N, long C, const REAL *lam, const REAL *v_re, const REAL *v_im, const REAL *rot,
                    REAL *out, REAL *h, long begin, long end, unsigned int csr) {
    const args_t p = {B, N, C, lam, v_re, v_im, rot, out, h, NULL, NULL, NULL, NULL};
    run(&p, 0, begin, end, csr);
}

void bihgru_backward(long B, long N, long C, const REAL *lam, const REAL *rot, const REAL *h, const REAL *grad,
                     REAL *dlam, REAL *dv_re, REAL *dv_im, REAL *dtheta, long begin, long end, unsigned int csr) {
    const args_t p = {B, N, C, lam, NULL, NULL, rot, (REAL *)grad, (REAL *)h, dlam, dv_re, dv_im, dtheta};
    run(&p, 1, begin, end, csr);
}
