// Shared by the CPU and CUDA implementations of avmt::sample_negatives and mirrored exactly by the PyTorch
// reference (avmt/sampling.py): a counter-based hash gives every (seed, anchor row, candidate) its own uniform,
// so all backends draw the same Gumbel noise for a seed, without any RNG state.
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AVMT_HD __host__ __device__ __forceinline__
#else
#define AVMT_HD inline
#endif

namespace avmt {

enum SampleMode : int64_t { kSimilar = 0, kDissimilar = 1, kUniform = 2, kSequence = 3 };

// "lowbias32" integer hash (C. Wellons): good avalanche, 32-bit arithmetic only.
AVMT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

AVMT_HD uint32_t row_key(uint64_t seed, uint32_t row) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) ^ mix32(row ^ 0x68e31da4U)));
}

// Gumbel(0, 1) noise of candidate j for the row whose key is `key`: u in (0, 1) on a 2^-24 grid.
AVMT_HD double gumbel(uint32_t key, uint32_t j) {
  const uint32_t h = mix32(key ^ mix32(j + 0x9e3779b9U));
  const double u = (static_cast<double>(h >> 8) + 0.5) * (1.0 / 16777216.0);
  return -log(-log(u));
}

// Selection key of a kept candidate: log(weight) + Gumbel, rounded to float (the order every backend sorts by).
// weight: similar 1 - d_hat, dissimilar d_hat, uniform/sequence 1. Returns -inf for weight 0 (never selected).
AVMT_HD float selection_key(int64_t mode, double d_hat, uint32_t key, uint32_t j) {
  const double w = mode == kSimilar ? 1.0 - d_hat : (mode == kDissimilar ? d_hat : 1.0);
  if (!(w > 0.0)) return -INFINITY;
  return static_cast<float>(log(w) + gumbel(key, j));
}

// Per-anchor normalisation of a distance to [0, 1] over the anchor's candidates (0.5 when all are equal).
AVMT_HD double normalised(float d, float dmin, float dmax) {
  return dmax > dmin ? (static_cast<double>(d) - dmin) / (static_cast<double>(dmax) - dmin) : 0.5;
}

// Defined in sampling.cpp, used by both backends: squared l2 distances [c, Np] (float) of anchor rows [c, D] to
// the pool [Np, D] given ||pool||^2 [Np]; and how many anchor rows fit a distance tile of `tile_bytes`.
// Shapes, dtypes and devices of the op's inputs (not their values); both backends call it first.
void check_inputs(const at::Tensor& anchors, const at::Tensor& pool, int64_t k, int64_t mode, double trim,
                  const at::Tensor& anchor_index, const at::Tensor& anchor_group, const at::Tensor& pool_group);
at::Tensor squared_distances(const at::Tensor& anchors, const at::Tensor& pool, const at::Tensor& pool_sq);
int64_t tile_rows(int64_t na, int64_t np, int64_t tile_bytes);

}  // namespace avmt
