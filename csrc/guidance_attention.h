// Argument checks, shapes and band arithmetic of guidance_attention shared by the CPU and CUDA
// implementations. The Python layer raises friendly ValueErrors first; these checks guard direct calls
// of torch.ops.stepfusion.guidance_attention so that no kernel ever reads out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace stepfusion {

struct GuidanceAttentionShape {
  int64_t batch;
  int64_t heads;
  int64_t len_q;
  int64_t len_k;
  int64_t globals;  // G, 0 when k_global/v_global are absent
  int64_t head_dim;
};

inline void check_guidance_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "guidance_attention: ", name, " must have shape (B, H, L, Dh), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "guidance_attention: ", name, " must have dtype ",
              q.scalar_type(), " like q, got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "guidance_attention: ", name, " must be on ", q.device(), " like q, got ",
              t.device());
  TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(3) == q.size(3), "guidance_attention: ",
              name, " must have batch, heads and head dim (", q.size(0), ", ", q.size(1), ", ", q.size(3),
              ") like q, got ", t.sizes());
}

inline GuidanceAttentionShape check_guidance_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const std::optional<at::Tensor>& k_global,
                                                       const std::optional<at::Tensor>& v_global, int64_t window) {
  TORCH_CHECK(q.dim() == 4, "guidance_attention: q must have shape (B, H, Lq, Dh), got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "guidance_attention: q must be floating point, got ",
              q.scalar_type());
  check_guidance_operand(k, "k", q);
  check_guidance_operand(v, "v", q);
  TORCH_CHECK(v.size(2) == k.size(2), "guidance_attention: v must have Lk = ", k.size(2), " keys like k, got ",
              v.sizes());
  TORCH_CHECK(k_global.has_value() == v_global.has_value(),
              "guidance_attention: k_global and v_global must be given together");
  int64_t globals = 0;
  if (k_global.has_value()) {
    check_guidance_operand(*k_global, "k_global", q);
    check_guidance_operand(*v_global, "v_global", q);
    TORCH_CHECK(v_global->size(2) == k_global->size(2), "guidance_attention: v_global must have G = ",
                k_global->size(2), " tokens like k_global, got ", v_global->sizes());
    globals = k_global->size(2);
  }
  TORCH_CHECK(window >= -1, "guidance_attention: window must be -1 (all keys) or >= 0, got ", window);
  const GuidanceAttentionShape shape{q.size(0), q.size(1), q.size(2), k.size(2), globals, q.size(3)};
  TORCH_CHECK(shape.len_k > 0 || shape.globals > 0 || shape.len_q == 0 || shape.batch * shape.heads == 0,
              "guidance_attention: k must have Lk >= 1 keys (or global tokens must be given), got Lk = 0");
  return shape;
}

// Key position aligned with query i: c_i = ((2 i + 1) Lk) // (2 Lq); c_i = i when Lq == Lk.
inline int64_t guidance_center(int64_t i, int64_t len_q, int64_t len_k) {
  return ((2 * i + 1) * len_k) / (2 * len_q);
}

// The dtype of lse: float32, float64 for float64 inputs.
inline at::ScalarType guidance_lse_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks of the saved forward results and grad_out passed to guidance_attention_backward.
inline GuidanceAttentionShape check_guidance_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& k_global, const std::optional<at::Tensor>& v_global, const at::Tensor& out,
    const at::Tensor& lse, int64_t window) {
  const GuidanceAttentionShape shape = check_guidance_attention(q, k, v, k_global, v_global, window);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.device() == q.device(),
              "guidance_attention_backward: grad_out must match q in shape, dtype and device, got ", grad_out.sizes(),
              " ", grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
              "guidance_attention_backward: out must match q in shape, dtype and device, got ", out.sizes(), " ",
              out.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == shape.batch && lse.size(1) == shape.heads &&
                  lse.size(2) == shape.len_q && lse.scalar_type() == guidance_lse_type(q.scalar_type()) &&
                  lse.device() == q.device(),
              "guidance_attention_backward: lse must be (B, H, Lq) = (", shape.batch, ", ", shape.heads, ", ",
              shape.len_q, ") of dtype ", guidance_lse_type(q.scalar_type()), ", got ", lse.sizes(), " ",
              lse.scalar_type());
  return shape;
}

// The keys [first, last] that queries [q_begin, q_end) may see (c_i is non-decreasing in i).
struct KeyRange {
  int64_t first;
  int64_t last;  // inclusive; last < first when the range is empty
};

inline KeyRange guidance_key_range(int64_t q_begin, int64_t q_end, int64_t len_q, int64_t len_k, int64_t window) {
  if (window < 0) return {0, len_k - 1};
  const int64_t lo = guidance_center(q_begin, len_q, len_k) - window;
  const int64_t hi = guidance_center(q_end - 1, len_q, len_k) + window;
  return {std::max<int64_t>(lo, 0), std::min<int64_t>(hi, len_k - 1)};
}

// The queries [first, last] that see at least one key of [k_begin, k_end): the inverse of the band.
// c_i is non-decreasing, so the set is an interval. With floor(x / n) >= a <=> x >= a n:
//   c_i + w >= k_begin   <=> (2 i + 1) Lk >= 2 Lq (k_begin - w)
//   c_i - w <= k_end - 1 <=> (2 i + 1) Lk <= 2 Lq (k_end + w) - 1
inline KeyRange guidance_query_range(int64_t k_begin, int64_t k_end, int64_t len_q, int64_t len_k, int64_t window) {
  if (window < 0) return {0, len_q - 1};
  const int64_t lower = 2 * len_q * (k_begin - window);
  const int64_t first = lower <= 0 ? 0 : ((lower + len_k - 1) / len_k) / 2;
  const int64_t upper = (2 * len_q * (k_end + window) - 1) / len_k;
  const int64_t last = upper >= 1 ? (upper - 1) / 2 : -1;  // C division truncates: keep it non-negative
  return {first, std::min<int64_t>(last, len_q - 1)};
}

// A contiguous copy of an optional argument (or an undefined tensor when it is absent).
inline at::Tensor guidance_contiguous_or_undefined(const std::optional<at::Tensor>& arg) {
  return arg.has_value() ? arg->contiguous() : at::Tensor();
}

}  // namespace stepfusion
