/* CPU kernels for the per-step mask updates of spre_fx (see _native.py).
 *
 * Each computes exactly what its torch counterpart in masks.py computes, in one or two passes
 * over the weight instead of a dozen, on `threads` POSIX threads. Weights are [O, C, taps]
 * addressed through element strides, so contiguous and channels_last layouts both work.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define SERIAL_BELOW (1 << 16) /* elements under which a thread costs more than it saves */
/* bytes of weight under which the N:M ranking runs on one thread: measured, a second thread
 * cost more than it saved on a 512 KiB float32 layer and saved time on a 1 MiB float64 one */
#define NM_SERIAL_BELOW_BYTES (1 << 20)

/* ------------------------------------------------------------------ parallel for */
typedef void (*body_fn)(void *ctx, int64_t begin, int64_t end, int part);

typedef struct {
    body_fn body;
    void *ctx;
    int64_t begin, end;
    int part;
} chunk_t;

static void *run_chunk(void *arg) {
    chunk_t *c = (chunk_t *)arg;
    c->body(c->ctx, c->begin, c->end, c->part);
    return NULL;
}

/* Split [0, total) into `parts` contiguous chunks; chunk i runs body(ctx, b, e, i). */
static void parallel_for(int64_t total, int parts, body_fn body, void *ctx) {
    pthread_t tid[MAX_THREADS];
    chunk_t chunk[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < parts; i++) {
        chunk[i] = (chunk_t){body, ctx, total * i / parts, total * (i + 1) / parts, i};
    }
    for (int i = 1; i < parts; i++) {
        started[i] = pthread_create(&tid[i], NULL, run_chunk, &chunk[i]) == 0;
        if (!started[i]) run_chunk(&chunk[i]);
    }
    run_chunk(&chunk[0]);
    for (int i = 1; i < parts; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
    }
}

static int clamp_threads(int threads) {
    return threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
}

/* ------------------------------------------------------------------ N:M mask
 * rank_i = i + #{k > i : a_i < a_k} - #{j < i : a_j < a_i}; keep rank_i < N. The same formula
 * (and so the same ties and NaN behaviour) as masks._nm_mask_torch. One body per dtype, M in
 * 2..8 (a compile-time constant, so the pairwise loops unroll) and layout:
 *   flat: groups are consecutive runs of M in memory, in the same order in weight and mask
 *         ([O, *kernel, C] contiguous: channels_last, and every 1x1 or linear weight);
 *   strided: anything else whose kernel axes collapse into one stride (contiguous k×k included:
 *            a body with unit tap stride measured no faster, the compiler does not vectorise it).
 */
typedef struct {
    const void *w;
    uint8_t *out;
    int64_t groups, taps;
    int64_t ws[3], os[3]; /* strides of o, c, tap */
    int n;
} nm_ctx;

/* Rank the M values a[0..M) and store keep flags at ob[i * OSTEP]. */
#define NM_RANK_STORE(T, MC, ob, OSTEP)                                           \
    do {                                                                          \
        int rank[MC];                                                             \
        _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) rank[i] = i;         \
        _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) {                    \
            _Pragma("GCC unroll 8") for (int j = i + 1; j < MC; j++) {            \
                int beaten = a[i] < a[j];                                         \
                rank[i] += beaten;                                                \
                rank[j] -= beaten;                                                \
            }                                                                     \
        }                                                                         \
        _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) (ob)[i * (OSTEP)] = rank[i] < n; \
    } while (0)

/* Locals only inside the loops: the uint8 stores may alias anything, ctx fields included. */
#define NM_BODIES_FOR(SUFFIX, T, ABS, MC)                                                      \
    static void nm_flat_##SUFFIX(void *vctx, int64_t begin, int64_t end, int part) {           \
        (void)part;                                                                            \
        const nm_ctx *c = (const nm_ctx *)vctx;                                                \
        const T *restrict w = (const T *)c->w;                                                 \
        uint8_t *restrict out = c->out;                                                        \
        const int n = c->n;                                                                    \
        for (int64_t q = begin; q < end; q++) {                                                \
            T a[MC];                                                                           \
            _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) a[i] = ABS(w[q * MC + i]);    \
            NM_RANK_STORE(T, MC, out + q * MC, 1);                                             \
        }                                                                                      \
    }                                                                                          \
    static void nm_strided_##SUFFIX(void *vctx, int64_t begin, int64_t end, int part) {        \
        (void)part;                                                                            \
        const nm_ctx *c = (const nm_ctx *)vctx;                                                \
        const T *restrict w = (const T *)c->w;                                                 \
        uint8_t *restrict out = c->out;                                                        \
        const int64_t groups = c->groups, taps = c->taps;                                      \
        const int64_t w0 = c->ws[0], w1 = c->ws[1], w2 = c->ws[2];                             \
        const int64_t o0 = c->os[0], o1 = c->os[1], o2 = c->os[2];                             \
        const int n = c->n;                                                                    \
        int64_t o = begin / groups, g = begin % groups; /* no division per group */           \
        for (int64_t p = begin; p < end; p++, g = g + 1 == groups ? (o++, 0) : g + 1) {        \
            const T *wb = w + o * w0 + g * MC * w1;                                            \
            uint8_t *ob = out + o * o0 + g * MC * o1;                                          \
            for (int64_t t = 0; t < taps; t++) {                                               \
                T a[MC];                                                                       \
                _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) a[i] = ABS(wb[i * w1 + t * w2]); \
                NM_RANK_STORE(T, MC, ob + t * o2, o1);                                         \
            }                                                                                  \
        }                                                                                      \
    }

/* Blocked body, float32 contiguous 3x3 ([O, C, 9] in weight and mask, TAPS = 9): the groups
 * p = o * C/M + g are consecutive blocks of M x TAPS values. GROUPS of them at a time are
 * copied member-major into local arrays, where the ranking runs over all their GROUPS x TAPS
 * lanes at once and vectorises (the per-group loops of the other bodies do not). Measured on
 * 64-512-channel 3x3 layers: half the strided body's time. The groups left after the last whole
 * block are ranked one tap at a time. Same comparisons, so the same mask. (Measured no faster:
 * the flat layout blocked so, TAPS = 1, and float64.) */
#define NM_BLOCKED_FOR(NAME, T, ABS, MC, TAPS, GROUPS)                                         \
    static void NAME(void *vctx, int64_t begin, int64_t end, int part) {                       \
        (void)part;                                                                            \
        const nm_ctx *c = (const nm_ctx *)vctx;                                                \
        const T *restrict w = (const T *)c->w;                                                 \
        uint8_t *restrict out = c->out;                                                        \
        const int n = c->n;                                                                    \
        enum { L = (GROUPS) * (TAPS) };                                                        \
        T a[MC][L];          /* member-major: a[i][g * TAPS + t] */                            \
        uint8_t keep[MC][L];                                                                   \
        int64_t p0 = begin;                                                                    \
        for (; p0 + (GROUPS) <= end; p0 += (GROUPS)) {                                         \
            const T *wb = w + p0 * MC * (TAPS);                                                \
            uint8_t *ob = out + p0 * MC * (TAPS);                                              \
            for (int g = 0; g < (GROUPS); g++) {                                               \
                for (int i = 0; i < MC; i++) {                                                 \
                    for (int t = 0; t < (TAPS); t++)                                           \
                        a[i][g * (TAPS) + t] = ABS(wb[(g * MC + i) * (TAPS) + t]);             \
                }                                                                              \
            }                                                                                  \
            for (int l = 0; l < L; l++) {                                                      \
                int32_t rank[MC];                                                              \
                _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) rank[i] = i;              \
                _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) {                         \
                    _Pragma("GCC unroll 8") for (int j = i + 1; j < MC; j++) {                 \
                        int32_t beaten = a[i][l] < a[j][l];                                    \
                        rank[i] += beaten;                                                     \
                        rank[j] -= beaten;                                                     \
                    }                                                                          \
                }                                                                              \
                _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) keep[i][l] = (uint8_t)(rank[i] < n); \
            }                                                                                  \
            for (int g = 0; g < (GROUPS); g++) {                                               \
                for (int i = 0; i < MC; i++)                                                   \
                    memcpy(ob + (g * MC + i) * (TAPS), &keep[i][g * (TAPS)], (TAPS));          \
            }                                                                                  \
        }                                                                                      \
        for (; p0 < end; p0++) {                                                               \
            const T *wb = w + p0 * MC * (TAPS);                                                \
            uint8_t *ob = out + p0 * MC * (TAPS);                                              \
            for (int t = 0; t < (TAPS); t++) {                                                 \
                T a1[MC];                                                                      \
                _Pragma("GCC unroll 8") for (int i = 0; i < MC; i++) a1[i] = ABS(wb[i * (TAPS) + t]); \
                { T *a = a1; NM_RANK_STORE(T, MC, ob + t, (TAPS)); }                           \
            }                                                                                  \
        }                                                                                      \
    }

#define NM_BODIES(MC)                                   \
    NM_BODIES_FOR(f32_m##MC, float, fabsf, MC)          \
    NM_BODIES_FOR(f64_m##MC, double, fabs, MC)          \
    NM_BLOCKED_FOR(nm_3x3_f32_m##MC, float, fabsf, MC, 9, 16)
NM_BODIES(2)
NM_BODIES(3)
NM_BODIES(4)
NM_BODIES(5)
NM_BODIES(6)
NM_BODIES(7)
NM_BODIES(8)

#define NM_TABLE(LAYOUT, T)                                                             \
    {nm_##LAYOUT##_##T##_m2, nm_##LAYOUT##_##T##_m3, nm_##LAYOUT##_##T##_m4,            \
     nm_##LAYOUT##_##T##_m5, nm_##LAYOUT##_##T##_m6, nm_##LAYOUT##_##T##_m7,            \
     nm_##LAYOUT##_##T##_m8}
static const body_fn nm_bodies[3][2][7] = {
    {NM_TABLE(flat, f32), NM_TABLE(flat, f64)},
    {NM_TABLE(strided, f32), NM_TABLE(strided, f64)},
    {NM_TABLE(3x3, f32), NM_TABLE(strided, f64)}, /* float64 3x3: the strided body */
};

/* Element strides must be non-negative; sizes too, and C > 0 (groups = C / M divides work). */
static int bad_layout(int64_t o, int64_t c, int64_t taps, const int64_t *strides) {
    if (!strides || o < 0 || c <= 0 || taps < 0) return 1;
    for (int i = 0; i < 3; i++) {
        if (strides[i] < 0) return 1;
    }
    return 0;
}

/* Returns 0 on success, -1 on arguments it does not handle (M > 8) or refuses (anything out of
 * range: _native.py validates first, this is the second line). */
int spre_nm_mask(const void *w, int is_double, uint8_t *out, int64_t o, int64_t c, int64_t taps,
                 const int64_t *wstrides, const int64_t *ostrides, int n, int m, int threads) {
    if (m < 2 || m > 8 || n < 1 || n >= m) return -1;
    if (!w || !out || bad_layout(o, c, taps, wstrides) || bad_layout(o, c, taps, ostrides)) return -1;
    if (c % m) return -1;
    nm_ctx ctx = {w, out, c / m, taps, {wstrides[0], wstrides[1], wstrides[2]},
                  {ostrides[0], ostrides[1], ostrides[2]}, n};
    const int64_t *ws = wstrides, *os = ostrides;
    /* [O, taps, C] contiguous in both (a single tap counts as any layout) */
    int flat = ws[1] == 1 && os[1] == 1 && (taps == 1 || (ws[2] == c && os[2] == c)) &&
               ws[0] == taps * c && os[0] == taps * c;
    /* [O, C, 9] contiguous in both, float32 (in float64 the block copy measured slower) */
    int k3x3 = !flat && !is_double && taps == 9 && ws[2] == 1 && os[2] == 1 && ws[1] == 9 && os[1] == 9 &&
               ws[0] == 9 * c && os[0] == 9 * c;
    int layout = flat ? 0 : (k3x3 ? 2 : 1);
    int64_t work = flat ? o * taps * (c / m) : o * (c / m);
    int parts = clamp_threads(threads);
    if (work * m * (flat ? 1 : taps) * (is_double ? 8 : 4) < NM_SERIAL_BELOW_BYTES) parts = 1;
    if (parts > work) parts = work > 0 ? (int)work : 1;
    parallel_for(work, parts, nm_bodies[layout][is_double != 0][m - 2], &ctx);
    return 0;
}

/* ------------------------------------------------------------------ spatial-mask counts
 * kept[t] = #{(o, c) : |w[o, c, t]| > v_k}, v_k the k-th smallest |w| of the layer: the per-tap
 * kept counts of masks.magnitude_mask (`a > v_k`: ties at v_k are pruned). Non-negative floats
 * order like their bit patterns with the sign bit cleared (their keys), so v_k is found by a
 * radix select: pass 1 builds a histogram of the top `bits` bits per tap, which gives the bucket
 * holding v_k and, per tap, the count above it; pass 2 collects that one bucket, selected 11 bits
 * at a time. With a hint (the key of v_k at the layer's last update), one pass instead: see
 * "bracket" below. Layers holding inf or NaN (or |w| within a bucket of inf) are left to the
 * torch code.
 */
typedef struct {
    const void *w;
    int64_t c, taps;
    int64_t ws[3];
    int shift;          /* key >> shift = bucket */
    int64_t buckets;
    uint32_t *hist;     /* [parts][taps][buckets] */
    int64_t bucket;     /* the bucket holding the k-th key */
    int64_t *offset;    /* [parts]: where each part writes its bucket keys */
    uint64_t *keys;     /* keys of the bucket ... */
    int64_t *key_tap;   /* ... and their taps */
} sp_ctx;

/* One pass with a bracket [lo, lo + span] around the key v_k had last time: per part, the count
 * per tap of keys above it and the keys in it (arrays grown as needed); `worst`, the largest key
 * (inf/NaN check). */
typedef struct {
    const void *w;
    int64_t c, taps;
    int64_t ws[3];
    uint64_t lo, span;
    int64_t *above;                /* [parts][taps] */
    uint64_t *keys[MAX_THREADS];   /* per part: the keys in the bracket ... */
    int64_t *key_tap[MAX_THREADS]; /* ... and their taps */
    int64_t met[MAX_THREADS], cap[MAX_THREADS];
    uint64_t worst[MAX_THREADS];
    int oom[MAX_THREADS];
} br_ctx;

/* Room for twice as many bracket keys in part `part`; 0 when out of memory. */
static int br_grow(br_ctx *c, int part) {
    const int64_t cap = c->cap[part] ? 2 * c->cap[part] : 1024;
    uint64_t *keys = realloc(c->keys[part], sizeof(uint64_t) * (size_t)cap);
    if (keys) c->keys[part] = keys;
    int64_t *taps = keys ? realloc(c->key_tap[part], sizeof(int64_t) * (size_t)cap) : NULL;
    if (taps) c->key_tap[part] = taps;
    if (!keys || !taps) return 0;
    c->cap[part] = cap;
    return 1;
}

/* Rows p = o * C + c of [begin, end), walked without a division per row. Loops keep ctx fields
 * in locals (stores through the histogram pointers may alias them). */
#define SP_BODIES(SUFFIX, UT, SIGN_OFF)                                                      \
    static void sp_hist_##SUFFIX(void *vctx, int64_t begin, int64_t end, int part) {         \
        const sp_ctx *c = (const sp_ctx *)vctx;                                              \
        const UT *restrict w = (const UT *)c->w;                                             \
        const int64_t cin = c->c, taps = c->taps, w0 = c->ws[0], w1 = c->ws[1], w2 = c->ws[2]; \
        const int64_t buckets = c->buckets;                                                  \
        const int shift = c->shift;                                                          \
        uint32_t *restrict hist = c->hist + part * taps * buckets;                           \
        int64_t o = begin / cin, ch = begin % cin;                                           \
        for (int64_t p = begin; p < end; p++) {                                              \
            const UT *row = w + o * w0 + ch * w1;                                            \
            for (int64_t t = 0; t < taps; t++) hist[t * buckets + ((row[t * w2] & SIGN_OFF) >> shift)]++; \
            if (++ch == cin) ch = 0, o++;                                                    \
        }                                                                                    \
    }                                                                                        \
    static void sp_collect_##SUFFIX(void *vctx, int64_t begin, int64_t end, int part) {      \
        const sp_ctx *c = (const sp_ctx *)vctx;                                              \
        const UT *restrict w = (const UT *)c->w;                                             \
        uint64_t *restrict keys = c->keys;                                                   \
        int64_t *restrict key_tap = c->key_tap;                                              \
        const int64_t cin = c->c, taps = c->taps, w0 = c->ws[0], w1 = c->ws[1], w2 = c->ws[2]; \
        const UT bucket = (UT)c->bucket;                                                     \
        const int shift = c->shift;                                                          \
        int64_t at = c->offset[part], o = begin / cin, ch = begin % cin;                     \
        for (int64_t p = begin; p < end; p++) {                                              \
            const UT *row = w + o * w0 + ch * w1;                                            \
            for (int64_t t = 0; t < taps; t++) {                                             \
                const UT key = row[t * w2] & SIGN_OFF;                                       \
                if ((key >> shift) == bucket) {                                              \
                    keys[at] = key;                                                          \
                    key_tap[at++] = t;                                                       \
                }                                                                            \
            }                                                                                \
            if (++ch == cin) ch = 0, o++;                                                    \
        }                                                                                    \
    }                                                                                        \
    static void sp_bracket_##SUFFIX(void *vctx, int64_t begin, int64_t end, int part) {      \
        br_ctx *c = (br_ctx *)vctx;                                                          \
        const UT *restrict w = (const UT *)c->w;                                             \
        const int64_t cin = c->c, taps = c->taps, w0 = c->ws[0], w1 = c->ws[1], w2 = c->ws[2]; \
        const UT lo = (UT)c->lo, span = (UT)c->span, hi = (UT)(c->lo + c->span);             \
        int64_t *restrict above = c->above + part * taps;                                    \
        uint64_t *keys = c->keys[part];                                                      \
        int64_t *key_tap = c->key_tap[part];                                                 \
        int64_t met = c->met[part], cap = c->cap[part]; /* a flat body may have begun */    \
        UT worst = (UT)c->worst[part];                                                       \
        int64_t o = begin / cin, ch = begin % cin;                                           \
        for (int64_t p = begin; p < end; p++) {                                              \
            const UT *row = w + o * w0 + ch * w1;                                            \
            for (int64_t t = 0; t < taps; t++) {                                             \
                const UT key = row[t * w2] & SIGN_OFF;                                       \
                above[t] += key > hi;                                                        \
                worst = key > worst ? key : worst;                                           \
                if ((UT)(key - lo) <= span) { /* unsigned: keys below lo wrap past span */   \
                    if (met == cap) {                                                        \
                        if (!br_grow(c, part)) {                                             \
                            c->oom[part] = 1;                                                \
                            return;                                                          \
                        }                                                                    \
                        keys = c->keys[part], key_tap = c->key_tap[part], cap = c->cap[part]; \
                    }                                                                        \
                    keys[met] = key;                                                         \
                    key_tap[met++] = t;                                                      \
                }                                                                            \
            }                                                                                \
            if (++ch == cin) ch = 0, o++;                                                    \
        }                                                                                    \
        c->met[part] = met;                                                                  \
        c->worst[part] = worst;                                                              \
    }

SP_BODIES(f32, uint32_t, 0x7fffffffU)
SP_BODIES(f64, uint64_t, 0x7fffffffffffffffULL)

#define BR_BLOCK_ROWS 16
#define BR_LANES_MAX 1024 /* 16 rows of up to 64 taps */
#define BR_RUN 16         /* keys tested together before any is collected (4 vectors) */

/* Four int32 lanes (GCC/Clang vector extensions: SSE2 on x86-64, NEON on arm64). */
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4i v4_load(const int32_t *p) {
    v4i v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The bracket pass of a contiguous float32 [O, C, taps] weight (taps <= 64): 16 rows at a time
 * as one run of 16 * taps keys counted in vector lanes (keys fit int32); a run of 16 keys that
 * holds a key of the bracket is walked again to collect it. The rows after the last whole block
 * go through the strided body. */
static void sp_bracket_flat_f32(void *vctx, int64_t begin, int64_t end, int part) {
    br_ctx *c = (br_ctx *)vctx;
    const int32_t *restrict w = (const int32_t *)c->w;
    const int64_t taps = c->taps, lanes = BR_BLOCK_ROWS * taps;
    const int32_t lo = (int32_t)c->lo, hi = (int32_t)(c->lo + c->span);
    const v4i sign_off = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    const v4i lo_v = {lo, lo, lo, lo}, hi_v = {hi, hi, hi, hi};
    v4i acc[BR_LANES_MAX / 4], worst = {0, 0, 0, 0};
    memset(acc, 0, sizeof(v4i) * (size_t)(lanes / 4));
    int64_t met = 0, p = begin;
    for (; p + BR_BLOCK_ROWS <= end; p += BR_BLOCK_ROWS) {
        const int32_t *restrict x = w + p * taps;
        for (int64_t g = 0; g < lanes; g += BR_RUN) { /* lanes: a multiple of BR_RUN */
            v4i in = {0, 0, 0, 0};
            for (int64_t j = g; j < g + BR_RUN; j += 4) {
                const v4i key = v4_load(x + j) & sign_off;
                const v4i above = key > hi_v, more = key > worst; /* lanes: -1 true, 0 false */
                acc[j / 4] -= above;
                in |= (key >= lo_v) & ~above;
                worst = (key & more) | (worst & ~more);
            }
            if (!(in[0] | in[1] | in[2] | in[3])) continue;
            for (int64_t j = g; j < g + BR_RUN; j++) {
                const int32_t key = x[j] & 0x7fffffff;
                if (key < lo || key > hi) continue;
                if (met == c->cap[part] && !br_grow(c, part)) {
                    c->oom[part] = 1;
                    return;
                }
                c->keys[part][met] = (uint64_t)key;
                c->key_tap[part][met++] = j % taps;
            }
        }
    }
    int64_t *above = c->above + part * taps;
    for (int64_t j = 0; j < lanes; j++) above[j % taps] += (uint32_t)acc[j / 4][j % 4];
    int32_t top = 0;
    for (int i = 0; i < 4; i++) top = worst[i] > top ? worst[i] : top;
    c->met[part] = met;
    c->worst[part] = (uint64_t)top;
    if (p < end) sp_bracket_f32(vctx, p, end, part);
}

#define DIGIT_BITS 11 /* select digits: a 16 KiB histogram on the stack */

/* The r-th smallest (1-based) of keys[0:n] that share their bits above `low_bits`. */
static uint64_t select_kth(uint64_t *keys, int64_t n, int64_t r, int low_bits) {
    int64_t hist[1 << DIGIT_BITS];
    while (low_bits > 0) {
        int shift = low_bits > DIGIT_BITS ? low_bits - DIGIT_BITS : 0;
        int width = low_bits - shift;
        uint64_t digit_mask = (1ULL << width) - 1;
        memset(hist, 0, sizeof(int64_t) << width);
        for (int64_t i = 0; i < n; i++) hist[(keys[i] >> shift) & digit_mask]++;
        uint64_t d = 0;
        while (r > hist[d]) r -= hist[d++];
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++) {
            if (((keys[i] >> shift) & digit_mask) == d) keys[kept++] = keys[i];
        }
        n = kept;
        low_bits = shift;
    }
    return keys[0];
}

/* Histogram bits per tap: up to 12 (16 KiB), fewer for small layers (a histogram much larger
 * than the layer costs more to clear and scan than it saves) and for large kernels (a thread's
 * histograms stay within 256 KiB). */
static int bucket_bits(int64_t numel, int64_t taps) {
    int bits = 12;
    while (bits > 4 && ((taps << bits) > (1 << 16) || (taps << bits) > numel / 8)) bits--;
    return bits;
}

/* How many keys the next bracket aims to hold: enough that a weight moved by one optimizer step
 * keeps v_k inside, few enough that collecting them stays a small part of the pass. */
static double bracket_target(int64_t numel) {
    const double share = (double)numel / 2048.0;
    return share > 256.0 ? share : 256.0;
}

/* The next half-width: `target` keys at the density just seen (`in` keys over `width` key
 * values), and at least 4x how far v_k moved since the last update. */
static int64_t next_half_width(double in, double width, double target, uint64_t moved, uint64_t max_key) {
    double d = in > 0 ? target * width / (2.0 * in) : (double)max_key;
    if (d < 4.0 * (double)moved) d = 4.0 * (double)moved;
    if (d < 1.0) d = 1.0;
    return d >= (double)max_key ? (int64_t)max_key : (int64_t)d;
}

/* The bracket pass. Returns 0 and fills kept and *kth when v_k lies in [lo, hi]; 1 when it does
 * not (the caller runs the two passes); 2 for a layer holding inf/NaN; -1 out of memory. */
static int spatial_bracket(const void *w, int is_double, int64_t o, int64_t c, int64_t taps,
                           const int64_t *wstrides, int64_t k, int parts, uint64_t lo, uint64_t hi,
                           uint64_t bad_key, int64_t *kept, uint64_t *kth, int64_t *in_bracket) {
    const int64_t rows = o * c, numel = rows * taps;
    br_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.w = w, ctx.c = c, ctx.taps = taps, ctx.lo = lo, ctx.span = hi - lo;
    for (int i = 0; i < 3; i++) ctx.ws[i] = wstrides[i];
    uint64_t *all = NULL;
    int64_t *all_tap = NULL;
    int status = -1;
    ctx.above = calloc((size_t)(parts * taps), sizeof(int64_t));
    if (!ctx.above) goto done;
    const int64_t *ws = wstrides;
    const int flat = !is_double && taps <= BR_LANES_MAX / BR_BLOCK_ROWS && (taps == 1 || ws[2] == 1) &&
                     ws[1] == taps && ws[0] == c * taps;
    parallel_for(rows, parts, flat ? sp_bracket_flat_f32 : (is_double ? sp_bracket_f64 : sp_bracket_f32), &ctx);
    int64_t in = 0, above = 0;
    for (int i = 0; i < parts; i++) {
        if (ctx.oom[i]) goto done;
        if (ctx.worst[i] >= bad_key) {
            status = 2;
            goto done;
        }
        in += ctx.met[i];
    }
    for (int64_t t = 0; t < taps; t++) {
        kept[t] = 0;
        for (int i = 0; i < parts; i++) kept[t] += ctx.above[i * taps + t];
        above += kept[t];
    }
    const int64_t below = numel - above - in; /* keys under lo */
    status = 1;
    if (!(below < k && k <= below + in)) goto done;
    status = -1;
    all = malloc(sizeof(uint64_t) * (size_t)(in > 0 ? in : 1));
    all_tap = malloc(sizeof(int64_t) * (size_t)(in > 0 ? in : 1));
    if (!all || !all_tap) goto done;
    for (int64_t i = 0, at = 0; i < parts; at += ctx.met[i++]) {
        for (int64_t j = 0; j < ctx.met[i]; j++) all[at + j] = ctx.keys[i][j] - lo, all_tap[at + j] = ctx.key_tap[i][j];
    }
    int low_bits = 0;
    while (low_bits < 64 && (hi - lo) >> low_bits) low_bits++;
    /* select_kth reorders its keys: count on a copy's result against the originals */
    uint64_t *scratch = malloc(sizeof(uint64_t) * (size_t)(in > 0 ? in : 1));
    if (!scratch) goto done;
    memcpy(scratch, all, sizeof(uint64_t) * (size_t)in);
    const uint64_t rel = select_kth(scratch, in, k - below, low_bits);
    free(scratch);
    for (int64_t i = 0; i < in; i++) kept[all_tap[i]] += all[i] > rel;
    *kth = lo + rel;
    *in_bracket = in;
    status = 0;
done:
    for (int i = 0; i < parts; i++) {
        free(ctx.keys[i]);
        free(ctx.key_tap[i]);
    }
    free(ctx.above);
    free(all);
    free(all_tap);
    return status;
}

/* kept: [taps] int64; k in [1, o*c*taps]. Returns 0; 1 when the layer holds inf/NaN (not
 * handled here); -1 when out of memory or on arguments out of range.
 * hint (NULL: none): int64[3], in: {the key of v_k at an earlier call on this layer, a half-width
 * d} ({-1, 0}: none); out: {this call's key of v_k, the next d, 1 if the bracket pass sufficed}.
 * With a hint, one pass counts above [key - d, key + d] and collects the keys in it; when v_k is
 * still among them (a weight that moved a little since), they give the counts, else the two
 * passes run. The hint decides only how the counts are found: any value gives the same counts. */
static int spatial_kept(const void *w, int is_double, int64_t o, int64_t c, int64_t taps,
                        const int64_t *wstrides, int64_t k, int threads, int64_t *kept, int64_t *hint) {
    if (!w || !kept || bad_layout(o, c, taps, wstrides) || o == 0 || taps == 0) return -1;
    /* per-part histogram counts are uint32 */
    if (o > INT64_MAX / c || o * c > INT64_MAX / taps || o * c > (int64_t)UINT32_MAX) return -1;
    if (k < 1 || k > o * c * taps) return -1;
    const int64_t rows = o * c, key_bits = is_double ? 63 : 31;
    const uint64_t inf_key = is_double ? 0x7ff0000000000000ULL : 0x7f800000ULL;
    const uint64_t max_key = is_double ? 0x7fffffffffffffffULL : 0x7fffffffULL;
    int parts = clamp_threads(threads);
    if (rows * taps < SERIAL_BELOW) parts = 1;
    if (parts > rows) parts = rows > 0 ? (int)rows : 1;
    const int bits = bucket_bits(rows * taps, taps);
    sp_ctx ctx = {w, c, taps, {wstrides[0], wstrides[1], wstrides[2]}, (int)(key_bits - bits),
                  (int64_t)1 << bits, NULL, 0, NULL, NULL, NULL};
    /* keys in the bucket of inf or above: left to torch, by either path */
    const uint64_t bad_key = (inf_key >> ctx.shift) << ctx.shift;
    const double target = bracket_target(rows * taps);
    int64_t before_kth = -1, before_d = 0;
    if (hint) {
        before_kth = hint[0], before_d = hint[1];
        hint[0] = -1, hint[1] = 0, hint[2] = 0;
        if (before_kth >= 0 && (uint64_t)before_kth <= max_key && before_d >= 0) {
            const uint64_t key = (uint64_t)before_kth, d = (uint64_t)before_d;
            const uint64_t lo = key > d ? key - d : 0, hi = max_key - key > d ? key + d : max_key;
            uint64_t kth = 0;
            int64_t in = 0;
            int found = spatial_bracket(w, is_double, o, c, taps, wstrides, k, parts, lo, hi, bad_key,
                                        kept, &kth, &in);
            if (found == 0) {
                const uint64_t moved = kth > key ? kth - key : key - kth;
                hint[0] = (int64_t)kth;
                hint[1] = next_half_width((double)in, (double)(hi - lo) + 1.0, target, moved, max_key);
                hint[2] = 1;
                return 0;
            }
            if (found != 1) return found == 2 ? 1 : -1;
        } else {
            before_kth = -1;
        }
    }
    const int64_t buckets = ctx.buckets, per_part = taps * buckets;
    int64_t offset[MAX_THREADS];
    uint64_t *scratch = NULL;
    int status = -1;
    int64_t *total = calloc((size_t)buckets, sizeof(int64_t));
    ctx.hist = calloc((size_t)(parts * per_part), sizeof(uint32_t));
    if (!total || !ctx.hist) goto done;
    parallel_for(rows, parts, is_double ? sp_hist_f64 : sp_hist_f32, &ctx);

    for (int i = 0; i < parts; i++) {
        for (int64_t t = 0; t < taps; t++) {
            const uint32_t *h = ctx.hist + i * per_part + t * buckets;
            for (int64_t b = 0; b < buckets; b++) total[b] += h[b];
        }
    }
    for (int64_t b = (int64_t)(inf_key >> ctx.shift); b < buckets; b++) {
        if (total[b]) {
            status = 1;
            goto done;
        }
    }
    int64_t before = 0, b = 0;
    while (b < buckets && before + total[b] < k) before += total[b++];
    if (b == buckets) goto done; /* cannot happen with 1 <= k <= numel; never read past total */
    ctx.bucket = b;
    for (int64_t t = 0; t < taps; t++) {
        kept[t] = 0;
        for (int i = 0; i < parts; i++) {
            const uint32_t *h = ctx.hist + i * per_part + t * buckets;
            for (int64_t above = b + 1; above < buckets; above++) kept[t] += h[above];
        }
    }
    int64_t in_bucket = 0;
    for (int i = 0; i < parts; i++) {
        offset[i] = in_bucket;
        for (int64_t t = 0; t < taps; t++) in_bucket += ctx.hist[i * per_part + t * buckets + b];
    }
    ctx.offset = offset;
    ctx.keys = malloc(sizeof(uint64_t) * (size_t)in_bucket);
    ctx.key_tap = malloc(sizeof(int64_t) * (size_t)in_bucket);
    scratch = malloc(sizeof(uint64_t) * (size_t)in_bucket);
    if (in_bucket < 1 || k - before > in_bucket || !ctx.keys || !ctx.key_tap || !scratch) goto done;
    parallel_for(rows, parts, is_double ? sp_collect_f64 : sp_collect_f32, &ctx);

    memcpy(scratch, ctx.keys, sizeof(uint64_t) * (size_t)in_bucket);
    const uint64_t kth = select_kth(scratch, in_bucket, k - before, ctx.shift);
    for (int64_t i = 0; i < in_bucket; i++) kept[ctx.key_tap[i]] += ctx.keys[i] > kth;
    if (hint) {
        const uint64_t moved = before_kth < 0 ? 0 : (kth > (uint64_t)before_kth ? kth - (uint64_t)before_kth
                                                                                : (uint64_t)before_kth - kth);
        int64_t d = next_half_width((double)in_bucket, (double)((uint64_t)1 << ctx.shift), target, moved, max_key);
        if (before_kth >= 0 && d < 2 * before_d && before_d <= (int64_t)(max_key / 2)) d = 2 * before_d;
        hint[0] = (int64_t)kth, hint[1] = d, hint[2] = 0;
    }
    status = 0;
done:
    free(total);
    free(scratch);
    free(ctx.hist);
    free(ctx.keys);
    free(ctx.key_tap);
    return status;
}

int spre_spatial_kept(const void *w, int is_double, int64_t o, int64_t c, int64_t taps,
                      const int64_t *wstrides, int64_t k, int threads, int64_t *kept) {
    return spatial_kept(w, is_double, o, c, taps, wstrides, k, threads, kept, NULL);
}

/* The same with a hint (see spatial_kept): int64[3], read and written. */
int spre_spatial_kept_hinted(const void *w, int is_double, int64_t o, int64_t c, int64_t taps,
                             const int64_t *wstrides, int64_t k, int threads, int64_t *kept,
                             int64_t *hint) {
    if (!hint) return -1;
    return spatial_kept(w, is_double, o, c, taps, wstrides, k, threads, kept, hint);
}
