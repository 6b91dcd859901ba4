// CUDA implementation of avmt::sample_negatives (semantics: sampling.cpp / avmt/sampling.py).
//
// Anchors are processed in tiles of rows whose [rows, Np] float distance tile stays under 64 MiB (cuBLAS GEMM
// for the distances), so extra memory is O(tile + Na*k), never O(Na*Np). One thread block per anchor row then
// does all the per-row work on chip: reductions for count/min/max, two radix selects for the trim bounds,
// the Gumbel keys (written over the row's distances), a radix select for the k-th best key and a rank sort of
// the k winners in shared memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "sampling.h"

namespace avmt {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxK = 1024;

// Order-preserving map float -> uint32 (a < b  <=>  ordered(a) < ordered(b), for non-NaN floats).
__device__ __forceinline__ uint32_t ordered(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Unique 64-bit composites, so that a rank in ascending composite order is exactly a rank in
//   distance order: ascending distance, then ascending index  -> (ordered(d) << 32) | j
//   selection order: descending key, then ascending index     -> (~ordered(key) << 32) | j
__device__ __forceinline__ uint64_t distance_composite(float d, int64_t j) {
  return (static_cast<uint64_t>(ordered(d)) << 32) | static_cast<uint32_t>(j);
}
__device__ __forceinline__ uint64_t selection_composite(float key, int64_t j) {
  return (static_cast<uint64_t>(~ordered(key)) << 32) | static_cast<uint32_t>(j);
}

// Own functors: cub::Min/Max are gone from CCCL 3 (CUDA 13).
struct MinOp {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct Shared {
  unsigned int hist[256];
  uint64_t prefix;
  int64_t rank;
  float dmin, dmax;
  int64_t count;
  unsigned int selected;
};

// The composite of rank `rank` (0-based, ascending) among the row's participating candidates; 8 passes of 8 bits.
// `comp(j, &c)` returns whether candidate j participates and its composite. Called by the whole block.
template <typename Comp>
__device__ uint64_t radix_select(const Comp& comp, int64_t np, int64_t rank, Shared& s) {
  __syncthreads();  // the previous call's result has been read by every thread
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.rank = rank;
  }
  uint64_t mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) s.hist[b] = 0;
    __syncthreads();
    const uint64_t prefix = s.prefix;
    for (int64_t j = threadIdx.x; j < np; j += blockDim.x) {
      uint64_t c;
      if (comp(j, &c) && (c & mask) == prefix) atomicAdd(&s.hist[(c >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t r = s.rank;
      int b = 0;
      for (; b < 255 && r >= static_cast<int64_t>(s.hist[b]); ++b) r -= s.hist[b];
      s.rank = r;
      s.prefix = prefix | (static_cast<uint64_t>(b) << shift);
    }
    mask |= static_cast<uint64_t>(255) << shift;
    __syncthreads();
  }
  return s.prefix;
}

struct RowView {
  int64_t i, np, mode;
  int64_t self_index, group;
  const int64_t* pool_group;
  __device__ bool valid(int64_t j) const {
    return j != self_index && (mode != kSequence || pool_group[j] == group);
  }
};

struct DistanceComp {
  RowView row;
  const float* dist;
  __device__ bool operator()(int64_t j, uint64_t* c) const {
    if (!row.valid(j)) return false;
    *c = distance_composite(dist[j], j);
    return true;
  }
};

struct KeyComp {
  const float* keys;
  __device__ bool operator()(int64_t j, uint64_t* c) const {
    if (!(keys[j] > -INFINITY)) return false;
    *c = selection_composite(keys[j], j);
    return true;
  }
};

__global__ void __launch_bounds__(kThreads) select_rows(
    float* tile, int64_t row0, int64_t np, int64_t k, int64_t mode, double trim, const int64_t* anchor_index,
    const int64_t* anchor_group, const int64_t* pool_group, uint64_t seed, int64_t* out) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  using Count = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  __shared__ typename Count::TempStorage count_tmp;
  __shared__ Shared s;
  extern __shared__ uint64_t winners[];  // [k] composites, then [k] indices (as uint64)

  const int64_t i = row0 + blockIdx.x;
  float* row = tile + static_cast<int64_t>(blockIdx.x) * np;
  const RowView view{i, np, mode, anchor_index[i], anchor_group[i], pool_group};
  const bool content = mode == kSimilar || mode == kDissimilar;
  const uint32_t key = row_key(seed, static_cast<uint32_t>(i));

  // 1. distances (in place over the squared distances), and count / min / max over the valid candidates
  float lo_d = INFINITY, hi_d = -INFINITY;
  int64_t n = 0;
  for (int64_t j = threadIdx.x; j < np; j += blockDim.x) {
    if (content) row[j] = row[j] > 0.f ? sqrtf(row[j]) : 0.f;  // +0 below zero, as the CPU op
    if (view.valid(j)) {
      ++n;
      if (content) {
        lo_d = fminf(lo_d, row[j]);
        hi_d = fmaxf(hi_d, row[j]);
      }
    }
  }
  n = Count(count_tmp).Sum(n);
  if (threadIdx.x == 0) s.count = n;
  __syncthreads();
  lo_d = Reduce(reduce_tmp).Reduce(lo_d, MinOp());
  if (threadIdx.x == 0) s.dmin = lo_d;
  __syncthreads();
  hi_d = Reduce(reduce_tmp).Reduce(hi_d, MaxOp());
  if (threadIdx.x == 0) s.dmax = hi_d;
  __syncthreads();
  n = s.count;
  const float dmin = s.dmin, dmax = s.dmax;

  // 2. trim bounds: keep ranks [t, n - t) of the (distance, index) order
  const int64_t t = content ? static_cast<int64_t>(floor(trim * static_cast<double>(n))) : 0;
  uint64_t lo = 0, hi = ~uint64_t(0);
  if (t > 0) {
    const DistanceComp by_distance{view, row};
    lo = radix_select(by_distance, np, t, s);
    hi = radix_select(by_distance, np, n - 1 - t, s);
  }
  __syncthreads();

  // 3. selection keys, written over the distances (each thread reads and writes only its own j)
  int64_t m = 0;
  for (int64_t j = threadIdx.x; j < np; j += blockDim.x) {
    float kj = -INFINITY;
    if (view.valid(j)) {
      const uint64_t c = content ? distance_composite(row[j], j) : 0;
      if (!content || (c >= lo && c <= hi)) {
        kj = selection_key(mode, content ? normalised(row[j], dmin, dmax) : 0.0, key, static_cast<uint32_t>(j));
      }
    }
    row[j] = kj;
    m += kj > -INFINITY;
  }
  m = Count(count_tmp).Sum(m);
  if (threadIdx.x == 0) {
    s.count = m;
    s.selected = 0;
  }
  __syncthreads();
  const int64_t take = s.count < k ? s.count : k;

  // 4. the take best keys: threshold by radix select, gather, then rank-sort in shared memory
  if (take > 0) {
    const KeyComp by_key{row};
    const uint64_t threshold = radix_select(by_key, np, take - 1, s);
    for (int64_t j = threadIdx.x; j < np; j += blockDim.x) {
      uint64_t c;
      if (by_key(j, &c) && c <= threshold) {
        const unsigned int slot = atomicAdd(&s.selected, 1u);
        winners[slot] = c;
        winners[k + slot] = static_cast<uint64_t>(j);
      }
    }
    __syncthreads();
    for (int64_t a = threadIdx.x; a < take; a += blockDim.x) {
      int64_t rank = 0;
      for (int64_t b = 0; b < take; ++b) rank += winners[b] < winners[a];
      out[i * k + rank] = static_cast<int64_t>(winners[k + a]);
    }
  }
  for (int64_t c = take + threadIdx.x; c < k; c += blockDim.x) out[i * k + c] = -1;
}

at::Tensor sample_negatives_cuda(const at::Tensor& anchors_in, const at::Tensor& pool_in, int64_t k, int64_t mode,
                                 double trim, const at::Tensor& anchor_index, const at::Tensor& anchor_group,
                                 const at::Tensor& pool_group, int64_t seed) {
  check_inputs(anchors_in, pool_in, k, mode, trim, anchor_index, anchor_group, pool_group);
  TORCH_CHECK(k <= kMaxK, "sample_negatives (CUDA): k must be in [1, ", kMaxK, "], got ", k);
  TORCH_CHECK(pool_in.size(0) < (int64_t(1) << 31), "sample_negatives (CUDA): pool size must be below 2^31");
  const c10::cuda::CUDAGuard guard(anchors_in.device());
  const int64_t na = anchors_in.size(0), np = pool_in.size(0);
  at::Tensor out = at::empty({na, k}, anchors_in.options().dtype(at::kLong));
  if (na == 0) return out;
  const bool content = mode == kSimilar || mode == kDissimilar;
  const at::Tensor anchors = anchors_in.to(at::kFloat).contiguous();
  const at::Tensor pool = pool_in.to(at::kFloat).contiguous();
  const at::Tensor pool_sq = content ? pool.square().sum(1) : at::Tensor();
  const at::Tensor aidx = anchor_index.contiguous(), agrp = anchor_group.contiguous(), pgrp = pool_group.contiguous();
  const int64_t rows_per_tile = tile_rows(na, np, int64_t(64) << 20);
  const size_t smem = static_cast<size_t>(2 * k) * sizeof(uint64_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < na; start += rows_per_tile) {
    const int64_t rows = std::min(rows_per_tile, na - start);
    at::Tensor tile = content ? squared_distances(anchors.narrow(0, start, rows), pool, pool_sq).contiguous()
                              : at::empty({rows, np}, anchors.options());
    select_rows<<<static_cast<unsigned int>(rows), kThreads, smem, stream>>>(
        tile.data_ptr<float>(), start, np, k, mode, trim, aidx.data_ptr<int64_t>(), agrp.data_ptr<int64_t>(),
        pgrp.data_ptr<int64_t>(), static_cast<uint64_t>(seed), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(avmt, CUDA, m) { m.impl("sample_negatives", &sample_negatives_cuda); }

}  // namespace avmt
