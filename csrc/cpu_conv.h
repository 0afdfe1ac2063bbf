// F32 convolution for the CPU, used where ggml's is slow: the PyPI ggml wheel has no llamafile
// sgemm, so im2col + F32 mul_mat runs at ~35-45 GFLOP/s on 2 AVX2 cores (a quarter of the FMA
// peak) plus a memory-bound im2col pass. The VAE's convolutions (F32 kernels in gpustack's
// files) are most of its work.
#pragma once

#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace fm {

// The kernel's instruction-set paths: AVX-512 (a 16-channel x 16-pixel tile of zmm registers),
// AVX2 (6 x 16, ymm), plain C++. The two vector paths give the same bits.
enum class ConvPath { Portable, Avx2, Avx512 };
bool conv_path_supported(ConvPath path);
const char *conv_path_name(ConvPath path);  // "portable", "avx2", "avx512"
// The process's path (kernel_choice(): FLUXMINI_KERNELS=portable forces plain C++, avx2 / avxvnni
// the AVX2 path; otherwise the fastest this CPU runs).
ConvPath conv_engine_path();

// Whether the engine uses a vector path (x86-64 with AVX2 and FMA, not forced portable);
// elsewhere callers keep ggml's convolution.
bool cpu_conv2d_available();

// A convolution kernel [k, k, Cin, Cout] (ggml's order; torch's [Cout, Cin, k, k]) in F32 or
// F16: exactly one of the two pointers is set. F16 values are widened exactly as they are used.
struct ConvKernel {
    const float *f32 = nullptr;
    const ggml_fp16_t *f16 = nullptr;
};

// out [OW, OH, Cout] = conv(x [W, H, Cin], kernel [k, k, Cin, Cout]) + bias, one thread's share
// (output pixels split over nth threads): im2col + GEMM, with the patch matrix packed straight
// from x (no k²·Cin x OW·OH matrix in memory, no im2col pass). Every output sums its k²·Cin
// products in one fixed order, so results do not depend on the thread count. A path this CPU lacks
// runs the plain C++ code.
void conv2d_f32(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H, int64_t Cin,
                int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth, ConvPath path);

// conv3x3(upsample2x(x)) with padding 1 (nearest-neighbour upsampling, as the VAE decoder's
// Upsample2D): out [2W, 2H, Cout] from x [W, H, Cin] and a 3x3 kernel, computed per output parity
// as a 2x2 convolution of x itself with kernel taps summed (4·Cin products an output instead of
// 9·Cin, and no upsampled map in memory). Same rounding as the two ops up to the summed taps.
void upsample_conv2d_f32(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H,
                         int64_t Cin, int64_t Cout, int ith, int nth, ConvPath path);

// ggml graph node computing conv2d_f32 on the CPU backend: x [W, H, Cin, 1] F32 contiguous,
// kernel [k, k, Cin, Cout] F32 or F16 contiguous, bias [Cout]
// F32 or null -> [OW, OH, Cout, 1].
ggml_tensor *conv2d_f32_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *kernel, ggml_tensor *bias, int stride,
                           int pad);
// The same for upsample_conv2d_f32: x [W, H, Cin, 1], kernel [3, 3, Cin, Cout] -> [2W, 2H, Cout, 1].
ggml_tensor *upsample_conv2d_f32_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *kernel, ggml_tensor *bias);

}  // namespace fm
