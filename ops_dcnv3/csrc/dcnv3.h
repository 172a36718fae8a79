// Shared declarations of the DCNv3 operator: argument checking and output geometry,
// used by every backend's kernels so that all of them reject the same bad input.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

namespace ops_dcnv3 {

struct Geometry {
  int64_t batch, height_in, width_in, channels;
  int64_t height_out, width_out, points;  // points = kernel_h * kernel_w - remove_center
};

// a * b and a + b for the size arguments. Huge values reach the op directly (torch.ops,
// exported graphs), and a product that wrapped around could equal a small tensor size,
// pass the shape checks and send the kernels out of bounds, so an overflow is an error.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &out), "dcnv3: ", what, " = ", a, " * ", b,
              " overflows int64: the arguments are too large");
  return out;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(!c10::add_overflows(a, b, &out), "dcnv3: ", what, " = ", a, " + ", b,
              " overflows int64: the arguments are too large");
  return out;
}

// Checks every argument and tensor shape (TORCH_CHECK messages name the expected
// value) and returns the output geometry.
inline Geometry check_dcnv3_args(const at::Tensor& input, const at::Tensor& offset,
                                 const at::Tensor& mask, int64_t kernel_h, int64_t kernel_w,
                                 int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                 int64_t dilation_h, int64_t dilation_w, int64_t group,
                                 int64_t group_channels, bool remove_center) {
  TORCH_CHECK(input.dim() == 4, "dcnv3: input must be 4-D (N, H, W, C), got ", input.dim(), "-D");
  TORCH_CHECK(offset.dim() == 4, "dcnv3: offset must be 4-D (N, Ho, Wo, group*P*2), got ",
              offset.dim(), "-D");
  TORCH_CHECK(mask.dim() == 4, "dcnv3: mask must be 4-D (N, Ho, Wo, group*P), got ", mask.dim(), "-D");
  TORCH_CHECK(input.device() == offset.device() && input.device() == mask.device(),
              "dcnv3: input, offset and mask must be on the same device, got ", input.device(), ", ",
              offset.device(), " and ", mask.device());
  TORCH_CHECK(input.scalar_type() == offset.scalar_type() && input.scalar_type() == mask.scalar_type(),
              "dcnv3: input, offset and mask must have the same dtype, got ", input.scalar_type(), ", ",
              offset.scalar_type(), " and ", mask.scalar_type());
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0, "dcnv3: kernel size must be positive, got ", kernel_h, "x",
              kernel_w);
  TORCH_CHECK(stride_h > 0 && stride_w > 0, "dcnv3: stride must be positive, got ", stride_h, "x",
              stride_w);
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0, "dcnv3: dilation must be positive, got ", dilation_h,
              "x", dilation_w);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "dcnv3: padding must be non-negative, got ", pad_h, "x", pad_w);
  TORCH_CHECK(group > 0 && group_channels > 0, "dcnv3: group and group_channels must be positive, got ",
              group, " and ", group_channels);
  // A 1x1 kernel without its centre has no sampling point at all (P = 0).
  TORCH_CHECK(!remove_center || (kernel_h == kernel_w && kernel_h % 2 == 1 && kernel_h > 1),
              "dcnv3: remove_center needs an odd square kernel larger than 1x1, got ", kernel_h, "x",
              kernel_w);
  Geometry g;
  g.batch = input.size(0);
  g.height_in = input.size(1);
  g.width_in = input.size(2);
  g.channels = input.size(3);
  const int64_t channels = checked_mul(group, group_channels, "group * group_channels");
  TORCH_CHECK(g.channels == channels, "dcnv3: input has ", g.channels,
              " channels, expected group * group_channels = ", group, " * ", group_channels, " = ",
              channels);
  g.points = checked_mul(kernel_h, kernel_w, "kernel_h * kernel_w") - (remove_center ? 1 : 0);
  const int64_t mask_channels = checked_mul(group, g.points, "group * P");
  const int64_t offset_channels = checked_mul(mask_channels, 2, "group * P * 2");
  // Extent of the dilated kernel and of the padded input along each axis.
  const int64_t span_h =
      checked_add(checked_mul(dilation_h, kernel_h - 1, "dilation_h * (kernel_h - 1)"), 1,
                  "dilation_h * (kernel_h - 1) + 1");
  const int64_t span_w =
      checked_add(checked_mul(dilation_w, kernel_w - 1, "dilation_w * (kernel_w - 1)"), 1,
                  "dilation_w * (kernel_w - 1) + 1");
  const int64_t padded_h = checked_add(g.height_in, checked_mul(2, pad_h, "2 * pad_h"), "height + 2 * pad_h");
  const int64_t padded_w = checked_add(g.width_in, checked_mul(2, pad_w, "2 * pad_w"), "width + 2 * pad_w");
  TORCH_CHECK(padded_h >= span_h && padded_w >= span_w, "dcnv3: output size would be zero or less for input ",
              g.height_in, "x", g.width_in, ", kernel ", kernel_h, "x", kernel_w, ", padding ", pad_h, "x",
              pad_w, ", dilation ", dilation_h, "x", dilation_w);
  g.height_out = (padded_h - span_h) / stride_h + 1;
  g.width_out = (padded_w - span_w) / stride_w + 1;
  // Per-image element counts the kernels form. Tensors hold N of each, but an empty batch
  // lets any of them through the shape checks.
  const int64_t hw_in = checked_mul(g.height_in, g.width_in, "H * W");
  checked_mul(hw_in, channels, "H * W * C");
  const int64_t hw_out = checked_mul(g.height_out, g.width_out, "Ho * Wo");
  checked_mul(hw_out, offset_channels, "Ho * Wo * group * P * 2");
  checked_mul(hw_out, channels, "Ho * Wo * C");
  const std::vector<int64_t> want_offset{g.batch, g.height_out, g.width_out, offset_channels};
  const std::vector<int64_t> want_mask{g.batch, g.height_out, g.width_out, mask_channels};
  TORCH_CHECK(offset.sizes() == at::IntArrayRef(want_offset),
              "dcnv3: offset must have shape (N, Ho, Wo, group*P*2) = ", at::IntArrayRef(want_offset),
              ", got ", offset.sizes());
  TORCH_CHECK(mask.sizes() == at::IntArrayRef(want_mask),
              "dcnv3: mask must have shape (N, Ho, Wo, group*P) = ", at::IntArrayRef(want_mask),
              ", got ", mask.sizes());
  return g;
}

}  // namespace ops_dcnv3
