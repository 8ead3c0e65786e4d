// Products with a sparse V straight from its packed form (FiPS layers; see ops.py).
//
// V (r x h) is stored as its kept entries in row-major order (`values`: float32, bfloat16 or
// float16) and a bitmask over the flat r*h entries (`mask`: uint8, row-major, most significant
// bit first: entry k of a byte is bit 7-k); when h % 8 != 0, rows do not start on a byte.
// `offsets` (int32, computed at load by ops.prepare) holds, for row i and every `per`-th block b of
// 64 columns (per = 1: r x nb with nb = ceil(h/64); per = 4: r x ceil(nb/4), a quarter of the bytes,
// told apart by the shape), the index in `values` of the first kept entry of V[i, 64b:64b+64]; the
// blocks between are reached by counting the mask bits of the blocks before them.
//
//   bitmask_in(z, ...)         z @ V    (z: N x r -> N x h), in parallel over stretches of V's rows
//   bitmask_out(x, ...)        x @ V^T  (x: N x h -> N x r), in parallel over rows of V
//                              (activations float32, bfloat16 or float16, the result in their dtype;
//                              16-bit ones widened to float32 as the products start)
//   bitmask_expand(..., out)   out = V  (r x h, written in place, float32, or bfloat16/float16 rounded
//                              as Tensor.to rounds), in parallel over rows
//   bitmask_in_q / bitmask_out_q / bitmask_expand_q (codes, scales, zeros, bits, group, n, ...)
//                              the same with the kept values held as integer codes (ops.QuantValues):
//                              value p = (code[p] - zeros[p / group]) * scales[p / group] in float32
//                              (scales float16, zero points uint8: as the file stores them)
//   bitmask_isa(use)           the path that runs ("avx512", "avx2" or "portable"); `use` switches
//                              it (tests compare the paths)
//   bitmask_spread(use)        how the AVX-512 path moves values to their columns ("expand16" on
//                              Intel CPUs with VBMI2: bfloat16 values and 4/8-bit codes spread on
//                              their 16 or 8 bits; "expand" on other Intel CPUs, "permute"
//                              elsewhere: see Spread); `use` switches it
//   bitmask_amx(use)           whether bfloat16 values times bfloat16 activations at several rows
//                              run on AMX tiles ("on" where the CPU and OS allow, "off", "absent";
//                              in_tile_amx, out_rows_amx); `use` switches it
//
// Accumulation is in float32. Three paths compute each op, the best the CPU has chosen at run
// time: AVX-512 (F, BW, VL: 16 columns per chunk), AVX2+FMA+F16C (8 columns per chunk), both
// moving the kept values to their columns by a lookup table and one permute (AVX-512 on Intel: one
// vexpandps; with VBMI2, one vpexpandw per 32 columns for bfloat16 values, each_pair32, and one
// vpexpandb per block for 4- and 8-bit codes, each_chunk_vbmi2), a block whose 64 entries are all kept
// loaded as it is, and portable scalar C++. The AVX-512 drivers (bitmask_avx512.h) are compiled
// twice, without and with VBMI2. The out-product gives each thread a stretch of V's rows, the
// in-product too (partial sums over every column, added in task order). The environment variable
// LAYERSHARE_KERNEL=avx2 or =portable caps the choice. Every read of `values` and `mask` is
// checked against the buffers' sizes: offsets that disagree with the mask give wrong numbers,
// never a read out of bounds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define LS_X86 1
#define LS_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#define LS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")))
#else
#define LS_X86 0
#endif
#define LS_INLINE inline __attribute__((always_inline))  // the helpers of the inner loops
#define LS_COLD __attribute__((noinline, cold))          // their rare paths, kept out of the loops

namespace {

constexpr int64_t kBlock = 64;   // columns per block: one 64-bit word of mask per (row, block)
constexpr int64_t kMaxRows = 8;  // activation rows per pass (their accumulators stay in registers)
constexpr int64_t kGrainEntries = 32768;  // entries of V per parallel task, at least
constexpr int64_t kAccFloats = 16384;     // the in-product's accumulators per task: 64 KiB (L1/L2)
constexpr int64_t kPrefetch = 8192;       // bytes ahead of the values being read (SparseV::prefetch)

// ---- V as the kernels read it -----------------------------------------------------------------
// Value types besides float32/bfloat16/float16: integer codes on a group-wise grid (quant/grid.py),
// value p = (code[p] - zero[g]) * scale[g] with g = p >> gshift (scale float16, zero uint8), in float32 (the arithmetic of
// grid.decode, so the products see exactly the dequantized V). Q8: one code per byte; Q4: two per
// byte, code p in the low nibble of byte p/2 when p is even (quant/pack.py's order).
struct Q4 {};
struct Q8 {};
template <typename T>
constexpr bool kQuant = std::is_same<T, Q4>::value || std::is_same<T, Q8>::value;
// codes the vector loads may read past a block's last value (Q4: a whole 8-byte word; Q8: 16 bytes)
template <typename T>
constexpr int64_t kReach = kQuant<T> ? 16 : 0;

template <typename T>
struct SparseV {
  const T* values;
  int64_t nnz;
  const uint8_t* mask;
  int64_t nbytes;
  const int32_t* offsets;
  int64_t r, h, nb;
  int64_t per = 1, no = 0;  // blocks per offset (1 or 4) and offsets per row (set by the ops)
  bool whole = false;       // every entry kept: no mask and no offsets are read (a weight held whole)
  // quantized values (T = Q4 or Q8; `values` unused): codes, per-group scales and zero points
  const uint8_t* codes = nullptr;
  const c10::Half* qscale = nullptr;  // float16, as the file stores them
  const uint8_t* qzero = nullptr;
  int gshift = 0;

  LS_INLINE int64_t width(int64_t b) const { return std::min(kBlock, h - b * kBlock); }

  // The mask bits of row i, block b: column 64b+k in bit 63-k, bits past the row's end cleared.
  // Reads 8 bytes (9 when the row does not start on a byte) from bit i*h + 64b.
  LS_INLINE uint64_t word(int64_t i, int64_t b) const {
    if (whole) {
      const int64_t n = width(b);
      return n < kBlock ? ~0ULL << (kBlock - n) : ~0ULL;
    }
    const int64_t pos = i * h + b * kBlock, q = pos >> 3;
    const int s = static_cast<int>(pos & 7);
    uint64_t w = q + 9 <= nbytes ? bits_at(mask + q, s) : word_near_end(q, s);
    const int64_t n = width(b);
    return n < kBlock ? w & (~0ULL << (kBlock - n)) : w;
  }

  // 64 bits from bit s of src (s < 8; src[8] is read when s > 0).
  static LS_INLINE uint64_t bits_at(const uint8_t* src, int s) {
    uint64_t w = 0;
    for (int k = 0; k < 8; ++k) w = (w << 8) | src[k];  // big-endian: compiles to one load + bswap
    return s ? (w << s) | (src[8] >> (8 - s)) : w;
  }

  // bits_at for the last bytes of the mask: the bytes past its end read as 0.
  LS_COLD uint64_t word_near_end(int64_t q, int s) const {
    uint8_t pad[9] = {};
    for (int64_t k = 0; k < 9 && q + k < nbytes; ++k) pad[k] = mask[q + k];
    return bits_at(pad, s);
  }

  LS_INLINE int64_t start(int64_t i, int64_t b) const {
    if (whole) return i * h + b * kBlock;
    const int64_t s = per == 1 ? b : b >> 2;
    int64_t p = offsets[i * no + s];
    for (int64_t k = s * per; k < b; ++k) p += __builtin_popcountll(word(i, k));  // at most 3 words
    return p;
  }

  LS_INLINE int code(int64_t p) const {
    if constexpr (std::is_same<T, Q4>::value) return (codes[p >> 1] >> ((p & 1) * 4)) & 15;
    else return codes[p];
  }

  LS_INLINE float value(int64_t p) const {
    if (p < 0 || p >= nnz) return 0.f;
    if constexpr (kQuant<T>) {
      const int64_t g = p >> gshift;
      return (static_cast<float>(code(p)) - static_cast<float>(qzero[g])) * static_cast<float>(qscale[g]);
    } else {
      return static_cast<float>(values[p]);
    }
  }

  // Ask for the two cache lines kPrefetch bytes past value p (those the row reads a few blocks
  // later), into L2 (prefetcht1): in a decoding model, whose weights come from memory between other
  // work, the hardware prefetchers alone left the products waiting (decode step 38 -> 33 ms at one
  // sequence, SmolLM2 FiPS 20%, Intel Xeon, 2 threads, with one line 4 KiB ahead into L1). A block
  // of 16-bit values whole is 128 bytes, so one line a block left every other line to the hardware:
  // two lines 8 KiB ahead into L2 measured faster again (decode 1 sequence 1.06x -> 1.13x the dense
  // float32 model, 1.28x -> 1.34x bfloat16, same process, alternated; docs/runtime.md). Integer
  // codes (4 or 8 bits a value): one line 4 KiB ahead. A prefetch past the buffer's end is harmless.
  LS_INLINE void prefetch(int64_t p) const {
    if constexpr (kQuant<T>) {  // a block of codes is 32 or 64 bytes: one line
      const char* at = reinterpret_cast<const char*>(codes) + (std::is_same<T, Q4>::value ? p >> 1 : p);
      __builtin_prefetch(at + kPrefetch / 2, 0, 2);
    } else {
      const char* at = reinterpret_cast<const char*>(values + p);
      __builtin_prefetch(at + kPrefetch, 0, 2);
      __builtin_prefetch(at + kPrefetch + 64, 0, 2);
    }
  }

  // whether every vector load of a block whose values start at p lies inside the buffers
  LS_INLINE bool inside(int64_t p) const { return p >= 0 && p + kBlock + kReach<T> <= nnz; }
};

// ---- portable path ---------------------------------------------------------------------------
// y[n, block b] = sum_i zt[i, n] * V[i, block b] for n < rows (zt: r x rows, y: rows x h, row stride ldy).
template <typename T>
void in_block_portable(const SparseV<T>& v, const float* zt, int64_t rows, int64_t b, float* y, int64_t ldy,
                       int64_t i0, int64_t i1) {
  float acc[kMaxRows][kBlock] = {};
  for (int64_t i = i0; i < i1; ++i) {
    int64_t p = v.start(i, b);
    uint64_t bits = v.word(i, b);
    while (bits) {  // set bits from the top: kept columns in order
      const int k = __builtin_clzll(bits);
      bits &= ~(1ULL << (63 - k));
      const float val = v.value(p++);
      for (int64_t n = 0; n < rows; ++n) acc[n][k] += zt[i * rows + n] * val;
    }
  }
  const int64_t c0 = b * kBlock, w = v.width(b);
  for (int64_t n = 0; n < rows; ++n) std::memcpy(y + n * ldy + c0, acc[n], w * sizeof(float));
}

// out[n, i] = V[i, :] . x[n, :] for n < rows (x: rows x h with row stride ldx; out: row stride ldo).
template <typename T>
void out_row_portable(const SparseV<T>& v, const float* x, int64_t ldx, int64_t rows, int64_t i, float* out,
                      int64_t ldo) {
  float acc[kMaxRows] = {};
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    uint64_t bits = v.word(i, b);
    while (bits) {
      const int k = __builtin_clzll(bits);
      bits &= ~(1ULL << (63 - k));
      const float val = v.value(p++);
      for (int64_t n = 0; n < rows; ++n) acc[n] += val * x[n * ldx + b * kBlock + k];
    }
  }
  for (int64_t n = 0; n < rows; ++n) out[n * ldo + i] = acc[n];
}

template <typename T>
void expand_row_portable(const SparseV<T>& v, int64_t i, float* row) {
  std::memset(row, 0, v.h * sizeof(float));
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    uint64_t bits = v.word(i, b);
    while (bits) {
      const int k = __builtin_clzll(bits);
      bits &= ~(1ULL << (63 - k));
      row[b * kBlock + k] = v.value(p++);
    }
  }
}

// How the AVX-512 path spreads a chunk's values: kExpand16 (on CPUs with VBMI2: bfloat16 values by
// each_pair32, 4- and 8-bit codes by each_chunk_vbmi2; other value types take kExpand), kExpand
// (vexpandps) or kPermute (spread16). The default is kExpand16 on Intel CPUs that have VBMI2,
// kExpand on other Intel CPUs, kPermute elsewhere; LAYERSHARE_KERNEL_SPREAD=expand16|expand|permute
// overrides it, bitmask_spread(use) switches it.
enum Spread : int { kPermute = 0, kExpand = 1, kExpand16 = 2 };
const char* const kSpreadNames[] = {"permute", "expand", "expand16"};

bool cpu_has_vbmi2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // (every CPU with VBMI2 so far has VBMI, GFNI and BMI2 too)
  return __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("gfni") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

Spread best_spread() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (!__builtin_cpu_is("intel")) return kPermute;
  return cpu_has_vbmi2() ? kExpand16 : kExpand;
#else
  return kPermute;
#endif
}

// "permute", "expand", "expand16" (kExpand where the CPU lacks VBMI2) or anything else: the best
Spread spread_named(const std::string& use) {
  if (use == "permute") return kPermute;
  if (use == "expand") return kExpand;
  if (use == "expand16") return cpu_has_vbmi2() ? kExpand16 : kExpand;
  return best_spread();
}

Spread default_spread() {
  const char* env = std::getenv("LAYERSHARE_KERNEL_SPREAD");
  return spread_named(env ? std::string(env) : std::string());
}
std::atomic<int> g_spread{default_spread()};

// A buffer of at least `floats` floats kept by the calling thread, aligned to a cache line (a vector
// load from it never spans two lines: activations widened or padded into a std::vector's 16-byte
// alignment made the out-product at 8 rows 1.5x slower); Slot tells apart buffers in use at once.
enum { kAccSlot, kWidenSlot, kPadSlot, kZtSlot, kAmxSlot, kTileSlot };
template <int Slot>
float* thread_buffer(int64_t floats) {
  thread_local std::vector<float> buf;
  buf.resize(std::max<size_t>(buf.size(), floats + 16));
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
}

// ---- the vector paths (x86): AVX2, AVX-512 -----------------------------------------------------
#if LS_X86
// f(std::integral_constant<int, N>{}) with N = rows (1..kMaxRows; more rows: kMaxRows): the
// vector paths' kernels take the activation rows as a template parameter.
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, kMaxRows>{});
  }
}

// `floats` accumulators for the in-products: on the heap (64 KiB is much for a thread's stack),
// kept per thread, aligned to a cache line.
float* accumulators(int64_t floats) { return thread_buffer<kAccSlot>(floats); }

// The in-product over all of V's nb column blocks, N activation rows, in tiles of blocks whose N
// accumulator rows fit kAccFloats: `tile(b0, b1, acc)` runs one tile (an ISA's in_tile_*).
template <int N, typename Tile>
void in_blocks(int64_t nb, Tile&& tile) {
  const int64_t width = std::min<int64_t>(kAccFloats / (N * kBlock), nb);
  float* acc = accumulators(N * width * kBlock);
  for (int64_t b = 0; b < nb; b += width) tile(b, std::min(nb, b + width), acc);
}

// ---- AVX2 path -------------------------------------------------------------------------------
#define LS_AVX2_LAMBDA __attribute__((target("avx2,fma,f16c,popcnt"), always_inline))

// For each mask byte m, lane k (column k of an 8-column chunk) takes packed value idx[m][k]
// (how many of the chunk's entries before k are kept) when bit 7-k of m is set; -1 otherwise,
// whose sign bit zeroes the lane.
struct SpreadTable {
  int8_t idx[256][8];
  constexpr SpreadTable() : idx{} {
    for (int m = 0; m < 256; ++m) {
      int8_t kept = 0;
      for (int k = 0; k < 8; ++k) idx[m][k] = (m >> (7 - k)) & 1 ? kept++ : -1;
    }
  }
};
alignas(64) constexpr SpreadTable kSpread{};

LS_AVX2 LS_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LS_AVX2 LS_INLINE __m256 load8(const c10::BFloat16* p) {  // bfloat16: the high half of a float32
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
LS_AVX2 LS_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// values[p : p+count] in lanes 0..count-1 (the other lanes are unused), reading only inside the buffer.
template <typename T>
LS_AVX2 LS_COLD __m256 load_near_end(const SparseV<T>& v, int64_t p, int count) {
  float tail[8] = {};
  for (int k = 0; k < count; ++k) tail[k] = v.value(p + k);
  return load8(tail);
}

// Values q..q+7 (q a multiple of 8, so one group: groups are multiples of 16 long) decoded to
// float32: (code - zero) * scale, as grid.decode computes them.
LS_AVX2 LS_INLINE __m256i codes8(const SparseV<Q8>& v, int64_t q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v.codes + q)));
}
LS_AVX2 LS_INLINE __m256i codes8(const SparseV<Q4>& v, int64_t q) {  // 4 bytes, low nibble first
  uint32_t w;
  std::memcpy(&w, v.codes + (q >> 1), 4);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts), _mm256_set1_epi32(15));
}
template <typename T>
LS_AVX2 LS_INLINE __m256 decode8(const SparseV<T>& v, int64_t q) {
  const int64_t g = q >> v.gshift;
  const __m256 c = _mm256_cvtepi32_ps(codes8(v, q));
  const float z = v.qzero[g], s = _cvtsh_ss(v.qscale[g].x);  // float16 -> float32: exact
  return _mm256_mul_ps(_mm256_sub_ps(c, _mm256_set1_ps(z)), _mm256_set1_ps(s));
}

// The chunk of 8 columns whose mask byte is m: its packed values moved to their columns, 0 elsewhere.
LS_AVX2 LS_INLINE __m256 spread(__m256 packed, unsigned m) {
  const __m256i idx = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kSpread.idx[m])));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(packed, idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

// f(t, chunk) for the 8 chunks t of 8 columns of one block of a row of V (mask bits `bits`), the
// row's values starting at p, which moves on to the next block's.
template <typename T, typename F>
LS_AVX2 LS_INLINE void each_chunk(const SparseV<T>& v, uint64_t bits, int64_t& p, F&& f) {
  v.prefetch(p);
  if (v.inside(p)) {  // every 8-value load of the block lies inside the buffer
    const std::conditional_t<kQuant<T>, float, T>* src;  // the block's values
    int64_t at = 0;
    alignas(32) float buf[kBlock + 16];
    if constexpr (kQuant<T>) {  // the block's codes decoded first, 8 at a time from a multiple of 8
      const int64_t q0 = p & ~int64_t{7}, end = p + __builtin_popcountll(bits);
      for (int64_t q = q0; q < end; q += 8) _mm256_store_ps(buf + (q - q0), decode8(v, q));
      src = buf;
      at = p - q0;
    } else {
      src = v.values + p;
    }
    if (bits == ~0ULL) {  // a full block (a 16-bit weight held for float32 compute: every block): no spreading
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) f(t, load8(src + at + 8 * t));
      p += kBlock;
      return;
    }
    const int64_t first = at;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const unsigned m = static_cast<unsigned>(bits >> 56);
      bits <<= 8;
      f(t, spread(load8(src + at), m));
      at += __builtin_popcount(m);
    }
    p += at - first;
    return;
  }
  for (int t = 0; t < 8; ++t) {  // near the ends of the buffer
    const unsigned m = static_cast<unsigned>(bits >> 56);
    bits <<= 8;
    const int count = __builtin_popcount(m);
    f(t, spread(load_near_end(v, p, count), m));
    p += count;
  }
}

LS_AVX2 LS_INLINE float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// in_block_portable's product for N rows over blocks [b0, b1), adding row i of V times z into the
// N x 64(b1-b0) accumulators `acc` (in L1: each loaded and stored once per row of V).
template <typename T, int N>
LS_AVX2 LS_INLINE void in_row_avx2(const SparseV<T>& v, const float* zt, int64_t i, int64_t b0, int64_t b1,
                                   float* acc, int64_t ld) {
  __m256 zb[N];
  for (int n = 0; n < N; ++n) zb[n] = _mm256_broadcast_ss(zt + i * N + n);
  int64_t p = v.start(i, b0);
  for (int64_t b = b0; b < b1; ++b) {
    const uint64_t bits = v.word(i, b);
    if (!bits) continue;
    float* a = acc + (b - b0) * kBlock;
    each_chunk(v, bits, p, [&](int t, __m256 chunk) LS_AVX2_LAMBDA {
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        float* an = a + n * ld + 8 * t;
        _mm256_store_ps(an, _mm256_fmadd_ps(zb[n], chunk, _mm256_load_ps(an)));
      }
    });
  }
}

template <typename T, int N>
LS_AVX2 void in_tile_avx2(const SparseV<T>& v, const float* zt, int64_t b0, int64_t b1, float* acc, float* y,
                          int64_t ldy, int64_t i0, int64_t i1) {
  const int64_t ld = (b1 - b0) * kBlock;
  std::memset(acc, 0, N * ld * sizeof(float));
  // one row of V at a time, streamed: measured 2.8x faster than two rows (i, i + r/2) at once
  // (SmolLM2's up/gate, one activation row: 124 against 349 µs on a Zen 5 core, 2026-12-04)
  for (int64_t i = i0; i < i1; ++i) in_row_avx2<T, N>(v, zt, i, b0, b1, acc, ld);
  const int64_t cols = std::min(ld, v.h - b0 * kBlock);
  for (int n = 0; n < N; ++n) std::memcpy(y + n * ldy + b0 * kBlock, acc + n * ld, cols * sizeof(float));
}

// out_row_portable for N rows; x is zero-padded to nb*64 columns. K independent accumulators
// per row keep several FMAs in flight when N is small.
template <typename T, int N>
LS_AVX2 void out_row_avx2(const SparseV<T>& v, const float* x, int64_t ldx, int64_t i, float* out, int64_t ldo) {
  constexpr int K = N == 1 ? 4 : N == 2 ? 2 : 1;
  __m256 acc[N][K];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) acc[n][k] = _mm256_setzero_ps();
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    const uint64_t bits = v.word(i, b);
    if (!bits) continue;
    const float* xb = x + b * kBlock;
    each_chunk(v, bits, p, [&](int t, __m256 chunk) LS_AVX2_LAMBDA {
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n)
        acc[n][t % K] = _mm256_fmadd_ps(chunk, _mm256_loadu_ps(xb + n * ldx + 8 * t), acc[n][t % K]);
    });
  }
  for (int n = 0; n < N; ++n) {
    __m256 s = acc[n][0];
    for (int k = 1; k < K; ++k) s = _mm256_add_ps(s, acc[n][k]);
    out[n * ldo + i] = hsum(s);
  }
}

// A row of V into `row` (h floats); the row's last block goes through a buffer when it is narrower
// than 64 columns.
template <typename T>
LS_AVX2 void expand_row_avx2(const SparseV<T>& v, int64_t i, float* row) {
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    alignas(32) float tmp[kBlock];
    const int64_t w = v.width(b);
    float* dst = w == kBlock ? row + b * kBlock : tmp;
    each_chunk(v, v.word(i, b), p, [&](int t, __m256 chunk) LS_AVX2_LAMBDA {
      _mm256_storeu_ps(dst + 8 * t, chunk);
    });
    if (w < kBlock) std::memcpy(row + b * kBlock, tmp, w * sizeof(float));
  }
}

// ---- AVX-512 path ----------------------------------------------------------------------------
#define LS_AVX512_LAMBDA __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt"), always_inline))

LS_AVX512 LS_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LS_AVX512 LS_INLINE __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
LS_AVX512 LS_INLINE __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename T>
LS_AVX512 LS_COLD __m512 load16_near_end(const SparseV<T>& v, int64_t p, int count) {
  float tail[16] = {};
  for (int k = 0; k < count; ++k) tail[k] = v.value(p + k);
  return load16(tail);
}

// Values q..q+15 (q a multiple of 16: one group) decoded to float32 (decode8's arithmetic).
LS_AVX512 LS_INLINE __m512i codes16(const SparseV<Q8>& v, int64_t q) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.codes + q)));
}
LS_AVX512 LS_INLINE __m512i codes16(const SparseV<Q4>& v, int64_t q) {  // 8 bytes, low nibble first
  uint64_t w;
  std::memcpy(&w, v.codes + (q >> 1), 8);
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(w))),
                                          _mm256_set1_epi32(static_cast<int>(w >> 32)), 1);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  return _mm512_and_si512(_mm512_srlv_epi32(both, shifts), _mm512_set1_epi32(15));
}
template <typename T>
LS_AVX512 LS_INLINE __m512 decode16(const SparseV<T>& v, int64_t q) {
  const int64_t g = q >> v.gshift;
  const __m512 c = _mm512_cvtepi32_ps(codes16(v, q));
  const float z = v.qzero[g], s = _cvtsh_ss(v.qscale[g].x);
  return _mm512_mul_ps(_mm512_sub_ps(c, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}

// The chunk of 16 columns whose mask bytes are lo (columns 0-7) and hi (8-15): its packed values
// moved to their columns, 0 elsewhere. Two ways, the same result bit for bit (g_spread picks):
// kSpread's rows for both bytes make one index vector (hi's shifted by lo's count), whose -1
// entries (sign bits) are the lanes zeroed, for one vpermps ("permute"); or one vexpandps with the
// mask bits in column order ("expand"). Measured on one V of SmolLM2's up/gate shape, half kept,
// bfloat16 values, one row: on a Zen 5 expand was 3x slower than permute; on an Intel Xeon with
// AMX 1.4x faster (105 against 148 us). So expand is the default on Intel CPUs, permute elsewhere;
// LAYERSHARE_KERNEL_SPREAD=expand|permute or bitmask_spread(use) overrides it.
LS_AVX512 LS_INLINE uint64_t reverse_bits(uint64_t w) {  // bit k <-> bit 63-k
  w = __builtin_bswap64(w);
  w = ((w >> 1) & 0x5555555555555555ULL) | ((w & 0x5555555555555555ULL) << 1);
  w = ((w >> 2) & 0x3333333333333333ULL) | ((w & 0x3333333333333333ULL) << 2);
  return ((w >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((w & 0x0F0F0F0F0F0F0F0FULL) << 4);
}

LS_AVX512 LS_INLINE __m512 spread16(__m512 packed, unsigned lo, unsigned hi) {
  __m128i idx = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kSpread.idx[lo])),
                                   _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kSpread.idx[hi])));
  const __mmask16 keep = static_cast<__mmask16>(~_mm_movepi8_mask(idx));
  idx = _mm_add_epi8(idx, _mm_set_epi64x(static_cast<int64_t>(0x0101010101010101ULL * __builtin_popcount(lo)), 0));
  return _mm512_maskz_permutexvar_ps(keep, _mm512_cvtepi8_epi32(idx), packed);
}

// f(t, chunk) for the 4 chunks t of 16 columns of one block of a row of V (mask bits `bits`), the
// row's values starting at p, which moves on to the next block's.
template <typename T, typename F>
LS_AVX512 LS_INLINE void each_chunk16(const SparseV<T>& v, uint64_t bits, int64_t& p, F&& f) {
  v.prefetch(p);
  if (v.inside(p)) {  // every 16-value load of the block lies inside the buffer
    const std::conditional_t<kQuant<T>, float, T>* src;  // the block's values
    int64_t at = 0;
    alignas(64) float buf[kBlock + 32];
    if constexpr (kQuant<T>) {  // the block's codes decoded first, 16 at a time from a multiple of 16
      const int64_t q0 = p & ~int64_t{15}, end = p + __builtin_popcountll(bits);
      for (int64_t q = q0; q < end; q += 16) _mm512_store_ps(buf + (q - q0), decode16(v, q));
      src = buf;
      at = p - q0;
    } else {
      src = v.values + p;
    }
    if (bits == ~0ULL) {  // a full block: no spreading
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) f(t, load16(src + at + 16 * t));
      p += kBlock;
      return;
    }
    const int64_t first = at;
    if (g_spread.load(std::memory_order_relaxed) != kPermute) {  // vexpandps, the mask bits in column order
      const uint64_t columns = reverse_bits(bits);
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __mmask16 m = static_cast<__mmask16>(columns >> (16 * t));
        f(t, _mm512_maskz_expand_ps(m, load16(src + at)));
        at += __builtin_popcount(m);
      }
      p += at - first;
      return;
    }
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const unsigned lo = static_cast<unsigned>(bits >> 56), hi = static_cast<unsigned>(bits >> 48) & 0xFF;
      bits <<= 16;
      f(t, spread16(load16(src + at), lo, hi));
      at += __builtin_popcount(lo) + __builtin_popcount(hi);
    }
    p += at - first;
    return;
  }
  for (int t = 0; t < 4; ++t) {
    const unsigned lo = static_cast<unsigned>(bits >> 56), hi = static_cast<unsigned>(bits >> 48) & 0xFF;
    bits <<= 16;
    const int count = __builtin_popcount(lo) + __builtin_popcount(hi);
    f(t, spread16(load16_near_end(v, p, count), lo, hi));
    p += count;
  }
}

namespace avx512 {
#define LS_DRIVER LS_AVX512
#define LS_DRIVER_LAMBDA LS_AVX512_LAMBDA
#define LS_CHUNKS each_chunk16
#include "bitmask_avx512.h"
#undef LS_CHUNKS
#undef LS_DRIVER_LAMBDA
#undef LS_DRIVER
}  // namespace avx512

// ---- AVX-512 with VBMI2 (and GFNI), 16-bit values ("expand16") ---------------------------------
// bfloat16 values spread 32 columns at a time with one vpexpandw, on their 16 bits: lane j of the
// result holds column 2j in its low half and 2j+1 in its high half, so `<< 16` gives the even
// columns' float32 values and `& 0xFFFF0000` the odd ones', with no conversion on the shuffle port
// (which the other spreads use two or three times per 16 columns). The in-product's accumulators
// hold each 32 columns as [16 even | 16 odd] and are put back in column order once per tile: the
// same sums in the same order as the other paths, bit for bit. The out-product reads x rearranged
// the same way (once per call); its partial sums fall in other lanes than the other paths' (equal
// to float32 rounding). Measured on an Intel Xeon with AMX (docs/runtime.md).
#define LS_VBMI2_ISA "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,gfni,bmi2,avx2,fma,f16c,popcnt"
#define LS_VBMI2 __attribute__((target(LS_VBMI2_ISA)))
#define LS_VBMI2_LAMBDA __attribute__((target(LS_VBMI2_ISA), always_inline))

// reverse_bits with GFNI (which every CPU with VBMI2 has; cpu_has_vbmi2 checks both): the bits of
// each byte reversed by one affine transform, then the bytes. The scalar shifts, ands and ors it
// replaces were a sizable part of a block's work: SmolLM2's up/gate V in-product at one row
// 63.0 -> 51.2 us, out-product 61.4 -> 51.5 (values cached; 104.7 -> 90.4 and 100.5 -> 85.8 from
// memory), 2 threads, same process, alternated.
LS_VBMI2 LS_INLINE uint64_t reverse_bits_gfni(uint64_t w) {
  const __m128i x = _mm_gf2p8affine_epi64_epi8(_mm_cvtsi64_si128(static_cast<int64_t>(w)),
                                               _mm_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL)), 0);
  return __builtin_bswap64(static_cast<uint64_t>(_mm_cvtsi128_si64(x)));
}

LS_VBMI2 LS_INLINE __m512 even16(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
LS_VBMI2 LS_INLINE __m512 odd16(__m512i w) {
  return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// f(t, even, odd) for the 2 chunks t of 32 columns of one block of a row of V (mask bits `bits`):
// even = columns 32t, 32t+2, ..., 32t+30 and odd = 32t+1, ..., 32t+31 as float32; the row's
// values start at p, which moves on to the next block's.
LS_VBMI2 LS_INLINE void pair32(const SparseV<c10::BFloat16>& v, uint64_t bits, int64_t& p, __m512i& w0, __m512i& w1);

template <typename F>
LS_VBMI2 LS_INLINE void each_pair32(const SparseV<c10::BFloat16>& v, uint64_t bits, int64_t& p, F&& f) {
  __m512i w0, w1;
  pair32(v, bits, p, w0, w1);
  f(0, even16(w0), odd16(w0));
  f(1, even16(w1), odd16(w1));
}

// The block's 64 columns as two vectors of 32 bfloat16 values, 0 where not kept (each_pair32's).
LS_VBMI2 LS_INLINE void pair32(const SparseV<c10::BFloat16>& v, uint64_t bits, int64_t& p, __m512i& w0, __m512i& w1) {
  v.prefetch(p);
  const int64_t count = __builtin_popcountll(bits);
  alignas(64) uint16_t tail[2 * kBlock];
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v.values) + p;
  if (!v.inside(p)) {  // near the ends of the buffer: the block's values copied (0 past the buffer)
    for (int64_t k = 0; k < 2 * kBlock; ++k) tail[k] = k < count ? c10::BFloat16(v.value(p + k)).x : 0;
    src = tail;
  }
  if (bits == ~0ULL) {  // a full block: no spreading
    w0 = _mm512_loadu_si512(src);
    w1 = _mm512_loadu_si512(src + 32);
  } else {
    const uint64_t columns = reverse_bits_gfni(bits);
    const __mmask32 m0 = static_cast<__mmask32>(columns), m1 = static_cast<__mmask32>(columns >> 32);
    w0 = _mm512_maskz_expand_epi16(m0, _mm512_loadu_si512(src));
    w1 = _mm512_maskz_expand_epi16(m1, _mm512_loadu_si512(src + __builtin_popcount(m0)));
  }
  p += count;
}

// The accumulators (N rows of ld floats, a multiple of 32) put back in column order: column j < 16
// of each 32 is lane lo[j] of (their first 16 | next 16), column 16 + j lane hi[j]; then the first
// `cols` of each row copied to y (row stride ldy).
LS_VBMI2 void to_columns(float* acc, int64_t ld, int N, __m512i lo, __m512i hi, int64_t cols, float* y,
                         int64_t ldy) {
  for (int n = 0; n < N; ++n) {
    float* an = acc + n * ld;
    for (int64_t c = 0; c < ld; c += 32) {
      const __m512 e = _mm512_load_ps(an + c), o = _mm512_load_ps(an + c + 16);
      _mm512_store_ps(an + c, _mm512_permutex2var_ps(e, lo, o));
      _mm512_store_ps(an + c + 16, _mm512_permutex2var_ps(e, hi, o));
    }
    std::memcpy(y + n * ldy, an, cols * sizeof(float));
  }
}

// avx512::in_tile for bfloat16 values: the accumulators in [even | odd] order per 32 columns.
template <int N>
LS_VBMI2 void in_tile_w16(const SparseV<c10::BFloat16>& v, const float* zt, int64_t b0, int64_t b1, float* acc,
                          float* y, int64_t ldy, int64_t i0, int64_t i1) {
  const int64_t ld = (b1 - b0) * kBlock;
  std::memset(acc, 0, N * ld * sizeof(float));
  // rows i and i + 1 of V at once, as avx512::in_rows2 (the same sums in the same order)
  int64_t i = i0;
  for (; i + 1 < i1; i += 2) {
    __m512 za[N], zc[N];
    for (int n = 0; n < N; ++n) {
      za[n] = _mm512_set1_ps(zt[i * N + n]);
      zc[n] = _mm512_set1_ps(zt[(i + 1) * N + n]);
    }
    int64_t p = v.start(i, b0), q = v.start(i + 1, b0);
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t bits = v.word(i, b), next = v.word(i + 1, b);
      float* a = acc + (b - b0) * kBlock;
      if (!bits || !next) {
        if (bits | next)
          each_pair32(v, bits | next, bits ? p : q, [&](int t, __m512 even, __m512 odd) LS_VBMI2_LAMBDA {
#pragma GCC unroll 8
            for (int n = 0; n < N; ++n) {
              float* an = a + n * ld + 32 * t;
              const __m512 z = bits ? za[n] : zc[n];
              _mm512_store_ps(an, _mm512_fmadd_ps(z, even, _mm512_load_ps(an)));
              _mm512_store_ps(an + 16, _mm512_fmadd_ps(z, odd, _mm512_load_ps(an + 16)));
            }
          });
        continue;
      }
      __m512i u[2], w[2];
      pair32(v, bits, p, u[0], u[1]);
      pair32(v, next, q, w[0], w[1]);
#pragma GCC unroll 2
      for (int t = 0; t < 2; ++t) {
        const __m512 ue = even16(u[t]), uo = odd16(u[t]), we = even16(w[t]), wo = odd16(w[t]);
#pragma GCC unroll 8
        for (int n = 0; n < N; ++n) {
          float* an = a + n * ld + 32 * t;
          _mm512_store_ps(an, _mm512_fmadd_ps(zc[n], we, _mm512_fmadd_ps(za[n], ue, _mm512_load_ps(an))));
          _mm512_store_ps(an + 16, _mm512_fmadd_ps(zc[n], wo, _mm512_fmadd_ps(za[n], uo, _mm512_load_ps(an + 16))));
        }
      }
    }
  }
  for (; i < i1; ++i) {
    __m512 zb[N];
    for (int n = 0; n < N; ++n) zb[n] = _mm512_set1_ps(zt[i * N + n]);
    int64_t p = v.start(i, b0);
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t bits = v.word(i, b);
      if (!bits) continue;
      float* a = acc + (b - b0) * kBlock;
      each_pair32(v, bits, p, [&](int t, __m512 even, __m512 odd) LS_VBMI2_LAMBDA {
#pragma GCC unroll 8
        for (int n = 0; n < N; ++n) {
          float* an = a + n * ld + 32 * t;
          _mm512_store_ps(an, _mm512_fmadd_ps(zb[n], even, _mm512_load_ps(an)));
          _mm512_store_ps(an + 16, _mm512_fmadd_ps(zb[n], odd, _mm512_load_ps(an + 16)));
        }
      });
    }
  }
  // back to column order: lanes (e0, o0, e1, o1, ...) from the even and odd halves
  to_columns(acc, ld, N, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
             _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
             std::min(ld, v.h - b0 * kBlock), y + b0 * kBlock, ldy);
}

// avx512::out_row for bfloat16 values; x (zero-padded to nb*64 columns) in [even | odd] order per
// 32 columns (out_impl rearranges it).
template <int N>
LS_VBMI2 void out_row_w16(const SparseV<c10::BFloat16>& v, const float* x, int64_t ldx, int64_t i, float* out,
                          int64_t ldo) {
  constexpr int K = N == 1 ? 4 : 2;  // independent accumulators per row: (chunk, half) -> acc[(2t + half) % K]
  __m512 acc[N][K];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) acc[n][k] = _mm512_setzero_ps();
  int64_t p = v.start(i, 0);
  for (int64_t b = 0; b < v.nb; ++b) {
    const uint64_t bits = v.word(i, b);
    if (!bits) continue;
    const float* xb = x + b * kBlock;
    each_pair32(v, bits, p, [&](int t, __m512 even, __m512 odd) LS_VBMI2_LAMBDA {
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        const float* xn = xb + n * ldx + 32 * t;
        acc[n][(2 * t) % K] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xn), acc[n][(2 * t) % K]);
        acc[n][(2 * t + 1) % K] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xn + 16), acc[n][(2 * t + 1) % K]);
      }
    });
  }
  for (int n = 0; n < N; ++n) {
    __m512 s = acc[n][0];
    for (int k = 1; k < K; ++k) s = _mm512_add_ps(s, acc[n][k]);
    out[n * ldo + i] = _mm512_reduce_add_ps(s);
  }
}

// ---- AVX-512 with VBMI2, 4- and 8-bit codes ---------------------------------------------------
// A block's codes spread once, as bytes: the codes one a byte (8-bit: one masked load; 4-bit: one
// vpermb and one vpmultishiftqb from the packed nibbles, from an even or odd start), one vpexpandb
// by the mask bits in column order, then per 16 columns a zero extension, the zero point
// subtracted in int32 (0 in the columns not kept), one conversion and the scale. The values are
// decode16's bit for bit: (code - zero) and its conversion are exact, then one product by the
// scale. A block of 64 columns spans at most two groups when group >= 64 (the columns of the
// second picked by a pdep of the mask); smaller groups take each_chunk16's path.

// qword k of the gather: bytes 4k..4k+4 of the codes (the nibbles of codes 8k..8k+7 from an even
// or odd start); the last three bytes of each qword are not read by the shifts.
struct Q4Gather {
  uint8_t idx[64];
  constexpr Q4Gather() : idx{} {
    for (int k = 0; k < 8; ++k)
      for (int m = 0; m < 8; ++m) idx[8 * k + m] = static_cast<uint8_t>(4 * k + (m < 4 ? m : 4));
  }
};
alignas(64) constexpr Q4Gather kQ4Gather{};

// codes p..p+count-1 one a byte (the bytes past them are whatever follows; callers drop them); no
// byte past the last code's is read
LS_VBMI2 LS_INLINE __m512i codes64(const SparseV<Q4>& v, int64_t p, int64_t count) {
  const int odd = static_cast<int>(p & 1);
  const int64_t bytes = (odd + count + 1) >> 1;  // <= 33
  const __m512i raw = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ULL, static_cast<unsigned>(bytes)), v.codes + (p >> 1));
  const __m512i gathered = _mm512_permutexvar_epi8(_mm512_load_si512(kQ4Gather.idx), raw);
  // byte j of each qword: the 8 bits from bit 4 (j + odd), whose low nibble is code 8k + j
  const __m512i shifts = _mm512_set1_epi64(odd ? 0x201C1814100C0804LL : 0x1C1814100C080400LL);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, gathered), _mm512_set1_epi8(15));
}
LS_VBMI2 LS_INLINE __m512i codes64(const SparseV<Q8>& v, int64_t p, int64_t count) {
  return _mm512_maskz_loadu_epi8(_bzhi_u64(~0ULL, static_cast<unsigned>(count)), v.codes + p);
}

// each_chunk16 on CPUs with VBMI2: codes as above, every other value type as each_chunk16.
template <typename T, typename F>
LS_VBMI2 LS_INLINE void each_chunk_vbmi2(const SparseV<T>& v, uint64_t bits, int64_t& p, F&& f) {
  if constexpr (kQuant<T>) {
    const int64_t count = __builtin_popcountll(bits);
    const int64_t g = p >> v.gshift, k = ((g + 1) << v.gshift) - p;  // values p + k, ... are in group g + 1
    const bool two = k < count;
    if (count && v.gshift >= 6 && p >= 0 && p + count <= v.nnz) {  // (groups g and g + 1 exist)
      v.prefetch(p);
      __m512i c = codes64(v, p, count);
      const uint64_t columns = bits == ~0ULL ? bits : reverse_bits_gfni(bits);
      if (bits != ~0ULL) c = _mm512_maskz_expand_epi8(columns, c);
      const __m512i z0 = _mm512_set1_epi32(v.qzero[g]), z1 = two ? _mm512_set1_epi32(v.qzero[g + 1]) : z0;
      const __m512 s0 = _mm512_set1_ps(_cvtsh_ss(v.qscale[g].x));
      const __m512 s1 = two ? _mm512_set1_ps(_cvtsh_ss(v.qscale[g + 1].x)) : s0;
      const uint64_t later = two ? _pdep_u64(~0ULL << k, columns) : 0;  // the columns of group g + 1
      const auto chunk = [&](int t, __m128i q) LS_VBMI2_LAMBDA {  // columns 16t..16t+15: 0 where not kept
        const __mmask16 kept = static_cast<__mmask16>(columns >> (16 * t));
        const __mmask16 next = static_cast<__mmask16>(later >> (16 * t));
        const __m512i d = _mm512_maskz_sub_epi32(kept, _mm512_cvtepu8_epi32(q), _mm512_mask_blend_epi32(next, z0, z1));
        f(t, _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_mask_blend_ps(next, s0, s1)));
      };
      chunk(0, _mm512_castsi512_si128(c));
      chunk(1, _mm512_extracti32x4_epi32(c, 1));
      chunk(2, _mm512_extracti32x4_epi32(c, 2));
      chunk(3, _mm512_extracti32x4_epi32(c, 3));
      p += count;
      return;
    }
  }
  __m512 chunks[4];  // (f, compiled for VBMI2, cannot be inlined into each_chunk16)
  each_chunk16(v, bits, p, [&](int t, __m512 chunk) LS_AVX512_LAMBDA { chunks[t] = chunk; });
#pragma GCC unroll 4
  for (int t = 0; t < 4; ++t) f(t, chunks[t]);
}

namespace vbmi2 {
#define LS_DRIVER LS_VBMI2
#define LS_DRIVER_LAMBDA LS_VBMI2_LAMBDA
#define LS_CHUNKS each_chunk_vbmi2
#include "bitmask_avx512.h"
#undef LS_CHUNKS
#undef LS_DRIVER_LAMBDA
#undef LS_DRIVER
}  // namespace vbmi2

// ---- AMX: bfloat16 values times bfloat16 activations at several rows, on tiles ------------------
// The in-product at several rows spends its time in the accumulators (each FMA of a chunk loads
// and stores 16 of them per row); with AMX the 8 rows' sums stay in tiles. For 32 rows of V at a
// time, each block's values are spread by pair32 (as at one row) and interleaved in pairs of rows
// (the tiles' VNNI layout) into 4 KiB of B tiles, z's 32 columns in bfloat16 are the A tile, and
// one tdpbf16ps per 16 columns adds the products into C tiles held in the accumulators' memory
// between blocks. Only for bfloat16 activations (z exactly representable, as the dense bfloat16
// model's GEMM takes them) and bfloat16 values; sums are float32 in another order than the FMA
// path's (equal to float32 rounding).
#define LS_AMX __attribute__((target(LS_VBMI2_ISA ",amx-tile,amx-bf16")))

// Whether the CPU has AMX-BF16 and the OS lets this process use the tiles (Linux asks per process).
bool amx_usable() {
#if defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!cpu_has_vbmi2() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// in_tile_w16 with AMX: zb holds z's N rows in bfloat16 (row stride rp >= i1 + 32, zeros past r).
LS_AMX void in_tile_amx(const SparseV<c10::BFloat16>& v, const uint16_t* zb, int64_t rp, int N, int64_t b0,
                        int64_t b1, float* acc, float* y, int64_t ldy, int64_t i0, int64_t i1) {
  const int64_t ld = (b1 - b0) * kBlock;
  std::memset(acc, 0, N * ld * sizeof(float));
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) cfg.rows[t] = static_cast<uint8_t>(N), cfg.colsb[t] = 64;  // C0-C3, A
  for (int t = 5; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                          // B
  _tile_loadconfig(&cfg);
  // B tiles of every block of the tile for 32 rows of V: block b's 4 tiles (16 pairs of rows x 16
  // columns each, 4 KiB) at bt + (b - b0) * 2048; filled a pair of rows at a time (two streams of
  // values, read in order, as the FMA path reads them), then multiplied block by block.
  uint16_t* bt = reinterpret_cast<uint16_t*>(thread_buffer<kTileSlot>((b1 - b0) * 1024));
  const __m512i none = _mm512_setzero_si512();
  const int64_t stride = ld * static_cast<int64_t>(sizeof(float));
  for (int64_t i = i0; i < i1; i += 32) {
    const int64_t rows = std::min<int64_t>(32, i1 - i);
    for (int64_t k = 0; k < 16; ++k) {  // rows i + 2k and i + 2k + 1
      const bool has_a = 2 * k < rows, has_b = 2 * k + 1 < rows;
      int64_t p = has_a ? v.start(i + 2 * k, b0) : 0, q = has_b ? v.start(i + 2 * k + 1, b0) : 0;
      for (int64_t b = b0; b < b1; ++b) {
        __m512i u0 = none, u1 = none, w0 = none, w1 = none;
        if (has_a) {
          const uint64_t bits = v.word(i + 2 * k, b);
          if (bits) pair32(v, bits, p, u0, u1);
        }
        if (has_b) {
          const uint64_t bits = v.word(i + 2 * k + 1, b);
          if (bits) pair32(v, bits, q, w0, w1);
        }
        // tile t, slot j: the pair (row 2k, row 2k + 1) of column 8 (j / 4) + j % 4 (+4 for odd t, +32 for t >= 2)
        uint16_t* tb = bt + (b - b0) * 2048 + k * 32;
        _mm512_store_si512(tb, _mm512_unpacklo_epi16(u0, w0));
        _mm512_store_si512(tb + 512, _mm512_unpackhi_epi16(u0, w0));
        _mm512_store_si512(tb + 1024, _mm512_unpacklo_epi16(u1, w1));
        _mm512_store_si512(tb + 1536, _mm512_unpackhi_epi16(u1, w1));
      }
    }
    _tile_loadd(4, zb + i, rp * 2);
    for (int64_t b = b0; b < b1; ++b) {
      float* a = acc + (b - b0) * kBlock;
      const uint16_t* tb = bt + (b - b0) * 2048;
      _tile_loadd(0, a, stride);
      _tile_loadd(1, a + 16, stride);
      _tile_loadd(2, a + 32, stride);
      _tile_loadd(3, a + 48, stride);
      _tile_loadd(5, tb, 64);
      _tile_loadd(6, tb + 512, 64);
      _tile_loadd(7, tb + 1024, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, tb + 1536, 64);
      _tile_dpbf16ps(3, 4, 5);
      _tile_stored(0, a, stride);
      _tile_stored(1, a + 16, stride);
      _tile_stored(2, a + 32, stride);
      _tile_stored(3, a + 48, stride);
    }
  }
  _tile_release();
  // back to column order: unpacklo/hi take words 0-3 / 4-7 of each 128-bit lane, so slot j of
  // tile 2h holds column 32h + 8 (j / 4) + j % 4, and of tile 2h + 1 that column + 4
  to_columns(acc, ld, N, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
             _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31),
             std::min(ld, v.h - b0 * kBlock), y + b0 * kBlock, ldy);
}

// The out-product x @ V^T on AMX tiles: per 16 rows of V, each block's values spread by pair32 into
// two A tiles (16 rows x 32 columns, as they lie), x in bfloat16 as B tiles (pairs of columns x N
// rows: xv, laid out by out_impl), one tdpbf16ps per 32 columns into a C tile (16 rows of V x N).
LS_AMX void out_rows_amx(const SparseV<c10::BFloat16>& v, const uint32_t* xv, int N, int64_t i0, int64_t i1,
                         float* out, int64_t ldo) {
  TileConfig cfg;
  cfg.rows[0] = 16, cfg.colsb[0] = static_cast<uint16_t>(4 * N);                    // C
  cfg.rows[1] = cfg.rows[2] = 16, cfg.colsb[1] = cfg.colsb[2] = 64;                 // A: 32 columns
  cfg.rows[3] = cfg.rows[4] = 16, cfg.colsb[3] = cfg.colsb[4] = static_cast<uint16_t>(4 * N);  // B
  _tile_loadconfig(&cfg);
  uint16_t* at = reinterpret_cast<uint16_t*>(thread_buffer<kTileSlot>(v.nb * 512));  // 2 KiB a block
  const __m512i none = _mm512_setzero_si512();
  alignas(64) float c[16 * 16];
  // a weight held whole whose rows are whole blocks: its tiles loaded where they lie
  const bool direct = v.whole && v.h % kBlock == 0;
  const uint16_t* w = reinterpret_cast<const uint16_t*>(v.values);
  for (int64_t i = i0; i < i1; i += 16) {
    const int64_t rows = std::min<int64_t>(16, i1 - i);
    // block b's A tiles: at a + b * step and 32 columns on, rows `stride` bytes apart
    const uint16_t* a = at;
    int64_t step = 1024, stride = 64;
    if (direct && rows == 16) {
      a = w + i * v.h, step = kBlock, stride = 2 * v.h;
    } else {
      for (int64_t k = 0; k < 16; ++k) {
        int64_t p = k < rows ? v.start(i + k, 0) : 0;
        for (int64_t b = 0; b < v.nb; ++b) {
          __m512i u0 = none, u1 = none;
          if (k < rows) {
            const uint64_t bits = v.word(i + k, b);
            if (bits) pair32(v, bits, p, u0, u1);
          }
          _mm512_store_si512(at + b * 1024 + k * 32, u0);
          _mm512_store_si512(at + b * 1024 + 512 + k * 32, u1);
        }
      }
    }
    _tile_zero(0);
    for (int64_t b = 0; b < v.nb; ++b) {
      if (step == kBlock)  // the same block's line of the next strip (its rows come a strip later)
        _mm_prefetch(reinterpret_cast<const char*>(a + b * step + 16 * v.h), _MM_HINT_T1);
      _tile_loadd(1, a + b * step, stride);
      _tile_loadd(2, a + b * step + (step == kBlock ? 32 : 512), stride);
      _tile_loadd(3, xv + (2 * b) * 16 * N, 4 * N);
      _tile_loadd(4, xv + (2 * b + 1) * 16 * N, 4 * N);
      _tile_dpbf16ps(0, 1, 3);
      _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, c, 4 * N);
    for (int64_t k = 0; k < rows; ++k)
      for (int n = 0; n < N; ++n) out[n * ldo + i + k] = c[k * N + n];
  }
  _tile_release();
}
#endif  // LS_X86

// ---- which path runs ---------------------------------------------------------------------------
bool cpu_has_avx2() {
#if LS_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if LS_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

// The best path at most `cap` ("portable", "avx2", anything else: no cap) the CPU has.
Isa best_isa(const std::string& cap) {
  if (cap == "portable") return kPortable;
  if (cap != "avx2" && cpu_has_avx512()) return kAvx512;
  return cpu_has_avx2() ? kAvx2 : kPortable;
}

Isa default_isa() {
  const char* env = std::getenv("LAYERSHARE_KERNEL");
  return best_isa(env ? std::string(env) : std::string());
}

std::atomic<int> g_isa{default_isa()};

std::string bitmask_isa(std::optional<c10::string_view> use) {
  if (use) {
    const std::string u(*use);
    TORCH_CHECK(u == "portable" || u == "avx2" || u == "best",
                "bitmask_isa: use must be 'portable', 'avx2' or 'best', got '", u, "'");
    g_isa = best_isa(u);
  }
  return kIsaNames[g_isa.load()];
}

std::string bitmask_spread(std::optional<c10::string_view> use) {
  if (use) {
    const std::string u(*use);
    TORCH_CHECK(u == "expand16" || u == "expand" || u == "permute" || u == "best",
                "bitmask_spread: use must be 'expand16', 'expand', 'permute' or 'best', got '", u, "'");
    g_spread = spread_named(u);
  }
  return kSpreadNames[g_spread.load()];
}

// Whether bfloat16 products at several rows run on AMX tiles (in_tile_amx from kAmxInRows rows,
// out_rows_amx from kAmxOutRows): where the CPU and OS allow it, unless LAYERSHARE_KERNEL_AMX=0;
// bitmask_amx(use) switches it. Below those rows the FMA paths measured faster (SmolLM2 FiPS 20%'s
// V's, bfloat16, 2 threads, Intel Xeon: in-product at 5 rows 116.0 against 116.5 us, at 8 rows
// 128.0 against 171.7; out-product at 3 rows 100.1 against 95.8, at 4 rows 93.5 against 112.5).
constexpr int64_t kAmxInRows = 6, kAmxOutRows = 4;
#if LS_X86
const bool g_amx_usable = amx_usable();
#else
const bool g_amx_usable = false;
#endif
std::atomic<bool> g_amx{g_amx_usable && !(std::getenv("LAYERSHARE_KERNEL_AMX") &&
                                          std::string(std::getenv("LAYERSHARE_KERNEL_AMX")) == "0")};

std::string bitmask_amx(std::optional<c10::string_view> use) {
  if (use) {
    const std::string u(*use);
    TORCH_CHECK(u == "on" || u == "off" || u == "best", "bitmask_amx: use must be 'on', 'off' or 'best', got '", u,
                "'");
    TORCH_CHECK(u != "on" || g_amx_usable, "bitmask_amx: this CPU (or OS) has no AMX-BF16 tiles to use");
    g_amx = u != "off" && g_amx_usable;
  }
  return g_amx ? "on" : g_amx_usable ? "off" : "absent";
}

// ---- the ops -----------------------------------------------------------------------------------
template <typename F>
void with_value_type(const at::Tensor& values, F&& f) {
  switch (values.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "bitmask ops: values must be float32, bfloat16 or float16, got ", values.scalar_type());
  }
}

// Activations: float32, bfloat16 or float16 (the products are float32 ones either way).
void check_activations(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous() &&
                  (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "bitmask ops: ", name, " must be a contiguous 2-D float32, bfloat16 or float16 CPU tensor, got ",
              t.sizes(), " ", dt);
}

// float32 -> bfloat16 rounded to nearest even, bit for bit as c10::BFloat16(float) (NaN -> 0x7FC0),
// written without branches so that GCC vectorizes it at the width of the function it is inlined into.
LS_INLINE void narrow_bf16_loop(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, src + j, 4);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dst[j] = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : rounded;
  }
}
#if LS_X86
LS_AVX512 void narrow_bf16_avx512(const float* src, uint16_t* dst, int64_t n) { narrow_bf16_loop(src, dst, n); }
LS_AVX2 void narrow_bf16_avx2(const float* src, uint16_t* dst, int64_t n) { narrow_bf16_loop(src, dst, n); }
#endif

// n floats into dst's dtype (float32: copied; bfloat16: the vector loop above; float16: as c10::Half).
template <typename S>
void narrow_to(const float* src, S* dst, int64_t n) {
  if constexpr (std::is_same<S, float>::value) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same<S, c10::BFloat16>::value) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#if LS_X86
    if (g_isa == kAvx512) return narrow_bf16_avx512(src, d, n);
    if (g_isa == kAvx2) return narrow_bf16_avx2(src, d, n);
#endif
    narrow_bf16_loop(src, d, n);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = S(src[k]);
  }
}

// 16-bit activations widened to float32 (exactly) in a buffer of the calling thread, float32 ones as
// they are: no tensor op (at one row, converting with .float() and back cost about 8 us a product,
// more than the product of a 192 x 576 linear).
const float* widened(const at::Tensor& t) {
  const float* out = nullptr;
  with_value_type(t, [&](auto tag) {  // (check_activations has admitted only these three dtypes)
    using S = decltype(tag);
    if constexpr (std::is_same<S, float>::value) {
      out = t.const_data_ptr<float>();
    } else {
      float* buf = thread_buffer<kWidenSlot>(t.numel());
      const S* p = t.const_data_ptr<S>();
      for (int64_t k = 0; k < t.numel(); ++k) buf[k] = static_cast<float>(p[k]);
      out = buf;
    }
  });
  return out;
}

// The float32 result y in the activations' dtype: y itself for float32, else rounded to nearest
// even, as Tensor.to rounds.
at::Tensor narrowed(const at::Tensor& y, const at::Tensor& activations) {
  if (activations.scalar_type() == at::kFloat) return y;
  at::Tensor out = at::empty(y.sizes(), y.options().dtype(activations.scalar_type()));
  with_value_type(activations, [&](auto tag) {
    using S = decltype(tag);
    narrow_to(y.const_data_ptr<float>(), out.data_ptr<S>(), y.numel());
  });
  return out;
}

// The mask and offsets of a V of shape (r, h), checked; returns (nb, per, whole): blocks of 64
// columns per row, blocks per offset (1: one offset a block; 4: one every 4 blocks), and whether V
// is kept whole (an empty mask and offsets of shape (r, 0): every entry kept, none read).
struct Layout {
  int64_t nb, per;
  bool whole;
};
Layout check_mask_offsets(const at::Tensor& mask, const at::Tensor& offsets, int64_t r, int64_t h) {
  TORCH_CHECK(h >= 0, "bitmask ops: h must be >= 0, got ", h);
  const int64_t nb = (h + kBlock - 1) / kBlock;
  TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 1 && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "bitmask ops: mask must be a contiguous 1-D uint8 CPU tensor");
  if (mask.numel() == 0 && r * h > 0 && offsets.dim() == 2 && offsets.size(0) == r && offsets.size(1) == 0) {
    TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kInt,
                "bitmask ops: offsets must be an int32 CPU tensor");
    return {nb, 1, true};
  }
  TORCH_CHECK(mask.numel() == (r * h + 7) / 8, "bitmask ops: mask has ", mask.numel(), " bytes, expected ",
              (r * h + 7) / 8, " for V of shape (", r, ", ", h, ") (or 0 with offsets of shape (", r,
              ", 0): V kept whole)");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kInt && offsets.is_contiguous() &&
                  offsets.dim() == 2 && offsets.size(0) == r &&
                  (offsets.size(1) == nb || offsets.size(1) == (nb + 3) / 4),
              "bitmask ops: offsets must be a contiguous int32 tensor of shape (", r, ", ", nb, ") or (", r, ", ",
              (nb + 3) / 4, "), got ", offsets.sizes(), " ", offsets.scalar_type());
  return {nb, offsets.size(1) == nb ? 1 : 4, false};
}

template <typename T>
SparseV<T> sparse_v(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets, int64_t r,
                    int64_t h) {
  const auto [nb, per, whole] = check_mask_offsets(mask, offsets, r, h);
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 1 && values.is_contiguous(),
              "bitmask ops: values must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(!whole || values.numel() == r * h, "bitmask ops: V of shape (", r, ", ", h,
              ") kept whole needs ", r * h, " values, got ", values.numel());
  SparseV<T> v{values.const_data_ptr<T>(), values.numel(), mask.const_data_ptr<uint8_t>(), mask.numel(),
               offsets.const_data_ptr<int32_t>(), r, h, nb};
  v.per = per;
  v.no = offsets.size(1);
  v.whole = whole;
  return v;
}

// The quantized values' V: `codes` (uint8: two codes a byte when bits <= 4, else one), `scales` and
// `zeros` (float32, one per group of `group` values; group a power of two >= 16), `n` values.
template <typename T>
SparseV<T> sparse_qv(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t group,
                     int64_t n, const at::Tensor& mask, const at::Tensor& offsets, int64_t r, int64_t h) {
  TORCH_CHECK(group >= 16 && (group & (group - 1)) == 0, "bitmask ops: group must be a power of two >= 16, got ",
              group);
  TORCH_CHECK(n >= 0, "bitmask ops: n must be >= 0, got ", n);
  const int64_t bytes = std::is_same<T, Q4>::value ? (n + 1) / 2 : n, groups = (n + group - 1) / group;
  TORCH_CHECK(codes.device().is_cpu() && codes.dim() == 1 && codes.scalar_type() == at::kByte &&
                  codes.is_contiguous() && codes.numel() == bytes,
              "bitmask ops: codes must be a contiguous 1-D uint8 CPU tensor of ", bytes, " bytes, got ",
              codes.sizes(), " ", codes.scalar_type());
  TORCH_CHECK(scales.device().is_cpu() && scales.dim() == 1 && scales.scalar_type() == at::kHalf &&
                  scales.is_contiguous() && scales.numel() == groups,
              "bitmask ops: scales must be a contiguous 1-D float16 CPU tensor of ", groups, " entries, got ",
              scales.sizes(), " ", scales.scalar_type());
  TORCH_CHECK(zeros.device().is_cpu() && zeros.dim() == 1 && zeros.scalar_type() == at::kByte &&
                  zeros.is_contiguous() && zeros.numel() == groups,
              "bitmask ops: zeros must be a contiguous 1-D uint8 CPU tensor of ", groups, " entries, got ",
              zeros.sizes(), " ", zeros.scalar_type());
  const auto [nb, per, whole] = check_mask_offsets(mask, offsets, r, h);
  TORCH_CHECK(!whole || n == r * h, "bitmask ops: V of shape (", r, ", ", h, ") kept whole needs ", r * h,
              " values, got ", n);
  SparseV<T> v{nullptr, n, mask.const_data_ptr<uint8_t>(), mask.numel(), offsets.const_data_ptr<int32_t>(), r, h, nb};
  v.per = per;
  v.no = offsets.size(1);
  v.whole = whole;
  v.codes = codes.const_data_ptr<uint8_t>();
  v.qscale = scales.const_data_ptr<c10::Half>();
  v.qzero = zeros.const_data_ptr<uint8_t>();
  v.gshift = __builtin_ctzll(static_cast<uint64_t>(group));
  return v;
}

// f(Q4{} or Q8{}) by the codes' width
template <typename F>
void with_code_type(int64_t bits, F&& f) {
  TORCH_CHECK(bits == 4 || bits == 8, "bitmask ops: bits must be 4 (two codes a byte) or 8, got ", bits);
  if (bits == 4) return f(Q4{});
  return f(Q8{});
}

int64_t grain(int64_t entries_per_task) { return std::max<int64_t>(1, kGrainEntries / std::max<int64_t>(1, entries_per_task)); }

template <typename T>
at::Tensor in_impl(const at::Tensor& z, const SparseV<T>& v) {
  const int64_t N = z.size(0), r = v.r, h = v.h;
  at::Tensor y = at::empty({N, h}, z.options().dtype(at::kFloat));
  const float* zs = nullptr;  // z in float32 (widened when first needed: the tiles read its bfloat16)
  float* ztb = thread_buffer<kZtSlot>(r * std::min(N, kMaxRows));  // r x rows: one row of V's weights together
  const int isa = g_isa, spread = g_spread;
  const bool amx = std::is_same<T, c10::BFloat16>::value && g_amx && isa == kAvx512 && spread == kExpand16 &&
                   z.scalar_type() == at::kBFloat16;
  const int64_t rp = r + 32;  // amx: z's rows in bfloat16, zero-padded (a tile reads 32 columns)
  uint16_t* zb = nullptr;
  if (amx) zb = reinterpret_cast<uint16_t*>(thread_buffer<kAmxSlot>((std::min(N, kMaxRows) * rp + 1) / 2));
  // Each task takes a stretch of whole rows of V (so reads one stretch of values and mask, in
  // order), into partial sums over every column; the tasks' sums are added in task order. (Split
  // by columns, every thread read every row in pieces: 1.5x slower for SmolLM2's V from memory.)
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), r * h / kGrainEntries));
  thread_local std::vector<float> part;  // the partial sums of tasks 1..tasks-1: (tasks-1) x N x h
  part.resize(std::max<size_t>(part.size(), (tasks - 1) * N * h));
  for (int64_t n0 = 0; n0 < N; n0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, N - n0);
    const bool tiles = amx && rows >= kAmxInRows;
    if (!tiles) {
      if (!zs) zs = widened(z);
      for (int64_t i = 0; i < r; ++i)
        for (int64_t n = 0; n < rows; ++n) ztb[i * rows + n] = zs[(n0 + n) * r + i];
    } else {
      const uint16_t* zs16 = reinterpret_cast<const uint16_t*>(z.const_data_ptr<c10::BFloat16>()) + n0 * r;
      for (int64_t n = 0; n < rows; ++n) {
        std::memcpy(zb + n * rp, zs16 + n * r, r * sizeof(uint16_t));
        std::memset(zb + n * rp + r, 0, (rp - r) * sizeof(uint16_t));
      }
    }
    const float* zp = ztb;
    float* yp = y.data_ptr<float>() + n0 * h;
    float* pp = part.data() + n0 * h;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = r * t / tasks, i1 = r * (t + 1) / tasks;
        float* out = t == 0 ? yp : pp + (t - 1) * N * h;
#if LS_X86
        if constexpr (std::is_same<T, c10::BFloat16>::value)
          if (tiles) {
            with_rows(rows, [&](auto n) {
              constexpr int N = decltype(n)::value;
              in_blocks<N>(v.nb, [&](int64_t b0, int64_t b1, float* acc) {
                in_tile_amx(v, zb, rp, N, b0, b1, acc, out, h, i0, i1);
              });
            });
            continue;
          }
        if constexpr (std::is_same<T, c10::BFloat16>::value)
          if (isa == kAvx512 && spread == kExpand16) {
            with_rows(rows, [&](auto n) {
              constexpr int N = decltype(n)::value;
              in_blocks<N>(v.nb, [&](int64_t b0, int64_t b1, float* acc) { in_tile_w16<N>(v, zp, b0, b1, acc, out, h, i0, i1); });
            });
            continue;
          }
        if constexpr (kQuant<T>)
          if (isa == kAvx512 && spread == kExpand16) {
            with_rows(rows, [&](auto n) {
              constexpr int N = decltype(n)::value;
              in_blocks<N>(v.nb, [&](int64_t b0, int64_t b1, float* acc) { vbmi2::in_tile<T, N>(v, zp, b0, b1, acc, out, h, i0, i1); });
            });
            continue;
          }
        if (isa == kAvx512) {
          with_rows(rows, [&](auto n) {
            constexpr int N = decltype(n)::value;
            in_blocks<N>(v.nb, [&](int64_t b0, int64_t b1, float* acc) { avx512::in_tile<T, N>(v, zp, b0, b1, acc, out, h, i0, i1); });
          });
          continue;
        }
        if (isa == kAvx2) {
          with_rows(rows, [&](auto n) {
            constexpr int N = decltype(n)::value;
            in_blocks<N>(v.nb, [&](int64_t b0, int64_t b1, float* acc) { in_tile_avx2<T, N>(v, zp, b0, b1, acc, out, h, i0, i1); });
          });
          continue;
        }
#endif
        for (int64_t b = 0; b < v.nb; ++b) in_block_portable(v, zp, rows, b, out, h, i0, i1);
      }
    });
    for (int64_t t = 1; t < tasks; ++t) {
      const float* src = pp + (t - 1) * N * h;
      for (int64_t n = 0; n < rows; ++n)
        for (int64_t c = 0; c < h; ++c) yp[n * h + c] += src[n * h + c];
    }
  }
  (void)isa;
  (void)spread;
  return narrowed(y, z);
}

template <typename T>
at::Tensor out_impl(const at::Tensor& x, const SparseV<T>& v) {
  const int64_t N = x.size(0), h = v.h, r = v.r;
  at::Tensor out = at::empty({N, r}, x.options().dtype(at::kFloat));
  const int isa = g_isa, spread = g_spread;
  // (up to 4 rows: at 8, its two accumulators per row measured slower than avx512::out_row's)
  const bool w16 = std::is_same<T, c10::BFloat16>::value && isa == kAvx512 && spread == kExpand16 && N <= 4;
  // The vector paths read x in whole blocks: when h is not a multiple of 64, a copy zero-padded to
  // nb*64 columns; for out_row_w16, each 32 columns as [16 even | 16 odd]. Written into a buffer of
  // the calling thread (no tensor ops: at one row they cost more than a small product).
  // AMX (bfloat16 values and activations, kAmxOutRows to kMaxRows rows): x as B tiles, xv[(2b + half) * 16 + k][n]
  // = columns 64b + 32 half + 2k and + 1 of row n (a pair of bfloat16), zero past h
  const bool tiles = std::is_same<T, c10::BFloat16>::value && g_amx && isa == kAvx512 && spread == kExpand16 &&
                     x.scalar_type() == at::kBFloat16 && N >= kAmxOutRows && N <= kMaxRows;
  uint32_t* xv = nullptr;
  if (tiles) {
    xv = reinterpret_cast<uint32_t*>(thread_buffer<kAmxSlot>(v.nb * 32 * N));
    const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < v.nb * 32; ++k) {
        const int64_t col = 2 * k;
        const uint32_t lo = col < h ? x16[n * h + col] : 0, hi = col + 1 < h ? x16[n * h + col + 1] : 0;
        xv[k * N + n] = lo | (hi << 16);
      }
  }
  const float* xs = tiles ? nullptr : widened(x);
  int64_t ldx = h;
  if (!tiles && (w16 || (isa != kPortable && v.nb * kBlock != h))) {
    ldx = v.nb * kBlock;
    float* buf = thread_buffer<kPadSlot>(N * ldx);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < ldx; ++c) {
        const int64_t j = c & 31, col = w16 ? c - j + (j < 16 ? 2 * j : 2 * j - 31) : c;
        buf[n * ldx + c] = col < h ? xs[n * h + col] : 0.f;
      }
    xs = buf;
  }
#if LS_X86
  if constexpr (std::is_same<T, c10::BFloat16>::value)
    if (tiles) {
      float* o = out.data_ptr<float>();
      at::parallel_for(0, (r + 15) / 16, std::max<int64_t>(1, grain(h) / 16), [&](int64_t s0, int64_t s1) {
        out_rows_amx(v, xv, static_cast<int>(N), 16 * s0, std::min(r, 16 * s1), o, r);
      });
      return narrowed(out, x);
    }
#endif
  for (int64_t n0 = 0; n0 < N; n0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, N - n0);
    const float* xg = xs + n0 * ldx;
    float* og = out.data_ptr<float>() + n0 * r;
    at::parallel_for(0, r, grain(h), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
#if LS_X86
        if constexpr (std::is_same<T, c10::BFloat16>::value)
          if (w16) {
            with_rows(rows, [&](auto n) { out_row_w16<decltype(n)::value>(v, xg, ldx, i, og, r); });
            continue;
          }
        if constexpr (kQuant<T>)
          if (isa == kAvx512 && spread == kExpand16) {
            with_rows(rows, [&](auto n) { vbmi2::out_row<T, decltype(n)::value>(v, xg, ldx, i, og, r); });
            continue;
          }
        if (isa == kAvx512) {
          with_rows(rows, [&](auto n) { avx512::out_row<T, decltype(n)::value>(v, xg, ldx, i, og, r); });
          continue;
        }
        if (isa == kAvx2) {
          with_rows(rows, [&](auto n) { out_row_avx2<T, decltype(n)::value>(v, xg, ldx, i, og, r); });
          continue;
        }
#endif
        out_row_portable(v, xg, ldx, rows, i, og, r);
      }
    });
  }
  (void)spread;
  return narrowed(out, x);
}

// Rows of V expanded into `out` (r x h): float32 written where they lie; bfloat16 or float16 (a
// prompt's GEMM in that dtype) through a float32 buffer of the calling thread, kNarrowRows rows at a
// time, then rounded as Tensor.to rounds: no float32 V of the whole shape is ever held.
constexpr int64_t kNarrowRows = 8;

template <typename T>
void expand_impl(const at::Tensor& out, const SparseV<T>& v) {
  const int64_t r = v.r, h = v.h;
  const int isa = g_isa, spread = g_spread;
  auto row = [&](int64_t i, float* dst) {
#if LS_X86
    if constexpr (kQuant<T>)
      if (isa == kAvx512 && spread == kExpand16) return vbmi2::expand_row(v, i, dst);
    if (isa == kAvx512) return avx512::expand_row(v, i, dst);
    if (isa == kAvx2) return expand_row_avx2(v, i, dst);
#endif
    expand_row_portable(v, i, dst);
  };
  with_value_type(out, [&](auto tag) {
    using S = decltype(tag);
    S* o = out.data_ptr<S>();
    at::parallel_for(0, r, grain(h), [&](int64_t i0, int64_t i1) {
      if constexpr (std::is_same<S, float>::value) {
        for (int64_t i = i0; i < i1; ++i) row(i, o + i * h);
      } else {
        float* buf = thread_buffer<kWidenSlot>(kNarrowRows * h);
        for (int64_t i = i0; i < i1; i += kNarrowRows) {
          const int64_t n = std::min(kNarrowRows, i1 - i);
          for (int64_t k = 0; k < n; ++k) row(i + k, buf + k * h);
          narrow_to(buf, o + i * h, n * h);
        }
      }
    });
  });
  (void)isa;
  (void)spread;
}

at::Tensor bitmask_in(const at::Tensor& z, const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
                      int64_t h) {
  check_activations(z, "z");
  at::Tensor y;
  with_value_type(values, [&](auto tag) {
    using T = decltype(tag);
    y = in_impl(z, sparse_v<T>(values, mask, offsets, z.size(1), h));
  });
  return y;
}

at::Tensor bitmask_out(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                       const at::Tensor& offsets) {
  check_activations(x, "x");
  const int64_t r = offsets.dim() == 2 ? offsets.size(0) : 0;
  at::Tensor out;
  with_value_type(values, [&](auto tag) {
    using T = decltype(tag);
    out = out_impl(x, sparse_v<T>(values, mask, offsets, r, x.size(1)));
  });
  return out;
}

void bitmask_expand(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
                    const at::Tensor& out) {
  check_activations(out, "out");
  with_value_type(values, [&](auto tag) {
    using T = decltype(tag);
    expand_impl(out, sparse_v<T>(values, mask, offsets, out.size(0), out.size(1)));
  });
}

at::Tensor bitmask_in_q(const at::Tensor& z, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t bits, int64_t group, int64_t n, const at::Tensor& mask,
                        const at::Tensor& offsets, int64_t h) {
  check_activations(z, "z");
  at::Tensor y;
  with_code_type(bits, [&](auto tag) {
    using T = decltype(tag);
    y = in_impl(z, sparse_qv<T>(codes, scales, zeros, group, n, mask, offsets, z.size(1), h));
  });
  return y;
}

at::Tensor bitmask_out_q(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group, int64_t n, const at::Tensor& mask,
                         const at::Tensor& offsets) {
  check_activations(x, "x");
  const int64_t r = offsets.dim() == 2 ? offsets.size(0) : 0;
  at::Tensor out;
  with_code_type(bits, [&](auto tag) {
    using T = decltype(tag);
    out = out_impl(x, sparse_qv<T>(codes, scales, zeros, group, n, mask, offsets, r, x.size(1)));
  });
  return out;
}

void bitmask_expand_q(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                      int64_t group, int64_t n, const at::Tensor& mask, const at::Tensor& offsets,
                      const at::Tensor& out) {
  check_activations(out, "out");
  with_code_type(bits, [&](auto tag) {
    using T = decltype(tag);
    expand_impl(out, sparse_qv<T>(codes, scales, zeros, group, n, mask, offsets, out.size(0), out.size(1)));
  });
}

}  // namespace

TORCH_LIBRARY(layershare, m) {
  m.def("bitmask_in(Tensor z, Tensor values, Tensor mask, Tensor offsets, int h) -> Tensor");
  m.def("bitmask_out(Tensor x, Tensor values, Tensor mask, Tensor offsets) -> Tensor");
  m.def("bitmask_expand(Tensor values, Tensor mask, Tensor offsets, Tensor(a!) out) -> ()");
  m.def("bitmask_in_q(Tensor z, Tensor codes, Tensor scales, Tensor zeros, int bits, int group, int n, Tensor mask, "
        "Tensor offsets, int h) -> Tensor");
  m.def("bitmask_out_q(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int bits, int group, int n, Tensor mask, "
        "Tensor offsets) -> Tensor");
  m.def("bitmask_expand_q(Tensor codes, Tensor scales, Tensor zeros, int bits, int group, int n, Tensor mask, "
        "Tensor offsets, Tensor(a!) out) -> ()");
  m.def("bitmask_isa(str? use=None) -> str", &bitmask_isa);
  m.def("bitmask_spread(str? use=None) -> str", &bitmask_spread);
  m.def("bitmask_amx(str? use=None) -> str", &bitmask_amx);
}

TORCH_LIBRARY_IMPL(layershare, CPU, m) {
  m.impl("bitmask_in", &bitmask_in);
  m.impl("bitmask_out", &bitmask_out);
  m.impl("bitmask_expand", &bitmask_expand);
  m.impl("bitmask_in_q", &bitmask_in_q);
  m.impl("bitmask_out_q", &bitmask_out_q);
  m.impl("bitmask_expand_q", &bitmask_expand_q);
}
