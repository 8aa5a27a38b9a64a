// The crop / flip kernel of smchainer.functions.augment (compiled by NVRTC through CuPy on a
// GPU; the CPU tests compile the same file as C++).
extern "C" __global__ void smchainer_crop_flip(
    const unsigned char* __restrict__ images,  // n x channels x height x width
    const long long* __restrict__ index,       // batch: rows of images
    const long long* __restrict__ top,         // batch: crop row in padded coordinates
    const long long* __restrict__ left,        // batch: crop column in padded coordinates
    const long long* __restrict__ flip,        // batch: nonzero mirrors the crop
    float* __restrict__ out,                   // batch x channels x height x width
    const long long n,
    const long long batch,
    const long long channels,
    const long long height,
    const long long width,
    const long long pad,
    const float scale)
{
    const long long total = batch * channels * height * width;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        const long long x = i % width;
        long long rest = i / width;
        const long long y = rest % height;
        rest /= height;
        const long long c = rest % channels;
        const long long b = rest / channels;
        const long long row = index[b];
        const long long sy = top[b] + y - pad;
        const long long sx = left[b] + (flip[b] ? width - 1 - x : x) - pad;
        float value;
        if (row < 0 || row >= n) {
            value = __int_as_float(0x7fc00000);  // quiet NaN: a bad row index
        } else if (sy < 0 || sy >= height || sx < 0 || sx >= width) {
            value = 0.0f;  // the zero padding
        } else {
            value = (float)images[((row * channels + c) * height + sy) * width + sx] * scale;
        }
        out[i] = value;
    }
}
