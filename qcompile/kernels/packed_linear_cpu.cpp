// y = x @ W^T for a weight packed by qcompile.primitives.pack_codes, on the CPU, streaming the packed
// bytes once (the decode step is memory-bound: fewer bytes read is the whole speed-up).
//
// Layout (the folded graph's, shared with ONNX): codes uint8 [N, row_bytes]; row n holds the K codes of
// output n, 8 / WIDTH codes per byte, low bits first, each stored unsigned (code - qmin). scale float32
// [N | 1, G]; zero_offset uint8 [N | 1, G] = zero_point - qmin; w[n, k] = (u[n, k] - zero_offset[n, g]) *
// scale[n, g] with g = k / group_size (group_size = K for one group per row).
//
// A 64-byte chunk of a row is read as 16 32-bit lanes; lane i holds the FIELDS = 32 / WIDTH codes
// i * FIELDS .. i * FIELDS + FIELDS - 1 of the chunk, and field f of every lane comes out with one shift
// and one mask (8-bit codes: field f is bytes 16 f .. 16 f + 15, widened; see code_of). x is permuted
// once per call ("field-major": position f * 16 + i of a chunk holds code code_of(i, f)) so that each
// field meets its 16 activations with one contiguous load. Per field:
// shift, mask, convert, (code * scale - zero * scale) as one FMA, then one FMA per row of x.
// More than kMaxGemvRows rows of x (a prefill) is compute-bound: the weight is dequantized once, in the
// same permuted order, and handed to BLAS with the permuted x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;
constexpr int kChunkBytes = 64;
constexpr int64_t kMaxGemvRows = 8;

// The code index (within a chunk) that field f of lane i holds: bit fields of 32-bit words for sub-byte
// codes; for bytes, 16 consecutive codes per field (one widening load), so x needs no permutation.
template <int WIDTH>
constexpr int64_t code_of(int64_t lane, int64_t field) {
  return WIDTH == 8 ? field * kLanes + lane : lane * (32 / WIDTH) + field;
}

#if defined(__AVX512F__)
struct Lanes {
  __m512 v;
  static Lanes zero() { return {_mm512_setzero_ps()}; }
  static Lanes broadcast(float a) { return {_mm512_set1_ps(a)}; }
  static Lanes load(const float* x) { return {_mm512_loadu_ps(x)}; }
  void store(float* out) const { _mm512_storeu_ps(out, v); }
  // Per-lane values of consecutive groups: lane i gets values[group_of_lane[i]], reading n values.
  static Lanes gather_groups(const float* values, const int32_t* group_of_lane, int n) {
    const __m512 loaded = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), values);
    return {_mm512_permutexvar_ps(_mm512_loadu_si512(group_of_lane), loaded)};
  }
  static Lanes gather_groups(const uint8_t* values, const int32_t* group_of_lane, int n) {
    const __m128i loaded = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), values);
    const __m512 as_float = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(loaded));
    return {_mm512_permutexvar_ps(_mm512_loadu_si512(group_of_lane), as_float)};
  }
  Lanes fma(const Lanes& a, const Lanes& b) const { return {_mm512_fmadd_ps(a.v, b.v, v)}; }  // this + a * b
  Lanes operator*(const Lanes& a) const { return {_mm512_mul_ps(v, a.v)}; }
  Lanes operator+(const Lanes& a) const { return {_mm512_add_ps(v, a.v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
};

struct Words {  // the 16 32-bit lanes of a chunk
  __m512i v;
  const uint8_t* bytes;
  static Words load(const uint8_t* bytes) { return {_mm512_loadu_si512(bytes), bytes}; }
  template <int WIDTH, int FIELD>
  Lanes field() const {
    if constexpr (WIDTH == 8)  // bytes 16 * FIELD .. + 15, widened (see code_of)
      return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + FIELD * kLanes))))};
    const __m512i shifted = FIELD == 0 ? v : _mm512_srli_epi32(v, FIELD * WIDTH);
    const __m512i masked = FIELD == 32 / WIDTH - 1 ? shifted : _mm512_and_si512(shifted, _mm512_set1_epi32((1 << WIDTH) - 1));
    return {_mm512_cvtepi32_ps(masked)};
  }
};
#else
struct Lanes {
  float v[kLanes];
  static Lanes zero() { return broadcast(0.f); }
  static Lanes broadcast(float a) { Lanes r; for (int i = 0; i < kLanes; ++i) r.v[i] = a; return r; }
  static Lanes load(const float* x) { Lanes r; std::memcpy(r.v, x, sizeof(r.v)); return r; }
  void store(float* out) const { std::memcpy(out, v, sizeof(v)); }
  template <typename T>
  static Lanes gather_groups(const T* values, const int32_t* group_of_lane, int) {
    Lanes r; for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<float>(values[group_of_lane[i]]); return r;
  }
  Lanes fma(const Lanes& a, const Lanes& b) const { Lanes r; for (int i = 0; i < kLanes; ++i) r.v[i] = v[i] + a.v[i] * b.v[i]; return r; }
  Lanes operator*(const Lanes& a) const { Lanes r; for (int i = 0; i < kLanes; ++i) r.v[i] = v[i] * a.v[i]; return r; }
  Lanes operator+(const Lanes& a) const { Lanes r; for (int i = 0; i < kLanes; ++i) r.v[i] = v[i] + a.v[i]; return r; }
  float sum() const { float s = 0.f; for (int i = 0; i < kLanes; ++i) s += v[i]; return s; }
};

struct Words {
  uint32_t v[kLanes];
  const uint8_t* bytes;
  static Words load(const uint8_t* bytes) { Words w; std::memcpy(w.v, bytes, sizeof(w.v)); w.bytes = bytes; return w; }
  template <int WIDTH, int FIELD>
  Lanes field() const {
    Lanes r;
    if constexpr (WIDTH == 8) {
      for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<float>(bytes[FIELD * kLanes + i]);
      return r;
    }
    for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<float>((v[i] >> (FIELD * WIDTH)) & ((1u << WIDTH) - 1));
    return r;
  }
};
#endif

struct Weights {
  const uint8_t* packed;      // [N, row_bytes]
  int64_t row_bytes;
  const float* scale;         // [N | 1, G]
  const uint8_t* zero_offset; // [N | 1, G]
  int64_t scale_row_stride;   // G, or 0 when one row of scales serves all outputs
  int64_t k;
  int64_t group_size;
  int32_t group_of_lane[kLanes];  // lane -> group within a chunk (all 0 when a group spans whole chunks)
  int groups_per_chunk;           // 1 when a group spans whole chunks
  int64_t chunks_per_group;       // 1 when a chunk holds several groups

  // Scale and -zero * scale of every lane of a chunk of row n whose first code is in group g.
  std::pair<Lanes, Lanes> affine(int64_t n, int64_t g) const {
    const float* s = scale + n * scale_row_stride + g;
    const uint8_t* z = zero_offset + n * scale_row_stride + g;
    if (groups_per_chunk == 1) return {Lanes::broadcast(*s), Lanes::broadcast(-static_cast<float>(*z) * *s)};
    const Lanes scale_lanes = Lanes::gather_groups(s, group_of_lane, groups_per_chunk);
    return {scale_lanes, Lanes::broadcast(-1.f) * Lanes::gather_groups(z, group_of_lane, groups_per_chunk) * scale_lanes};
  }

  // Moves (group, chunk within group) on by one chunk: no division in the inner loop.
  void next_chunk(int64_t& g, int64_t& in_group) const {
    if (++in_group == chunks_per_group) {
      in_group = 0;
      g += groups_per_chunk;
    }
  }

  // The dequantized codes of a partial last chunk, by code index within the row.
  template <int WIDTH>
  float tail_weight(int64_t n, int64_t e) const {
    const int64_t g = e / group_size;
    const int code = (packed[n * row_bytes + e / (8 / WIDTH)] >> ((e % (8 / WIDTH)) * WIDTH)) & ((1 << WIDTH) - 1);
    return (static_cast<float>(code) - zero_offset[n * scale_row_stride + g]) * scale[n * scale_row_stride + g];
  }
};

// Rows m0 .. m0 + MR of x against outputs [n_begin, n_end). x_perm: [M, k_pad] field-major; x: [M, K].
// CHAINS accumulators per row of x (fields are spread over them) hide the FMA latency.
template <int WIDTH, int MR>
void gemv_rows(const Weights& w, const float* x_perm, const float* x, int64_t k_pad, int64_t m0, int64_t n_begin,
               int64_t n_end, float* out, int64_t n_out) {
  constexpr int FIELDS = 32 / WIDTH;
  constexpr int CHUNK_CODES = kLanes * FIELDS;
  constexpr int CHAINS = std::max(1, std::min(FIELDS, 8 / MR));
  const int64_t full_chunks = w.row_bytes / kChunkBytes;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w.packed + n * w.row_bytes;
    Lanes acc[MR][CHAINS];
    for (auto& per_row : acc)
      for (auto& chain : per_row) chain = Lanes::zero();
    for (int64_t c = 0, g = 0, in_group = 0; c < full_chunks; ++c, w.next_chunk(g, in_group)) {
      const auto [scale, offset] = w.affine(n, g);
      const Words words = Words::load(row + c * kChunkBytes);
      [&]<int... F>(std::integer_sequence<int, F...>) {
        ([&] {
          const Lanes weight = offset.fma(words.template field<WIDTH, F>(), scale);
          for (int m = 0; m < MR; ++m)
            acc[m][F % CHAINS] = acc[m][F % CHAINS].fma(weight, Lanes::load(x_perm + (m0 + m) * k_pad + c * CHUNK_CODES + F * kLanes));
        }(), ...);
      }(std::make_integer_sequence<int, FIELDS>{});
    }
    for (int m = 0; m < MR; ++m) {
      Lanes total = acc[m][0];
      for (int j = 1; j < CHAINS; ++j) total = total + acc[m][j];
      float y = total.sum();
      for (int64_t e = full_chunks * CHUNK_CODES; e < w.k; ++e) y += w.tail_weight<WIDTH>(n, e) * x[(m0 + m) * w.k + e];
      out[(m0 + m) * n_out + n] = y;
    }
  }
}

template <int WIDTH>
void gemv(const Weights& w, const float* x_perm, const float* x, int64_t k_pad, int64_t m, float* out, int64_t n_out) {
  const int64_t grain = std::max<int64_t>(16, n_out / (4 * at::get_num_threads()));
  at::parallel_for(0, n_out, grain, [&](int64_t n_begin, int64_t n_end) {
    int64_t m0 = 0;
    for (; m0 + 4 <= m; m0 += 4) gemv_rows<WIDTH, 4>(w, x_perm, x, k_pad, m0, n_begin, n_end, out, n_out);
    for (; m0 + 2 <= m; m0 += 2) gemv_rows<WIDTH, 2>(w, x_perm, x, k_pad, m0, n_begin, n_end, out, n_out);
    for (; m0 < m; ++m0) gemv_rows<WIDTH, 1>(w, x_perm, x, k_pad, m0, n_begin, n_end, out, n_out);
  });
}

// The weight as float32 [N, k_pad] in the field-major order of permute_fields (zero past K).
template <int WIDTH>
at::Tensor dequantize_permuted(const Weights& w, int64_t n_out, int64_t k_pad) {
  constexpr int FIELDS = 32 / WIDTH;
  constexpr int CHUNK_CODES = kLanes * FIELDS;
  at::Tensor dense = at::zeros({n_out, k_pad}, at::kFloat);
  float* out = dense.data_ptr<float>();
  const int64_t full_chunks = w.row_bytes / kChunkBytes;
  at::parallel_for(0, n_out, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      float* row_out = out + n * k_pad;
      for (int64_t c = 0, g = 0, in_group = 0; c < full_chunks; ++c, w.next_chunk(g, in_group)) {
        const auto [scale, offset] = w.affine(n, g);
        const Words words = Words::load(w.packed + n * w.row_bytes + c * kChunkBytes);
        [&]<int... F>(std::integer_sequence<int, F...>) {
          (offset.fma(words.template field<WIDTH, F>(), scale).store(row_out + c * CHUNK_CODES + F * kLanes), ...);
        }(std::make_integer_sequence<int, FIELDS>{});
      }
      for (int64_t i = 0; i < kLanes; ++i)
        for (int64_t f = 0; f < FIELDS; ++f) {
          const int64_t e = full_chunks * CHUNK_CODES + code_of<WIDTH>(i, f);
          if (e < w.k) row_out[full_chunks * CHUNK_CODES + f * kLanes + i] = w.tail_weight<WIDTH>(n, e);
        }
    }
  });
  return dense;
}

// x [M, K] -> [M, k_pad], zero-padded: within each chunk, code code_of(i, f) moves to f * 16 + i.
template <int WIDTH>
at::Tensor permute_fields(const at::Tensor& x, int64_t k_pad) {
  constexpr int FIELDS = 32 / WIDTH;
  const int64_t rows = x.size(0), k = x.size(1);
  at::Tensor padded = at::zeros({rows, k_pad}, x.options());
  padded.narrow(1, 0, k).copy_(x);
  if (WIDTH == 8) return padded;
  return padded.view({rows, k_pad / (kLanes * FIELDS), kLanes, FIELDS}).transpose(2, 3).contiguous().view({rows, k_pad});
}

// Groups the chunk layout serves: one per row, whole chunks, or (sub-byte codes) whole lanes of a chunk.
bool supports_groups(int64_t width, int64_t n_groups, int64_t group_size) {
  const int64_t fields = 32 / width, chunk_codes = kLanes * fields;
  return n_groups == 1 || group_size % chunk_codes == 0 ||
         (width < 8 && chunk_codes % group_size == 0 && group_size % fields == 0);
}

template <int WIDTH>
at::Tensor run(const at::Tensor& x, const Weights& w, int64_t n_out) {
  constexpr int FIELDS = 32 / WIDTH;
  const int64_t m = x.size(0), chunk_codes = kLanes * FIELDS;
  const int64_t k_pad = (w.k + chunk_codes - 1) / chunk_codes * chunk_codes;
  const at::Tensor x_perm = permute_fields<WIDTH>(x, k_pad);
  if (m > kMaxGemvRows) return at::matmul(x_perm, dequantize_permuted<WIDTH>(w, n_out, k_pad).t());
  at::Tensor out = at::empty({m, n_out}, x.options());
  gemv<WIDTH>(w, x_perm.data_ptr<float>(), x.data_ptr<float>(), k_pad, m, out.data_ptr<float>(), n_out);
  return out;
}

at::Tensor packed_linear(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scale_in,
                         const at::Tensor& zero_offset_in, int64_t width, int64_t group_size) {
  TORCH_CHECK(width == 2 || width == 4 || width == 8, "packed_linear: container width must be 2, 4 or 8, got ", width);
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && zero_offset_in.scalar_type() == at::kByte,
              "packed_linear: packed codes and zero offsets must be uint8");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).to(at::kFloat).contiguous();
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor zero_offset = zero_offset_in.contiguous();
  const int64_t k = x.size(1), n_out = packed.size(0), per_byte = 8 / width, fields = 32 / width;
  const int64_t n_groups = scale.size(1), chunk_codes = kLanes * fields;
  TORCH_CHECK(packed.size(1) == (k + per_byte - 1) / per_byte, "packed_linear: x has ", k,
              " features but the packed rows hold ", packed.size(1) * per_byte);
  TORCH_CHECK(n_groups * group_size == k, "packed_linear: ", n_groups, " groups of ", group_size, " != ", k);
  TORCH_CHECK(supports_groups(width, n_groups, group_size), "packed_linear: group size ", group_size,
              " does not tile ", chunk_codes, "-code chunks");
  Weights w{packed.data_ptr<uint8_t>(), packed.size(1), scale.data_ptr<float>(), zero_offset.data_ptr<uint8_t>(),
            scale.size(0) == 1 ? 0 : n_groups, k, group_size, {}, 1, n_groups == 1 ? INT64_MAX : std::max<int64_t>(1, group_size / chunk_codes)};
  if (n_groups > 1 && group_size < chunk_codes) {
    w.groups_per_chunk = static_cast<int>(chunk_codes / group_size);
    for (int i = 0; i < kLanes; ++i) w.group_of_lane[i] = static_cast<int32_t>(i * fields / group_size);
  }
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = n_out;
  const at::Tensor y = width == 2 ? run<2>(x, w, n_out) : width == 4 ? run<4>(x, w, n_out) : run<8>(x, w, n_out);
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY(qcompile_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero_offset, int width, int group_size) -> Tensor");
  m.def("supports_groups(int width, int n_groups, int group_size) -> bool", &supports_groups);
}

TORCH_LIBRARY_IMPL(qcompile_cpu, CPU, m) {
  m.impl("packed_linear", &packed_linear);
}
