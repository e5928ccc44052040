// Batched products of small matrices on the calling thread: what tf.vectorized_map makes of a dense learner's
// per-task weights (tfmeta.kernels.batch_matmul).
//
// Why: MAML's tasks, vectorised, turn each dense layer's product into BatchMatMulV2 of, on the sine MLP, 25 products
// of 10x40 by 40x40. TensorFlow's kernels (oneDNN's and Eigen's) split so small a batch across the intra-op threads,
// and waking a second thread costs more than the product: 26-53 us per op with two threads against 10 us with one
// (docs/performance.md, issue 21). Here batches below about 8M multiply-adds run on the calling thread, larger ones
// are split over the intra-op pool.
//
// out[b] = op(x[b]) op(y[b]), op(m) = m or its transpose (adj_x, adj_y; real types only), for x, y of rank 3 with the
// same batch size.

#include <algorithm>
#include <cstdint>

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
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
typedef int64_t i64;

// Multiply-adds below which a batch runs on the calling thread, against the tens of microseconds it costs to wake
// another thread on these machines. Measured (25 products, 2 threads): at 4M multiply-adds one thread was faster, at
// 16M two were (by a tenth).
constexpr i64 kInlineMultiplyAdds = i64{1} << 23;

REGISTER_OP("TfmetaBatchMatMul")
    .Input("x: T")
    .Input("y: T")
    .Output("output: T")
    .Attr("T: {float, double}")
    .Attr("adj_x: bool = false")
    .Attr("adj_y: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, y, batch;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &y));
      bool adj_x, adj_y;
      TF_RETURN_IF_ERROR(c->GetAttr("adj_x", &adj_x));
      TF_RETURN_IF_ERROR(c->GetAttr("adj_y", &adj_y));
      DimensionHandle b, k;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(y, 0), &b));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, adj_x ? 1 : 2), c->Dim(y, adj_y ? 2 : 1), &k));
      c->set_output(0, c->MakeShape({b, c->Dim(x, adj_x ? 2 : 1), c->Dim(y, adj_y ? 1 : 2)}));
      return ::tensorflow::OkStatus();
    });

template <typename T>
class BatchMatMulOp : public OpKernel {
 public:
  explicit BatchMatMulOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("adj_x", &adj_x_));
    OP_REQUIRES_OK(context, context->GetAttr("adj_y", &adj_y_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& y = context->input(1);
    OP_REQUIRES(context, x.dims() == 3 && y.dims() == 3,
                InvalidArgument("x and y must be [batch, rows, columns]; got ", x.shape().DebugString(), " and ",
                                y.shape().DebugString()));
    const i64 batch = x.dim_size(0), m = x.dim_size(adj_x_ ? 2 : 1), k = x.dim_size(adj_x_ ? 1 : 2);
    const i64 n = y.dim_size(adj_y_ ? 1 : 2);
    OP_REQUIRES(context, y.dim_size(0) == batch && y.dim_size(adj_y_ ? 2 : 1) == k,
                InvalidArgument("x and y must hold the same number of matrices of matching inner size; got ",
                                x.shape().DebugString(), " and ", y.shape().DebugString(), " (adj_x=", adj_x_,
                                ", adj_y=", adj_y_, ")"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, m, n}), &out));
    const T* xs = x.flat<T>().data();
    const T* ys = y.flat<T>().data();
    T* outs = out->flat<T>().data();
    auto products = [&](i64 begin, i64 end) {
      for (i64 i = begin; i < end; ++i) Product(xs + i * m * k, ys + i * k * n, outs + i * m * n, m, k, n);
    };
    if (batch * m * k * n < kInlineMultiplyAdds) {
      products(0, batch);
    } else {
      auto* workers = context->device()->tensorflow_cpu_worker_threads();
      ::tensorflow::Shard(workers->num_threads, workers->workers, batch, 2 * m * k * n, products);
    }
  }

 private:
  typedef Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Matrix;
  typedef Eigen::Map<const Matrix> In;
  typedef Eigen::Map<Matrix> Out;

  void Product(const T* x, const T* y, T* out, i64 m, i64 k, i64 n) const {
    Out result(out, m, n);
    if (k == 0) {
      result.setZero();
    } else if (!adj_x_ && !adj_y_) {
      result.noalias() = In(x, m, k) * In(y, k, n);
    } else if (!adj_x_) {
      result.noalias() = In(x, m, k) * In(y, n, k).transpose();
    } else if (!adj_y_) {
      result.noalias() = In(x, k, m).transpose() * In(y, k, n);
    } else {
      result.noalias() = In(x, k, m).transpose() * In(y, n, k).transpose();
    }
  }

  bool adj_x_, adj_y_;
};

REGISTER_KERNEL_BUILDER(Name("TfmetaBatchMatMul").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        BatchMatMulOp<float>);
REGISTER_KERNEL_BUILDER(Name("TfmetaBatchMatMul").Device(DEVICE_CPU).TypeConstraint<double>("T"),
                        BatchMatMulOp<double>);

}  // namespace
}  // namespace tfmeta
