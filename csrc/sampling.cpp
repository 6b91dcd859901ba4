// avmt::sample_negatives: the op schema, the C++ CPU implementation, and the Python module avmt._C.
//
// For each anchor row i, candidates are the pool rows j != anchor_index[i] (and, in mode `sequence`, with
// pool_group[j] == anchor_group[i]). Content-aware modes (similar, dissimilar) compute l2 distances, drop the
// floor(trim * n) nearest and farthest candidates (order: distance, then index), and weight the rest by the
// distance normalised to [0, 1] over all candidates. k candidates are drawn without replacement by Gumbel-top-k
// (keys from sampling.h). Output [Na, k] int64, in selection order; rows with fewer than k selectable candidates
// end with -1. The PyTorch reference in avmt/sampling.py is the specification; this must agree with it.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "build_info.h"  // written by setup.py
#include "sampling.h"

namespace avmt {

// Squared l2 distances of `anchors` rows [c, D] to every pool row, as float [c, Np]; pool_sq = ||pool||^2 [Np].
at::Tensor squared_distances(const at::Tensor& anchors, const at::Tensor& pool, const at::Tensor& pool_sq) {
  const at::Tensor a_sq = anchors.square().sum(1, /*keepdim=*/true);
  return at::addmm(a_sq + pool_sq.unsqueeze(0), anchors, pool.t(), /*beta=*/1, /*alpha=*/-2);
}

// Anchor rows per distance tile: keeps the [rows, Np] float tile under `tile_bytes`.
int64_t tile_rows(int64_t na, int64_t np, int64_t tile_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(na, tile_bytes / std::max<int64_t>(1, np * 4)));
}

void check_inputs(const at::Tensor& anchors, const at::Tensor& pool, int64_t k, int64_t mode, double trim,
                  const at::Tensor& anchor_index, const at::Tensor& anchor_group, const at::Tensor& pool_group) {
  TORCH_CHECK(anchors.dim() == 2 && pool.dim() == 2 && anchors.size(1) == pool.size(1),
              "sample_negatives: anchors [Na, D] and pool [Np, D] need the same D, got ", anchors.sizes(), " and ",
              pool.sizes());
  TORCH_CHECK(anchors.scalar_type() == pool.scalar_type(), "sample_negatives: anchors and pool dtypes differ");
  TORCH_CHECK(k > 0, "sample_negatives: k must be > 0, got ", k);
  TORCH_CHECK(mode >= kSimilar && mode <= kSequence, "sample_negatives: unknown mode ", mode);
  TORCH_CHECK(trim >= 0 && trim < 0.5, "sample_negatives: trim must be in [0, 0.5), got ", trim);
  TORCH_CHECK(pool.size(0) > 0, "sample_negatives: the pool is empty");
  const std::pair<const at::Tensor*, int64_t> index_tensors[] = {
      {&anchor_index, anchors.size(0)}, {&anchor_group, anchors.size(0)}, {&pool_group, pool.size(0)}};
  const char* names[] = {"anchor_index", "anchor_group", "pool_group"};
  for (int t = 0; t < 3; ++t) {
    const at::Tensor& x = *index_tensors[t].first;
    TORCH_CHECK(x.scalar_type() == at::kLong && x.dim() == 1 && x.numel() == index_tensors[t].second,
                "sample_negatives: ", names[t], " must be int64 [", index_tensors[t].second, "], got ", x.scalar_type(),
                " ", x.sizes());
    TORCH_CHECK(x.device() == anchors.device(), "sample_negatives: ", names[t], " is on ", x.device(),
                " but anchors are on ", anchors.device());
  }
  TORCH_CHECK(pool.device() == anchors.device(), "sample_negatives: pool is on ", pool.device(), " but anchors are on ",
              anchors.device());
}

namespace {

at::Tensor sample_negatives_cpu(const at::Tensor& anchors_in, const at::Tensor& pool_in, int64_t k, int64_t mode,
                                double trim, const at::Tensor& anchor_index_in, const at::Tensor& anchor_group_in,
                                const at::Tensor& pool_group_in, int64_t seed) {
  check_inputs(anchors_in, pool_in, k, mode, trim, anchor_index_in, anchor_group_in, pool_group_in);
  const int64_t na = anchors_in.size(0), np = pool_in.size(0);
  at::Tensor out = at::full({na, k}, -1, anchors_in.options().dtype(at::kLong));
  if (na == 0) return out;
  const bool content = mode == kSimilar || mode == kDissimilar;
  const at::Tensor anchors = anchors_in.to(at::kFloat).contiguous();
  const at::Tensor pool = pool_in.to(at::kFloat).contiguous();
  const at::Tensor pool_sq = content ? pool.square().sum(1) : at::Tensor();
  const at::Tensor anchor_index = anchor_index_in.contiguous(), anchor_group = anchor_group_in.contiguous();
  const at::Tensor pool_group = pool_group_in.contiguous();
  const int64_t* aidx = anchor_index.data_ptr<int64_t>();
  const int64_t* agrp = anchor_group.data_ptr<int64_t>();
  const int64_t* pgrp = pool_group.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t rows_per_tile = content ? tile_rows(na, np, int64_t(64) << 20) : na;

  for (int64_t start = 0; start < na; start += rows_per_tile) {
    const int64_t stop = std::min(na, start + rows_per_tile);
    at::Tensor tile;
    if (content) tile = squared_distances(anchors.narrow(0, start, stop - start), pool, pool_sq).contiguous();
    const float* d2 = content ? tile.data_ptr<float>() : nullptr;

    at::parallel_for(start, stop, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cand;
      std::vector<float> dist;
      std::vector<std::pair<float, int64_t>> keyed;
      cand.reserve(np);
      for (int64_t i = begin; i < end; ++i) {
        cand.clear();
        for (int64_t j = 0; j < np; ++j) {
          if (j == aidx[i] || (mode == kSequence && pgrp[j] != agrp[i])) continue;
          cand.push_back(j);
        }
        const uint32_t key = row_key(static_cast<uint64_t>(seed), static_cast<uint32_t>(i));
        keyed.clear();
        if (content && !cand.empty()) {
          const float* row = d2 + (i - start) * np;
          dist.assign(np, 0.f);
          float dmin = std::numeric_limits<float>::infinity(), dmax = -dmin;
          for (int64_t j : cand) {
            const float v = row[j];
            dist[j] = v > 0.f ? std::sqrt(v) : 0.f;  // +0 for rounding below zero: keeps (d, j) a total order
            dmin = std::min(dmin, dist[j]);
            dmax = std::max(dmax, dist[j]);
          }
          const auto n = static_cast<int64_t>(cand.size());
          const auto t = static_cast<int64_t>(std::floor(trim * static_cast<double>(n)));
          auto by_distance = [&](int64_t a, int64_t b) { return dist[a] < dist[b] || (dist[a] == dist[b] && a < b); };
          auto first = cand.begin(), last = cand.end();
          if (t > 0) {  // keep ranks [t, n - t) of the (distance, index) order
            std::nth_element(cand.begin(), cand.begin() + t, cand.end(), by_distance);
            std::nth_element(cand.begin() + t, cand.begin() + (n - t), cand.end(), by_distance);
            first = cand.begin() + t;
            last = cand.begin() + (n - t);
          }
          for (auto it = first; it != last; ++it) {
            const float s = selection_key(mode, normalised(dist[*it], dmin, dmax), key, static_cast<uint32_t>(*it));
            if (s > -std::numeric_limits<float>::infinity()) keyed.emplace_back(s, *it);
          }
        } else {
          for (int64_t j : cand) keyed.emplace_back(selection_key(mode, 0.0, key, static_cast<uint32_t>(j)), j);
        }
        const auto take = std::min<int64_t>(k, static_cast<int64_t>(keyed.size()));
        std::partial_sort(keyed.begin(), keyed.begin() + take, keyed.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        for (int64_t c = 0; c < take; ++c) o[i * k + c] = keyed[c].second;
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(avmt, m) {
  m.def(
      "sample_negatives(Tensor anchors, Tensor pool, int k, int mode, float trim, Tensor anchor_index, "
      "Tensor anchor_group, Tensor pool_group, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(avmt, CPU, m) { m.impl("sample_negatives", &sample_negatives_cpu); }

}  // namespace avmt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avmt compiled ops; the ops themselves are registered with TORCH_LIBRARY under torch.ops.avmt";
#ifdef WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  // what this binary was built with (setup.py): torch version, CUDA version and TORCH_CUDA_ARCH_LIST ("" without CUDA)
  m.attr("build_torch") = AVMT_BUILD_TORCH;
  m.attr("build_cuda") = AVMT_BUILD_CUDA;
  m.attr("build_archs") = AVMT_BUILD_ARCHS;
}
