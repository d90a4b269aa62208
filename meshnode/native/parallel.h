// Work split for the native kernels: parallel_rows(pool, rows, min_chunk, body).
//
// Rows are split into chunks that the calling thread and XLA's intra-op
// thread pool take from a shared counter; the caller waits only for chunks
// already taken, so it never depends on a pool thread being free. Which thread
// computes a row never changes its result: every kernel computes a row alone.
//
// Who takes part: the caller and num_threads() - 1 pool threads (XLA sizes its
// pool to the cores, and the caller runs on one of them). One thread more than
// the cores makes a short call's threads take turns: a 10-block decode forward
// of 8 rows took 6.9 ms that way, 6.0 without (SmolLM2, 2 cores). A long call
// (Call::kLong) takes every pool thread as well: a pool thread left without work
// spins looking for some, which costs a long call more than the extra thread
// does (SmolLM2's head over 8 rows: 5.3-5.6 ms with every pool thread, 5.7-6.7
// without).

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

enum class Call { kShort, kLong };

// Runs body(first, last) over [0, rows) in chunks, on this thread and the pool.
inline void parallel_rows(xla::ffi::ThreadPool& pool, int64_t rows, int64_t min_chunk,
                          std::function<void(int64_t, int64_t)> body,
                          Call call = Call::kShort) {
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
  const int64_t helpers = call == Call::kLong ? threads : threads - 1;  // besides the caller
  for (int64_t t = 0; t < std::min(helpers, shared->chunks - 1); ++t) {
    pool.Schedule([shared] { shared->work(); });
  }
  shared->work();
  while (shared->finished.load(std::memory_order_acquire) < shared->chunks) {
    std::this_thread::yield();
  }
}

}  // namespace meshnode

#endif  // MESHNODE_NATIVE_PARALLEL_H_
