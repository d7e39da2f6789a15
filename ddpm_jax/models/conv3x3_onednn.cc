// The U-Net's 3x3 stride-1 'same' convolutions on the CPU through oneDNN, as XLA FFI handlers.
//
// Three handlers, one per pass of a convolution y = conv(x, w) with NHWC activations and HWIO weights (float32):
//   ddpm_conv3x3_forward          (x, w)  -> y
//   ddpm_conv3x3_input_grad       (g, w)  -> dx
//   ddpm_conv3x3_weight_grad      (x, g)  -> dw
// Activations stay in XLA's row-major NHWC buffers; only the (small) weights are reordered into the layout oneDNN
// picks for them. oneDNN primitives are expensive to create and cheap to run, so each (pass, N, H, W, C_in, C_out)
// primitive is created once per process and cached. Calls are serialised: oneDNN already runs each one on every
// core (OpenMP), and two at once from XLA's concurrent thunks would only compete for the cores.
// Compiled on first use by ddpm_jax/models/onednn.py.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Pass { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Conv {
  dnnl::primitive primitive;
  memory::desc weights_plain;     // HWIO, as XLA holds the weights
  memory::desc weights_internal;  // the layout oneDNN's kernel wants
  memory::desc activations_in, activations_out;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex mutex;  // guards the cache and serialises calls (see the header)
std::map<Key, std::unique_ptr<Conv>> cache;

const Conv& GetConv(Pass pass, int64_t n, int64_t h, int64_t w, int64_t c_in, int64_t c_out) {
  Key key{pass, n, h, w, c_in, c_out};
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  memory::desc src({n, c_in, h, w}, f32, tag::nhwc);
  memory::desc dst({n, c_out, h, w}, f32, tag::nhwc);
  memory::desc weights_plain({c_out, c_in, 3, 3}, f32, tag::hwio);
  memory::desc weights_any({c_out, c_in, 3, 3}, f32, tag::any);
  const memory::dims strides{1, 1}, padding{1, 1};
  auto& engine = Engine();
  dnnl::convolution_forward::primitive_desc forward(engine, dnnl::prop_kind::forward_training,
                                                    dnnl::algorithm::convolution_direct, src, weights_any, dst,
                                                    strides, padding, padding);
  auto conv = std::make_unique<Conv>();
  conv->weights_plain = weights_plain;
  if (pass == kForward) {
    conv->primitive = dnnl::convolution_forward(forward);
    conv->weights_internal = forward.weights_desc();
    conv->activations_in = src;
    conv->activations_out = dst;
  } else if (pass == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc backward(engine, dnnl::algorithm::convolution_direct, src,
                                                             weights_any, dst, strides, padding, padding, forward);
    conv->primitive = dnnl::convolution_backward_data(backward);
    conv->weights_internal = backward.weights_desc();
    conv->activations_in = dst;
    conv->activations_out = src;
  } else {
    dnnl::convolution_backward_weights::primitive_desc backward(engine, dnnl::algorithm::convolution_direct, src,
                                                                weights_any, dst, strides, padding, padding,
                                                                forward);
    conv->primitive = dnnl::convolution_backward_weights(backward);
    conv->weights_internal = backward.diff_weights_desc();
    conv->activations_in = src;
    conv->activations_out = dst;
  }
  return *cache.emplace(key, std::move(conv)).first->second;
}

// `in` and `out`: NHWC activations of one convolution with HWIO 3x3 `weights` (stride 1, 'same'), `in` having
// c_in channels and `out` c_out (or the other way round for the input gradient). Nothing is read or written
// through a buffer of another shape.
ffi::Error CheckShapes(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, ffi::Span<const int64_t> weights,
                       int64_t in_channels_axis, int64_t out_channels_axis) {
  if (in.size() != 4 || out.size() != 4 || weights.size() != 4 || weights[0] != 3 || weights[1] != 3 ||
      in[0] != out[0] || in[1] != out[1] || in[2] != out[2] || in[3] != weights[in_channels_axis] ||
      out[3] != weights[out_channels_axis]) {
    return ffi::Error::InvalidArgument("conv3x3_onednn: shapes do not fit one 3x3 stride-1 'same' convolution");
  }
  return ffi::Error::Success();
}

// y = conv(x, w), or dx = conv_transpose(g, w): activations in, weights in, activations out.
ffi::Error Apply(Pass pass, ffi::Buffer<ffi::F32> act_in, ffi::Buffer<ffi::F32> weights,
                 ffi::ResultBuffer<ffi::F32> act_out) {
  auto in_dims = act_in.dimensions(), w_dims = weights.dimensions();
  const bool forward = pass == kForward;
  if (auto error = CheckShapes(in_dims, act_out->dimensions(), w_dims, forward ? 2 : 3, forward ? 3 : 2);
      error.failure()) {
    return error;
  }
  std::lock_guard<std::mutex> lock(mutex);
  const Conv& conv = GetConv(pass, in_dims[0], in_dims[1], in_dims[2], w_dims[2], w_dims[3]);
  auto& engine = Engine();
  dnnl::stream stream(engine);
  memory w_plain(conv.weights_plain, engine, weights.typed_data());
  memory w = w_plain;
  if (conv.weights_internal != conv.weights_plain) {
    w = memory(conv.weights_internal, engine);
    dnnl::reorder(w_plain, w).execute(stream, w_plain, w);
  }
  memory in(conv.activations_in, engine, act_in.typed_data());
  memory out(conv.activations_out, engine, act_out->typed_data());
  if (pass == kForward) {
    conv.primitive.execute(stream, {{DNNL_ARG_SRC, in}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, out}});
  } else {
    conv.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, in}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, out}});
  }
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  return Apply(kForward, x, w, y);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx) {
  return Apply(kInputGrad, g, w, dx);
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  auto x_dims = x.dimensions(), dw_dims = dw->dimensions();
  if (auto error = CheckShapes(x_dims, g.dimensions(), dw_dims, 2, 3); error.failure()) return error;
  std::lock_guard<std::mutex> lock(mutex);
  const Conv& conv = GetConv(kWeightGrad, x_dims[0], x_dims[1], x_dims[2], dw_dims[2], dw_dims[3]);
  auto& engine = Engine();
  dnnl::stream stream(engine);
  memory src(conv.activations_in, engine, x.typed_data());
  memory diff_dst(conv.activations_out, engine, g.typed_data());
  memory dw_plain(conv.weights_plain, engine, dw->typed_data());
  memory dw_internal = dw_plain;
  if (conv.weights_internal != conv.weights_plain) dw_internal = memory(conv.weights_internal, engine);
  conv.primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                  {DNNL_ARG_DIFF_WEIGHTS, dw_internal}});
  if (dw_internal != dw_plain) dnnl::reorder(dw_internal, dw_plain).execute(stream, dw_internal, dw_plain);
  stream.wait();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ddpm_conv3x3_forward, Forward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ddpm_conv3x3_input_grad, InputGrad,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ddpm_conv3x3_weight_grad, WeightGrad,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
