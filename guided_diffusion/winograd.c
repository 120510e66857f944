/* Winograd F(4x4, 3x3) tile transforms for guided_diffusion.winograd (float32).
 *
 * Images are NCHW; the transformed domain is [tiles][36][channels], each tile one contiguous
 * block, so the convolution's 36 products are one batched matrix multiply over strided views
 * (PyTorch's). Tile (i, j) of an image covers rows 4i-1 .. 4i+4 and columns 4j-1 .. 4j+4 (zero
 * padding 1 outside the image); tiles are numbered (image, i, j). Each function does the tile
 * rows [first, last) of an enumeration of (image, i), so a caller can split a call over
 * threads; c % 8 == 0. Each returns 0, or 1 when its scratch buffer cannot be allocated.
 *
 * Layout changes go through a small per-call scratch buffer: for one tile row and a block of
 * CB channels, the image rows it touches are held channel-last (sc[row][column][CB]), filled
 * from / written back to NCHW with 8x8 transposes (8 channels x 8 columns at a time), so the
 * tile transforms themselves use plain 8-channel vector loads and stores.
 */
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
#define S(x) ((v8){x, x, x, x, x, x, x, x})
#define CB 32 /* channels per scratch block (a multiple of 8) */

/* Unaligned 8-float load / store (a macro: passing v8 by value warns without AVX, -Wpsabi). */
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
#define ld8(p) ((v8) * (const v8u *)(p))
#define st8(p, a) (*(v8u *)(p) = (a))

/* The tile loops go through [tiles][36][c] with a stride of c between the 36 vectors of a
 * tile, which the hardware prefetcher does not follow: while doing 8 channels of tile j, fetch
 * the same 36 vectors of tile j + 1 (for writing when w is 1). */
#define PREFETCH_NEXT_TILE(p, c, j, tw, w)                                                    \
    do {                                                                                      \
        if ((j) + 1 < (tw))                                                                   \
            for (int a_ = 0; a_ < 36; a_++) __builtin_prefetch((p) + (36 + a_) * (c), w, 3); \
    } while (0)

/* The 1-D transforms of F(4, 3) (Lavin & Gray 2016): B^T (input), A^T (output), and transposes. */
static inline void in1d(const v8 d[6], v8 o[6]) {
    o[0] = S(4) * d[0] - S(5) * d[2] + d[4];
    o[1] = -S(4) * (d[1] + d[2]) + d[3] + d[4];
    o[2] = S(4) * (d[1] - d[2]) - d[3] + d[4];
    o[3] = S(2) * (d[3] - d[1]) - d[2] + d[4];
    o[4] = S(2) * (d[1] - d[3]) - d[2] + d[4];
    o[5] = S(4) * d[1] - S(5) * d[3] + d[5];
}
static inline void in1d_t(const v8 v[6], v8 o[6]) {
    o[0] = S(4) * v[0];
    o[1] = S(4) * (v[2] - v[1] + v[5]) + S(2) * (v[4] - v[3]);
    o[2] = -S(5) * v[0] - S(4) * (v[1] + v[2]) - v[3] - v[4];
    o[3] = v[1] - v[2] + S(2) * (v[3] - v[4]) - S(5) * v[5];
    o[4] = v[0] + v[1] + v[2] + v[3] + v[4];
    o[5] = v[5];
}
static inline void out1d(const v8 m[6], v8 o[4]) {
    v8 p = m[1] + m[2], q = m[1] - m[2], r = m[3] + m[4], s = m[3] - m[4];
    o[0] = m[0] + p + r;
    o[1] = q + S(2) * s;
    o[2] = p + S(4) * r;
    o[3] = q + S(8) * s + m[5];
}
static inline void out1d_t(const v8 y[4], v8 o[6]) {
    v8 e = y[0] + y[2], f = y[1] + y[3], g = y[0] + S(4) * y[2], h = S(2) * y[1] + S(8) * y[3];
    o[0] = y[0];
    o[1] = e + f;
    o[2] = e - f;
    o[3] = g + h;
    o[4] = g - h;
    o[5] = y[3];
}

/* out[a][b] = sum_rs L[a][r] L[b][s] in[r][s] for a 1-D transform L of R -> K points. */
#define SANDWICH(fn, R, K, in, out)                                    \
    do {                                                               \
        v8 col_[R], res_[K], mid_[K][R];                               \
        for (int s_ = 0; s_ < R; s_++) {                               \
            for (int r_ = 0; r_ < R; r_++) col_[r_] = in[r_][s_];      \
            fn(col_, res_);                                            \
            for (int a_ = 0; a_ < K; a_++) mid_[a_][s_] = res_[a_];    \
        }                                                              \
        for (int a_ = 0; a_ < K; a_++) fn(mid_[a_], out[a_]);          \
    } while (0)

/* In-place 8x8 transpose: r[p][q] <-> r[q][p]. */
static inline void tr8(v8 r[8]) {
#ifdef __AVX2__
    __m256 t[8], u[8];
    for (int p = 0; p < 8; p += 2) {
        t[p] = _mm256_unpacklo_ps(r[p], r[p + 1]);     /* r_p0 r_q0 r_p1 r_q1 | same, +4 */
        t[p + 1] = _mm256_unpackhi_ps(r[p], r[p + 1]); /* r_p2 r_q2 r_p3 r_q3 | same, +4 */
    }
    for (int p = 0; p < 8; p += 4) {
        u[p] = _mm256_shuffle_ps(t[p], t[p + 2], 0x44);     /* column 0 (and 4) of 4 rows */
        u[p + 1] = _mm256_shuffle_ps(t[p], t[p + 2], 0xee); /* column 1 (and 5) */
        u[p + 2] = _mm256_shuffle_ps(t[p + 1], t[p + 3], 0x44);
        u[p + 3] = _mm256_shuffle_ps(t[p + 1], t[p + 3], 0xee);
    }
    for (int q = 0; q < 4; q++) {
        r[q] = (v8)_mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
        r[q + 4] = (v8)_mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
    }
#else
    v8 t[8];
    for (int p = 0; p < 8; p++)
        for (int q = 0; q < 8; q++) t[q][p] = r[p][q];
    memcpy(r, t, sizeof t);
#endif
}

/* NCHW -> channel-last for 8 channels of one image row: dst[x * CB + k] = src[k * plane + x],
 * x < n. */
static inline void gather_row(const float *src, long plane, float *dst, int n) {
    int x = 0;
    for (; x + 8 <= n; x += 8) {
        v8 r[8];
        for (int k = 0; k < 8; k++) r[k] = ld8(src + k * plane + x);
        tr8(r);
        for (int q = 0; q < 8; q++) st8(dst + (x + q) * CB, r[q]);
    }
    for (; x < n; x++)
        for (int k = 0; k < 8; k++) dst[x * CB + k] = src[k * plane + x];
}

/* The reverse: dst[k * plane + x] = src[x * CB + k] (or += when add), x < n. */
static inline void scatter_row(const float *src, float *dst, long plane, int n, int add) {
    int x = 0;
    for (; x + 8 <= n; x += 8) {
        v8 r[8];
        for (int q = 0; q < 8; q++) r[q] = ld8(src + (x + q) * CB);
        tr8(r);
        if (add) { /* all loads before the stores: the planes may be 4 KiB apart (false aliasing) */
            v8 o[8];
            for (int k = 0; k < 8; k++) o[k] = ld8(dst + k * plane + x);
            for (int k = 0; k < 8; k++) r[k] += o[k];
        }
        for (int k = 0; k < 8; k++) st8(dst + k * plane + x, r[k]);
    }
    for (; x < n; x++)
        for (int k = 0; k < 8; k++) dst[k * plane + x] = add ? dst[k * plane + x] + src[x * CB + k] : src[x * CB + k];
}

#define TH(h) (((h) + 3) / 4)
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* Stages image rows y0 .. y0 + R - 1 (channels c0 .. c0 + cb of image img) into sc[R][W][CB]
 * with image column x at scratch column x + off; rows and columns outside the image are zero. */
static void stage(const float *img, int h, int w, int c0, int cb, int y0, int R, int W, int off, float *sc) {
    long plane = (long)h * w;
    for (int r = 0; r < R; r++) {
        float *d = sc + (long)r * W * CB;
        int y = y0 + r;
        if (y < 0 || y >= h) {
            memset(d, 0, sizeof(float) * W * CB);
            continue;
        }
        memset(d, 0, sizeof(float) * off * CB);
        memset(d + (w + off) * CB, 0, sizeof(float) * (W - w - off) * CB);
        for (int k0 = 0; k0 < cb; k0 += 8) gather_row(img + (c0 + k0) * plane + (long)y * w, plane, d + off * CB + k0, w);
    }
}

/* The 36 transformed vectors of tile j (channels k0 .. k0 + 7) from the staged rows: F(4, 3)'s
 * input transform of the 6x6 patch at scratch column 4j, or the adjoint of its output transform of
 * the 4x4 patch there. */
static void input_tile(const float *sc, int W, int j, int k0, v8 t[6][6]) {
    v8 d[6][6];
    for (int r = 0; r < 6; r++)
        for (int s = 0; s < 6; s++) d[r][s] = ld8(sc + (r * W + 4 * j + s) * CB + k0);
    SANDWICH(in1d, 6, 6, d, t);
}
static void output_adjoint_tile(const float *sc, int W, int j, int k0, v8 t[6][6]) {
    v8 g[4][4];
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < 4; s++) g[r][s] = ld8(sc + (r * W + 4 * j + s) * CB + k0);
    SANDWICH(out1d_t, 4, 6, g, t);
}

/* NCHW images -> [tiles][36][c]: for each tile row, stage its R image rows from 4i - off (image
 * column x at scratch column x + off), then transform tile by tile. */
static int to_tiles(const float *src, float *dst, int c, int h, int w, long first, long last, int R, int off,
                    void (*tile)(const float *, int, int, int, v8[6][6])) {
    int th = TH(h), tw = TH(w), W = 4 * tw + 2 * off;
    float *sc = malloc(sizeof(float) * R * W * CB);
    if (!sc) return 1;
    for (long row = first; row < last; row++) {
        long n = row / th;
        int i = row % th;
        for (int c0 = 0; c0 < c; c0 += CB) {
            int cb = MIN(CB, c - c0);
            stage(src + n * c * h * w, h, w, c0, cb, 4 * i - off, R, W, off, sc);
            for (int j = 0; j < tw; j++)
                for (int k0 = 0; k0 < cb; k0 += 8) {
                    float *out = dst + (row * tw + j) * 36 * c + c0 + k0;
                    v8 t[6][6];
                    PREFETCH_NEXT_TILE(out, c, j, tw, 1);
                    tile(sc, W, j, k0, t);
                    for (int a = 0; a < 36; a++) st8(out + a * c, t[a / 6][a % 6]);
                }
        }
    }
    free(sc);
    return 0;
}

/* x [images][c][h][w] -> v [tiles][36][c]; rows enumerate (image, i) */
int wino_input(const float *x, float *v, int c, int h, int w, long first, long last) {
    return to_tiles(x, v, c, h, w, first, last, 6, 1, input_tile);
}

/* The adjoint of wino_output (bias aside): dy [images][c][h][w] -> dm [tiles][36][c] */
int wino_output_adjoint(const float *dy, float *dm, int c, int h, int w, long first, long last) {
    return to_tiles(dy, dm, c, h, w, first, last, 4, 0, output_adjoint_tile);
}

/* m [tiles][36][c] (+ bias [c]) -> y [images][c][h][w]; rows enumerate (image, i) */
int wino_output(const float *m, const float *bias, float *y, int c, int h, int w, long first, long last) {
    int th = TH(h), tw = TH(w), W = 4 * tw; /* scratch: output rows 4i .. 4i+3, columns 0 .. 4tw-1 */
    long plane = (long)h * w;
    float *sc = malloc(sizeof(float) * 4 * W * CB);
    if (!sc) return 1;
    for (long row = first; row < last; row++) {
        long n = row / th;
        int i = row % th;
        for (int c0 = 0; c0 < c; c0 += CB) {
            int cb = MIN(CB, c - c0);
            for (int j = 0; j < tw; j++)
                for (int k0 = 0; k0 < cb; k0 += 8) {
                    const float *src = m + (row * tw + j) * 36 * c + c0 + k0;
                    PREFETCH_NEXT_TILE(src, c, j, tw, 0);
                    v8 t[6][6], o[4][4], b = ld8(bias + c0 + k0);
                    for (int a = 0; a < 36; a++) t[a / 6][a % 6] = ld8(src + a * c);
                    SANDWICH(out1d, 6, 4, t, o);
                    for (int r = 0; r < 4; r++)
                        for (int s = 0; s < 4; s++) st8(sc + (r * W + 4 * j + s) * CB + k0, o[r][s] + b);
                }
            for (int r = 0; r < 4 && 4 * i + r < h; r++)
                for (int k0 = 0; k0 < cb; k0 += 8)
                    scatter_row(sc + r * W * CB + k0, y + (n * c + c0 + k0) * plane + (long)(4 * i + r) * w, plane, w, 0);
        }
    }
    free(sc);
    return 0;
}

/* The adjoint of wino_input: dv [tiles][36][c] is added into dx [images][c][h][w]. Tile rows i
 * and i + 1 overlap, so rows enumerate (image, i) for i of one parity only: (image, parity + 2q).
 * A caller runs parity 0, then parity 1, each split over threads as it likes. */
int wino_input_adjoint(const float *dv, float *dx, int c, int h, int w, int parity, long first, long last) {
    int th = TH(h), tw = TH(w), per_image = (th - parity + 1) / 2;
    int W = 4 * tw + 2; /* scratch: rows 4i-1 .. 4i+4, image columns -1 .. 4tw */
    long plane = (long)h * w;
    float *sc = malloc(sizeof(float) * 6 * W * CB);
    if (!sc) return 1;
    for (long item = first; item < last; item++) {
        long n = item / per_image;
        int i = parity + 2 * (int)(item % per_image);
        for (int c0 = 0; c0 < c; c0 += CB) {
            int cb = MIN(CB, c - c0);
            /* sum the tiles' contributions in the scratch: tile j covers scratch columns
             * 4j .. 4j+5, its first two shared with tile j-1 */
            for (int j = 0; j < tw; j++)
                for (int k0 = 0; k0 < cb; k0 += 8) {
                    const float *src = dv + ((n * th + i) * tw + j) * 36 * c + c0 + k0;
                    PREFETCH_NEXT_TILE(src, c, j, tw, 0);
                    v8 t[6][6], d[6][6];
                    for (int a = 0; a < 36; a++) t[a / 6][a % 6] = ld8(src + a * c);
                    SANDWICH(in1d_t, 6, 6, t, d);
                    for (int r = 0; r < 6; r++)
                        for (int s = 0; s < 6; s++) {
                            float *p = sc + (r * W + 4 * j + s) * CB + k0;
                            st8(p, j > 0 && s < 2 ? ld8(p) + d[r][s] : d[r][s]);
                        }
                }
            /* add the in-image part (scratch column 1 is image column 0) into dx */
            for (int r = 0; r < 6; r++) {
                int yy = 4 * i - 1 + r;
                if (yy < 0 || yy >= h) continue;
                for (int k0 = 0; k0 < cb; k0 += 8)
                    scatter_row(sc + (r * W + 1) * CB + k0, dx + (n * c + c0 + k0) * plane + (long)yy * w, plane, w, 1);
            }
        }
    }
    free(sc);
    return 0;
}
