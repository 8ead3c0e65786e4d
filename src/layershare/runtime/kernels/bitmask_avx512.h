// The AVX-512 drivers of the products (bitmask.cpp includes this file twice): for each row of V,
// its blocks' chunks of 16 columns (LS_CHUNKS) multiplied into the accumulators. Compiled once
// with AVX-512 F/BW/VL (namespace avx512: LS_CHUNKS = each_chunk16) and once with VBMI2 too
// (namespace vbmi2: LS_CHUNKS = each_chunk_vbmi2, which decodes 4-bit codes with byte shuffles):
// GCC inlines a helper only into a function compiled for at least its instructions, so the
// drivers exist once per instruction set. LS_DRIVER and LS_DRIVER_LAMBDA are those targets.
// No include guard: included on purpose once per namespace.

template <typename T, int N>
LS_DRIVER LS_INLINE void in_row(const SparseV<T>& v, const float* zt, int64_t i, int64_t b0, int64_t b1,
                                float* acc, int64_t ld) {
  __m512 zb[N];
  for (int n = 0; n < N; ++n) zb[n] = _mm512_set1_ps(zt[i * N + n]);
  int64_t p = v.start(i, b0);
  for (int64_t b = b0; b < b1; ++b) {
    const uint64_t bits = v.word(i, b);
    if (!bits) continue;
    float* a = acc + (b - b0) * kBlock;
    LS_CHUNKS(v, bits, p, [&](int t, __m512 chunk) LS_DRIVER_LAMBDA {
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        float* an = a + n * ld + 16 * t;
        _mm512_store_ps(an, _mm512_fmadd_ps(zb[n], chunk, _mm512_load_ps(an)));
      }
    });
  }
}

// in_row for rows i and i + 1 of V at once: each accumulator is loaded and stored once for
// both rows (the in-product is bound by those loads and stores at several activation rows), adding
// row i's term, then row i + 1's: the same sums in the same order as two passes, bit for bit.
template <typename T, int N>
LS_DRIVER LS_INLINE void in_rows2(const SparseV<T>& v, const float* zt, int64_t i, int64_t b0, int64_t b1,
                                  float* acc, int64_t ld) {
  __m512 za[N], zc[N];
  for (int n = 0; n < N; ++n) {
    za[n] = _mm512_set1_ps(zt[i * N + n]);
    zc[n] = _mm512_set1_ps(zt[(i + 1) * N + n]);
  }
  int64_t p = v.start(i, b0), q = v.start(i + 1, b0);
  for (int64_t b = b0; b < b1; ++b) {
    const uint64_t bits = v.word(i, b), next = v.word(i + 1, b);
    float* a = acc + (b - b0) * kBlock;
    if (!bits || !next) {  // one row (or none) has entries here
      if (bits | next)
        LS_CHUNKS(v, bits | next, bits ? p : q, [&](int t, __m512 chunk) LS_DRIVER_LAMBDA {
#pragma GCC unroll 8
          for (int n = 0; n < N; ++n) {
            float* an = a + n * ld + 16 * t;
            _mm512_store_ps(an, _mm512_fmadd_ps(bits ? za[n] : zc[n], chunk, _mm512_load_ps(an)));
          }
        });
      continue;
    }
    __m512 first[4];
    LS_CHUNKS(v, bits, p, [&](int t, __m512 chunk) LS_DRIVER_LAMBDA { first[t] = chunk; });
    LS_CHUNKS(v, next, q, [&](int t, __m512 chunk) LS_DRIVER_LAMBDA {
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        float* an = a + n * ld + 16 * t;
        _mm512_store_ps(an, _mm512_fmadd_ps(zc[n], chunk, _mm512_fmadd_ps(za[n], first[t], _mm512_load_ps(an))));
      }
    });
  }
}

template <typename T, int N>
LS_DRIVER void in_tile(const SparseV<T>& v, const float* zt, int64_t b0, int64_t b1, float* acc, float* y,
                       int64_t ldy, int64_t i0, int64_t i1) {
  const int64_t ld = (b1 - b0) * kBlock;
  std::memset(acc, 0, N * ld * sizeof(float));
  int64_t i = i0;
  for (; i + 1 < i1; i += 2) in_rows2<T, N>(v, zt, i, b0, b1, acc, ld);
  if (i < i1) in_row<T, N>(v, zt, i, b0, b1, acc, ld);
  const int64_t cols = std::min(ld, v.h - b0 * kBlock);
  for (int n = 0; n < N; ++n) std::memcpy(y + n * ldy + b0 * kBlock, acc + n * ld, cols * sizeof(float));
}

template <typename T, int N>
LS_DRIVER void out_row(const SparseV<T>& v, const float* x, int64_t ldx, int64_t i, float* out,
                       int64_t ldo) {
  constexpr int K = N == 1 ? 4 : N == 2 ? 2 : 1;
  __m512 acc[N][K];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) acc[n][k] = _mm512_setzero_ps();
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    const uint64_t bits = v.word(i, b);
    if (!bits) continue;
    const float* xb = x + b * kBlock;
    LS_CHUNKS(v, bits, p, [&](int t, __m512 chunk) LS_DRIVER_LAMBDA {
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n)
        acc[n][t % K] = _mm512_fmadd_ps(chunk, _mm512_loadu_ps(xb + n * ldx + 16 * t), acc[n][t % K]);
    });
  }
  for (int n = 0; n < N; ++n) {
    __m512 s = acc[n][0];
    for (int k = 1; k < K; ++k) s = _mm512_add_ps(s, acc[n][k]);
    out[n * ldo + i] = _mm512_reduce_add_ps(s);
  }
}

template <typename T>
LS_DRIVER void expand_row(const SparseV<T>& v, int64_t i, float* row) {
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    alignas(64) float tmp[kBlock];
    const int64_t w = v.width(b);
    float* dst = w == kBlock ? row + b * kBlock : tmp;
    LS_CHUNKS(v, v.word(i, b), p, [&](int t, __m512 chunk) LS_DRIVER_LAMBDA {
      _mm512_storeu_ps(dst + 16 * t, chunk);
    });
    if (w < kBlock) std::memcpy(row + b * kBlock, tmp, w * sizeof(float));
  }
}
