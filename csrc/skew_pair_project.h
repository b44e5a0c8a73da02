// Argument checks and shapes of skew_pair_project shared by the CPU and CUDA implementations.
// The Python layer raises friendly ValueErrors first; these checks guard direct calls of
// torch.ops.stepfusion.skew_pair_project so that no kernel ever reads out of bounds (the pair
// indices are range-checked here, which costs one small device-to-host copy when they are on the GPU:
// pairs may stay on the CPU, a few integers, to spare every call that synchronisation).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace stepfusion {

struct SkewPairProjectShape {
  int64_t layers_a;      // LA
  int64_t layers_b;      // LB
  int64_t samples;       // N
  int64_t in_features;   // E
  int64_t out_features;  // F
  int64_t pairs;         // P
  bool per_pair;         // weights (P, F, E) and biases (P, F) instead of (F, E) and (F,)
};

inline void check_like_ha(const at::Tensor& t, const char* name, const at::Tensor& ha) {
  TORCH_CHECK(t.scalar_type() == ha.scalar_type(), "skew_pair_project: ", name, " must have dtype ",
              ha.scalar_type(), " like ha, got ", t.scalar_type());
  TORCH_CHECK(t.device() == ha.device(), "skew_pair_project: ", name, " must be on ", ha.device(),
              " like ha, got ", t.device());
}

inline void check_weight(const at::Tensor& weight, const char* name, const at::Tensor& ha,
                         const SkewPairProjectShape& shape) {
  check_like_ha(weight, name, ha);
  if (shape.per_pair) {
    TORCH_CHECK(weight.dim() == 3 && weight.size(0) == shape.pairs && weight.size(1) == shape.out_features &&
                    weight.size(2) == shape.in_features,
                "skew_pair_project: ", name, " must have shape (P, F, E) = (", shape.pairs, ", ",
                shape.out_features, ", ", shape.in_features, "), got ", weight.sizes());
  } else {
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == shape.out_features && weight.size(1) == shape.in_features,
                "skew_pair_project: ", name, " must have shape (F, E) = (", shape.out_features, ", ",
                shape.in_features, "), got ", weight.sizes());
  }
}

inline void check_bias(const std::optional<at::Tensor>& bias, const char* name, const at::Tensor& ha,
                       const SkewPairProjectShape& shape) {
  if (!bias.has_value()) return;
  check_like_ha(*bias, name, ha);
  if (shape.per_pair) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == shape.pairs && bias->size(1) == shape.out_features,
                "skew_pair_project: ", name, " must have shape (P, F) = (", shape.pairs, ", ", shape.out_features,
                "), got ", bias->sizes());
  } else {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == shape.out_features, "skew_pair_project: ", name,
                " must have shape (F,) = (", shape.out_features, ",), got ", bias->sizes());
  }
}

inline SkewPairProjectShape check_skew_pair_project(const at::Tensor& ha, const at::Tensor& hb,
                                                    const at::Tensor& pairs, const at::Tensor& weight_a,
                                                    const std::optional<at::Tensor>& bias_a,
                                                    const std::optional<at::Tensor>& weight_b,
                                                    const std::optional<at::Tensor>& bias_b) {
  TORCH_CHECK(ha.dim() == 3, "skew_pair_project: ha must have shape (LA, N, E), got ", ha.sizes());
  TORCH_CHECK(hb.dim() == 3, "skew_pair_project: hb must have shape (LB, N, E), got ", hb.sizes());
  TORCH_CHECK(hb.size(1) == ha.size(1) && hb.size(2) == ha.size(2),
              "skew_pair_project: hb must have shape (LB, N, E) with N and E of ha (", ha.size(1), ", ",
              ha.size(2), "), got ", hb.sizes());
  check_like_ha(hb, "hb", ha);
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 2, "skew_pair_project: pairs must have shape (P, 2), got ",
              pairs.sizes());
  TORCH_CHECK(pairs.scalar_type() == at::kLong, "skew_pair_project: pairs must be int64, got ",
              pairs.scalar_type());
  TORCH_CHECK(pairs.device() == ha.device() || pairs.is_cpu(), "skew_pair_project: pairs must be on ", ha.device(),
              " like ha, or on the CPU, got ", pairs.device());
  TORCH_CHECK(weight_a.dim() == 2 || weight_a.dim() == 3,
              "skew_pair_project: weight_a must have shape (F, E) or (P, F, E), got ", weight_a.sizes());
  SkewPairProjectShape shape{ha.size(0), hb.size(0), ha.size(1), ha.size(2),
                             weight_a.size(weight_a.dim() - 2), pairs.size(0), weight_a.dim() == 3};
  check_weight(weight_a, "weight_a", ha, shape);
  check_bias(bias_a, "bias_a", ha, shape);
  if (weight_b.has_value()) {
    check_weight(*weight_b, "weight_b", ha, shape);
    check_bias(bias_b, "bias_b", ha, shape);
  } else {
    TORCH_CHECK(!bias_b.has_value(),
                "skew_pair_project: bias_b must be None when weight_b is None (B then shares weight_a and bias_a)");
  }
  if (shape.pairs > 0) {
    // Column-wise minimum and maximum of the indices: (i_min, j_min) and (i_max, j_max). Pairs on the
    // host are read in a loop (tensor reductions would cost tens of microseconds of host time per call).
    int64_t b[4];
    if (pairs.is_cpu()) {
      const auto index = pairs.accessor<int64_t, 2>();
      b[0] = b[2] = index[0][0];
      b[1] = b[3] = index[0][1];
      for (int64_t k = 1; k < shape.pairs; ++k) {
        for (int column = 0; column < 2; ++column) {
          b[column] = std::min(b[column], index[k][column]);
          b[2 + column] = std::max(b[2 + column], index[k][column]);
        }
      }
    } else {
      const at::Tensor bounds = at::stack({std::get<0>(pairs.min(0)), std::get<0>(pairs.max(0))}).cpu();
      std::copy_n(bounds.const_data_ptr<int64_t>(), 4, b);
    }
    TORCH_CHECK(b[0] >= 0 && b[2] < shape.layers_a, "skew_pair_project: pairs[:, 0] must lie in [0, LA = ",
                shape.layers_a, "), got values in [", b[0], ", ", b[2], "]");
    TORCH_CHECK(b[1] >= 0 && b[3] < shape.layers_b, "skew_pair_project: pairs[:, 1] must lie in [0, LB = ",
                shape.layers_b, "), got values in [", b[1], ", ", b[3], "]");
  }
  return shape;
}

// The gradients of skew_pair_project_backward must be (P, N, F) in ha's dtype and device.
inline void check_skew_pair_project_grads(const at::Tensor& grad_pa, const at::Tensor& grad_pb, const at::Tensor& ha,
                                          const SkewPairProjectShape& shape) {
  const std::vector<int64_t> expected{shape.pairs, shape.samples, shape.out_features};
  TORCH_CHECK(grad_pa.sizes() == at::IntArrayRef(expected), "skew_pair_project_backward: grad_pa must have shape ",
              at::IntArrayRef(expected), ", got ", grad_pa.sizes());
  TORCH_CHECK(grad_pb.sizes() == at::IntArrayRef(expected), "skew_pair_project_backward: grad_pb must have shape ",
              at::IntArrayRef(expected), ", got ", grad_pb.sizes());
  check_like_ha(grad_pa, "grad_pa", ha);
  check_like_ha(grad_pb, "grad_pb", ha);
}

}  // namespace stepfusion
