// The block-sparse prompt attention of block_sparse.py in one CPU kernel: each query block of a streaming
// query head reads its listed key blocks (the picked ones whole; the sinks' and window's blocks masked per
// key) with an online softmax, on oneDNN's batch-reduce GEMM (AMX tiles in bfloat16 where the CPU has them).
// The keys and values are packed once per call, so a 64-query block costs what a long causal call costs per
// key pair; SDPA's flash kernel, called per query block, costs 3x that (bench/kv_cpu_attention_kernels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t BLK = 64;    // tokens per block, block_sparse.BLOCK
constexpr int64_t STEP = 8;    // key blocks per softmax step: a [64, 512] score tile stays in L2

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& heads, const at::Tensor& kpack, const at::Tensor& vpack,
            const at::Tensor& table, int64_t n_open, int64_t q0, int64_t sink, int64_t window, float scale,
            at::Tensor& out) {
  constexpr bool vnni = std::is_same_v<T, at::BFloat16>;
  const int64_t B = q.size(0), M = q.size(2), d = q.size(3), HS = heads.size(0);
  const int64_t H = table.size(0), NQ = table.size(1), L = table.size(2);
  const int64_t NB = kpack.size(1), g = HS / (kpack.size(0) / B);
  const T* qd = q.data_ptr<T>();
  const T* kd = kpack.data_ptr<T>();
  const T* vd = vpack.data_ptr<T>();
  const int64_t* hd = heads.data_ptr<int64_t>();
  const int32_t* td = table.data_ptr<int32_t>();
  T* od = out.data_ptr<T>();
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, H * NQ, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BLK * STEP * BLK), O(BLK * d), row_max(BLK), row_sum(BLK);
    std::vector<T> P(vnni ? BLK * STEP * BLK : 0), Q(BLK * d);
    for (int64_t item = begin; item < end; ++item) {
      // Kernel head h: batch row h / HS, query head heads[h % HS], KV head (h % HS) / g of that row.
      const int64_t h = item / NQ, qb = item % NQ, t0 = q0 + qb * BLK, rows = std::min(BLK, M - t0);
      const int64_t bi = h / HS, head = hd[h % HS], kvh = h / HS * (HS / g) + h % HS / g;
      const T* qt = qd + bi * q.stride(0) + head * q.stride(1) + t0 * q.stride(2);
      int64_t ld_q = q.stride(2);
      if (rows < BLK) {  // the ragged last block: its rows, then zeros
        std::fill(Q.begin(), Q.end(), T(0.f));
        for (int64_t r = 0; r < rows; ++r) std::copy(qt + r * ld_q, qt + r * ld_q + d, Q.data() + r * d);
        qt = Q.data();
        ld_q = d;
      }
      const int32_t* row = td + item * L;
      std::fill(row_max.begin(), row_max.end(), ninf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(O.begin(), O.end(), 0.f);
      for (int64_t c0 = 0; c0 < L; c0 += STEP) {
        int64_t ids[STEP];
        bool masked[STEP];
        int64_t nc = 0;
        for (int64_t i = c0; i < std::min(L, c0 + STEP); ++i) {
          if (row[i] < 0) continue;  // padding of the table
          ids[nc] = row[i];
          masked[nc++] = i >= n_open;
        }
        if (!nc) continue;
        const int64_t W = nc * BLK;
        for (int64_t i = 0; i < nc; ++i)
          at::native::cpublas::brgemm(BLK, BLK, d, ld_q, BLK, W, false, qt, kd + (kvh * NB + ids[i]) * d * BLK,
                                      S.data() + i * BLK, vnni);
        for (int64_t r = 0; r < BLK; ++r) {  // the raw scores; `scale` (> 0) enters with the exponent
          float* s = S.data() + r * W;
          const int64_t t = t0 + r;
          for (int64_t i = 0; i < nc; ++i) {
            if (!masked[i]) continue;
            float* sb = s + i * BLK;  // visible: the sinks [0, sink) and the window (t - window, t]
            const int64_t j0 = ids[i] * BLK;
            const int64_t open_sink = std::clamp<int64_t>(sink - j0, 0, BLK);
            const int64_t lo = std::clamp<int64_t>(t - window + 1 - j0, 0, BLK);
            const int64_t hi = std::clamp<int64_t>(t + 1 - j0, 0, BLK);
            if (lo > open_sink) std::fill(sb + open_sink, sb + lo, ninf);
            if (hi < BLK) std::fill(sb + std::max(hi, open_sink), sb + BLK, ninf);
          }
          const float m = std::max(row_max[r], at::vec::reduce_all<float>(
              [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, W));
          float alpha = 1.f, total = 0.f;
          if (m == ninf) {  // nothing visible yet: the row's weights are all zero
            std::fill(s, s + W, 0.f);
          } else {
            const Vec vs(scale), vms(-m * scale);
            Vec acc(0.f);
            int64_t c = 0;
            for (; c + Vec::size() <= W; c += Vec::size()) {
              Vec e = at::vec::fmadd(Vec::loadu(s + c), vs, vms).exp_u20();
              acc = acc + e;
              e.store(s + c);
            }
            total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
            for (; c < W; ++c) total += (s[c] = std::exp(s[c] * scale - m * scale));
            alpha = std::exp((row_max[r] - m) * scale);
            row_max[r] = m;
          }
          row_sum[r] = row_sum[r] * alpha + total;
          at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, O.data() + r * d, O.data() + r * d, d);
          if constexpr (vnni) at::vec::convert(s, P.data() + r * W, W);
        }
        const T* p = vnni ? reinterpret_cast<const T*>(P.data()) : reinterpret_cast<const T*>(S.data());
        for (int64_t i = 0; i < nc; ++i)
          at::native::cpublas::brgemm(BLK, d, BLK, W, d, d, true, p + i * BLK, vd + (kvh * NB + ids[i]) * BLK * d,
                                      O.data(), vnni);
      }
      T* ot = od + bi * out.stride(0) + head * out.stride(1) + t0 * out.stride(2);
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = row_sum[r] > 0 ? 1.f / row_sum[r] : 0.f;
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, O.data() + r * d, O.data() + r * d, d);
        at::vec::convert(O.data() + r * d, ot + r * out.stride(2), d);
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

}  // namespace

// q, out [B, Hq, M, d] (any strides, d contiguous); heads [HS] int64: the query heads of q that attend, KV head by
// KV head; kpack [B * KV, NB, d * 64] (per block: K^T, VNNI-packed in bfloat16); vpack [B * KV, NB, 64 * d] (per
// block: V, VNNI-packed in bfloat16); table [B * HS, NQ, L] int32: key blocks per query block, -1 for none, the
// first n_open wholly visible. Query block qb holds positions q0 + 64 qb ... (those below M); each query's output
// is written into `out` at its head and position.
void block_sparse_attention(const at::Tensor& q, const at::Tensor& heads, const at::Tensor& kpack,
                            const at::Tensor& vpack, const at::Tensor& table, int64_t n_open, int64_t q0, int64_t sink,
                            int64_t window, double scale, at::Tensor out) {
  TORCH_CHECK(scale > 0, "block_sparse_attention: the softmax scale must be positive");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1 && out.sizes() == q.sizes() && out.stride(3) == 1);
  TORCH_CHECK(kpack.is_contiguous() && vpack.is_contiguous() && table.is_contiguous() && heads.is_contiguous());
  TORCH_CHECK(q.scalar_type() == kpack.scalar_type() && q.scalar_type() == vpack.scalar_type() &&
              q.scalar_type() == out.scalar_type());
  TORCH_CHECK(table.scalar_type() == at::kInt && heads.scalar_type() == at::kLong &&
              table.size(0) == q.size(0) * heads.size(0) && q0 + table.size(1) * BLK >= q.size(2));
  if (q.scalar_type() == at::kBFloat16)
    attend<at::BFloat16>(q, heads, kpack, vpack, table, n_open, q0, sink, window, static_cast<float>(scale), out);
  else if (q.scalar_type() == at::kFloat)
    attend<float>(q, heads, kpack, vpack, table, n_open, q0, sink, window, static_cast<float>(scale), out);
  else
    TORCH_CHECK(false, "block_sparse_attention: float32 or bfloat16");
}

bool packs_bfloat16() { return at::native::cpublas::could_pack(at::kBFloat16); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_attention", &block_sparse_attention);
  m.def("packs_bfloat16", &packs_bfloat16);
}
