// The O(N) FedAlign-MoE expert aggregation as three hand-written CPU passes (a probe for
// benchmarks/selective_sum_probe.py, not part of the library): how close to FedAvg's one read
// of the deltas can the method's exact arithmetic get on this CPU?
//
//   pass1: x_bar[e] = sum_c v[c,e] x[c,e] and |x[c,e]|^2, one read of the deltas;
//   pass2: <x[c,e], x_bar[e]> -> the score S[c,e] -> acc[e] += cnt[c,e] S[c,e] x[c,e] while
//          the row is in cache, one read;
//   pass3: acc[e] = scale[e] acc[e] + sum_c coef[c,e] x[c,e] over the nonzero coef (the
//          excluded pairs, subtracted), a read of those rows only.
//
// x: L leaves, each (C, E, P_l) float32, row-major. Each thread takes a contiguous range of
// experts and walks the clients in order, so that it streams through memory. Sums of 16
// lanes (the AVX-512 width) let the compiler vectorize without reassociation flags.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {
constexpr int kLanes = 16;

template <class F>
void ForExpertRanges(int64_t num_experts, F f) {
  const int64_t nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < nt; ++t) {
    threads.emplace_back([=] { f(num_experts * t / nt, num_experts * (t + 1) / nt); });
  }
  for (auto& th : threads) th.join();
}

// sum_p a[p] b[p] (b == a: the squared norm), in kLanes partial sums.
float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float part[kLanes] = {0};
  for (int64_t p = 0; p < n; p += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += a[p + k] * b[p + k];
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += part[k];
  return s;
}

void Axpy(float w, const float* __restrict x, float* __restrict acc, int64_t n) {
  for (int64_t p = 0; p < n; ++p) acc[p] += w * x[p];
}
}  // namespace

extern "C" {

// P[l] must be a multiple of 16. part: (C,) 0/1; rows of other clients are never read.
void pass1(int L, const float** x, const int64_t* P, int64_t C, int64_t E, const float* v,
           const uint8_t* part, float** x_bar, float* sq) {
  ForExpertRanges(E, [&](int64_t lo, int64_t hi) {
    for (int l = 0; l < L; ++l) std::fill(x_bar[l] + lo * P[l], x_bar[l] + hi * P[l], 0.f);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t e = lo; e < hi; ++e) {
        const int64_t ce = c * E + e;
        if (!part[c]) {
          sq[ce] = 0.f;
          continue;
        }
        const float w = v[ce];  // hoisted: the stores to bar could alias v otherwise
        float s = 0.f;
        for (int l = 0; l < L; ++l) {
          const float* __restrict row = x[l] + ce * P[l];
          float* __restrict bar = x_bar[l] + e * P[l];
          float part_sq[kLanes] = {0};
          for (int64_t p = 0; p < P[l]; p += kLanes)
            for (int k = 0; k < kLanes; ++k) {
              const float a = row[p + k];
              bar[p + k] += w * a;
              part_sq[k] += a * a;
            }
          for (int k = 0; k < kLanes; ++k) s += part_sq[k];
        }
        sq[ce] = s;
      }
    }
  });
}

// S = 0 outside P(e) (cnt <= 0) and for non-participants; 1 where |P(e)| < 2; else
// gbar (1 + cos) / 2 with cos = clip(dot / (|x| |x_bar|), -1, 1), 0 for a zero vector.
void pass2(int L, const float** x, const int64_t* P, int64_t C, int64_t E, const float** x_bar,
           const uint8_t* part, const float* cnt, const float* gbar, const float* sq,
           const float* sq_bar, const float* n_sel, float** acc, float* score) {
  ForExpertRanges(E, [&](int64_t lo, int64_t hi) {
    for (int l = 0; l < L; ++l) std::fill(acc[l] + lo * P[l], acc[l] + hi * P[l], 0.f);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t e = lo; e < hi; ++e) {
        const int64_t ce = c * E + e;
        if (!part[c] || !(cnt[ce] > 0.f)) {
          score[ce] = 0.f;
          continue;
        }
        float s = 1.f;
        if (n_sel[e] >= 2.f) {
          float d = 0.f;
          for (int l = 0; l < L; ++l) d += Dot(x[l] + ce * P[l], x_bar[l] + e * P[l], P[l]);
          const float den = std::sqrt(sq[ce]) * std::sqrt(sq_bar[e]);
          const float cosine = std::min(1.f, std::max(-1.f, den != 0.f ? d / den : 0.f));
          s = gbar[ce] * (1.f + cosine) / 2.f;
        }
        score[ce] = s;
        const float w = cnt[ce] * s;
        if (w == 0.f) continue;
        for (int l = 0; l < L; ++l) Axpy(w, x[l] + ce * P[l], acc[l] + e * P[l], P[l]);
      }
    }
  });
}

void pass3(int L, const float** x, const int64_t* P, int64_t C, int64_t E, const float* scale,
           const float* coef, float** acc) {
  ForExpertRanges(E, [&](int64_t lo, int64_t hi) {
    for (int l = 0; l < L; ++l)
      for (int64_t e = lo; e < hi; ++e)
        for (int64_t p = 0; p < P[l]; ++p) acc[l][e * P[l] + p] *= scale[e];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t e = lo; e < hi; ++e) {
        const float w = coef[c * E + e];
        if (w == 0.f) continue;
        for (int l = 0; l < L; ++l) Axpy(w, x[l] + (c * E + e) * P[l], acc[l] + e * P[l], P[l]);
      }
  });
}

}  // extern "C"
