/* Fused CPU kernels for the gating attention modules (float32, contiguous NCHW).
 *
 * Compiled on first use by attnzoo/fast/kernels.py (plain C99 + OpenMP, no Python or torch
 * headers) and called through ctypes with raw data pointers. Every function takes the number of
 * OpenMP threads to use (torch.get_num_threads() of the caller). Shapes: a "row" is one (sample,
 * channel) pair, P = H * W pixels per row.
 *
 * NaN handling matches torch: a NaN anywhere in a reduced range makes its max NaN (torch.amax
 * propagates NaN); sums propagate NaN by themselves.
 */
#include <math.h>
#include <stddef.h>

/* Parallelise only when there is enough work to pay for waking the threads. */
#define AZ_MIN_PARALLEL_ELEMENTS 32768L
#define AZ_THREADS(work, nt) ((work) >= AZ_MIN_PARALLEL_ELEMENTS ? (nt) : 1)

static float max_with_nan(const float* p, long n, long stride, float m) {
  for (long i = 0; i < n; ++i)
    if (p[i * stride] != p[i * stride]) return NAN;
  return m;
}

/* mean[r] = mean(x[r, :]), max[r] = max(x[r, :]) for rows r < rows of length n: one pass. */
void az_rows_mean_max(const float* x, long rows, long n, float* mean, float* max, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(rows * n, nt))
  for (long r = 0; r < rows; ++r) {
    const float* p = x + r * n;
    float s = 0.f, m = -INFINITY;
#pragma omp simd reduction(+ : s) reduction(max : m)
    for (long i = 0; i < n; ++i) {
      s += p[i];
      m = p[i] > m ? p[i] : m;
    }
    mean[r] = s / (float)n;
    max[r] = (s != s) ? max_with_nan(p, n, 1, m) : m;
  }
}

/* out[r] = sum_i a[r, i] * b[r, i]: row-wise dot products, nothing allocated. */
void az_rows_dot(const float* a, const float* b, long rows, long n, float* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(rows * n, nt))
  for (long r = 0; r < rows; ++r) {
    const float* p = a + r * n;
    const float* q = b + r * n;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; ++i) s += p[i] * q[i];
    out[r] = s;
  }
}

/* out[r, i] = a[r] * x[r, i] + b[r]: a per-row scale and shift. */
void az_rows_scale_shift(const float* x, const float* a, const float* b, long rows, long n,
                         float* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(rows * n, nt))
  for (long r = 0; r < rows; ++r) {
    const float* p = x + r * n;
    const float ar = a[r], br = b[r];
    float* o = out + r * n;
#pragma omp simd
    for (long i = 0; i < n; ++i) o[i] = ar * p[i] + br;
  }
}

/* Per row: mean[r] and m2[r] = sum_i (x[r, i] - mean[r])^2, one pass. The sums are taken around
 * the row's first value (a shift that keeps the single-pass formula accurate when the mean is far
 * from zero). A row holding NaN or an infinity gets torch's plain mean and a NaN m2. */
void az_rows_mean_m2(const float* x, long rows, long n, float* mean, float* m2, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(rows * n, nt))
  for (long r = 0; r < rows; ++r) {
    const float* p = x + r * n;
    const float shift = p[0];
    float s = 0.f, q = 0.f;
#pragma omp simd reduction(+ : s, q)
    for (long i = 0; i < n; ++i) {
      const float d = p[i] - shift;
      s += d;
      q += d * d;
    }
    if (!isfinite(s) || !isfinite(q)) {
      float t = 0.f;
      for (long i = 0; i < n; ++i) t += p[i];
      mean[r] = t / (float)n;
      m2[r] = NAN;
      continue;
    }
    mean[r] = shift + s / (float)n;
    const float v = q - s * (s / (float)n);
    m2[r] = v > 0.f ? v : 0.f; /* rounding may push a constant row slightly below zero */
  }
}

/* Per row: total[r] = sum_i g[r, i] and dot[r] = sum_i g[r, i] * x[r, i], one pass. */
void az_rows_sum_dot(const float* g, const float* x, long rows, long n, float* total, float* dot,
                     int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(rows * n, nt))
  for (long r = 0; r < rows; ++r) {
    const float* p = g + r * n;
    const float* q = x + r * n;
    float s = 0.f, d = 0.f;
#pragma omp simd reduction(+ : s, d)
    for (long i = 0; i < n; ++i) {
      s += p[i];
      d += p[i] * q[i];
    }
    total[r] = s;
    dot[r] = d;
  }
}

/* out[r, i] = a[r] * g[r, i] + b[r] * x[r, i] + c[r]: two maps, per-row coefficients. */
void az_rows_affine2(const float* g, const float* x, const float* a, const float* b,
                     const float* c, long rows, long n, float* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(rows * n, nt))
  for (long r = 0; r < rows; ++r) {
    const float* p = g + r * n;
    const float* q = x + r * n;
    const float ar = a[r], br = b[r], cr = c[r];
    float* o = out + r * n;
#pragma omp simd
    for (long i = 0; i < n; ++i) o[i] = ar * p[i] + br * q[i] + cr;
  }
}

/* For x (B, C, P) and a channel gate s (B, C): mean and max over channels of x * s, per pixel,
 * without writing x * s: mean (B, P), max (B, P). Pixels are processed in blocks that stay in
 * L1 while the channels stream past. */
#define AZ_PIXEL_BLOCK 512L
void az_channel_mean_max_scaled(const float* x, const float* s, long B, long C, long P,
                                float* mean, float* max, int nt) {
  const long blocks = (P + AZ_PIXEL_BLOCK - 1) / AZ_PIXEL_BLOCK;
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(B * C * P, nt))
  for (long t = 0; t < B * blocks; ++t) {
    const long b = t / blocks, p0 = (t % blocks) * AZ_PIXEL_BLOCK;
    const long len = p0 + AZ_PIXEL_BLOCK <= P ? AZ_PIXEL_BLOCK : P - p0;
    float acc[AZ_PIXEL_BLOCK], mx[AZ_PIXEL_BLOCK];
    const float* xb = x + b * C * P + p0;
    const float* sb = s + b * C;
    for (long i = 0; i < len; ++i) {
      acc[i] = 0.f;
      mx[i] = -INFINITY;
    }
    for (long c = 0; c < C; ++c) {
      const float* row = xb + c * P;
      const float sc = sb[c];
#pragma omp simd
      for (long i = 0; i < len; ++i) {
        const float v = row[i] * sc;
        acc[i] += v;
        mx[i] = v > mx[i] ? v : mx[i];
      }
    }
    for (long i = 0; i < len; ++i) {
      float m = mx[i];
      if (acc[i] != acc[i]) { /* a NaN (or inf - inf) among the channels: rescan this pixel */
        for (long c = 0; c < C; ++c) {
          const float v = xb[c * P + i] * sb[c];
          if (v != v) { m = NAN; break; }
        }
      }
      mean[b * P + p0 + i] = acc[i] / (float)C;
      max[b * P + p0 + i] = m;
    }
  }
}

/* ---- CBAM's backward (channel gate s, then spatial gate a; y = (x * s) * a) ----
 * v = x * s (the channel gate's output, never stored); M[b, p] = max_c v (saved by the forward);
 * mrow[r] = max_p x[r, :] (the channel gate's max pool). Ties split evenly, as amax's backward. */

/* Per pixel: grad_a[b, p] = sum_c s g x and cnt[b, p] = #{c : x * s == M}. */
void az_cbam_grad_spatial(const float* g, const float* x, const float* s, const float* M, long B,
                          long C, long P, float* grad_a, float* cnt, int nt) {
  const long blocks = (P + AZ_PIXEL_BLOCK - 1) / AZ_PIXEL_BLOCK;
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(B * C * P, nt))
  for (long t = 0; t < B * blocks; ++t) {
    const long b = t / blocks, p0 = (t % blocks) * AZ_PIXEL_BLOCK;
    const long len = p0 + AZ_PIXEL_BLOCK <= P ? AZ_PIXEL_BLOCK : P - p0;
    float acc[AZ_PIXEL_BLOCK], n[AZ_PIXEL_BLOCK];
    const float* mb = M + b * P + p0;
    for (long i = 0; i < len; ++i) acc[i] = n[i] = 0.f;
    for (long c = 0; c < C; ++c) {
      const float* gr = g + (b * C + c) * P + p0;
      const float* xr = x + (b * C + c) * P + p0;
      const float sc = s[b * C + c];
#pragma omp simd
      for (long i = 0; i < len; ++i) {
        const float v = xr[i] * sc;
        acc[i] += gr[i] * v;
        n[i] += v == mb[i] ? 1.f : 0.f;
      }
    }
    for (long i = 0; i < len; ++i) {
      grad_a[b * P + p0 + i] = acc[i];
      cnt[b * P + p0 + i] = n[i];
    }
  }
}

/* The gradient w.r.t. v = x * s: g * a + gm / C + [v == M] * gM / cnt (all per pixel). */
static inline float cbam_grad_v(float g, float v, float a, float gm_c, float M, float share) {
  return g * a + gm_c + (v == M ? share : 0.f);
}

/* Per row r = (b, c): grad_s[r] = sum_p x * dL/dv and rowcnt[r] = #{p : x == mrow[r]}.
 * gm_c = gm / C and share = gM / cnt are per-pixel vectors prepared by the caller. */
void az_cbam_grad_channel(const float* g, const float* x, const float* s, const float* a,
                          const float* gm_c, const float* M, const float* share,
                          const float* mrow, long B, long C, long P, float* grad_s,
                          float* rowcnt, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(B * C * P, nt))
  for (long r = 0; r < B * C; ++r) {
    const long off = (r / C) * P;
    const float* gr = g + r * P;
    const float* xr = x + r * P;
    const float sc = s[r], m = mrow[r];
    float acc = 0.f, n = 0.f;
#pragma omp simd reduction(+ : acc, n)
    for (long i = 0; i < P; ++i) {
      const float v = xr[i] * sc;
      acc += xr[i] * cbam_grad_v(gr[i], v, a[off + i], gm_c[off + i], M[off + i], share[off + i]);
      n += xr[i] == m ? 1.f : 0.f;
    }
    grad_s[r] = acc;
    rowcnt[r] = n;
  }
}

/* grad_x = dL/dv * s + gmean[r] / P + [x == mrow[r]] * gmax_share[r] (gmax_share = gmax / rowcnt). */
void az_cbam_grad_input(const float* g, const float* x, const float* s, const float* a,
                        const float* gm_c, const float* M, const float* share,
                        const float* mrow, const float* gmean_p, const float* gmax_share,
                        long B, long C, long P, float* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(B * C * P, nt))
  for (long r = 0; r < B * C; ++r) {
    const long off = (r / C) * P;
    const float* gr = g + r * P;
    const float* xr = x + r * P;
    const float sc = s[r], m = mrow[r], base = gmean_p[r], top = gmax_share[r];
    float* o = out + r * P;
#pragma omp simd
    for (long i = 0; i < P; ++i) {
      const float v = xr[i] * sc;
      const float gv = cbam_grad_v(gr[i], v, a[off + i], gm_c[off + i], M[off + i], share[off + i]);
      o[i] = gv * sc + base + (xr[i] == m ? top : 0.f);
    }
  }
}

/* out[b, c, p] = (x[b, c, p] * s[b, c]) * a[b, p]: a channel gate and a spatial gate, one pass. */
void az_scale_channel_spatial(const float* x, const float* s, const float* a, long B, long C,
                              long P, float* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(B * C * P, nt))
  for (long r = 0; r < B * C; ++r) {
    const float* xr = x + r * P;
    const float* ab = a + (r / C) * P;
    const float sc = s[r];
    float* o = out + r * P;
#pragma omp simd
    for (long i = 0; i < P; ++i) o[i] = (xr[i] * sc) * ab[i];
  }
}

/* "Same" zero-padded, stride-1 correlation of x (B, Cin, H, W) with w (Cin, k, k), k odd, one
 * output channel, no bias: out (B, H, W). CBAM's 7x7 spatial convolution (Cin = 2). Each input
 * row is copied into a zero-padded buffer, so the inner loops have no bounds to check. */
#define AZ_MAX_ROW 4096L
void az_conv_same(const float* x, const float* w, long B, long Cin, long H, long W, long k,
                  float* out, int nt) {
  const long r = k / 2;
#pragma omp parallel for schedule(static) num_threads(AZ_THREADS(B * Cin * H * W * k, nt))
  for (long t = 0; t < B * H; ++t) {
    const long b = t / H, h = t % H;
    float padded[AZ_MAX_ROW];
    float* o = out + t * W;
    for (long j = 0; j < W; ++j) o[j] = 0.f;
    for (long j = 0; j < r; ++j) padded[j] = padded[W + r + j] = 0.f;
    for (long c = 0; c < Cin; ++c) {
      for (long di = 0; di < k; ++di) {
        const long hh = h + di - r;
        if (hh < 0 || hh >= H) continue;
        const float* row = x + ((b * Cin + c) * H + hh) * W;
        const float* wr = w + (c * k + di) * k;
        for (long j = 0; j < W; ++j) padded[r + j] = row[j];
#pragma omp simd
        for (long j = 0; j < W; ++j) {
          float acc = 0.f;
          for (long dj = 0; dj < k; ++dj) acc += wr[dj] * padded[j + dj];
          o[j] += acc;
        }
      }
    }
  }
}
