// A conv_net block with few input channels as one kernel: 3x3 convolution ("same" padding, bias), batch norm with
// the batch's statistics, ReLU and 2x2 max pooling (stride 2, "valid"), forward and backward.
//
// tfmeta.kernels builds this file at first use; tfmeta.kernels.conv_block gives it its gradient and conv_net uses it
// for its first block (benchmarks/fused_block.py times it against TensorFlow's ops). Why: with 1-3 input channels
// the convolution does 9-27 multiply-adds per output value, so the block is bound by memory, and as separate ops it
// streams its largest feature maps through memory about a dozen times per forward and backward pass. Here each image
// is processed alone in buffers that stay in cache (its patches and its convolution's output, recomputed where
// needed), and only the pooled output is written. Batch norm's statistics need the whole batch before any output:
// being linear in the patches, the convolution's mean and variance follow from the patches' mean and covariance
// (9*ci values, from the image's lag products), so no pass over the maps is spent on them.
//
// Batch norm's statistics are over all N*H*W convolution outputs (also those that pooling drops at odd sizes).
// The backward pass follows the separate ops: the pooled gradient goes to the first maximum of each window, through
// the ReLU where its input is > 0, then through batch norm and the convolution. The forward kernel stores each pooled
// value's route (a byte), so the backward kernels need not recompute the convolution to find it. For the weights,
// the kernels give only the routed gradient's correlation with the patches, and its sum: batch norm's and the
// convolution's gradients are ordinary ops on these, so that TensorFlow differentiates them again (MAML's second
// order); the correlation's own gradient is its adjoint kernel, ConvBlockGradGrad.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "Eigen/Core"

namespace tfmeta {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
typedef int64_t i64;

struct Dims {
  i64 n, h, w, ci, c, ho, wo, k;  // k = 9 * ci: the length of a patch
};

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<Matrix>;
using ConstMatrixMap = Eigen::Map<const Matrix>;
using Row = Eigen::Map<const Eigen::RowVectorXf>;

// The image's 3x3 patches as rows of `columns` (h*w x 9*ci), zeros outside the image: column (di*3 + dj)*ci + ch.
// `padded` ((h+2) x (w+2) x ci, zero borders) holds a copy of the image, so that each patch is three runs of 3*ci
// values, copied with a size known at compile time (a memmove call per run took as long as the convolution's
// product on e's images).
template <int kChannels>
void Im2ColRuns(const Dims& d, const float* padded, float* columns) {
  constexpr i64 run = 3 * kChannels;
  const i64 row = (d.w + 2) * kChannels;
  for (i64 i = 0; i < d.h; ++i) {
    for (i64 j = 0; j < d.w; ++j) {
      float* patch = columns + (i * d.w + j) * 3 * run;
      for (i64 di = 0; di < 3; ++di) std::memcpy(patch + di * run, padded + (i + di) * row + j * kChannels, sizeof(float) * run);
    }
  }
}

void Im2Col(const float* x, const Dims& d, float* padded, float* columns) {
  const i64 row = (d.w + 2) * d.ci;
  for (i64 i = 0; i < d.h; ++i) std::copy(x + i * d.w * d.ci, x + (i + 1) * d.w * d.ci, padded + (i + 1) * row + d.ci);
  switch (d.ci) {  // conv_block.fusable_layers admits at most MAX_INPUT_CHANNELS = 4
    case 1: return Im2ColRuns<1>(d, padded, columns);
    case 2: return Im2ColRuns<2>(d, padded, columns);
    case 3: return Im2ColRuns<3>(d, padded, columns);
    case 4: return Im2ColRuns<4>(d, padded, columns);
  }
  for (i64 i = 0; i < d.h; ++i) {
    for (i64 j = 0; j < d.w; ++j) {
      float* patch = columns + (i * d.w + j) * d.k;
      for (i64 di = 0; di < 3; ++di) std::copy_n(padded + (i + di) * row + j * d.ci, 3 * d.ci, patch + di * 3 * d.ci);
    }
  }
}

// The transpose of Im2Col: adds each row of `columns` back onto the positions its patch came from.
void Col2Im(const float* columns, const Dims& d, float* x) {
  for (i64 i = 0; i < d.h; ++i) {
    for (i64 j = 0; j < d.w; ++j) {
      const float* patch = columns + (i * d.w + j) * d.k;
      for (i64 di = 0; di < 3; ++di) {
        for (i64 dj = 0; dj < 3; ++dj) {
          const i64 r = i + di - 1, s = j + dj - 1;
          if (r < 0 || r >= d.h || s < 0 || s >= d.w) continue;
          const float* p = patch + (di * 3 + dj) * d.ci;
          for (i64 ch = 0; ch < d.ci; ++ch) x[(r * d.w + s) * d.ci + ch] += p[ch];
        }
      }
    }
  }
}

// Checks the shapes of (x, kernel, bias, gamma, beta) from input `first` on, and returns the dimensions.
::tensorflow::Status ReadDims(OpKernelContext* context, int first, Dims* d) {
  const Tensor& x = context->input(first);
  const Tensor& kernel = context->input(first + 1);
  if (x.dims() != 4) {
    return InvalidArgument("x must be [batch, height, width, channels]; got ", x.shape().DebugString());
  }
  if (kernel.dims() != 4 || kernel.dim_size(0) != 3 || kernel.dim_size(1) != 3 || kernel.dim_size(2) != x.dim_size(3)) {
    return InvalidArgument("kernel must be [3, 3, ", x.dim_size(3), ", filters]; got ", kernel.shape().DebugString());
  }
  d->n = x.dim_size(0), d->h = x.dim_size(1), d->w = x.dim_size(2), d->ci = x.dim_size(3);
  d->c = kernel.dim_size(3), d->ho = d->h / 2, d->wo = d->w / 2, d->k = 9 * d->ci;
  for (int i = first + 2; i < first + 5; ++i) {
    if (context->input(i).dims() != 1 || context->input(i).dim_size(0) != d->c) {
      return InvalidArgument("bias, gamma and beta must be [", d->c, "]; got ", context->input(i).shape().DebugString());
    }
  }
  if (d->n == 0) return InvalidArgument("batch norm needs a batch of at least one example");
  return ::tensorflow::OkStatus();
}

// Runs fn(first, last) over images [0, n) on TensorFlow's intra-op threads.
template <typename Fn>
void ForImages(OpKernelContext* context, const Dims& d, Fn fn) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads();
  const i64 cost = d.h * d.w * d.k * d.c * 6;
  ::tensorflow::Shard(workers->num_threads, workers->workers, d.n, cost, fn);
}

// The sum over the batch, in double, of each image's `size` values, which `make_worker()(n, out)` writes for image n
// (one worker, with its own buffers, per range of images on TensorFlow's intra-op threads).
template <typename MakeWorker>
std::vector<double> SumOverImages(OpKernelContext* context, const Dims& d, i64 size, MakeWorker make_worker) {
  std::vector<double> sums(d.n * size, 0.0);
  ForImages(context, d, [&](i64 begin, i64 end) {
    auto worker = make_worker();
    for (i64 n = begin; n < end; ++n) worker(n, &sums[n * size]);
  });
  std::vector<double> total(size, 0.0);
  for (i64 n = 0; n < d.n; ++n)
    for (i64 i = 0; i < size; ++i) total[i] += sums[n * size + i];
  return total;
}

// Writes a row vector, then a matrix's values, to `out`.
void Store(const Eigen::RowVectorXf& row, const Matrix& matrix, double* out) {
  std::copy(row.data(), row.data() + row.size(), out);
  std::copy(matrix.data(), matrix.data() + matrix.size(), out + row.size());
}

// An image's 3x3 patches, in buffers that stay in cache (one image at a time).
struct Patches {
  std::vector<float> padded;
  Matrix columns;
  explicit Patches(const Dims& d) : padded((d.h + 2) * (d.w + 2) * d.ci, 0.f), columns(d.h * d.w, d.k) {}
  void Of(const float* x, const Dims& d, i64 n) { Im2Col(x + n * d.h * d.w * d.ci, d, padded.data(), columns.data()); }
};

// An image's patches and its convolution's output without the bias.
struct Image : Patches {
  Matrix z;
  explicit Image(const Dims& d) : Patches(d), z(d.h * d.w, d.c) {}
  void Convolve(const float* x, const float* kernel, const Dims& d, i64 n) {
    Of(x, d, n);
    z.noalias() = columns * ConstMatrixMap(kernel, d.k, d.c);
  }
};

// out[u] = sum_i a[i] * b[i + u - 2] for u = 0..4: five neighbouring lags in one pass over `a` (Eigen's packets).
inline void FiveLags(const float* a, const float* b, i64 n, float* out) {
  namespace E = Eigen::internal;
  using Packet = E::packet_traits<float>::type;
  constexpr i64 kSize = E::unpacket_traits<Packet>::size;
  Packet acc[5];
  for (Packet& p : acc) p = E::pset1<Packet>(0.f);
  i64 i = 0;
  for (; i + kSize <= n; i += kSize) {
    const Packet ai = E::ploadu<Packet>(a + i);
    for (int u = 0; u < 5; ++u) acc[u] = E::pmadd(ai, E::ploadu<Packet>(b + i + u - 2), acc[u]);
  }
  for (int u = 0; u < 5; ++u) {
    out[u] = E::predux(acc[u]);
    for (i64 j = i; j < n; ++j) out[u] += a[j] * b[j + u - 2];
  }
}

inline float Dot(const float* a, const float* b, i64 n) {
  return Eigen::Map<const Eigen::VectorXf>(a, n).dot(Eigen::Map<const Eigen::VectorXf>(b, n));
}

// An image's sums over its 3x3 patches that batch norm's statistics need, the patches shifted by `shift` (one value
// per input channel): the k sums of the patches and the k x k sums of their products (the Gram matrix), written to
// `out` in that order. A patch holds the image at nine offsets, so each product's sum is a lag product of the image
// with itself (25 lags), less the rows and columns that this offset's patches do not reach. This is about a fifth
// of the Gram matrix's multiply-adds, and no patches are written.
class PatchMoments {
 public:
  explicit PatchMoments(const Dims& d)
      : d_(d), y_(d.h, d.w, d.ci), yt_(d.w, d.h, d.ci), full_(25 * d.ci * d.ci), rows_(100 * d.ci * d.ci),
        columns_(100 * d.ci * d.ci) {}

  void operator()(const float* x, const float* shift, double* out) {
    const i64 h = d_.h, w = d_.w, ci = d_.ci, cc = ci * ci, k = d_.k;
    for (i64 c = 0; c < ci; ++c) {
      // what a patch reads, shifted: x - s in the image, -s on the ring around it (the patches' zero padding)
      const float s = shift[c];
      for (i64 i = 1; i <= h + 2; ++i) {
        for (i64 j = 1; j <= w + 2; ++j) *y_.At(c, i, j) = -s;
      }
      for (i64 a = 0; a < h; ++a) {
        for (i64 b = 0; b < w; ++b) *y_.At(c, a + 2, b + 2) = x[(a * w + b) * ci + c] - s;
      }
      for (i64 i = 1; i <= h + 2; ++i) {
        for (i64 j = 1; j <= w + 2; ++j) *yt_.At(c, j, i) = *y_.At(c, i, j);
      }
    }
    // The patches at offset o = (oy, ox) read rows oy+1 .. oy+h and columns ox+1 .. ox+w of the ring's h+2 x w+2
    // square: all but two of its edge rows {1, 2, h+1, h+2}, and of its edge columns.
    const i64 edge_rows[4] = {1, 2, h + 1, h + 2}, edge_columns[4] = {1, 2, w + 1, w + 2};
    static constexpr int kLeftOut[3][2] = {{2, 3}, {0, 3}, {0, 1}};  // indices into the edges, for oy (ox) = 0, 1, 2
    for (i64 c = 0; c < ci; ++c) {
      double total = 0, row_sums[4], column_sums[4];
      for (i64 i = 1; i <= h + 2; ++i) total += Eigen::Map<const Eigen::VectorXf>(y_.At(c, i, 1), w + 2).sum();
      for (int e = 0; e < 4; ++e) {
        row_sums[e] = Eigen::Map<const Eigen::VectorXf>(y_.At(c, edge_rows[e], 1), w + 2).sum();
        column_sums[e] = Eigen::Map<const Eigen::VectorXf>(yt_.At(c, edge_columns[e], 1), h + 2).sum();
      }
      for (i64 o = 0; o < 9; ++o) {
        double sum = total;
        for (int e : kLeftOut[o / 3]) sum -= row_sums[e];
        for (int f : kLeftOut[o % 3]) sum -= column_sums[f];
        for (int e : kLeftOut[o / 3]) {
          for (int f : kLeftOut[o % 3]) sum += *y_.At(c, edge_rows[e], edge_columns[f]);
        }
        out[o * ci + c] = sum;
      }
    }
    // For each lag (dy, dx) and channel pair: the lag product over the square, and over each edge row and column.
    // Lag (dy, dx) of (c1, c2) equals lag (-dy, -dx) of (c2, c1) over the square (zeros lie beyond it).
    const i64 length = (h + 2) * y_.stride;
    for (i64 dy = -2; dy <= 2; ++dy) {
      for (i64 c1 = 0; c1 < ci; ++c1) {
        for (i64 c2 = 0; c2 < ci; ++c2) {
          const i64 first = Lag(dy, -2, c1, c2);
          if (dy >= 0) {
            float five[5];
            FiveLags(y_.At(c1, 1, 0), y_.At(c2, 1 + dy, 0), length, five);
            for (int u = 0; u < 5; ++u) full_[first + u * cc] = five[u];
          } else {
            for (i64 dx = -2; dx <= 2; ++dx) full_[Lag(dy, dx, c1, c2)] = full_[Lag(-dy, -dx, c2, c1)];
          }
          for (i64 dx = -2; dx <= 2; ++dx) {
            const i64 lag = Lag(dy, dx, c1, c2);
            for (int e = 0; e < 4; ++e) {
              rows_[lag * 4 + e] = Dot(y_.At(c1, edge_rows[e], 1), y_.At(c2, edge_rows[e] + dy, 1 + dx), w + 2);
              columns_[lag * 4 + e] =
                  Dot(yt_.At(c1, edge_columns[e], 1), yt_.At(c2, edge_columns[e] + dx, 1 + dy), h + 2);
            }
          }
        }
      }
    }
    for (i64 k1 = 0; k1 < k; ++k1) {
      for (i64 k2 = k1; k2 < k; ++k2) {
        const i64 o1 = k1 / ci, c1 = k1 % ci, o2 = k2 / ci, c2 = k2 % ci, oy = o1 / 3, ox = o1 % 3;
        const i64 dy = o2 / 3 - oy, dx = o2 % 3 - ox, lag = Lag(dy, dx, c1, c2);
        double sum = full_[lag];
        for (int e : kLeftOut[oy]) sum -= rows_[lag * 4 + e];
        for (int f : kLeftOut[ox]) sum -= columns_[lag * 4 + f];
        for (int e : kLeftOut[oy]) {
          for (int f : kLeftOut[ox]) {
            sum += *y_.At(c1, edge_rows[e], edge_columns[f]) * *y_.At(c2, edge_rows[e] + dy, edge_columns[f] + dx);
          }
        }
        out[k + k1 * k + k2] = out[k + k2 * k + k1] = sum;
      }
    }
  }

 private:
  // One plane per channel, rows -2 .. h+5 and columns 0 .. w+3, zero outside what operator() writes, so that every
  // lag of rows 1 .. h+2 stays inside (a lag that runs off a row's end lands on zeros).
  struct Planes {
    i64 stride, size;
    std::vector<float> values;
    Planes(i64 h, i64 w, i64 ci) : stride(w + 4), size((h + 8) * (w + 4)), values(ci * size, 0.f) {}
    float* At(i64 c, i64 i, i64 j) { return values.data() + c * size + (i + 2) * stride + j; }
  };
  i64 Lag(i64 dy, i64 dx, i64 c1, i64 c2) const { return ((dy + 2) * 5 + dx + 2) * d_.ci * d_.ci + c1 * d_.ci + c2; }

  Dims d_;
  Planes y_, yt_;  // the shifted image and its transpose
  std::vector<float> full_, rows_, columns_;
};

// Batch norm's affine map on the convolution's output without its bias: a = z * scale + shift.
struct Normalization {
  std::vector<float> scale, shift, inverse;
  Normalization(const float* bias, const float* gamma, const float* beta, const float* mean, const float* variance,
                float epsilon, const Dims& d)
      : scale(d.c), shift(d.c), inverse(d.c) {
    for (i64 c = 0; c < d.c; ++c) {
      inverse[c] = 1.f / std::sqrt(variance[c] + epsilon);
      scale[c] = gamma[c] * inverse[c];
      shift[c] = beta[c] + (bias[c] - mean[c]) * scale[c];
    }
  }
};

// The 2x2 pooling windows' rows in an image's h*w x c maps: fn(rows[4], pooled index), for every window.
template <typename Fn>
inline void ForWindows(const Dims& d, Fn fn) {
  for (i64 pi = 0; pi < d.ho; ++pi) {
    for (i64 pj = 0; pj < d.wo; ++pj) {
      const i64 top = 2 * pi * d.w + 2 * pj;
      const i64 rows[4] = {top, top + 1, top + d.w, top + d.w + 1};
      fn(rows, pi * d.wo + pj);
    }
  }
}

// A window's route: the slot (0-3) of the value that its pooled gradient goes to, as MaxPoolGrad then ReluGrad route
// it (the first maximum of the normalised values v0..v3, if it is > 0), or 4 for none. A float from selects, so that
// loops over channels vectorise (an integer or a branch here stops them); the forward kernel stores it in a byte.
inline float WindowRoute(float v0, float v1, float v2, float v3) {
  const float t1 = v1 > v0 ? v1 : v0, t2 = v2 > t1 ? v2 : t1, top = v3 > t2 ? v3 : t2;
  const float slot = v3 > t2 ? 3.f : v2 > t1 ? 2.f : v1 > v0 ? 1.f : 0.f;
  return top > 0.f ? slot : 4.f;
}

// The kernels' common part: batch norm's epsilon attribute.
class EpsilonKernel : public OpKernel {
 public:
  explicit EpsilonKernel(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

 protected:
  float epsilon_;
};

class ConvBlockOp : public EpsilonKernel {
 public:
  using EpsilonKernel::EpsilonKernel;

  void Compute(OpKernelContext* context) override {
    Dims d;
    OP_REQUIRES_OK(context, ReadDims(context, 0, &d));
    const float* x = context->input(0).flat<float>().data();
    const float* kernel = context->input(1).flat<float>().data();
    const float* bias = context->input(2).flat<float>().data();
    const float* gamma = context->input(3).flat<float>().data();
    const float* beta = context->input(4).flat<float>().data();
    Tensor *y_tensor, *mean_tensor, *variance_tensor, *covariance_tensor, *patch_mean_tensor, *routes_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({d.n, d.ho, d.wo, d.c}), &y_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({d.c}), &mean_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({d.c}), &variance_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(3, TensorShape({d.k, d.k}), &covariance_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(4, TensorShape({d.k}), &patch_mean_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(5, TensorShape({d.n, d.ho, d.wo, d.c}), &routes_tensor));

    // The convolution is linear in the patches, so batch norm's statistics follow from the patches' mean m and
    // covariance C (k x k, from the input alone): mean = bias + m'W, variance = diag(W'CW). The patches are
    // shifted by the first image's mean per input channel first (no cancellation in C when |m| >> std).
    std::vector<float> shift(d.k, 0.f);
    for (i64 ch = 0; ch < d.ci; ++ch) {
      double total = 0;
      for (i64 p = 0; p < d.h * d.w; ++p) total += x[p * d.ci + ch];
      for (i64 o = 0; o < 9; ++o) shift[o * d.ci + ch] = static_cast<float>(total / (d.h * d.w));
    }
    const std::vector<double> total = SumOverImages(context, d, d.k + d.k * d.k, [&] {
      return [&, moments = PatchMoments(d)](i64 n, double* out) mutable {
        moments(x + n * d.h * d.w * d.ci, shift.data(), out);
      };
    });
    const double count = static_cast<double>(d.n * d.h * d.w);
    float* covariance = covariance_tensor->flat<float>().data();
    float* patch_mean = patch_mean_tensor->flat<float>().data();
    std::vector<double> centred_mean(d.k), cov(d.k * d.k);
    for (i64 k = 0; k < d.k; ++k) centred_mean[k] = total[k] / count, patch_mean[k] = shift[k] + centred_mean[k];
    for (i64 k = 0; k < d.k; ++k) {
      for (i64 l = 0; l < d.k; ++l) {
        cov[k * d.k + l] = total[d.k + k * d.k + l] / count - centred_mean[k] * centred_mean[l];
        covariance[k * d.k + l] = static_cast<float>(cov[k * d.k + l]);
      }
    }
    float* mean = mean_tensor->flat<float>().data();
    float* variance = variance_tensor->flat<float>().data();
    for (i64 c = 0; c < d.c; ++c) {
      double m = bias[c], v = 0;
      for (i64 k = 0; k < d.k; ++k) {
        const double wk = kernel[k * d.c + c];
        m += (shift[k] + centred_mean[k]) * wk;
        double row = 0;
        for (i64 l = 0; l < d.k; ++l) row += cov[k * d.k + l] * kernel[l * d.c + c];
        v += wk * row;
      }
      mean[c] = static_cast<float>(m), variance[c] = static_cast<float>(std::max(v, 0.0));
    }

    const Normalization norm(bias, gamma, beta, mean, variance, epsilon_, d);
    float* y = y_tensor->flat<float>().data();
    uint8_t* routes = routes_tensor->flat<uint8_t>().data();
    ForImages(context, d, [&](i64 begin, i64 end) {
      Image image(d);
      const i64 pooled_size = d.ho * d.wo * d.c;  // a local: the byte stores below may alias d
      std::vector<float> image_routes(pooled_size);
      const float *scale = norm.scale.data(), *offset = norm.shift.data();
      for (i64 n = begin; n < end; ++n) {
        image.Convolve(x, kernel, d, n);
        float* yn = y + n * d.ho * d.wo * d.c;
        const float* z = image.z.data();
        ForWindows(d, [&](const i64* rows, i64 pooled) {
          const float *z0 = z + rows[0] * d.c, *z1 = z + rows[1] * d.c, *z2 = z + rows[2] * d.c,
                      *z3 = z + rows[3] * d.c;
          float* out = yn + pooled * d.c;
          float* route = image_routes.data() + pooled * d.c;
#pragma GCC ivdep
          for (i64 c = 0; c < d.c; ++c) {
            // max, then ReLU, of the normalised values; a NaN anywhere in the window comes out as NaN
            const float v0 = z0[c] * scale[c] + offset[c], v1 = z1[c] * scale[c] + offset[c];
            const float v2 = z2[c] * scale[c] + offset[c], v3 = z3[c] * scale[c] + offset[c];
            float m = v0;
            m = (m >= v1) ? m : v1, m = (m >= v2) ? m : v2, m = (m >= v3) ? m : v3;
            const float relu = m > 0.f ? m : 0.f;
            out[c] = (m != m) ? m : relu;
            route[c] = WindowRoute(v0, v1, v2, v3);
          }
        });
        uint8_t* routes_n = routes + n * pooled_size;
        for (i64 i = 0; i < pooled_size; ++i) routes_n[i] = static_cast<uint8_t>(image_routes[i]);
      }
    });
  }
};

// Checks that input `i` (`name`) has `shape`.
::tensorflow::Status CheckShape(OpKernelContext* context, int i, const char* name, const TensorShape& shape) {
  if (context->input(i).shape() == shape) return ::tensorflow::OkStatus();
  return InvalidArgument(name, " must be ", shape.DebugString(), "; got ", context->input(i).shape().DebugString());
}

// The route kernels' inputs from `first` on: the forward kernel's routes, the block's input x and the patches'
// mean. Their gradient arguments come before `first`.
struct RouteInputs {
  const uint8_t* routes;
  const float *x, *patch_mean;
  ::tensorflow::Status Read(OpKernelContext* context, int first, Dims* d) {
    const Tensor &routes_tensor = context->input(first), &x_tensor = context->input(first + 1);
    if (x_tensor.dims() != 4) {
      return InvalidArgument("x must be [batch, height, width, channels]; got ", x_tensor.shape().DebugString());
    }
    if (routes_tensor.dims() != 4) {
      return InvalidArgument("routes must be [batch, height / 2, width / 2, filters]; got ",
                             routes_tensor.shape().DebugString());
    }
    d->n = x_tensor.dim_size(0), d->h = x_tensor.dim_size(1), d->w = x_tensor.dim_size(2), d->ci = x_tensor.dim_size(3);
    d->c = routes_tensor.dim_size(3), d->ho = d->h / 2, d->wo = d->w / 2, d->k = 9 * d->ci;
    TF_RETURN_IF_ERROR(CheckShape(context, first, "routes", TensorShape({d->n, d->ho, d->wo, d->c})));
    TF_RETURN_IF_ERROR(CheckShape(context, first + 2, "patch_mean", TensorShape({d->k})));
    routes = routes_tensor.flat<uint8_t>().data();
    x = x_tensor.flat<float>().data();
    patch_mean = context->input(first + 2).flat<float>().data();
    return ::tensorflow::OkStatus();
  }
};

// One image's gradient at batch norm's output: each window's pooled gradient `dy` on its route's position, zero
// elsewhere (positions outside every window, at odd sizes, stay zero).
void Route(const uint8_t* routes, const float* dy, const Dims& d, Matrix* routed) {
  float* out = routed->data();
  ForWindows(d, [&](const i64* rows, i64 pooled) {
    const uint8_t* route = routes + pooled * d.c;
    const float* g = dy + pooled * d.c;
    float *out0 = out + rows[0] * d.c, *out1 = out + rows[1] * d.c, *out2 = out + rows[2] * d.c,
          *out3 = out + rows[3] * d.c;
#pragma GCC ivdep
    for (i64 c = 0; c < d.c; ++c) {
      out0[c] = route[c] == 0 ? g[c] : 0.f, out1[c] = route[c] == 1 ? g[c] : 0.f;
      out2[c] = route[c] == 2 ? g[c] : 0.f, out3[c] = route[c] == 3 ? g[c] : 0.f;
    }
  });
}

// From the pooled gradient dy: the gradient at batch norm's output (along the forward pass's routes through pooling
// and ReLU), correlated with the centred patches (k x c, as the kernel) and summed over positions (c). Batch norm's
// and the convolution's gradients are ordinary ops on these two (tfmeta.kernels.conv_block), so that TensorFlow
// differentiates them.
class ConvBlockGradOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* context) override {
    Dims d;
    RouteInputs in;
    OP_REQUIRES_OK(context, in.Read(context, 1, &d));
    OP_REQUIRES_OK(context, CheckShape(context, 0, "dy", TensorShape({d.n, d.ho, d.wo, d.c})));
    const float* dy = context->input(0).flat<float>().data();
    const std::vector<double> total = SumOverImages(context, d, d.c + d.k * d.c, [&] {
      return [&, patches = Patches(d), routed = Matrix(Matrix::Zero(d.h * d.w, d.c)),
              correlation = Matrix(d.k, d.c)](i64 n, double* out) mutable {
        patches.Of(in.x, d, n);
        Route(in.routes + n * d.ho * d.wo * d.c, dy + n * d.ho * d.wo * d.c, d, &routed);
        correlation.noalias() = patches.columns.transpose() * routed;
        Store(routed.colwise().sum(), correlation, out);
      };
    });
    Tensor *correlation_tensor, *total_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({3, 3, d.ci, d.c}), &correlation_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({d.c}), &total_tensor));
    float* correlation = correlation_tensor->flat<float>().data();
    for (i64 c = 0; c < d.c; ++c) {
      total_tensor->flat<float>()(c) = static_cast<float>(total[c]);
      for (i64 k = 0; k < d.k; ++k) {  // centred: the sum of routes * (patch - patch_mean)
        correlation[k * d.c + c] = static_cast<float>(total[d.c + k * d.c + c] - in.patch_mean[k] * total[c]);
      }
    }
  }
};

// The adjoint of ConvBlockGrad in dy, so its gradient: from (dcorrelation, dtotal), each window's pooled value is
// (centred patch . dcorrelation + dtotal) at the position of its route, zero where it has none.
class ConvBlockGradGradOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* context) override {
    Dims d;
    RouteInputs in;
    OP_REQUIRES_OK(context, in.Read(context, 2, &d));
    OP_REQUIRES_OK(context, CheckShape(context, 0, "dcorrelation", TensorShape({3, 3, d.ci, d.c})));
    OP_REQUIRES_OK(context, CheckShape(context, 1, "dtotal", TensorShape({d.c})));
    const ConstMatrixMap dcorrelation(context->input(0).flat<float>().data(), d.k, d.c);
    // centred patch . dcorrelation + dtotal = patch . dcorrelation + (dtotal - patch_mean . dcorrelation)
    const Eigen::RowVectorXf offset = Row(context->input(1).flat<float>().data(), d.c) -
                                      Row(in.patch_mean, d.k) * dcorrelation;
    Tensor* ddy_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({d.n, d.ho, d.wo, d.c}), &ddy_tensor));
    float* ddy = ddy_tensor->flat<float>().data();
    ForImages(context, d, [&](i64 begin, i64 end) {
      Patches patches(d);
      Matrix values(d.h * d.w, d.c);
      const i64 pooled_size = d.ho * d.wo * d.c;
      std::vector<float> image_routes(pooled_size);  // as floats, so that the selects below vectorise
      for (i64 n = begin; n < end; ++n) {
        patches.Of(in.x, d, n);
        values.noalias() = patches.columns * dcorrelation;
        values.rowwise() += offset;
        const uint8_t* routes = in.routes + n * pooled_size;
        for (i64 i = 0; i < pooled_size; ++i) image_routes[i] = routes[i];
        float* out = ddy + n * pooled_size;
        ForWindows(d, [&](const i64* rows, i64 pooled) {
          const float* route = image_routes.data() + pooled * d.c;
          const float *v0 = values.data() + rows[0] * d.c, *v1 = values.data() + rows[1] * d.c,
                      *v2 = values.data() + rows[2] * d.c, *v3 = values.data() + rows[3] * d.c;
          float* o = out + pooled * d.c;
#pragma GCC ivdep
          for (i64 c = 0; c < d.c; ++c) {
            const float r = route[c], a0 = v0[c], a1 = v1[c], a2 = v2[c], a3 = v3[c];  // a sum of selects vectorises
            o[c] = (r == 0.f ? a0 : 0.f) + (r == 1.f ? a1 : 0.f) + (r == 2.f ? a2 : 0.f) + (r == 3.f ? a3 : 0.f);
          }
        });
      }
    });
  }
};

// The input gradient from dy, given the gradients of gamma and beta (batch norm's dense terms). Its inputs: dy, the
// block's (x, kernel, bias, gamma, beta), the forward pass's mean, variance and routes, then dgamma and dbeta.
class ConvBlockInputGradOp : public EpsilonKernel {
 public:
  using EpsilonKernel::EpsilonKernel;

  void Compute(OpKernelContext* context) override {
    Dims d;
    OP_REQUIRES_OK(context, ReadDims(context, 1, &d));
    const std::pair<int, const char*> vectors[] = {{6, "mean"}, {7, "variance"}, {9, "dgamma"}, {10, "dbeta"}};
    for (const auto& [i, name] : vectors) OP_REQUIRES_OK(context, CheckShape(context, i, name, TensorShape({d.c})));
    OP_REQUIRES_OK(context, CheckShape(context, 8, "routes", TensorShape({d.n, d.ho, d.wo, d.c})));
    OP_REQUIRES_OK(context, CheckShape(context, 0, "dy", TensorShape({d.n, d.ho, d.wo, d.c})));
    const float* in[11];
    for (int i : {0, 1, 2, 3, 4, 5, 6, 7, 9, 10}) in[i] = context->input(i).flat<float>().data();
    const float *dy = in[0], *x = in[1], *kernel = in[2], *bias = in[3], *mean = in[6], *dgamma = in[9], *dbeta = in[10];
    const uint8_t* routes = context->input(8).flat<uint8_t>().data();
    const Normalization norm(bias, in[4], in[5], mean, in[7], epsilon_, d);
    Tensor* dx_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(1).shape(), &dx_tensor));
    float* dx = dx_tensor->flat<float>().data();
    std::fill(dx, dx + dx_tensor->NumElements(), 0.f);
    // dz = scale * da + offset + slope * z (z without its bias), with batch norm's dense terms in offset and slope.
    const float count = static_cast<float>(d.n * d.h * d.w);
    Eigen::RowVectorXf scale(d.c), offset(d.c), slope(d.c);
    for (i64 c = 0; c < d.c; ++c) {
      scale[c] = norm.scale[c];
      slope[c] = -norm.scale[c] * norm.inverse[c] * dgamma[c] / count;
      offset[c] = -norm.scale[c] * dbeta[c] / count + slope[c] * (bias[c] - mean[c]);
    }
    ForImages(context, d, [&](i64 begin, i64 end) {
      Image image(d);
      Matrix routed = Matrix::Zero(d.h * d.w, d.c), dcolumns(d.h * d.w, d.k);
      for (i64 n = begin; n < end; ++n) {
        image.Convolve(x, kernel, d, n);
        Route(routes + n * d.ho * d.wo * d.c, dy + n * d.ho * d.wo * d.c, d, &routed);
        image.z = (routed.array().rowwise() * scale.array() + image.z.array().rowwise() * slope.array()).rowwise() +
                  offset.array();
        dcolumns.noalias() = image.z * ConstMatrixMap(kernel, d.k, d.c).transpose();
        Col2Im(dcolumns.data(), d, dx + n * d.h * d.w * d.ci);
      }
    });
  }
};

}  // namespace

REGISTER_OP("TfmetaConvBlock")
    .Input("x: float").Input("kernel: float").Input("bias: float").Input("gamma: float").Input("beta: float")
    .Output("y: float").Output("mean: float").Output("variance: float").Output("covariance: float")
    .Output("patch_mean: float").Output("routes: uint8")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &kernel));
      DimensionHandle height, width, patch;
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(x, 1), 2, false, &height));
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(x, 2), 2, false, &width));
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(x, 3), 9, &patch));
      c->set_output(0, c->MakeShape({c->Dim(x, 0), height, width, c->Dim(kernel, 3)}));
      c->set_output(1, c->Vector(c->Dim(kernel, 3)));
      c->set_output(2, c->Vector(c->Dim(kernel, 3)));
      c->set_output(3, c->Matrix(patch, patch));
      c->set_output(4, c->Vector(patch));
      c->set_output(5, c->output(0));
      return ::tensorflow::OkStatus();
    })
    .Doc("tfmeta: 3x3 convolution, batch norm (batch statistics), ReLU, 2x2 max pooling; y, mean, biased variance,"
         " the patches' covariance and mean, and each pooled value's route (the slot 0-3 its gradient goes to, 4 for"
         " none), which the gradient kernels take.");

REGISTER_OP("TfmetaConvBlockGrad")
    .Input("dy: float").Input("routes: uint8").Input("x: float").Input("patch_mean: float")
    .Output("correlation: float").Output("total: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, dy;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &dy));
      c->set_output(0, c->MakeShape({3, 3, c->Dim(x, 3), c->Dim(dy, 3)}));
      c->set_output(1, c->Vector(c->Dim(dy, 3)));
      return ::tensorflow::OkStatus();
    })
    .Doc("tfmeta: the gradient at the block's batch-norm output, correlated with the centred patches and summed.");

REGISTER_OP("TfmetaConvBlockGradGrad")
    .Input("dcorrelation: float").Input("dtotal: float").Input("routes: uint8").Input("x: float")
    .Input("patch_mean: float")
    .Output("ddy: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(2));
      return ::tensorflow::OkStatus();
    })
    .Doc("tfmeta: TfmetaConvBlockGrad's adjoint in dy (its gradient).");

REGISTER_OP("TfmetaConvBlockInputGrad")
    .Input("dy: float").Input("x: float").Input("kernel: float").Input("bias: float").Input("gamma: float")
    .Input("beta: float").Input("mean: float").Input("variance: float").Input("routes: uint8")
    .Input("dgamma: float").Input("dbeta: float")
    .Output("dx: float")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(1));
      return ::tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfmetaConvBlock").Device(DEVICE_CPU), ConvBlockOp);
REGISTER_KERNEL_BUILDER(Name("TfmetaConvBlockGrad").Device(DEVICE_CPU), ConvBlockGradOp);
REGISTER_KERNEL_BUILDER(Name("TfmetaConvBlockGradGrad").Device(DEVICE_CPU), ConvBlockGradGradOp);
REGISTER_KERNEL_BUILDER(Name("TfmetaConvBlockInputGrad").Device(DEVICE_CPU), ConvBlockInputGradOp);

}  // namespace tfmeta
