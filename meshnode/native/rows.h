// Live rows of a matmul's input: LiveRows(x, rows, width).
//
// A batch padded to a row bucket (meshnode/compute.py) carries rows of zeros,
// and in a family without biases a zero row stays zero through every block. A
// zero row times any matrix is exactly +0.0 in every output, whatever the
// kernel's summation order, so the matmuls compute only the other rows,
// packed together, and write zeros for the rest: the padding costs nothing,
// and every result keeps its bits. A computed row's arithmetic never depends
// on which rows share its call (batch invariance), so packing changes nothing
// either.

#ifndef MESHNODE_NATIVE_ROWS_H_
#define MESHNODE_NATIVE_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace meshnode {

class LiveRows {
 public:
  // x: [rows, width] row-major; a row is dead when every element compares equal to 0.
  LiveRows(const float* x, int64_t rows, int64_t width) : x_(x), rows_(rows) {
    live_.reserve(static_cast<size_t>(rows));
    for (int64_t n = 0; n < rows; ++n) {
      const float* row = x + n * width;
      if (std::any_of(row, row + width, [](float v) { return v != 0.f; })) live_.push_back(n);
    }
    if (!all()) {
      packed_in_.reset(new float[std::max<int64_t>(1, count() * width)]);
      for (int64_t i = 0; i < count(); ++i) {
        std::memcpy(packed_in_.get() + i * width, x + live_[i] * width, width * sizeof(float));
      }
    }
  }

  int64_t count() const { return static_cast<int64_t>(live_.size()); }
  bool all() const { return count() == rows_; }

  // The live rows, [count(), width]: x itself when every row is live.
  const float* inputs() const { return all() ? x_ : packed_in_.get(); }

  // Where the kernel writes the live rows' outputs, [count(), out]: y itself when every
  // row is live, else a packed buffer that scatter() moves into y.
  float* outputs(float* y, int64_t out) {
    if (all()) return y;
    packed_out_.reset(new float[std::max<int64_t>(1, count() * out)]);
    return packed_out_.get();
  }

  // y [rows, out]: each live row's output in its place, zeros in every other row.
  void scatter(float* y, int64_t out) const {
    if (all()) return;
    std::fill(y, y + rows_ * out, 0.f);
    for (int64_t i = 0; i < count(); ++i) {
      std::memcpy(y + live_[i] * out, packed_out_.get() + i * out, out * sizeof(float));
    }
  }

 private:
  const float* x_;
  int64_t rows_;
  std::vector<int64_t> live_;
  std::unique_ptr<float[]> packed_in_, packed_out_;
};

}  // namespace meshnode

#endif  // MESHNODE_NATIVE_ROWS_H_
