// Work split for the native kernels: parallel_rows(pool, rows, min_chunk, body).
//
// Rows are split into chunks that the calling thread and XLA's intra-op
// thread pool take from a shared counter; the caller waits only for chunks
// already taken, so it never depends on a pool thread being free. Which thread
// computes a row never changes its result: every kernel computes a row alone.

#ifndef MESHNODE_NATIVE_PARALLEL_H_
#define MESHNODE_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace meshnode {

// Runs body(first, last) over [0, rows) in chunks, on this thread and the pool.
inline void parallel_rows(xla::ffi::ThreadPool& pool, int64_t rows, int64_t min_chunk,
                   std::function<void(int64_t, int64_t)> body) {
  struct Shared {
    std::function<void(int64_t, int64_t)> body;
    int64_t rows, chunk, chunks;
    std::atomic<int64_t> next{0}, finished{0};
    void work() {
      for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
        body(i * chunk, std::min(rows, (i + 1) * chunk));
        finished.fetch_add(1, std::memory_order_release);
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto shared = std::make_shared<Shared>();
  shared->body = std::move(body);
  shared->rows = rows;
  shared->chunk = std::max(min_chunk, (rows + 4 * threads - 1) / (4 * threads));
  shared->chunks = (rows + shared->chunk - 1) / shared->chunk;
  for (int64_t t = 1; t < std::min(threads + 1, shared->chunks); ++t) {
    pool.Schedule([shared] { shared->work(); });
  }
  shared->work();
  while (shared->finished.load(std::memory_order_acquire) < shared->chunks) {
    std::this_thread::yield();
  }
}

}  // namespace meshnode

#endif  // MESHNODE_NATIVE_PARALLEL_H_
