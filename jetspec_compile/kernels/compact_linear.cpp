// Linears whose fp32 weights are stored compactly, without changing a single weight value.
//
// Many fp32 models hold weights that need fewer bits than fp32 gives them: a checkpoint saved in bf16 and loaded
// as fp32 has every weight exactly representable in bf16, and a model dequantized from a 4-bit GGUF file (Q4_1)
// has, in every block of 32 consecutive inputs of an output row, weights equal to scale * code + min with a 4-bit
// code. Few-row GEMMs (decoding, tree verification) are bound by reading the weights, so reading 2 bytes (bf16) or
// 0.75 bytes (4-bit codes plus a scale and a min per block) per weight instead of 4 is what makes them faster.
//
// Each weight is decoded to the very fp32 value the model holds (the Python side checks every weight of a tensor
// before choosing a form) and multiplied in fp32 with fp32 activations, accumulating in fp32: the products are the
// ones an fp32 GEMM forms; only the order of the sum differs, as it does between any two GEMM kernels.
//
// Layouts (T = out_features / 16 tiles of 16 output columns; the 16 lanes of a vector are 16 output columns):
//   q4:   codes uint8 [T, K/2, 16] (byte: low nibble input 2p, high nibble input 2p+1), scales and mins fp32
//         [T, K/32, 16]; weight = scale * code + min, where scale * code is exact in fp32 (checked in Python).
//   bf16: codes int16 [T, K, 16], the upper half of each fp32 weight (the lower half is zero).
//
// Written with GCC/Clang vector extensions, compiled with -march=native: 16-lane vectors are one AVX-512
// register, two AVX2 registers, or four NEON ones.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));

constexpr int64_t LANES = 16;
constexpr int64_t BLOCK = 32;  // inputs per q4 scale / min
constexpr int MAX_MR = 8;      // rows per register block: MR x NT accumulators of 16 lanes

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

// 16 bytes / 16 uint16 widened to 16 int32 lanes (GCC scalarises __builtin_convertvector between element sizes)
inline v16i widen_u8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (v16i)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  v16i out;
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  v16b c;
  std::memcpy(&c, p, sizeof(c));
  return __builtin_convertvector(c, v16i);
#endif
}

inline v16u widen_u16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (v16u)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
  v16u out;
  const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, v16u);
#endif
}

// y[r, tile t] (+)= x[r, :] . W[tile t] for MR rows and NT adjacent tiles, q4 form
template <int MR, int NT>
void q4_block(const float* x, int64_t ldx, const uint8_t* codes, const float* scales, const float* mins,
              int64_t K, float* y, int64_t ldy, const float* bias) {
  const int64_t code_stride = (K / 2) * LANES, scale_stride = (K / BLOCK) * LANES;
  v16f acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = v16f{};
  for (int64_t kb = 0; kb < K / BLOCK; ++kb) {
    v16f d[NT], m[NT];
    for (int t = 0; t < NT; ++t) {
      d[t] = load16(scales + t * scale_stride + kb * LANES);
      m[t] = load16(mins + t * scale_stride + kb * LANES);
    }
    for (int64_t p = 0; p < BLOCK / 2; ++p) {
      const int64_t k = kb * BLOCK + 2 * p;
      v16f w0[NT], w1[NT];
      for (int t = 0; t < NT; ++t) {
        const v16i ci = widen_u8(codes + t * code_stride + (k / 2) * LANES);
        // scale * code is exact, so a fused multiply-add rounds this sum exactly as mul-then-add does
        w0[t] = __builtin_convertvector(ci & 15, v16f) * d[t] + m[t];
        w1[t] = __builtin_convertvector(ci >> 4, v16f) * d[t] + m[t];
      }
      for (int r = 0; r < MR; ++r) {
        const float x0 = x[r * ldx + k], x1 = x[r * ldx + k + 1];
        for (int t = 0; t < NT; ++t) {
          acc[r][t] += x0 * w0[t];
          acc[r][t] += x1 * w1[t];
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t)
      store16(y + r * ldy + t * LANES, bias ? acc[r][t] + load16(bias + t * LANES) : acc[r][t]);
}

template <int MR, int NT>
void bf16_block(const float* x, int64_t ldx, const uint16_t* codes, int64_t K, float* y, int64_t ldy,
                const float* bias) {
  const int64_t code_stride = K * LANES;
  v16f acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = v16f{};
  for (int64_t k = 0; k < K; ++k) {
    v16f w[NT];
    for (int t = 0; t < NT; ++t) {
      const v16u u = widen_u16(codes + t * code_stride + k * LANES) << 16;
      std::memcpy(&w[t], &u, sizeof(u));
    }
    for (int r = 0; r < MR; ++r) {
      const float xk = x[r * ldx + k];
      for (int t = 0; t < NT; ++t) acc[r][t] += xk * w[t];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t)
      store16(y + r * ldy + t * LANES, bias ? acc[r][t] + load16(bias + t * LANES) : acc[r][t]);
}

// One call per (row block, tile pair): MR and NT are template arguments so the accumulators stay in registers.
struct Q4 {
  const uint8_t* codes;
  const float* scales;
  const float* mins;
  template <int MR, int NT>
  void run(const float* x, int64_t ldx, int64_t tile, int64_t K, float* y, int64_t ldy, const float* bias) const {
    q4_block<MR, NT>(x, ldx, codes + tile * (K / 2) * LANES, scales + tile * (K / BLOCK) * LANES,
                     mins + tile * (K / BLOCK) * LANES, K, y, ldy, bias);
  }
};

struct BF16 {
  const uint16_t* codes;
  template <int MR, int NT>
  void run(const float* x, int64_t ldx, int64_t tile, int64_t K, float* y, int64_t ldy, const float* bias) const {
    bf16_block<MR, NT>(x, ldx, codes + tile * K * LANES, K, y, ldy, bias);
  }
};

template <typename Form, int NT>
void dispatch_rows(const Form& form, int mr, const float* x, int64_t ldx, int64_t tile, int64_t K, float* y,
                   int64_t ldy, const float* bias) {
  switch (mr) {
    case 1: form.template run<1, NT>(x, ldx, tile, K, y, ldy, bias); break;
    case 2: form.template run<2, NT>(x, ldx, tile, K, y, ldy, bias); break;
    case 3: form.template run<3, NT>(x, ldx, tile, K, y, ldy, bias); break;
    case 4: form.template run<4, NT>(x, ldx, tile, K, y, ldy, bias); break;
    case 5: form.template run<5, NT>(x, ldx, tile, K, y, ldy, bias); break;
    case 6: form.template run<6, NT>(x, ldx, tile, K, y, ldy, bias); break;
    case 7: form.template run<7, NT>(x, ldx, tile, K, y, ldy, bias); break;
    default: form.template run<8, NT>(x, ldx, tile, K, y, ldy, bias); break;
  }
}

template <typename Form>
at::Tensor compact_linear(const Form& form, const at::Tensor& input, int64_t out_features,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dtype() == at::kFloat && input.device().is_cpu(),
              "compact_linear: the input must be an fp32 CPU tensor, got ", input.dtype(), " on ", input.device());
  const int64_t K = input.size(-1);
  const at::Tensor x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), tiles = out_features / LANES;
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, input.options());
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == out_features, "compact_linear: bias has ", bias_c.numel(), " values, expected ",
                out_features);
    b = bias_c.data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t pairs = (tiles + 1) / 2;
  // every weight byte is read once per call: threads split the tiles, each runs all rows over its tiles
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t tile = 2 * pair;
      const int nt = tile + 1 < tiles ? 2 : 1;
      for (int64_t r0 = 0; r0 < M; r0 += MAX_MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MAX_MR, M - r0));
        const float* xr = xp + r0 * K;
        float* yr = yp + r0 * out_features + tile * LANES;
        const float* br = b ? b + tile * LANES : nullptr;
        if (nt == 2)
          dispatch_rows<Form, 2>(form, mr, xr, K, tile, K, yr, out_features, br);
        else
          dispatch_rows<Form, 1>(form, mr, xr, K, tile, K, yr, out_features, br);
      }
    }
  });
  return out;
}

at::Tensor linear_q4(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == LANES && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "linear_q4: codes must be contiguous uint8 [out/16, in/2, 16]");
  const int64_t tiles = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(input.size(-1) == K && K % BLOCK == 0, "linear_q4: input has ", input.size(-1), " features, the ",
              "weight ", K, " (a multiple of ", BLOCK, ")");
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.scalar_type() == at::kFloat &&
                  mins.scalar_type() == at::kFloat && scales.numel() == tiles * (K / BLOCK) * LANES &&
                  mins.numel() == scales.numel(),
              "linear_q4: scales and mins must be contiguous fp32 [out/16, in/32, 16]");
  const Q4 form{codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>()};
  return compact_linear(form, input, tiles * LANES, bias);
}

at::Tensor linear_bf16w(const at::Tensor& input, const at::Tensor& codes, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == LANES && codes.scalar_type() == at::kShort && codes.is_contiguous(),
              "linear_bf16w: codes must be contiguous int16 [out/16, in, 16]");
  TORCH_CHECK(input.size(-1) == codes.size(1), "linear_bf16w: input has ", input.size(-1), " features, the weight ",
              codes.size(1));
  const BF16 form{reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>())};
  return compact_linear(form, input, codes.size(0) * LANES, bias);
}

}  // namespace

TORCH_LIBRARY(jetspec_cpu, m) {
  m.def("linear_q4(Tensor input, Tensor codes, Tensor scales, Tensor mins, Tensor? bias) -> Tensor");
  m.def("linear_bf16w(Tensor input, Tensor codes, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(jetspec_cpu, CPU, m) {
  m.impl("linear_q4", &linear_q4);
  m.impl("linear_bf16w", &linear_bf16w);
}
