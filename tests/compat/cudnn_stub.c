/* A stand-in for libcudnn.so.9 that checks its callers as cuDNN 9 would, on the CPU.
 *
 * Exports the legacy functions smchainer.compat.cudnn calls. Every call is
 * appended to a log ("name key=value ...", one line each, read with
 * stub_log()). Arguments are checked as the real API requires: descriptors
 * created before use, set before use and never used after destroy; tensor
 * dims/strides packed; convolution output shapes consistent with the input,
 * filter, padding, stride, dilation and groups; alpha/beta read as double for
 * double data and float otherwise (and required to be the 1/0 the binding
 * passes); workspace non-null and at least what cudnnGet*WorkspaceSize
 * reported; the handle's stream set. A violation returns
 * CUDNN_STATUS_BAD_PARAM (2000) and logs "VIOLATION ...".
 *
 * Outputs are written on the host buffers the test passes: convolution and
 * pooling outputs are set to 0 (beta = 0), cudnnAddTensor really adds its
 * broadcast operand, activation forward computes ReLU/sigmoid/tanh on
 * float32, other outputs get 1.0, so the test can check what was written.
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define OK 0
#define BAD 2000
#define MAXD 8
#define MAXDESC 4096

enum { K_TENSOR = 1, K_FILTER, K_CONV, K_POOL, K_ACT, K_HANDLE };

typedef struct {
    int kind, alive, set, dtype, nb, format;
    int dims[MAXD], strides[MAXD];
    int pad[MAXD], stride[MAXD], dil[MAXD], groups, math, mode, compute;
    int stream_set; long long stream;
    long long ws_reported;  /* conv descriptor: last workspace size reported */
} Obj;

static Obj objs[MAXDESC];
static int nobjs = 0;
static char logbuf[1 << 20];
static size_t loglen = 0;
static size_t version = 91900;
static char fail_name[128] = "";
static int fail_status = 0;
static char last_error[256] = "";

static void logf_(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    int n = vsnprintf(logbuf + loglen, sizeof logbuf - loglen - 2, fmt, ap);
    va_end(ap);
    if (n > 0 && loglen + n < sizeof logbuf - 2) { loglen += n; logbuf[loglen++] = '\n'; logbuf[loglen] = 0; }
}
#define VIOLATE(...) do { logf_("VIOLATION " __VA_ARGS__); snprintf(last_error, sizeof last_error, __VA_ARGS__); return BAD; } while (0)

const char *stub_log(void) { return logbuf; }
void stub_reset(void) { loglen = 0; logbuf[0] = 0; }
void stub_set_version(size_t v) { version = v; }
void stub_fail(const char *name, int status) { snprintf(fail_name, sizeof fail_name, "%s", name); fail_status = status; }
int stub_live(void) { int n = 0; for (int i = 0; i < nobjs; i++) if (objs[i].alive && objs[i].kind != K_HANDLE) n++; return n; }

static int forced(const char *name) {
    if (fail_status && strcmp(name, fail_name) == 0) { int s = fail_status; fail_status = 0; logf_("%s forced=%d", name, s); return s; }
    return 0;
}
#define ENTER(name) do { int _f = forced(name); if (_f) return _f; } while (0)

size_t cudnnGetVersion(void) { return version; }
int cudnnOpsVersionCheck(void) { return OK; }
int cudnnCnnVersionCheck(void) { return OK; }
const char *cudnnGetErrorString(int s) {
    switch (s) {
    case 0: return "CUDNN_STATUS_SUCCESS";
    case 2000: return "CUDNN_STATUS_BAD_PARAM";
    case 3000: return "CUDNN_STATUS_NOT_SUPPORTED";
    case 4000: return "CUDNN_STATUS_INTERNAL_ERROR";
    case 5000: return "CUDNN_STATUS_EXECUTION_FAILED";
    default: return "CUDNN_STATUS_UNKNOWN";
    }
}
void cudnnGetLastErrorString(char *message, size_t max) {
    snprintf(message, max, "%s", last_error); last_error[0] = 0;
}

static int make(void **out, int kind, const char *name) {
    ENTER(name);
    if (!out) VIOLATE("%s null out", name);
    if (nobjs >= MAXDESC) return 4000;
    Obj *o = &objs[nobjs++]; memset(o, 0, sizeof *o); o->kind = kind; o->alive = 1; o->groups = 1;
    *out = o; logf_("%s -> %p", name, (void *)o); return OK;
}
static Obj *get(void *p, int kind) {
    Obj *o = (Obj *)p;
    if (o < objs || o >= objs + nobjs || o->kind != kind || !o->alive) return NULL;
    return o;
}
static int kill(void *p, int kind, const char *name) {
    Obj *o = get(p, kind);
    if (!o) VIOLATE("%s of a descriptor not alive: %p", name, p);
    o->alive = 0; logf_("%s %p", name, p); return OK;
}
/* a descriptor that must be alive and set */
#define NEED(var, ptr, kind, what) Obj *var = get(ptr, kind); if (!var || !var->set) VIOLATE("%s: %s not created/set/alive (%p)", fn, what, ptr)

static int elemsize(int dtype) { return dtype == 1 ? 8 : dtype == 2 ? 2 : 4; }
static int check_scalars(const char *fn, int dtype, const void *alpha, const void *beta, double a, double b) {
    if (!alpha || !beta) VIOLATE("%s: null alpha/beta", fn);
    double ra, rb;
    if (dtype == 1) { ra = *(const double *)alpha; rb = *(const double *)beta; }
    else { ra = *(const float *)alpha; rb = *(const float *)beta; }
    if (ra != a || rb != b) VIOLATE("%s: alpha=%g beta=%g read as %s, expected %g/%g", fn, ra, rb, dtype == 1 ? "double" : "float", a, b);
    return OK;
}
static int check_handle(const char *fn, void *h) {
    Obj *o = get(h, K_HANDLE);
    if (!o) VIOLATE("%s: bad handle %p", fn, h);
    if (!o->stream_set) VIOLATE("%s: stream not set on the handle", fn);
    return OK;
}
static long long count(const Obj *t) { long long n = 1; for (int i = 0; i < t->nb; i++) n *= t->dims[i]; return n; }
static void fill(void *p, const Obj *t, double v) {
    long long n = count(t);
    for (long long i = 0; i < n; i++) {
        if (t->dtype == 1) ((double *)p)[i] = v;
        else if (t->dtype == 0) ((float *)p)[i] = (float)v;
        else ((uint16_t *)p)[i] = v == 0 ? 0 : 0x3C00;  /* 1.0 in half */
    }
}
static int aligned(const void *p, int dtype) { return p && ((uintptr_t)p % elemsize(dtype)) == 0; }
static void dimstr(char *out, const Obj *t) {
    int n = 0; out[0] = 0;
    for (int i = 0; i < t->nb; i++) n += sprintf(out + n, "%s%d", i ? "," : "", t->dims[i]);
}

int cudnnCreate(void **h) { return make(h, K_HANDLE, "cudnnCreate"); }
int cudnnDestroy(void *h) { return kill(h, K_HANDLE, "cudnnDestroy"); }
int cudnnSetStream(void *h, void *stream) {
    const char *fn = "cudnnSetStream"; ENTER(fn);
    Obj *o = get(h, K_HANDLE); if (!o) VIOLATE("%s: bad handle", fn);
    o->stream_set = 1; o->stream = (long long)(intptr_t)stream;
    logf_("%s handle=%p stream=%lld", fn, h, o->stream); return OK;
}

int cudnnCreateTensorDescriptor(void **d) { return make(d, K_TENSOR, "cudnnCreateTensorDescriptor"); }
int cudnnDestroyTensorDescriptor(void *d) { return kill(d, K_TENSOR, "cudnnDestroyTensorDescriptor"); }
int cudnnSetTensor4dDescriptor(void *d, int format, int dtype, int n, int c, int h, int w) {
    const char *fn = "cudnnSetTensor4dDescriptor"; ENTER(fn);
    Obj *t = get(d, K_TENSOR); if (!t) VIOLATE("%s: descriptor not alive", fn);
    if (dtype < 0 || dtype > 2 || (format != 0 && format != 1) || n < 1 || c < 1 || h < 1 || w < 1)
        VIOLATE("%s: format=%d dtype=%d dims %d,%d,%d,%d", fn, format, dtype, n, c, h, w);
    t->nb = 4; t->dtype = dtype; t->format = format;
    t->dims[0] = n; t->dims[1] = c; t->dims[2] = h; t->dims[3] = w;
    if (format == 0) { t->strides[3] = 1; t->strides[2] = w; t->strides[1] = h * w; t->strides[0] = c * h * w; }
    else { t->strides[1] = 1; t->strides[3] = c; t->strides[2] = w * c; t->strides[0] = h * w * c; }
    t->set = 1; logf_("%s %p format=%d dtype=%d dims=%d,%d,%d,%d", fn, d, format, dtype, n, c, h, w); return OK;
}
int cudnnSetTensorNdDescriptor(void *d, int dtype, int nb, const int *dims, const int *strides) {
    const char *fn = "cudnnSetTensorNdDescriptor"; ENTER(fn);
    Obj *t = get(d, K_TENSOR); if (!t) VIOLATE("%s: descriptor not alive", fn);
    if (nb < 3 || nb > MAXD || dtype < 0 || dtype > 2) VIOLATE("%s: nbDims=%d dtype=%d", fn, nb, dtype);
    long long step = 1;
    for (int i = nb - 1; i >= 0; i--) {
        if (dims[i] < 1) VIOLATE("%s: dim %d = %d", fn, i, dims[i]);
        if (strides[i] != step) VIOLATE("%s: stride %d = %d, packed would be %lld", fn, i, strides[i], step);
        step *= dims[i];
    }
    t->nb = nb; t->dtype = dtype; t->format = 0;
    memcpy(t->dims, dims, nb * sizeof(int)); memcpy(t->strides, strides, nb * sizeof(int)); t->set = 1;
    char s[128]; dimstr(s, t); logf_("%s %p dtype=%d dims=%s", fn, d, dtype, s); return OK;
}

int cudnnCreateFilterDescriptor(void **d) { return make(d, K_FILTER, "cudnnCreateFilterDescriptor"); }
int cudnnDestroyFilterDescriptor(void *d) { return kill(d, K_FILTER, "cudnnDestroyFilterDescriptor"); }
int cudnnSetFilter4dDescriptor(void *d, int dtype, int format, int k, int c, int h, int w) {
    const char *fn = "cudnnSetFilter4dDescriptor"; ENTER(fn);
    Obj *f = get(d, K_FILTER); if (!f) VIOLATE("%s: descriptor not alive", fn);
    if (dtype < 0 || dtype > 2 || (format != 0 && format != 1) || k < 1 || c < 1 || h < 1 || w < 1) VIOLATE("%s: bad args", fn);
    f->nb = 4; f->dtype = dtype; f->format = format; f->dims[0] = k; f->dims[1] = c; f->dims[2] = h; f->dims[3] = w; f->set = 1;
    logf_("%s %p dtype=%d format=%d dims=%d,%d,%d,%d", fn, d, dtype, format, k, c, h, w); return OK;
}
int cudnnSetFilterNdDescriptor(void *d, int dtype, int format, int nb, const int *dims) {
    const char *fn = "cudnnSetFilterNdDescriptor"; ENTER(fn);
    Obj *f = get(d, K_FILTER); if (!f) VIOLATE("%s: descriptor not alive", fn);
    if (nb < 3 || nb > MAXD) VIOLATE("%s: nbDims=%d", fn, nb);
    for (int i = 0; i < nb; i++) if (dims[i] < 1) VIOLATE("%s: dim %d", fn, i);
    f->nb = nb; f->dtype = dtype; f->format = format; memcpy(f->dims, dims, nb * sizeof(int)); f->set = 1;
    char s[128]; dimstr(s, f); logf_("%s %p dtype=%d format=%d dims=%s", fn, d, dtype, format, s); return OK;
}

int cudnnCreateConvolutionDescriptor(void **d) { return make(d, K_CONV, "cudnnCreateConvolutionDescriptor"); }
int cudnnDestroyConvolutionDescriptor(void *d) { return kill(d, K_CONV, "cudnnDestroyConvolutionDescriptor"); }
static int set_conv(const char *fn, void *d, int n, const int *pad, const int *stride, const int *dil, int mode, int compute) {
    Obj *c = get(d, K_CONV); if (!c) VIOLATE("%s: descriptor not alive", fn);
    if (mode != 0 && mode != 1) VIOLATE("%s: mode %d", fn, mode);
    if (compute < 0 || compute > 1) VIOLATE("%s: compute type %d (float or double)", fn, compute);
    for (int i = 0; i < n; i++) if (pad[i] < 0 || stride[i] < 1 || dil[i] < 1) VIOLATE("%s: pad/stride/dilation %d", fn, i);
    c->nb = n; memcpy(c->pad, pad, n * sizeof(int)); memcpy(c->stride, stride, n * sizeof(int)); memcpy(c->dil, dil, n * sizeof(int));
    c->mode = mode; c->compute = compute; c->set = 1; c->ws_reported = -1;
    char p[64], s[64], l[64]; int a = 0, b = 0, e = 0;
    for (int i = 0; i < n; i++) { a += sprintf(p + a, "%s%d", i ? "," : "", pad[i]); b += sprintf(s + b, "%s%d", i ? "," : "", stride[i]); e += sprintf(l + e, "%s%d", i ? "," : "", dil[i]); }
    logf_("%s %p pad=%s stride=%s dilation=%s mode=%d compute=%d", fn, d, p, s, l, mode, compute); return OK;
}
int cudnnSetConvolution2dDescriptor(void *d, int ph, int pw, int u, int v, int dh, int dw, int mode, int compute) {
    ENTER("cudnnSetConvolution2dDescriptor");
    int pad[2] = {ph, pw}, st[2] = {u, v}, dl[2] = {dh, dw};
    return set_conv("cudnnSetConvolution2dDescriptor", d, 2, pad, st, dl, mode, compute);
}
int cudnnSetConvolutionNdDescriptor(void *d, int n, const int *pad, const int *st, const int *dl, int mode, int compute) {
    ENTER("cudnnSetConvolutionNdDescriptor");
    if (n < 1 || n > MAXD - 2) return BAD;
    return set_conv("cudnnSetConvolutionNdDescriptor", d, n, pad, st, dl, mode, compute);
}
int cudnnSetConvolutionMathType(void *d, int math) {
    const char *fn = "cudnnSetConvolutionMathType"; ENTER(fn);
    NEED(c, d, K_CONV, "convolution descriptor");
    if (math < 0 || math > 3) VIOLATE("%s: math type %d", fn, math);
    c->math = math; logf_("%s %p math=%d", fn, d, math); return OK;
}
int cudnnSetConvolutionGroupCount(void *d, int groups) {
    const char *fn = "cudnnSetConvolutionGroupCount"; ENTER(fn);
    NEED(c, d, K_CONV, "convolution descriptor");
    if (groups < 1) VIOLATE("%s: groups %d", fn, groups);
    c->groups = groups; logf_("%s %p groups=%d", fn, d, groups); return OK;
}

/* x (N,C,spatial), w (K,C/g,kernel), y (N,K,out) in logical NCHW order */
static int check_geometry(const char *fn, const Obj *x, const Obj *w, const Obj *c, const Obj *y) {
    if (x->nb != w->nb || x->nb != y->nb || x->nb != c->nb + 2) VIOLATE("%s: ranks x=%d w=%d y=%d conv=%d", fn, x->nb, w->nb, y->nb, c->nb);
    if (x->dtype != w->dtype || x->dtype != y->dtype) VIOLATE("%s: data types differ", fn);
    int wc = w->dims[1], wk = w->dims[0];
    if (x->dims[1] != wc * c->groups) VIOLATE("%s: x channels %d != filter channels %d x groups %d", fn, x->dims[1], wc, c->groups);
    if (y->dims[1] != wk || wk % c->groups) VIOLATE("%s: y channels %d, filter count %d, groups %d", fn, y->dims[1], wk, c->groups);
    if (y->dims[0] != x->dims[0]) VIOLATE("%s: batch %d != %d", fn, y->dims[0], x->dims[0]);
    if (x->format != w->format && x->nb == 4) VIOLATE("%s: tensor format %d, filter format %d", fn, x->format, w->format);
    for (int i = 0; i < c->nb; i++) {
        int k = w->dims[2 + i], in = x->dims[2 + i];
        int out = (in + 2 * c->pad[i] - c->dil[i] * (k - 1) - 1) / c->stride[i] + 1;
        if (y->dims[2 + i] != out) VIOLATE("%s: output dim %d is %d, geometry gives %d", fn, i, y->dims[2 + i], out);
    }
    if (x->dtype == 2 ? c->compute != 0 : c->compute != x->dtype) VIOLATE("%s: compute type %d for data type %d", fn, c->compute, x->dtype);
    return OK;
}

typedef struct { int algo, status; float time; size_t memory; int determinism, mathType, reserved[3]; } Perf;
static const int order[3][4] = {{1, 0, 6, 2}, {0, 1, 5, 3}, {0, 1, 3, 5}};  /* fwd, bwd data, bwd filter */
static size_t perf_memory(int algo) { return (size_t)algo * 4096; }
static size_t ws_size(int algo) { return algo ? (size_t)algo * 4096 + 256 : 0; }
static const char *opname[3] = {"fwd", "bwd_data", "bwd_filter"};

/* descs in the order of the heuristic call: fwd (x, w, y), bwd data (w, dy, dx), bwd filter (x, dy, dw) */
static int geometry(const char *fn, int op, void *a, void *b, void *conv, void *c3, Obj **conv_out) {
    Obj *x, *w, *y;
    if (op == 0) { NEED(xx, a, K_TENSOR, "x"); NEED(ww, b, K_FILTER, "w"); NEED(yy, c3, K_TENSOR, "y"); x = xx; w = ww; y = yy; }
    else if (op == 1) { NEED(ww, a, K_FILTER, "w"); NEED(yy, b, K_TENSOR, "dy"); NEED(xx, c3, K_TENSOR, "dx"); x = xx; w = ww; y = yy; }
    else { NEED(xx, a, K_TENSOR, "x"); NEED(yy, b, K_TENSOR, "dy"); NEED(ww, c3, K_FILTER, "dw"); x = xx; w = ww; y = yy; }
    NEED(c, conv, K_CONV, "convolution descriptor");
    *conv_out = c;
    return check_geometry(fn, x, w, c, y);
}
static int perfs(const char *fn, int op, void *h, void *a, void *b, void *conv, void *c3, int requested, int *returned, Perf *out, long long wsz) {
    Obj *c; int r;
    if ((r = check_handle(fn, h))) return r;
    if ((r = geometry(fn, op, a, b, conv, c3, &c))) return r;
    if (requested < 1 || !returned || !out) VIOLATE("%s: requested=%d", fn, requested);
    int n = requested < 4 ? requested : 4;
    for (int i = 0; i < n; i++) {
        int algo = order[op][i];
        out[i].algo = algo; out[i].status = (op == 0 && algo == 2) ? 3000 : 0; out[i].time = 1.0f + i;
        out[i].memory = perf_memory(algo); out[i].determinism = (op > 0 && algo == 0) ? 0 : 1;
        out[i].mathType = c->math == 3 ? 1 : c->math;  /* as if the algorithm prefers tensor ops */
    }
    *returned = n;
    for (int i = 0; wsz >= 0 && i < n; i++) if (out[i].memory > (size_t)wsz) out[i].status = 3000;
    logf_("%s op=%s math=%d groups=%d returned=%d workspace=%lld", fn, opname[op], c->math, c->groups, n, wsz); return OK;
}
#define HEUR(NAME, OP) int NAME(void *h, void *a, void *b, void *c, void *d, int req, int *ret, Perf *p) { ENTER(#NAME); return perfs(#NAME, OP, h, a, b, c, d, req, ret, p, -1); }
HEUR(cudnnGetConvolutionForwardAlgorithm_v7, 0)
HEUR(cudnnGetConvolutionBackwardDataAlgorithm_v7, 1)
HEUR(cudnnGetConvolutionBackwardFilterAlgorithm_v7, 2)
#define FIND(NAME, OP) int NAME(void *h, void *a, const void *pa, void *b, const void *pb, void *c, void *d, void *pd, int req, int *ret, Perf *p, void *ws, size_t wsz) { \
    ENTER(#NAME); const char *fn = #NAME; \
    if (!pa || !pb || !pd) VIOLATE("%s: null data pointer", fn); \
    if (wsz > 0 && !ws) VIOLATE("%s: workspace size %zu with a null pointer", fn, wsz); \
    return perfs(fn, OP, h, a, b, c, d, req, ret, p, (long long)wsz); }
FIND(cudnnFindConvolutionForwardAlgorithmEx, 0)
FIND(cudnnFindConvolutionBackwardDataAlgorithmEx, 1)
FIND(cudnnFindConvolutionBackwardFilterAlgorithmEx, 2)
#define WSIZE(NAME, OP) int NAME(void *h, void *a, void *b, void *c, void *d, int algo, size_t *size) { \
    ENTER(#NAME); const char *fn = #NAME; Obj *conv; int r; \
    if ((r = check_handle(fn, h))) return r; if ((r = geometry(fn, OP, a, b, c, d, &conv))) return r; \
    if (!size) VIOLATE("%s: null size", fn); *size = ws_size(algo); conv->ws_reported = (long long)*size; \
    logf_("%s op=%s algo=%d size=%zu math=%d", fn, opname[OP], algo, *size, conv->math); return OK; }
WSIZE(cudnnGetConvolutionForwardWorkspaceSize, 0)
WSIZE(cudnnGetConvolutionBackwardDataWorkspaceSize, 1)
WSIZE(cudnnGetConvolutionBackwardFilterWorkspaceSize, 2)
#define CONV(NAME, OP) int NAME(void *h, const void *alpha, void *a, const void *pa, void *b, const void *pb, void *c, int algo, void *ws, size_t wsz, const void *beta, void *d, void *pd) { \
    ENTER(#NAME); const char *fn = #NAME; Obj *conv; int r; \
    if ((r = check_handle(fn, h))) return r; if ((r = geometry(fn, OP, a, b, c, d, &conv))) return r; \
    Obj *out = (Obj *)d; \
    if ((r = check_scalars(fn, out->dtype, alpha, beta, 1, 0))) return r; \
    if (!aligned(pa, out->dtype) || !aligned(pb, out->dtype) || !aligned(pd, out->dtype)) VIOLATE("%s: null or misaligned data", fn); \
    if (conv->ws_reported < 0) VIOLATE("%s: workspace size never asked for", fn); \
    if ((long long)wsz < conv->ws_reported) VIOLATE("%s: workspace %zu < reported %lld", fn, wsz, conv->ws_reported); \
    if (wsz > 0 && !ws) VIOLATE("%s: null workspace of size %zu", fn, wsz); \
    fill(pd, out, 0.0); \
    logf_("%s op=%s algo=%d workspace=%zu math=%d groups=%d stream=%lld", fn, opname[OP], algo, wsz, conv->math, conv->groups, ((Obj *)h)->stream); return OK; }
CONV(cudnnConvolutionForward, 0)
CONV(cudnnConvolutionBackwardData, 1)
CONV(cudnnConvolutionBackwardFilter, 2)

int cudnnAddTensor(void *h, const void *alpha, void *ad, const void *a, const void *beta, void *cd, void *c) {
    const char *fn = "cudnnAddTensor"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(at, ad, K_TENSOR, "A"); NEED(ct, cd, K_TENSOR, "C");
    if ((r = check_scalars(fn, ct->dtype, alpha, beta, 1, 1))) return r;
    if (at->nb != ct->nb || at->dtype != ct->dtype) VIOLATE("%s: ranks %d/%d", fn, at->nb, ct->nb);
    for (int i = 0; i < at->nb; i++) if (at->dims[i] != 1 && at->dims[i] != ct->dims[i]) VIOLATE("%s: dim %d not broadcastable", fn, i);
    if (!aligned(a, at->dtype) || !aligned(c, ct->dtype)) VIOLATE("%s: null data", fn);
    if (ct->dtype == 0) {  /* C += A, broadcast by logical index, through each one's strides */
        long long n = count(ct); int idx[MAXD];
        for (long long e = 0; e < n; e++) {
            long long rem = e, co = 0, ao = 0;
            for (int i = ct->nb - 1; i >= 0; i--) { idx[i] = rem % ct->dims[i]; rem /= ct->dims[i]; }
            for (int i = 0; i < ct->nb; i++) { co += (long long)idx[i] * ct->strides[i]; ao += (long long)(at->dims[i] == 1 ? 0 : idx[i]) * at->strides[i]; }
            ((float *)c)[co] += ((const float *)a)[ao];
        }
    }
    char s[128]; dimstr(s, at); logf_("%s A=%s", fn, s); return OK;
}

int cudnnCreatePoolingDescriptor(void **d) { return make(d, K_POOL, "cudnnCreatePoolingDescriptor"); }
int cudnnDestroyPoolingDescriptor(void *d) { return kill(d, K_POOL, "cudnnDestroyPoolingDescriptor"); }
static int set_pool(const char *fn, void *d, int mode, int nan, int n, const int *win, const int *pad, const int *st) {
    Obj *p = get(d, K_POOL); if (!p) VIOLATE("%s: descriptor not alive", fn);
    if (mode < 0 || mode > 3 || nan < 0 || nan > 1) VIOLATE("%s: mode %d nan %d", fn, mode, nan);
    for (int i = 0; i < n; i++) if (win[i] < 1 || pad[i] < 0 || st[i] < 1) VIOLATE("%s: window/pad/stride %d", fn, i);
    p->nb = n; p->mode = mode; memcpy(p->dims, win, n * sizeof(int)); memcpy(p->pad, pad, n * sizeof(int)); memcpy(p->stride, st, n * sizeof(int)); p->set = 1;
    logf_("%s %p mode=%d window=%d,%d pad=%d,%d stride=%d,%d", fn, d, mode, win[0], win[1], pad[0], pad[1], st[0], st[1]); return OK;
}
int cudnnSetPooling2dDescriptor(void *d, int mode, int nan, int wh, int ww, int ph, int pw, int sh, int sw) {
    ENTER("cudnnSetPooling2dDescriptor"); int w[2] = {wh, ww}, p[2] = {ph, pw}, s[2] = {sh, sw};
    return set_pool("cudnnSetPooling2dDescriptor", d, mode, nan, 2, w, p, s);
}
int cudnnSetPoolingNdDescriptor(void *d, int mode, int nan, int n, const int *w, const int *p, const int *s) {
    ENTER("cudnnSetPoolingNdDescriptor"); return set_pool("cudnnSetPoolingNdDescriptor", d, mode, nan, n, w, p, s);
}
static int pool_shapes(const char *fn, const Obj *p, const Obj *x, const Obj *y) {
    if (x->nb != p->nb + 2 || y->nb != x->nb) VIOLATE("%s: ranks", fn);
    if (x->dims[0] != y->dims[0] || x->dims[1] != y->dims[1]) VIOLATE("%s: N/C differ", fn);
    for (int i = 0; i < p->nb; i++) {
        int lo = (x->dims[2 + i] + 2 * p->pad[i] - p->dims[i]) / p->stride[i] + 1;
        if (y->dims[2 + i] < lo || y->dims[2 + i] > lo + 1) VIOLATE("%s: pooled dim %d is %d for input %d", fn, i, y->dims[2 + i], x->dims[2 + i]);
    }
    return OK;
}
int cudnnPoolingForward(void *h, void *pd, const void *alpha, void *xd, const void *x, const void *beta, void *yd, void *y) {
    const char *fn = "cudnnPoolingForward"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(p, pd, K_POOL, "pooling"); NEED(xt, xd, K_TENSOR, "x"); NEED(yt, yd, K_TENSOR, "y");
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if ((r = pool_shapes(fn, p, xt, yt))) return r;
    if (!aligned(x, xt->dtype) || !aligned(y, yt->dtype)) VIOLATE("%s: null data", fn);
    fill(y, yt, 0.0); logf_("%s mode=%d", fn, p->mode); return OK;
}
int cudnnPoolingBackward(void *h, void *pd, const void *alpha, void *yd, const void *y, void *dyd, const void *dy, void *xd, const void *x, const void *beta, void *dxd, void *dx) {
    const char *fn = "cudnnPoolingBackward"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(p, pd, K_POOL, "pooling"); NEED(yt, yd, K_TENSOR, "y"); NEED(dyt, dyd, K_TENSOR, "dy"); NEED(xt, xd, K_TENSOR, "x"); NEED(dxt, dxd, K_TENSOR, "dx");
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if ((r = pool_shapes(fn, p, xt, yt))) return r;
    if (!y || !dy || !x || !dx || dyt->nb != yt->nb || dxt->nb != xt->nb) VIOLATE("%s: null data / ranks", fn);
    fill(dx, dxt, 1.0); logf_("%s mode=%d", fn, p->mode); return OK;
}

int cudnnCreateActivationDescriptor(void **d) { return make(d, K_ACT, "cudnnCreateActivationDescriptor"); }
int cudnnDestroyActivationDescriptor(void *d) { return kill(d, K_ACT, "cudnnDestroyActivationDescriptor"); }
int cudnnSetActivationDescriptor(void *d, int mode, int nan, double coef) {
    const char *fn = "cudnnSetActivationDescriptor"; ENTER(fn);
    Obj *a = get(d, K_ACT); if (!a) VIOLATE("%s: descriptor not alive", fn);
    if (mode < 0 || mode > 6 || nan < 0 || nan > 1) VIOLATE("%s: mode %d", fn, mode);
    if (mode == 3 && !(coef > 0)) VIOLATE("%s: clipped ReLU needs a ceiling", fn);
    a->mode = mode; a->set = 1; logf_("%s %p mode=%d coef=%g", fn, d, mode, coef); return OK;
}
int cudnnActivationForward(void *h, void *ad, const void *alpha, void *xd, const void *x, const void *beta, void *yd, void *y) {
    const char *fn = "cudnnActivationForward"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(a, ad, K_ACT, "activation"); NEED(xt, xd, K_TENSOR, "x"); NEED(yt, yd, K_TENSOR, "y");
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if (count(xt) != count(yt) || !aligned(x, xt->dtype) || !aligned(y, yt->dtype)) VIOLATE("%s: sizes/data", fn);
    if (xt->dtype == 0) {
        for (long long i = 0; i < count(xt); i++) {
            float v = ((const float *)x)[i];
            ((float *)y)[i] = a->mode == 1 ? (v > 0 ? v : 0) : a->mode == 0 ? 1 / (1 + expf(-v)) : a->mode == 2 ? tanhf(v) : v;
        }
    } else fill(y, yt, 1.0);
    logf_("%s mode=%d n=%lld", fn, a->mode, count(xt)); return OK;
}
int cudnnActivationBackward(void *h, void *ad, const void *alpha, void *yd, const void *y, void *dyd, const void *dy, void *xd, const void *x, const void *beta, void *dxd, void *dx) {
    const char *fn = "cudnnActivationBackward"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(a, ad, K_ACT, "activation"); NEED(yt, yd, K_TENSOR, "y"); NEED(dyt, dyd, K_TENSOR, "dy"); NEED(xt, xd, K_TENSOR, "x"); NEED(dxt, dxd, K_TENSOR, "dx");
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if (count(yt) != count(dxt) || !y || !dy || !x || !dx) VIOLATE("%s: sizes/data", fn);
    (void)dyt; fill(dx, dxt, 1.0); logf_("%s mode=%d", fn, a->mode); return OK;
}
int cudnnSoftmaxForward(void *h, int algo, int mode, const void *alpha, void *xd, const void *x, const void *beta, void *yd, void *y) {
    const char *fn = "cudnnSoftmaxForward"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(xt, xd, K_TENSOR, "x"); NEED(yt, yd, K_TENSOR, "y");
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if (algo < 0 || algo > 2 || mode < 0 || mode > 1 || !x || !y) VIOLATE("%s: algo %d mode %d", fn, algo, mode);
    fill(y, yt, 1.0); char s[128]; dimstr(s, xt); logf_("%s algo=%d mode=%d dims=%s", fn, algo, mode, s); return OK;
}
int cudnnSoftmaxBackward(void *h, int algo, int mode, const void *alpha, void *yd, const void *y, void *dyd, const void *dy, const void *beta, void *dxd, void *dx) {
    const char *fn = "cudnnSoftmaxBackward"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r;
    NEED(yt, yd, K_TENSOR, "y"); NEED(dyt, dyd, K_TENSOR, "dy"); NEED(dxt, dxd, K_TENSOR, "dx");
    if ((r = check_scalars(fn, yt->dtype, alpha, beta, 1, 0))) return r;
    if (algo < 0 || algo > 2 || !y || !dy || !dx) VIOLATE("%s: bad args", fn);
    (void)dyt; fill(dx, dxt, 1.0); logf_("%s algo=%d mode=%d", fn, algo, mode); return OK;
}

/* batch norm: the derived descriptor is (1, C, 1, 1) spatially, (1, C, H, W) per activation */
static long long bn_ws_fwd = 4096, bn_ws_bwd = 8192, bn_reserve = 1024;
int cudnnDeriveBNTensorDescriptor(void *dd, void *xd, int mode) {
    const char *fn = "cudnnDeriveBNTensorDescriptor"; ENTER(fn);
    Obj *d = get(dd, K_TENSOR); if (!d) VIOLATE("%s: derived descriptor not alive", fn);
    NEED(x, xd, K_TENSOR, "x");
    if (mode < 0 || mode > 2) VIOLATE("%s: mode %d", fn, mode);
    d->nb = x->nb; d->dtype = x->dtype == 1 ? 1 : 0; d->format = 0;
    for (int i = 0; i < x->nb; i++) d->dims[i] = i == 1 || (mode == 0 && i > 1) ? x->dims[i] : 1;
    long long step = 1; for (int i = d->nb - 1; i >= 0; i--) { d->strides[i] = (int)step; step *= d->dims[i]; }
    d->set = 1; d->mode = 100 + mode;  /* marks "derived for mode" */
    logf_("%s mode=%d", fn, mode); return OK;
}
static int bn_check(const char *fn, void *h, int mode, Obj *x, void *bnd) {
    int r; if ((r = check_handle(fn, h))) return r;
    NEED(b, bnd, K_TENSOR, "bn scale/bias descriptor");
    if (b->mode != 100 + mode) VIOLATE("%s: bn descriptor not derived for mode %d", fn, mode);
    if (b->dims[1] != x->dims[1] || b->nb != x->nb) VIOLATE("%s: bn channels %d != x channels %d", fn, b->dims[1], x->dims[1]);
    return OK;
}
int cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(void *h, int mode, int ops, void *xd, void *zd, void *yd, void *bnd, void *act, size_t *size) {
    const char *fn = "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize"; ENTER(fn); int r;
    NEED(x, xd, K_TENSOR, "x"); if ((r = bn_check(fn, h, mode, x, bnd))) return r;
    if (ops != 0 || act) VIOLATE("%s: ops %d", fn, ops); (void)zd; (void)yd;
    *size = (size_t)bn_ws_fwd; logf_("%s size=%lld", fn, bn_ws_fwd); return OK;
}
int cudnnGetBatchNormalizationTrainingExReserveSpaceSize(void *h, int mode, int ops, void *act, void *xd, size_t *size) {
    const char *fn = "cudnnGetBatchNormalizationTrainingExReserveSpaceSize"; ENTER(fn); int r;
    if ((r = check_handle(fn, h))) return r; NEED(x, xd, K_TENSOR, "x");
    (void)mode; (void)ops; (void)act; (void)x; *size = (size_t)bn_reserve; logf_("%s size=%lld", fn, bn_reserve); return OK;
}
int cudnnBatchNormalizationForwardTrainingEx(void *h, int mode, int ops, const void *alpha, const void *beta, void *xd, const void *x, void *zd, const void *z, void *yd, void *y,
        void *bnd, const void *scale, const void *bias, double factor, void *rmean, void *rvar, double eps, void *smean, void *sinv, void *act, void *ws, size_t wsz, void *rs, size_t rsz) {
    const char *fn = "cudnnBatchNormalizationForwardTrainingEx"; ENTER(fn); int r;
    NEED(xt, xd, K_TENSOR, "x"); NEED(yt, yd, K_TENSOR, "y");
    if ((r = bn_check(fn, h, mode, xt, bnd))) return r;
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if (!x || !y || !scale || !bias || !rmean || !rvar) VIOLATE("%s: null data", fn);
    if (z || act || ops != 0) VIOLATE("%s: z/activation given for plain BN", fn);
    if (eps < 0 || factor < 0 || factor > 1) VIOLATE("%s: eps %g factor %g", fn, eps, factor);
    if ((long long)wsz < bn_ws_fwd || !ws) VIOLATE("%s: workspace %zu < %lld", fn, wsz, bn_ws_fwd);
    if ((rs == NULL) != (rsz == 0)) VIOLATE("%s: reserve pointer/size mismatch", fn);
    (void)zd; fill(y, yt, 1.0);
    Obj *b = (Obj *)bnd; if (smean) fill(smean, b, 0.0); if (sinv) fill(sinv, b, 1.0);
    logf_("%s mode=%d factor=%g eps=%g workspace=%zu reserve=%zu", fn, mode, factor, eps, wsz, rsz); return OK;
}
int cudnnBatchNormalizationForwardInference(void *h, int mode, const void *alpha, const void *beta, void *xd, const void *x, void *yd, void *y, void *bnd,
        const void *scale, const void *bias, const void *mean, const void *var, double eps) {
    const char *fn = "cudnnBatchNormalizationForwardInference"; ENTER(fn); int r;
    NEED(xt, xd, K_TENSOR, "x"); NEED(yt, yd, K_TENSOR, "y");
    if ((r = bn_check(fn, h, mode, xt, bnd))) return r;
    if ((r = check_scalars(fn, xt->dtype, alpha, beta, 1, 0))) return r;
    if (!x || !y || !scale || !bias || !mean || !var || eps < 0) VIOLATE("%s: null data", fn);
    fill(y, yt, 1.0); logf_("%s mode=%d eps=%g", fn, mode, eps); return OK;
}
int cudnnGetBatchNormalizationBackwardExWorkspaceSize(void *h, int mode, int ops, void *xd, void *yd, void *dyd, void *dzd, void *dxd, void *bnd, void *act, size_t *size) {
    const char *fn = "cudnnGetBatchNormalizationBackwardExWorkspaceSize"; ENTER(fn); int r;
    NEED(x, xd, K_TENSOR, "x"); if ((r = bn_check(fn, h, mode, x, bnd))) return r;
    (void)ops; (void)yd; (void)dyd; (void)dzd; (void)dxd; (void)act;
    *size = (size_t)bn_ws_bwd; logf_("%s size=%lld", fn, bn_ws_bwd); return OK;
}
int cudnnBatchNormalizationBackwardEx(void *h, int mode, int ops, const void *a1, const void *b1, const void *a2, const void *b2, void *xd, const void *x, void *yd, const void *y,
        void *dyd, const void *dy, void *dzd, void *dz, void *dxd, void *dx, void *bnd, const void *scale, const void *bias, void *dscale, void *dbias, double eps,
        const void *smean, const void *sinv, void *act, void *ws, size_t wsz, void *rs, size_t rsz) {
    const char *fn = "cudnnBatchNormalizationBackwardEx"; ENTER(fn); int r;
    NEED(xt, xd, K_TENSOR, "x"); NEED(dxt, dxd, K_TENSOR, "dx");
    if ((r = bn_check(fn, h, mode, xt, bnd))) return r;
    if ((r = check_scalars(fn, xt->dtype, a1, b1, 1, 0)) || (r = check_scalars(fn, xt->dtype, a2, b2, 1, 0))) return r;
    if (!x || !dy || !dx || !scale || !dscale || !dbias || !smean || !sinv) VIOLATE("%s: null data", fn);
    if (y || dz || bias || act || ops != 0) VIOLATE("%s: activation operands for plain BN", fn);
    if ((long long)wsz < bn_ws_bwd || !ws) VIOLATE("%s: workspace %zu < %lld", fn, wsz, bn_ws_bwd);
    (void)yd; (void)dyd; (void)dzd; (void)rs;
    fill(dx, dxt, 1.0); Obj *b = (Obj *)bnd; fill(dscale, b, 1.0); fill(dbias, b, 1.0);
    logf_("%s mode=%d eps=%g workspace=%zu reserve=%zu", fn, mode, eps, wsz, rsz); return OK;
}
int cudnnQueryRuntimeError(void *h, int *status, int mode, void *tag) {
    const char *fn = "cudnnQueryRuntimeError"; ENTER(fn);
    if (!get(h, K_HANDLE) || !status || tag) VIOLATE("%s: bad args", fn);
    *status = 0; logf_("%s mode=%d", fn, mode); return OK;
}
