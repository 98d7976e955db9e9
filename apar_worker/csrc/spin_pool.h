// A persistent, spinning thread pool for the engine's CPU kernels: `parallel_range` has the
// contract of at::parallel_for (f(b, e) over chunks of [begin, end), at most one chunk per
// thread, none smaller than `grain` unless the range is).
//
// Why not at::parallel_for: with GNU OpenMP, a parallel region entered from a thread other than
// the process's first one ran our kernels 2-3x slower than from the first thread (a 16-row
// 1536x576 product: 574-810 us vs 313-365 us on 2 vCPUs), and the engine steps in its own
// thread (apar_worker/async_engine.py; Ray Serve runs user code off the main thread too). A
// decode step enters ~10 parallel regions per layer, each ~20-300 us long, so what matters is
// how fast sleeping threads join: here they spin on a generation counter for a while after each
// region (llama.cpp's pool does the same) and sleep on a condition variable only when idle.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define APAR_PAUSE() _mm_pause()
#else
#define APAR_PAUSE() std::this_thread::yield()
#endif

namespace apar {

class SpinPool {
 public:
  using Fn = std::function<void(int64_t, int64_t)>;

  // the pool of this process, (re)built with `threads` participants (the caller included)
  static SpinPool& get(int threads) {
    static std::mutex mu;
    static SpinPool* pool = nullptr;  // never destroyed: its threads may outlive static destructors
    std::lock_guard<std::mutex> lock(mu);
    if (pool != nullptr && pool->pid_ != getpid()) pool = nullptr;  // a forked child: no workers
    if (pool != nullptr && pool->threads_ != threads) {
      std::unique_lock<std::mutex> idle(pool->run_mu_, std::try_to_lock);
      if (!idle.owns_lock()) return *pool;  // in use by another thread: keep it for now
      pool->stop();
      pool = nullptr;
    }
    if (pool == nullptr) pool = new SpinPool(threads);
    return *pool;
  }

  // f over [begin, end) split in `chunks` static parts, part 0 on the calling thread
  void run(int64_t begin, int64_t end, int64_t chunks, const Fn& f) {
    if (in_pool()) return f(begin, end);  // nested in a job: inline
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    // another thread runs a job, or replaced this pool since `get` returned it: inline
    if (!busy.owns_lock() || stopping_.load(std::memory_order_acquire)) return f(begin, end);
    in_pool() = true;
    job_ = &f;
    begin_ = begin;
    end_ = end;
    chunks_ = std::min<int64_t>(chunks, threads_);
    error_ = nullptr;
    remaining_.store(static_cast<int>(chunks_), std::memory_order_relaxed);
    for (int i = 0; i < threads_; ++i)  // release: whoever takes a part sees this job's fields
      open_[i].store(i < chunks_ ? 1 : 0, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    for (int64_t i = 0; i < chunks_; ++i) take(i);  // its own part, then any no worker has begun
    while (remaining_.load(std::memory_order_acquire) > 0) APAR_PAUSE();
    in_pool() = false;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  explicit SpinPool(int threads) : threads_(threads), pid_(getpid()), open_(new std::atomic<int>[threads]) {
    for (int i = 0; i < threads; ++i) open_[i].store(0);
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this, i] { loop(i); });
      workers_.back().detach();
    }
  }

  // true on a worker thread, and on a caller while its job runs
  static bool& in_pool() {
    thread_local bool flag = false;
    return flag;
  }

  // runs `part` if no one has taken it yet (its worker, or the caller on behalf of a worker the
  // OS has not scheduled: on 2 vCPUs shared with other processes a region would otherwise wait
  // out the descheduled thread's time slice, milliseconds, for a part of tens of microseconds)
  void take(int64_t part) {
    if (open_[part].exchange(0, std::memory_order_acq_rel) != 1) return;
    work(part);
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }

  void work(int64_t part) {
    if (part >= chunks_) return;
    const int64_t size = (end_ - begin_ + chunks_ - 1) / chunks_;
    const int64_t b = begin_ + part * size, e = std::min(end_, b + size);
    if (b >= e) return;
    try {
      (*job_)(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void loop(int part) {
    in_pool() = true;
    uint64_t seen = 0;  // the generation at construction: a job posted before this thread ran is still new
    for (;;) {
      uint64_t g = wait_for_job(seen);
      if (stopping_.load(std::memory_order_acquire)) return;
      seen = g;
      take(part);  // if the job it saw has ended, the part it takes is the next one's, read after
    }
  }

  // spins ~2 ms on the generation counter, then sleeps until the next job
  uint64_t wait_for_job(uint64_t seen) {
    using clock = std::chrono::steady_clock;
    auto until = clock::now() + std::chrono::milliseconds(2);
    for (int i = 0;; ++i) {
      const uint64_t g = gen_.load(std::memory_order_acquire);
      if (g != seen || stopping_.load(std::memory_order_relaxed)) return g;
      APAR_PAUSE();
      if ((i & 255) == 255 && clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mu_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return gen_.load(std::memory_order_seq_cst) != seen || stopping_.load(); });
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return gen_.load(std::memory_order_acquire);
  }

  void stop() {
    stopping_.store(true, std::memory_order_release);
    std::lock_guard<std::mutex> lock(sleep_mu_);
    wake_.notify_all();
  }

  const int threads_;
  const pid_t pid_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_, sleep_mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> gen_{0};
  std::unique_ptr<std::atomic<int>[]> open_;  // per part: 1 while no one has taken it
  std::atomic<int> remaining_{0}, sleepers_{0};
  std::atomic<bool> stopping_{false};
  const Fn* job_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunks_ = 0;
  std::exception_ptr error_;
};

// at::parallel_for's contract on the pool; the thread count is torch's (torch.set_num_threads)
template <typename F>
inline void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t g = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(threads, (range + g - 1) / g);
  if (chunks <= 1) return f(begin, end);
  SpinPool::get(threads).run(begin, end, chunks, SpinPool::Fn(f));
}

}  // namespace apar
