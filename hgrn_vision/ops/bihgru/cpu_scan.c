/* The bidirectional HGRU scan on the CPU: both directions' recurrences, forward and backward, in one pass each.
 *
 * Built by `cpu.py` at first use, once with -DREAL=float and once with -DREAL=double. Tensors are row-major, channels
 * innermost, so that the loops over the channels of a row vectorise; rows of more than MAX_WIDTH channels are cut in
 * blocks. Whole rows are fastest (long runs in memory, few calls). One thread: the scan is bound by memory, and
 * threads sharing it made the models no faster.
 *
 * From sig = sigmoid(z) (B, N, C) and c = silu(u) (B, N, 2C, (re, im) pairs): lam = gamma + (1 - gamma) sig,
 * v = (1 - lam) c, a = lam e^{i theta} the gate. hf / hr are the forward / reverse states, *_re / *_im the parts of a
 * complex value, d* adjoints.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_WIDTH 512  /* channels scanned together at most */

typedef struct {
    int64_t B, N, C;
    const REAL *sig, *c, *par;  /* par (5, C): cos theta_f, sin theta_f, cos theta_r, sin theta_r, gamma */
    REAL *out;                  /* forward: (B, N, 2C) [Re h | Im h]; backward: the incoming gradient */
    REAL *h;                    /* (4, B, N, C) hf_re, hf_im, hr_re, hr_im, or NULL in inference */
    REAL *dsig, *dc, *dpar;     /* backward: (B, N, C), (B, N, 2C) and (3, B, C) d theta_f, d theta_r, d gamma */
} args_t;

static const REAL zeros[MAX_WIDTH];

/* The per-token steps stay functions of their own: inlined, gcc loses their `restrict` and vectorises no loop. */
#define STEP static __attribute__((noinline)) void

/* One token of one direction over w channels: h = a h + v; then o = h, or o += h. */
STEP scan_step(int64_t w, int add, const REAL *restrict sig, const REAL *restrict c, const REAL *restrict cs,
               const REAL *restrict sn, const REAL *restrict gamma, REAL *restrict h_re, REAL *restrict h_im,
               REAL *restrict o_re, REAL *restrict o_im) {
    for (int64_t j = 0; j < w; j++) {
        const REAL lam = gamma[j] + (1 - gamma[j]) * sig[j], a_re = lam * cs[j], a_im = lam * sn[j], v = 1 - lam;
        const REAL re = a_re * h_re[j] - a_im * h_im[j] + v * c[2 * j];
        const REAL im = a_re * h_im[j] + a_im * h_re[j] + v * c[2 * j + 1];
        h_re[j] = re;
        h_im[j] = im;
        o_re[j] = add ? o_re[j] + re : re;
        o_im[j] = add ? o_im[j] + im : im;
    }
}

/* Forward: hf_t = a_t hf_{t-1} + v_t over t = 0 .. N-1, then hr_t = a_t hr_{t+1} + v_t back, out = hf + hr; the
 * states kept in h when it is given. */
static void forward_item(const args_t *p, int64_t b, int64_t c0, int64_t w) {
    const int64_t N = p->N, C = p->C, NC = p->B * N * C;
    const REAL *gamma = p->par + 4 * C + c0;
    REAL h_re[MAX_WIDTH], h_im[MAX_WIDTH];
    for (int reverse = 0; reverse < 2; reverse++) {
        const REAL *cs = p->par + 2 * reverse * C + c0, *sn = cs + C;
        memset(h_re, 0, sizeof h_re);
        memset(h_im, 0, sizeof h_im);
        for (int64_t n = 0; n < N; n++) {
            const int64_t t = reverse ? N - 1 - n : n, i = (b * N + t) * C + c0;
            REAL *o_re = p->out + (b * N + t) * 2 * C + c0;
            scan_step(w, reverse, p->sig + i, p->c + 2 * i, cs, sn, gamma, h_re, h_im, o_re, o_re + C);
            if (p->h) {
                memcpy(p->h + 2 * reverse * NC + i, h_re, w * sizeof(REAL));
                memcpy(p->h + (2 * reverse + 1) * NC + i, h_im, w * sizeof(REAL));
            }
        }
    }
}
/* One token of one direction's adjoint over w channels: d = conj(a) d + g with a the gate of the token after this one
 * in the direction's order; then a = this token's gate, and with hp the state before this token (zeros at the
 * direction's first), da = d conj(hp), dtheta += Re(conj(da) i a) and dlam gets Re(da e^{-i theta}).
 * The first direction (add = 0) leaves its d in dc and its part of dlam in dsig. The second adds its own: dv = both
 * directions' d, dc = (1 - lam) dv, dlam = both parts - Re(dv conj(c)), then dsig = (1 - gamma) dlam and
 * dgamma += (1 - sig) dlam. */
STEP adjoint_step(int64_t w, int add, const REAL *restrict sig, const REAL *restrict c, const REAL *restrict cs,
                         const REAL *restrict sn, const REAL *restrict gamma, const REAL *restrict g_re,
                         const REAL *restrict g_im, const REAL *restrict hp_re, const REAL *restrict hp_im,
                         REAL *restrict a_re, REAL *restrict a_im, REAL *restrict d_re, REAL *restrict d_im,
                         REAL *restrict dsig, REAL *restrict dc, REAL *restrict dtheta, REAL *restrict dgamma) {
    for (int64_t j = 0; j < w; j++) {
        const REAL re = a_re[j] * d_re[j] + a_im[j] * d_im[j] + g_re[j];
        const REAL im = a_re[j] * d_im[j] - a_im[j] * d_re[j] + g_im[j];
        const REAL lam = gamma[j] + (1 - gamma[j]) * sig[j];
        d_re[j] = re;
        d_im[j] = im;
        a_re[j] = lam * cs[j];
        a_im[j] = lam * sn[j];
    }
    if (add) {
        for (int64_t j = 0; j < w; j++) {
            const REAL da_re = d_re[j] * hp_re[j] + d_im[j] * hp_im[j];
            const REAL da_im = d_im[j] * hp_re[j] - d_re[j] * hp_im[j];
            const REAL dv_re = dc[2 * j] + d_re[j], dv_im = dc[2 * j + 1] + d_im[j];
            const REAL lam = gamma[j] + (1 - gamma[j]) * sig[j];
            const REAL dlam = dsig[j] + da_re * cs[j] + da_im * sn[j] - dv_re * c[2 * j] - dv_im * c[2 * j + 1];
            dtheta[j] += da_im * a_re[j] - da_re * a_im[j];
            dc[2 * j] = (1 - lam) * dv_re;
            dc[2 * j + 1] = (1 - lam) * dv_im;
            dsig[j] = (1 - gamma[j]) * dlam;
            dgamma[j] += (1 - sig[j]) * dlam;
        }
    } else {
        for (int64_t j = 0; j < w; j++) {
            const REAL da_re = d_re[j] * hp_re[j] + d_im[j] * hp_im[j];
            const REAL da_im = d_im[j] * hp_re[j] - d_re[j] * hp_im[j];
            dtheta[j] += da_im * a_re[j] - da_re * a_im[j];
            dc[2 * j] = d_re[j];
            dc[2 * j + 1] = d_im[j];
            dsig[j] = da_re * cs[j] + da_im * sn[j];
        }
    }
}

/* Backward: the forward direction's adjoint dh_t = g_t + conj(a_{t+1}) dh_{t+1} from t = N-1 down, then the reverse
 * one's, dh_t = g_t + conj(a_{t-1}) dh_{t-1} from t = 0 up. */
static void backward_item(const args_t *p, int64_t b, int64_t c0, int64_t w) {
    const int64_t N = p->N, C = p->C, NC = p->B * N * C;
    const REAL *gamma = p->par + 4 * C + c0;
    REAL d_re[MAX_WIDTH], d_im[MAX_WIDTH], a_re[MAX_WIDTH], a_im[MAX_WIDTH], dtheta[MAX_WIDTH], dgamma[MAX_WIDTH];
    memset(dgamma, 0, sizeof dgamma);
    for (int reverse = 0; reverse < 2; reverse++) {
        const REAL *cs = p->par + 2 * reverse * C + c0, *sn = cs + C;
        const REAL *h_re = p->h + 2 * reverse * NC, *h_im = h_re + NC;
        const int64_t before = reverse ? C : -C;  /* the state before a token in the direction's order */
        memset(d_re, 0, sizeof d_re);
        memset(d_im, 0, sizeof d_im);
        memset(a_re, 0, sizeof a_re);  /* no token after the last */
        memset(a_im, 0, sizeof a_im);
        memset(dtheta, 0, sizeof dtheta);
        for (int64_t n = 0; n < N; n++) {
            const int64_t t = reverse ? n : N - 1 - n, i = (b * N + t) * C + c0;
            const REAL *g_re = p->out + (b * N + t) * 2 * C + c0;
            const int first = n == N - 1;  /* the direction's first token: the state before it is 0 */
            adjoint_step(w, reverse, p->sig + i, p->c + 2 * i, cs, sn, gamma, g_re, g_re + C,
                         first ? zeros : h_re + i + before, first ? zeros : h_im + i + before, a_re, a_im, d_re, d_im,
                         p->dsig + i, p->dc + 2 * i, dtheta, dgamma);
        }
        memcpy(p->dpar + (reverse * p->B + b) * C + c0, dtheta, w * sizeof(REAL));
    }
    memcpy(p->dpar + (2 * p->B + b) * C + c0, dgamma, w * sizeof(REAL));
}

/* Every (sequence, block of MAX_WIDTH channels) item in turn. */
static void run(const args_t *p, int backward) {
    for (int64_t b = 0; b < p->B; b++)
        for (int64_t c0 = 0; c0 < p->C; c0 += MAX_WIDTH)
            (backward ? backward_item : forward_item)(p, b, c0, p->C - c0 < MAX_WIDTH ? p->C - c0 : MAX_WIDTH);
}

void bihgru_forward(int64_t B, int64_t N, int64_t C, const REAL *sig, const REAL *c, const REAL *par, REAL *out,
                    REAL *h) {
    const args_t p = {B, N, C, sig, c, par, out, h, NULL, NULL, NULL};
    run(&p, 0);
}

void bihgru_backward(int64_t B, int64_t N, int64_t C, const REAL *sig, const REAL *c, const REAL *par, const REAL *h,
                     const REAL *grad, REAL *dsig, REAL *dc, REAL *dpar) {
    const args_t p = {B, N, C, sig, c, par, (REAL *)grad, (REAL *)h, dsig, dc, dpar};
    run(&p, 1);
}
