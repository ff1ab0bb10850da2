// ResNet training and inference on oneDNN (CPU).
//
// Layout: every activation after the stem lives in ONE blocked layout, the one oneDNN's
// convolution prefers on this CPU (nChw16c with AVX-512, nChw8c with AVX2), chosen once by
// asking oneDNN. Convolutions are created with that layout fixed for src/dst, so no
// activation is ever reordered; only weights are (plain OIHW master copy in the ParamStore
// -> the layout each conv primitive asked for, once per step; weight gradients back to OIHW).
// The input image batch stays plain NCHW (the stem conv reads it directly; in bf16 after a
// conversion in place of layout).
//
// Precision (NetworkOptions::precision): fp32, or bf16: activations, their gradients and the
// convolutions' weight copies in bf16 (made from the fp32 master each step), with oneDNN's bf16
// primitives accumulating in fp32; weight gradients (fp32 from the convolutions, BN and the FC),
// BN statistics and scale/shift, the FC layer, the loss and the master weights stay fp32.
//
// Fusions oneDNN 2.6 offers and we use: BN + ReLU (fuse_norm_relu: the ReLU's backward is
// folded into BN backward via the workspace), residual Add + ReLU (binary add with a ReLU
// post-op). Every primitive is created once (at Create) for this shape and reused.
//
// BN groups: the batch is split into batch / bn_group groups of consecutive samples; the
// blocked layouts keep N outermost, so a group is a contiguous slice and gets its own BN
// primitive execution (same primitive, different memory handles).
//
// Errors: oneDNN's C++ API throws dnnl::error; every public method catches it and returns a
// Status naming the layer and oneDNN's message (no exception leaves this file).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/backend/network.h"
#include "worker/model/param_store.h"
#include "worker/model/resnet.h"

namespace lmsgd::backend::onednn {

// OK when the CPU backend can train in `precision` here: fp32 always; bf16 only where oneDNN
// finds AVX512-BF16 (FAILED_PRECONDITION otherwise, naming it); tf32 never (INVALID_ARGUMENT).
absl::Status CheckPrecision(Precision precision);

// Threads oneDNN (OpenMP) uses from now on; 0 = number of cores. Returns the count in use.
int SetNumThreads(int threads);

absl::StatusOr<std::unique_ptr<Network>> CreateResNet(const model::ResNetSpec& spec, model::ParamStore* store,
                                                      const NetworkOptions& options);

}  // namespace lmsgd::backend::onednn
