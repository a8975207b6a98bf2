/* cmd-optim's fused CPU kernels: plain C on raw pointers and lengths (no torch headers, so the
 * extension does not depend on the torch version or ABI), threaded with OpenMP where it is available.
 *
 * mode_sums    out[bin] += sum over i of u[i] * g[i], bins[i] = bin     (one pass; per-thread histograms)
 * lift         w[i] += u[i] * table[bins[i]]                            (one pass)
 *
 * Gradients may be float32, bfloat16 or float16 (dtype codes 0, 1, 2); u, w and table are float32, bins
 * uint8. Pointers arrive as Python integers (tensor.data_ptr()), counts as int64. The GIL is
 * released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 4096
#define MAX_BINS 256

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float f16_to_float(uint16_t h) {
    uint32_t sign = ((uint32_t)(h & 0x8000u)) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400u)) { mantissa <<= 1; exponent--; }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load(const void *data, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)data)[i];
    if (dtype == 1) return bf16_to_float(((const uint16_t *)data)[i]);
    return f16_to_float(((const uint16_t *)data)[i]);
}

static int threads_for(int64_t n, int requested) {
    int64_t useful = n / (16 * BLOCK) + 1; /* below about 64K elements per thread a team costs more than it saves */
    return (int)(requested < useful ? requested : useful);
}

static void mode_sums(const float *u, const void *g, int dtype, const uint8_t *bins, int64_t n, int nbins,
                      double *out, int threads) {
    int team = threads_for(n, threads);
    double partial[64][MAX_BINS];
    if (team > 64) team = 64;
    memset(partial, 0, sizeof(double) * (size_t)team * MAX_BINS);
#pragma omp parallel num_threads(team) if (team > 1)
    {
#ifdef _OPENMP
        int me = omp_get_thread_num();
#else
        int me = 0;
#endif
        float local[MAX_BINS];
        memset(local, 0, sizeof(local));
        double *mine = partial[me];
#pragma omp for schedule(static)
        for (int64_t start = 0; start < n; start += BLOCK) {
            int64_t end = start + BLOCK < n ? start + BLOCK : n;
            if (dtype == 0) {
                const float *gf = (const float *)g;
                for (int64_t i = start; i < end; ++i) local[bins[i]] += u[i] * gf[i];
            } else {
                for (int64_t i = start; i < end; ++i) local[bins[i]] += u[i] * load(g, dtype, i);
            }
            for (int k = 0; k < nbins; ++k) { mine[k] += local[k]; local[k] = 0.0f; }
        }
    }
    for (int t = 0; t < team; ++t)
        for (int k = 0; k < nbins; ++k) out[k] += partial[t][k];
}

static void lift(float *w, const float *u, const uint8_t *bins, const float *table, int64_t n, int threads) {
    int team = threads_for(n, threads);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t i = 0; i < n; ++i) w[i] += u[i] * table[bins[i]];
}

static PyObject *py_mode_sums(PyObject *self, PyObject *args) {
    unsigned long long u, g, bins, out;
    long long n;
    int dtype, nbins, threads;
    if (!PyArg_ParseTuple(args, "KKiKLiKi", &u, &g, &dtype, &bins, &n, &nbins, &out, &threads)) return NULL;
    if (nbins < 1 || nbins > MAX_BINS || dtype < 0 || dtype > 2) {
        PyErr_SetString(PyExc_ValueError, "mode_sums: nbins must be in [1, 256] and dtype in {0, 1, 2}");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    mode_sums((const float *)u, (const void *)g, dtype, (const uint8_t *)bins, n, nbins, (double *)out, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_lift(PyObject *self, PyObject *args) {
    unsigned long long w, u, bins, table;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLi", &w, &u, &bins, &table, &n, &threads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    lift((float *)w, (const float *)u, (const uint8_t *)bins, (const float *)table, n, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_openmp(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"mode_sums", py_mode_sums, METH_VARARGS, "out[bin] += sum of u * g per bin (pointers, counts)"},
    {"lift", py_lift, METH_VARARGS, "w += u * table[bin] (pointers, counts)"},
    {"openmp", py_openmp, METH_NOARGS, "whether the kernels were built with OpenMP"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "cmd-optim's fused CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
