// Batch norm with the batch's statistics, ReLU and 2x2 max pooling (stride 2, "valid"): the forward pass, its
// backward pass, and that backward pass's own gradient. conv_net's later blocks, after their convolution.
//
// tfmeta.kernels builds this file with conv_block.cc; tfmeta.kernels.norm_pool registers NormPoolGradGrad as
// NormPoolGrad's gradient. Why: a MAML support pass's backward through batch norm is differentiated again, so it
// used to run as about 20 ordinary ops, and their derivative as about 40 more, each a pass over the maps; with the
// pooling and ReLU gradients they took a sixth of a 5-step second-order meta-step's op time (docs/performance.md).
// Here each is one kernel of two or three passes.
//
// Per channel, over the M = N*H*W values z of the batch (also those that pooling drops at odd sizes), with
// c = z - mean(z), r = 1/sqrt(mean(c^2) + epsilon), y = gamma*c*r + beta: the pooled gradient dp goes to the first
// maximum of its window where that maximum is > 0 (through the ReLU), giving g at full resolution. Then
//   dbeta = sum(g), dgamma = r*sum(g*c), dz = gamma*r*g - gamma*r*mean(g) - gamma*r^3*mean(g*c)*c.
// The routing is piecewise constant in z, gamma and beta, so the gradient of (dz, dgamma, dbeta) with cotangents
// (u, a, b) is, with P = mean(g*c), Q = mean(u*c), K = sum(u*g) - mean(g)*sum(u):
//   in g:     gamma*r*(u - mean(u)) - gamma*r^3*Q*c + a*r*c + b  (gathered back to the pooled positions: in dp)
//   in gamma: r*K - r^3*M*P*Q
//   in z:     alpha*c + beta1*(u - mean(u)) + beta2*(g - mean(g)), where
//             alpha = -r^3/M*(gamma*K - 3*gamma*r^2*M*P*Q + a*M*P), beta1 = -gamma*r^3*P, beta2 = a*r - gamma*r^3*Q.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfmeta {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
typedef int64_t i64;

struct Dims {
  i64 n, h, w, c, ho, wo;
  i64 values() const { return n * h * w; }    // per channel
  i64 windows() const { return n * ho * wo; }  // per channel
};

Status CheckShape(OpKernelContext* context, int index, const char* name, const TensorShape& expected) {
  if (context->input(index).shape() == expected) return ::tensorflow::OkStatus();
  return InvalidArgument(name, " must have shape ", expected.DebugString(), "; got ",
                         context->input(index).shape().DebugString());
}

// Reads z [n, h, w, c] at `z_index` and checks dp [n, h/2, w/2, c] at `dp_index` and gamma, beta [c] after z.
Status ReadDims(OpKernelContext* context, int dp_index, int z_index, Dims* d) {
  const Tensor& z = context->input(z_index);
  if (z.dims() != 4) {
    return InvalidArgument("z must be [batch, height, width, channels]; got ", z.shape().DebugString());
  }
  *d = {z.dim_size(0), z.dim_size(1), z.dim_size(2), z.dim_size(3), z.dim_size(1) / 2, z.dim_size(2) / 2};
  TF_RETURN_IF_ERROR(CheckShape(context, dp_index, "dp", TensorShape({d->n, d->ho, d->wo, d->c})));
  TF_RETURN_IF_ERROR(CheckShape(context, z_index + 1, "gamma", TensorShape({d->c})));
  return CheckShape(context, z_index + 2, "beta", TensorShape({d->c}));
}

// The inner loops over channels, with pointers that do not alias (so that they vectorize).
void AddSums(const float* __restrict row, i64 c, double* __restrict sum, double* __restrict squares) {
  for (i64 ch = 0; ch < c; ++ch) {
    const double value = row[ch];
    sum[ch] += value;
    squares[ch] += value * value;
  }
}

// For each channel of a window, which of its four positions (0-3) the pooled gradient goes to: the first maximum of
// y = z*scale + shift, or 4 where that maximum is <= 0 (the ReLU stops it). The forward kernel outputs these routes,
// so that the backward kernels need not recompute them.
void Route(const float* __restrict z0, const float* __restrict z1, const float* __restrict z2,
           const float* __restrict z3, const float* __restrict scale, const float* __restrict shift, i64 c,
           int32_t* __restrict out) {
  for (i64 ch = 0; ch < c; ++ch) {
    const float y0 = z0[ch] * scale[ch] + shift[ch], y1 = z1[ch] * scale[ch] + shift[ch];
    const float y2 = z2[ch] * scale[ch] + shift[ch], y3 = z3[ch] * scale[ch] + shift[ch];
    const float best = std::max(std::max(y0, y1), std::max(y2, y3));
    int32_t where = y2 == best ? 2 : 3;  // the first maximum, as selects (which vectorize)
    where = y1 == best ? 1 : where;
    where = y0 == best ? 0 : where;
    where = best > 0.0f ? where : 4;  // only a maximum > 0 passes the ReLU
    out[ch] = where;
  }
}

// The pooled outputs of one window: the maximum of max(0, y) over its four positions, y = z*scale + shift.
void Pool(const float* __restrict z0, const float* __restrict z1, const float* __restrict z2,
          const float* __restrict z3, const float* __restrict scale, const float* __restrict shift, i64 c,
          float* __restrict out) {
  for (i64 ch = 0; ch < c; ++ch) {
    const float y0 = z0[ch] * scale[ch] + shift[ch], y1 = z1[ch] * scale[ch] + shift[ch];
    const float y2 = z2[ch] * scale[ch] + shift[ch], y3 = z3[ch] * scale[ch] + shift[ch];
    float best = 0.0f;  // ReLU and then the maximum; a NaN is never selected (as ReLU and oneDNN's pooling do)
    best = y0 > best ? y0 : best;
    best = y1 > best ? y1 : best;
    best = y2 > best ? y2 : best;
    out[ch] = y3 > best ? y3 : best;
  }
}

// Sums of the routed g and g*c (c = z - centre) at one of a window's positions (`k`).
void AddRouted(const float* __restrict g, const int32_t* __restrict to, int32_t k, const float* __restrict zk,
               const float* __restrict centre, i64 c, float* __restrict sum_g, float* __restrict sum_gc) {
  for (i64 ch = 0; ch < c; ++ch) {
    const float routed = to[ch] == k ? g[ch] : 0.0f;
    sum_g[ch] += routed;
    sum_gc[ch] += routed * (zk[ch] - centre[ch]);
  }
}

void GradAt(const float* __restrict g, const int32_t* __restrict to, int32_t k, const float* __restrict zk,
            const float* __restrict k0, const float* __restrict k2, const float* __restrict offset, i64 c,
            float* __restrict out) {
  for (i64 ch = 0; ch < c; ++ch) out[ch] = offset[ch] - k2[ch] * zk[ch] + (to[ch] == k ? k0[ch] * g[ch] : 0.0f);
}

// Sums (in `sums`: u, u*c, g, g*c, u*g, each c long) at one of a window's positions (`k`).
void AddRoutedAndU(const float* __restrict g, const int32_t* __restrict to, int32_t k, const float* __restrict zk,
                   const float* __restrict uk, const float* __restrict centre, i64 c, float* __restrict sums) {
  float *__restrict sum_u = sums, *__restrict sum_uc = sums + c, *__restrict sum_g = sums + 2 * c;
  float *__restrict sum_gc = sums + 3 * c, *__restrict sum_ug = sums + 4 * c;
  for (i64 ch = 0; ch < c; ++ch) {
    const float routed = to[ch] == k ? g[ch] : 0.0f, centred = zk[ch] - centre[ch];
    sum_u[ch] += uk[ch];
    sum_uc[ch] += uk[ch] * centred;
    sum_g[ch] += routed;
    sum_gc[ch] += routed * centred;
    sum_ug[ch] += routed * uk[ch];
  }
}

// The gradients in z (`out`) and, added to `back`, in dp at one of a window's positions (`k`); `coefficients` holds
// gu, gz, g0, zz, zu, zg, z0, each c long (NormPoolGradGradOp).
void GradGradAt(const float* __restrict g, const int32_t* __restrict to, int32_t k, const float* __restrict zk,
                const float* __restrict uk, const float* __restrict coefficients, i64 c, float* __restrict out,
                float* __restrict back) {
  const float *__restrict gu = coefficients, *__restrict gz = gu + c, *__restrict g0 = gz + c;
  const float *__restrict zz = g0 + c, *__restrict zu = zz + c, *__restrict zg = zu + c, *__restrict z0 = zg + c;
  for (i64 ch = 0; ch < c; ++ch) {
    const bool routed = to[ch] == k;
    out[ch] = zz[ch] * zk[ch] + zu[ch] * uk[ch] + z0[ch] + (routed ? zg[ch] * g[ch] : 0.0f);
    back[ch] += routed ? gu[ch] * uk[ch] + gz[ch] * zk[ch] + g0[ch] : 0.0f;
  }
}

// Per channel: the batch's mean and r = 1/sqrt(biased variance + epsilon), from sums in double (one pass).
void Statistics(const float* z, const Dims& d, float epsilon, std::vector<double>* mean, std::vector<double>* r) {
  std::vector<double> sums(2 * d.c, 0.0);
  double* sum = sums.data();
  double* squares = sum + d.c;
  for (i64 p = 0; p < d.values(); ++p) AddSums(z + p * d.c, d.c, sum, squares);
  mean->resize(d.c);
  r->resize(d.c);
  for (i64 ch = 0; ch < d.c; ++ch) {
    const double m = sum[ch] / d.values();
    (*mean)[ch] = m;
    (*r)[ch] = 1.0 / std::sqrt(std::max(squares[ch] / d.values() - m * m, 0.0) + epsilon);
  }
}

// The forward kernel's statistics, inputs `index` (mean) and `index` + 1 (biased variance), as Statistics gives
// them: the backward kernels take them rather than pass over z again.
Status ReadStatistics(OpKernelContext* context, int index, const Dims& d, float epsilon, std::vector<double>* mean,
                      std::vector<double>* r) {
  TF_RETURN_IF_ERROR(CheckShape(context, index, "mean", TensorShape({d.c})));
  TF_RETURN_IF_ERROR(CheckShape(context, index + 1, "variance", TensorShape({d.c})));
  const float* m = context->input(index).flat<float>().data();
  const float* v = context->input(index + 1).flat<float>().data();
  mean->assign(m, m + d.c);
  r->resize(d.c);
  for (i64 ch = 0; ch < d.c; ++ch) (*r)[ch] = 1.0 / std::sqrt(static_cast<double>(v[ch]) + epsilon);
  return ::tensorflow::OkStatus();
}

// Calls visit(window, offsets) for each pooling window (its index among the n*ho*wo, and the offsets in z of its
// four positions, in row-major order), then leftover(offset) for each position no window covers (odd sizes).
template <typename Visit, typename Leftover>
void ForWindows(const Dims& d, Visit visit, Leftover leftover) {
  for (i64 b = 0; b < d.n; ++b) {
    for (i64 i = 0; i < d.h; ++i) {
      for (i64 j = 0; j < d.w; ++j) {
        if (i >= 2 * d.ho || j >= 2 * d.wo) leftover(((b * d.h + i) * d.w + j) * d.c);
      }
    }
    for (i64 i = 0; i < d.ho; ++i) {
      for (i64 j = 0; j < d.wo; ++j) {
        const i64 corner = ((b * d.h + 2 * i) * d.w + 2 * j) * d.c;
        const i64 offsets[4] = {corner, corner + d.c, corner + d.w * d.c, corner + (d.w + 1) * d.c};
        visit((b * d.ho + i) * d.wo + j, offsets);
      }
    }
  }
}

// `count` sums per channel over the windows (and leftover positions): visit(window, offsets, partial) and
// leftover(offset, partial) add into float partial sums, which go into double once per row of windows.
template <typename Visit, typename Leftover>
std::vector<double> SumByRows(const Dims& d, i64 count, Visit visit, Leftover leftover) {
  std::vector<double> sums(count * d.c, 0.0);
  std::vector<float> partial(count * d.c, 0.0f);
  auto flush = [&]() {
    for (i64 i = 0; i < count * d.c; ++i) sums[i] += partial[i], partial[i] = 0.0f;
  };
  ForWindows(d, [&](i64 window, const i64* offsets) {
    visit(window, offsets, partial.data());
    if ((window + 1) % d.wo == 0) flush();
  }, [&](i64 at) { leftover(at, partial.data()); });
  flush();
  return sums;
}

// Batch norm as y = z*scale + shift per channel: scale = gamma*r, shift = beta - gamma*r*mean (`affine`: 2*c).
std::vector<float> Affine(const float* gamma, const float* beta, const Dims& d, const std::vector<double>& mean,
                          const std::vector<double>& r) {
  std::vector<float> affine(2 * d.c);
  for (i64 ch = 0; ch < d.c; ++ch) {
    affine[ch] = static_cast<float>(gamma[ch] * r[ch]);
    affine[d.c + ch] = static_cast<float>(beta[ch] - gamma[ch] * r[ch] * mean[ch]);
  }
  return affine;
}

// The three kernels' common part: batch norm's epsilon.
class NormPoolKernel : public OpKernel {
 public:
  explicit NormPoolKernel(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

 protected:
  float epsilon_;
};

class NormPoolOp : public NormPoolKernel {
 public:
  using NormPoolKernel::NormPoolKernel;

  // Inputs: z, gamma, beta. Outputs: the pooled output, the batch's mean and biased variance, and the routes.
  void Compute(OpKernelContext* context) override {
    const Tensor& z_tensor = context->input(0);
    OP_REQUIRES(context, z_tensor.dims() == 4,
                InvalidArgument("z must be [batch, height, width, channels]; got ", z_tensor.shape().DebugString()));
    const Dims d{z_tensor.dim_size(0), z_tensor.dim_size(1), z_tensor.dim_size(2), z_tensor.dim_size(3),
                 z_tensor.dim_size(1) / 2, z_tensor.dim_size(2) / 2};
    OP_REQUIRES_OK(context, CheckShape(context, 1, "gamma", TensorShape({d.c})));
    OP_REQUIRES_OK(context, CheckShape(context, 2, "beta", TensorShape({d.c})));
    Tensor *p_tensor, *mean_tensor, *variance_tensor, *routes_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({d.n, d.ho, d.wo, d.c}), &p_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({d.c}), &mean_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({d.c}), &variance_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(3, p_tensor->shape(), &routes_tensor));
    const float* z = z_tensor.flat<float>().data();
    std::vector<double> mean, r;
    Statistics(z, d, epsilon_, &mean, &r);
    for (i64 ch = 0; ch < d.c; ++ch) {
      mean_tensor->flat<float>()(ch) = static_cast<float>(mean[ch]);
      variance_tensor->flat<float>()(ch) = static_cast<float>(1.0 / (r[ch] * r[ch]) - epsilon_);
    }
    const std::vector<float> affine =
        Affine(context->input(1).flat<float>().data(), context->input(2).flat<float>().data(), d, mean, r);
    float* p = p_tensor->flat<float>().data();
    int32_t* routes = routes_tensor->flat<int32_t>().data();
    const float *scale = affine.data(), *shift = scale + d.c;
    ForWindows(d, [&](i64 window, const i64* offsets) {
      const float *z0 = z + offsets[0], *z1 = z + offsets[1], *z2 = z + offsets[2], *z3 = z + offsets[3];
      Pool(z0, z1, z2, z3, scale, shift, d.c, p + window * d.c);
      Route(z0, z1, z2, z3, scale, shift, d.c, routes + window * d.c);
    }, [](i64) {});
  }
};

class NormPoolGradOp : public NormPoolKernel {
 public:
  using NormPoolKernel::NormPoolKernel;

  // Inputs: dp, z, gamma, beta, and the forward kernel's mean, variance and routes. Outputs: dz, dgamma, dbeta.
  void Compute(OpKernelContext* context) override {
    Dims d;
    OP_REQUIRES_OK(context, ReadDims(context, 0, 1, &d));
    const float* dp = context->input(0).flat<float>().data();
    const float* z = context->input(1).flat<float>().data();
    const float* gamma = context->input(2).flat<float>().data();
    Tensor *dz_tensor, *dgamma_tensor, *dbeta_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(1).shape(), &dz_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({d.c}), &dgamma_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({d.c}), &dbeta_tensor));
    std::vector<double> mean, r;
    OP_REQUIRES_OK(context, ReadStatistics(context, 4, d, epsilon_, &mean, &r));
    OP_REQUIRES_OK(context, CheckShape(context, 6, "routes", context->input(0).shape()));
    const int32_t* route = context->input(6).flat<int32_t>().data();
    // sums of g and g*c over the routed positions
    const std::vector<float> centres(mean.begin(), mean.end());
    const std::vector<double> sums = SumByRows(d, 2, [&](i64 window, const i64* offsets, float* partial) {
      for (int32_t k = 0; k < 4; ++k) {
        AddRouted(dp + window * d.c, route + window * d.c, k, z + offsets[k], centres.data(), d.c, partial,
                  partial + d.c);
      }
    }, [](i64, float*) {});
    const double *sum_g = sums.data(), *sum_gc = sum_g + d.c;
    // dz = k0*g - k1 - k2*c, with c = z - mean: k0*g + offset - k2*z
    std::vector<float> coefficients(3 * d.c);
    float *k0 = coefficients.data(), *k2 = k0 + d.c, *offset = k2 + d.c;
    float* dgamma = dgamma_tensor->flat<float>().data();
    float* dbeta = dbeta_tensor->flat<float>().data();
    for (i64 ch = 0; ch < d.c; ++ch) {
      const double m = d.values(), gr = gamma[ch] * r[ch];
      const double k1 = gr * sum_g[ch] / m, slope = gr * r[ch] * r[ch] * sum_gc[ch] / m;
      k0[ch] = static_cast<float>(gr);
      k2[ch] = static_cast<float>(slope);
      offset[ch] = static_cast<float>(slope * mean[ch] - k1);
      dgamma[ch] = static_cast<float>(r[ch] * sum_gc[ch]);
      dbeta[ch] = static_cast<float>(sum_g[ch]);
    }
    float* dz = dz_tensor->flat<float>().data();
    ForWindows(d, [&](i64 window, const i64* offsets) {
      const float* g = dp + window * d.c;
      const int32_t* to = route + window * d.c;
      for (int32_t k = 0; k < 4; ++k) GradAt(g, to, k, z + offsets[k], k0, k2, offset, d.c, dz + offsets[k]);
    }, [&](i64 at) {
      for (i64 ch = 0; ch < d.c; ++ch) dz[at + ch] = offset[ch] - k2[ch] * z[at + ch];
    });
  }
};

class NormPoolGradGradOp : public NormPoolKernel {
 public:
  using NormPoolKernel::NormPoolKernel;

  // Inputs: u (cotangent of dz), a (of dgamma), b (of dbeta), dp, z, gamma, beta, and the forward kernel's mean,
  // variance and routes. Outputs: ddp, dz, dgamma.
  void Compute(OpKernelContext* context) override {
    Dims d;
    OP_REQUIRES_OK(context, ReadDims(context, 3, 4, &d));
    OP_REQUIRES_OK(context, CheckShape(context, 0, "u", context->input(4).shape()));
    OP_REQUIRES_OK(context, CheckShape(context, 1, "a", TensorShape({d.c})));
    OP_REQUIRES_OK(context, CheckShape(context, 2, "b", TensorShape({d.c})));
    const float* u = context->input(0).flat<float>().data();
    const float* a = context->input(1).flat<float>().data();
    const float* b = context->input(2).flat<float>().data();
    const float* dp = context->input(3).flat<float>().data();
    const float* z = context->input(4).flat<float>().data();
    const float* gamma = context->input(5).flat<float>().data();
    Tensor *ddp_tensor, *dz_tensor, *dgamma_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(3).shape(), &ddp_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(4).shape(), &dz_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({d.c}), &dgamma_tensor));
    std::vector<double> mean, r;
    OP_REQUIRES_OK(context, ReadStatistics(context, 7, d, epsilon_, &mean, &r));
    OP_REQUIRES_OK(context, CheckShape(context, 9, "routes", context->input(3).shape()));
    const int32_t* route = context->input(9).flat<int32_t>().data();
    // sums over all values (u, u*c) and over the routed ones (g, g*c, u*g)
    const std::vector<float> centres(mean.begin(), mean.end());
    const float* centre = centres.data();
    const std::vector<double> sums = SumByRows(d, 5, [&](i64 window, const i64* offsets, float* partial) {
      for (int32_t k = 0; k < 4; ++k) {
        AddRoutedAndU(dp + window * d.c, route + window * d.c, k, z + offsets[k], u + offsets[k], centre, d.c,
                      partial);
      }
    }, [&](i64 at, float* partial) {
      for (i64 ch = 0; ch < d.c; ++ch) {
        partial[ch] += u[at + ch];
        partial[d.c + ch] += u[at + ch] * (z[at + ch] - centre[ch]);
      }
    });
    const double *sum_u = sums.data(), *sum_uc = sum_u + d.c, *sum_g = sum_uc + d.c, *sum_gc = sum_g + d.c,
                 *sum_ug = sum_gc + d.c;
    // Per channel, the gradient in g is gu*u + gz*z + g0, and the gradient in z is zz*z + zu*u + zg*g + z0.
    std::vector<float> coefficients(7 * d.c);
    float *gu = coefficients.data(), *gz = gu + d.c, *g0 = gz + d.c, *zz = g0 + d.c, *zu = zz + d.c,
          *zg = zu + d.c, *z0 = zg + d.c;
    float* dgamma = dgamma_tensor->flat<float>().data();
    for (i64 ch = 0; ch < d.c; ++ch) {
      const double m = d.values(), rc = r[ch], r3 = rc * rc * rc, gm = gamma[ch];
      const double mean_u = sum_u[ch] / m, mean_g = sum_g[ch] / m;
      const double P = sum_gc[ch] / m, Q = sum_uc[ch] / m;
      const double K = sum_ug[ch] - mean_g * sum_u[ch];
      const double alpha = -r3 / m * (gm * K - 3.0 * gm * rc * rc * m * P * Q + a[ch] * m * P);
      const double beta1 = -gm * r3 * P, beta2 = a[ch] * rc - gm * r3 * Q;  // beta2 is also the g-gradient's slope
      gu[ch] = static_cast<float>(gm * rc);
      gz[ch] = static_cast<float>(beta2);
      g0[ch] = static_cast<float>(-gm * rc * mean_u - beta2 * mean[ch] + b[ch]);
      zz[ch] = static_cast<float>(alpha);
      zu[ch] = static_cast<float>(beta1);
      zg[ch] = static_cast<float>(beta2);
      z0[ch] = static_cast<float>(-alpha * mean[ch] - beta1 * mean_u - beta2 * mean_g);
      dgamma[ch] = static_cast<float>(rc * K - r3 * m * P * Q);
    }
    float* dz = dz_tensor->flat<float>().data();
    float* ddp = ddp_tensor->flat<float>().data();
    ForWindows(d, [&](i64 window, const i64* offsets) {
      const float* g = dp + window * d.c;
      const int32_t* to = route + window * d.c;
      float* back = ddp + window * d.c;
      for (i64 ch = 0; ch < d.c; ++ch) back[ch] = 0.0f;
      for (int32_t k = 0; k < 4; ++k) {
        GradGradAt(g, to, k, z + offsets[k], u + offsets[k], coefficients.data(), d.c, dz + offsets[k], back);
      }
    }, [&](i64 at) {
      for (i64 ch = 0; ch < d.c; ++ch) dz[at + ch] = zz[ch] * z[at + ch] + zu[ch] * u[at + ch] + z0[ch];
    });
  }
};

REGISTER_OP("TfmetaNormPool")
    .Input("z: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("p: float")
    .Output("mean: float")
    .Output("variance: float")
    .Output("routes: int32")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle z;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &z));
      auto half = [c](::tensorflow::shape_inference::DimensionHandle dim) {
        return c->ValueKnown(dim) ? c->MakeDim(c->Value(dim) / 2) : c->UnknownDim();
      };
      c->set_output(0, c->MakeShape({c->Dim(z, 0), half(c->Dim(z, 1)), half(c->Dim(z, 2)), c->Dim(z, 3)}));
      c->set_output(1, c->Vector(c->Dim(z, 3)));
      c->set_output(2, c->Vector(c->Dim(z, 3)));
      c->set_output(3, c->output(0));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("TfmetaNormPoolGrad")
    .Input("dp: float")
    .Input("z: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("mean: float")
    .Input("variance: float")
    .Input("routes: int32")
    .Output("dz: float")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle z;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &z));
      c->set_output(0, z);
      c->set_output(1, c->Vector(c->Dim(z, 3)));
      c->set_output(2, c->Vector(c->Dim(z, 3)));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("TfmetaNormPoolGradGrad")
    .Input("u: float")
    .Input("a: float")
    .Input("b: float")
    .Input("dp: float")
    .Input("z: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("mean: float")
    .Input("variance: float")
    .Input("routes: int32")
    .Output("ddp: float")
    .Output("dz: float")
    .Output("dgamma: float")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(3));
      c->set_output(1, c->input(4));
      c->set_output(2, c->input(5));
      return ::tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfmetaNormPool").Device(DEVICE_CPU), NormPoolOp);
REGISTER_KERNEL_BUILDER(Name("TfmetaNormPoolGrad").Device(DEVICE_CPU), NormPoolGradOp);
REGISTER_KERNEL_BUILDER(Name("TfmetaNormPoolGradGrad").Device(DEVICE_CPU), NormPoolGradGradOp);

}  // namespace
}  // namespace tfmeta
