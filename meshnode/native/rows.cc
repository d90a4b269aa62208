// Per-row statistics whose arithmetic never depends on how many rows there are.
//
// MeshnodeRowMeanSquare(x [N, H] f32) -> out [N] f32: mean of x^2 over each row.
//
// XLA's CPU reduction of the last axis picks its vectorization by shape: a
// row of 576 summed beside 7 others or more came out different in its last
// bits than the same row summed alone, so a session's RMSNorm depended on its
// batch-mates. Here each row is summed by the same loop in the same order
// (16 running sums, then a fixed pairwise tree), whatever N.

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

float mean_square(const float* x, int64_t width) {
  float lanes[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= width; i += 16) {
    for (int k = 0; k < 16; ++k) lanes[k] += x[i + k] * x[i + k];
  }
  for (int k = 0; i < width; ++i, ++k) lanes[k] += x[i] * x[i];
  for (int step = 8; step > 0; step /= 2) {
    for (int k = 0; k < step; ++k) lanes[k] += lanes[k + step];
  }
  return lanes[0] / static_cast<float>(width);
}

ffi::Error RowMeanSquare(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [N, H]");
  const int64_t rows = dims[0], width = dims[1];
  const float* data = x.typed_data();
  float* result = out->typed_data();
  for (int64_t n = 0; n < rows; ++n) result[n] = mean_square(data + n * width, width);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshnodeRowMeanSquare, RowMeanSquare,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [N]
