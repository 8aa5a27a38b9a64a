// The fused channels-last kernels of smchainer.functions.channels_last (compiled by NVRTC
// through CuPy on a GPU; the CPU tests compile the same file as C++).
// Every array is contiguous float32. Elementwise kernels take a 64-bit element count and
// use 32-bit index arithmetic when it fits (64-bit integer division is a long instruction
// sequence on GPUs, and each element divides its index several times).

#define SMCHAINER_GRID_STRIDE(I, i, total) \
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total; i += (I)gridDim.x * blockDim.x)
#define SMCHAINER_DISPATCH(fn, total, ...) \
    if (total <= 0x7fffffffLL) fn<unsigned>((unsigned)(total), __VA_ARGS__); \
    else fn<long long>((total), __VA_ARGS__)

// col[r, (kh * 3 + kw) * c + ch] = x[n, oh + kh - 1, ow + kw - 1, ch] (zero outside),
// with r = (n * h + oh) * w + ow: the 3x3 patches of an NHWC image, one row per pixel.
// One block per pixel row (grid-stride over rows); its threads walk the row's 9c values.
extern "C" __global__ void smchainer_im2col3x3(
        const float* __restrict__ x, float* __restrict__ col,
        long long rows, int h, int w, int c) {
    const int kc = 9 * c;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const int ow = (int)(r % w);
        const long long t = r / w;
        const int oh = (int)(t % h);
        const long long n = t / h;
        float* out = col + r * kc;
        for (int k = threadIdx.x; k < kc; k += blockDim.x) {
            const int kk = k / c;
            const int ch = k - kk * c;
            const int kh = kk / 3, kw = kk - 3 * (kk / 3);
            const int ih = oh + kh - 1, iw = ow + kw - 1;
            out[k] = (ih >= 0 && ih < h && iw >= 0 && iw < w)
                ? x[((n * h + ih) * w + iw) * c + ch] : 0.0f;
        }
    }
}

// gx[n, y, x, ch] = sum of the gcol entries im2col copied x[n, y, x, ch] into.
// One block per pixel (grid-stride), its threads walk the channels.
extern "C" __global__ void smchainer_col2im3x3(
        const float* __restrict__ gcol, float* __restrict__ gx,
        long long rows, int h, int w, int c) {
    const long long kc = 9LL * c;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const int xx = (int)(r % w);
        const long long t = r / w;
        const int yy = (int)(t % h);
        const long long n = t / h;
        for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
            float s = 0.0f;
            for (int kh = 0; kh < 3; ++kh) {
                const int oh = yy - kh + 1;
                if (oh < 0 || oh >= h) continue;
                for (int kw = 0; kw < 3; ++kw) {
                    const int ow = xx - kw + 1;
                    if (ow < 0 || ow >= w) continue;
                    s += gcol[((n * h + oh) * w + ow) * kc + (kh * 3 + kw) * c + ch];
                }
            }
            gx[r * c + ch] = s;
        }
    }
}

// Per-channel partial sums of a (rows, c) matrix, added into sums[0:c] and sums[c:2c].
// mode 0 (forward statistics):  a = x,                       b = a * a
// mode 1 (backward):            a = gy * gscale masked by y > 0 (relu; dropped values are 0
//                               too, and gscale is dropout's 1 / (1 - ratio), else 1),
//                               b = a * (x - mean) * inv_std
// Block (32, 8): threadIdx.x walks channels (coalesced), threadIdx.y walks rows.
extern "C" __global__ void smchainer_channel_sums(
        const float* __restrict__ x, const float* __restrict__ gy, const float* __restrict__ y,
        const float* __restrict__ mean, const float* __restrict__ inv_std,
        long long rows, int c, int rows_per_block, int mode, int relu, float gscale,
        double* __restrict__ sums) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * rows_per_block;
    long long r1 = r0 + rows_per_block;
    if (r1 > rows) r1 = rows;
    float sa = 0.0f, sb = 0.0f;
    if (ch < c) {
        if (mode == 0) {
            for (long long r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
                const float v = x[r * c + ch];
                sa += v;
                sb += v * v;
            }
        } else {
            const float mu = mean[ch], is = inv_std[ch];
            for (long long r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
                const long long j = r * c + ch;
                const float g = (relu && !(y[j] > 0.0f)) ? 0.0f : gy[j] * gscale;
                sa += g;
                sb += g * (x[j] - mu) * is;
            }
        }
    }
    __shared__ float part_a[8][32];
    __shared__ float part_b[8][32];
    part_a[threadIdx.y][threadIdx.x] = sa;
    part_b[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
        double da = 0.0, db = 0.0;
        for (int k = 0; k < blockDim.y; ++k) {
            da += part_a[k][threadIdx.x];
            db += part_b[k][threadIdx.x];
        }
        atomicAdd(sums + ch, da);
        atomicAdd(sums + c + ch, db);
    }
}

// From the sums of x and x^2: the batch mean and 1/std, the affine map of the output
// (scale, shift), and Chainer's running averages (variance unbiased by adjust).
extern "C" __global__ void smchainer_bn_statistics(
        const double* __restrict__ sums, const float* __restrict__ gamma,
        const float* __restrict__ beta, int c, double m, double eps, double decay,
        double adjust, float* __restrict__ mean, float* __restrict__ inv_std,
        float* __restrict__ scale, float* __restrict__ shift,
        float* __restrict__ running_mean, float* __restrict__ running_var) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    const double mu = sums[ch] / m;
    double var = sums[c + ch] / m - mu * mu;
    if (var < 0.0) var = 0.0;
    const double is = 1.0 / sqrt(var + eps);
    mean[ch] = (float)mu;
    inv_std[ch] = (float)is;
    scale[ch] = (float)(gamma[ch] * is);
    shift[ch] = (float)(beta[ch] - mu * gamma[ch] * is);
    running_mean[ch] = (float)(decay * running_mean[ch] + (1.0 - decay) * mu);
    running_var[ch] = (float)(decay * running_var[ch] + (1.0 - decay) * adjust * var);
}

// Dropout's uniform draw for element i: splitmix64 of (seed, i), top 24 bits, in [0, 1).
__device__ __forceinline__ float smchainer_uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// y = x * scale[ch] + shift[ch], then max(y, 0) when relu, then dropout when ratio > 0
// (kept values scaled by keep_scale = 1 / (1 - ratio)).
template <typename I>
__device__ __forceinline__ void affine_relu(
        I total, const float* __restrict__ x, const float* __restrict__ scale,
        const float* __restrict__ shift, float* __restrict__ y, int c, int relu,
        float ratio, float keep_scale, unsigned long long seed) {
    SMCHAINER_GRID_STRIDE(I, i, total) {
        const int ch = (int)(i % (I)c);
        float v = x[i] * scale[ch] + shift[ch];
        if (relu && v < 0.0f) v = 0.0f;
        if (ratio > 0.0f) {
            v = smchainer_uniform(seed, (unsigned long long)i) >= ratio ? v * keep_scale : 0.0f;
        }
        y[i] = v;
    }
}

extern "C" __global__ void smchainer_affine_relu(
        const float* __restrict__ x, const float* __restrict__ scale,
        const float* __restrict__ shift, float* __restrict__ y,
        long long total, int c, int relu, float ratio, float keep_scale,
        unsigned long long seed) {
    SMCHAINER_DISPATCH(affine_relu, total, x, scale, shift, y, c, relu, ratio, keep_scale, seed);
}

// gx = gamma * inv_std * (g - xhat * mean(g * xhat) - mean(g)), g = gy * gscale masked by
// relu (y > 0: also false where dropout dropped); sums holds sum(g) and sum(g * xhat).
template <typename I>
__device__ __forceinline__ void bn_relu_grad(
        I total, const float* __restrict__ x, const float* __restrict__ gy,
        const float* __restrict__ y, const float* __restrict__ mean,
        const float* __restrict__ inv_std, const float* __restrict__ gamma,
        const double* __restrict__ sums, float* __restrict__ gx, int c, double m, int relu,
        float gscale) {
    SMCHAINER_GRID_STRIDE(I, i, total) {
        const int ch = (int)(i % (I)c);
        const float g = (relu && !(y[i] > 0.0f)) ? 0.0f : gy[i] * gscale;
        const float is = inv_std[ch];
        const float xhat = (x[i] - mean[ch]) * is;
        const float gbeta = (float)(sums[ch] / m);
        const float ggamma = (float)(sums[c + ch] / m);
        gx[i] = gamma[ch] * is * (g - xhat * ggamma - gbeta);
    }
}

extern "C" __global__ void smchainer_bn_relu_grad(
        const float* __restrict__ x, const float* __restrict__ gy, const float* __restrict__ y,
        const float* __restrict__ mean, const float* __restrict__ inv_std,
        const float* __restrict__ gamma, const double* __restrict__ sums,
        float* __restrict__ gx, long long total, int c, double m, int relu, float gscale) {
    SMCHAINER_DISPATCH(bn_relu_grad, total, x, gy, y, mean, inv_std, gamma, sums, gx, c, m, relu,
                       gscale);
}

// Fixed (inference) normalisation: scale = gamma / sqrt(var + eps), shift = beta - mean * scale.
extern "C" __global__ void smchainer_bn_fixed(
        const float* __restrict__ gamma, const float* __restrict__ beta,
        const float* __restrict__ mean, const float* __restrict__ var, int c, double eps,
        float* __restrict__ scale, float* __restrict__ shift) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    const double s = gamma[ch] / sqrt((double)var[ch] + eps);
    scale[ch] = (float)s;
    shift[ch] = (float)(beta[ch] - mean[ch] * s);
}

// 2x2 max pooling, stride 2, of an NHWC image (h, w even); arg = 0..3 in (dy, dx) order,
// the first maximum winning (as in Chainer).
template <typename I>
__device__ __forceinline__ void max_pool2x2(
        I total, const float* __restrict__ x, float* __restrict__ y,
        signed char* __restrict__ arg, int h, int w, int c) {
    const int oh = h / 2, ow = w / 2;
    SMCHAINER_GRID_STRIDE(I, i, total) {
        const int ch = (int)(i % (I)c);
        I t = i / (I)c;
        const int ox = (int)(t % (I)ow);
        t /= (I)ow;
        const int oy = (int)(t % (I)oh);
        const long long n = (long long)(t / (I)oh);
        const long long base = ((n * h + 2 * oy) * w + 2 * ox) * c + ch;
        const long long down = (long long)w * c;
        float best = x[base];
        signed char a = 0;
        float v = x[base + c];
        if (v > best) { best = v; a = 1; }
        v = x[base + down];
        if (v > best) { best = v; a = 2; }
        v = x[base + down + c];
        if (v > best) { best = v; a = 3; }
        y[i] = best;
        arg[i] = a;
    }
}

extern "C" __global__ void smchainer_max_pool2x2(
        const float* __restrict__ x, float* __restrict__ y, signed char* __restrict__ arg,
        long long total, int h, int w, int c) {
    SMCHAINER_DISPATCH(max_pool2x2, total, x, y, arg, h, w, c);
}

template <typename I>
__device__ __forceinline__ void max_pool2x2_grad(
        I total, const float* __restrict__ gy, const signed char* __restrict__ arg,
        float* __restrict__ gx, int h, int w, int c) {
    const int oh = h / 2, ow = w / 2;
    SMCHAINER_GRID_STRIDE(I, i, total) {
        const int ch = (int)(i % (I)c);
        I t = i / (I)c;
        const int xx = (int)(t % (I)w);
        t /= (I)w;
        const int yy = (int)(t % (I)h);
        const long long n = (long long)(t / (I)h);
        const long long o = ((n * oh + yy / 2) * ow + xx / 2) * c + ch;
        gx[i] = (arg[o] == (yy % 2) * 2 + (xx % 2)) ? gy[o] : 0.0f;
    }
}

extern "C" __global__ void smchainer_max_pool2x2_grad(
        const float* __restrict__ gy, const signed char* __restrict__ arg,
        float* __restrict__ gx, long long total, int h, int w, int c) {
    SMCHAINER_DISPATCH(max_pool2x2_grad, total, gy, arg, gx, h, w, c);
}
