/* embedwatch._rowsums: float64 sums over the rows of a float32 batch, in one pass each.
 *
 * The statistics of embedwatch.window and embedwatch.monitor read every event three times in
 * float64: the similarity summary (each row's dot product with the centroid and its squared norm),
 * the bucket sums (column sums of the rows and of their squares) and the mean-shift scan's segment
 * sums. In numpy each of these first converts the rows to a float64 buffer and then runs BLAS on it:
 * about 0.8 us of a 384-d event together. Here each is one loop that converts as it reads: about
 * 0.5 us together with SSE2, 0.2 us with AVX2 (each loop is built for both; the module takes the
 * AVX2 ones when the CPU has it). A fourth loop, pair_distances, gives the scan the squared distance
 * of each window's mean (a difference of two running sums, scaled) to a point, where numpy made three
 * (windows, d) temporaries; a fifth, row_peaks, gives the decoder each row's largest magnitude.
 * embedwatch.rowsums holds the numpy versions, used without a C compiler, and the tests hold these
 * to them.
 *
 * Order of additions, which decides the rounding (the same for either instruction set):
 * - column sums and segment sums add the rows in order, one at a time, into each column, so a sum
 *   does not depend on how a stream's events were split into batches;
 * - a row's dot product and squared norm add term j into partial sum j mod 8 and combine the 8 as
 *   ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)), then add the last d mod 8 terms in order:
 *   within a few ulps of the BLAS result, not equal to it.
 *
 * Buffers come through the buffer protocol (no numpy headers): every one C-contiguous, the rows
 * float32 ("f"), the rest float64 ("d"), the outputs writable. A shape that does not fit raises
 * ValueError; nothing is written then.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* GCC/clang vector types: SSE2 at the default flags, and the loops stay vectorised at -O2. */
typedef double v2d __attribute__((vector_size(16)));
typedef float v2f __attribute__((vector_size(8)));

static inline v2d load2f(const float *p) {
    v2f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v2d);
}

static inline v2d load2d(const double *p) {
    v2d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store2d(double *p, v2d v) { memcpy(p, &v, sizeof v); }

/* The loops come twice: for the baseline of the build (SSE2 on x86-64, NEON on arm64) and, with GCC
 * or clang on x86-64, for AVX2, taken when the CPU has it (twice the lanes). Both add the same terms
 * in the same order, so they give the same bits (the tests hold them to it): column and segment sums
 * add the rows in order into each column, a dot product adds term j into partial sum j mod 8 and
 * combines the 8 in a fixed order. AVX2 without FMA, and setup.py builds with -ffp-contract=off: a
 * fused multiply-add would round differently. */
typedef struct {
    const char *name;
    void (*dots)(const float *x, Py_ssize_t n, Py_ssize_t d, const double *c, double *dots, double *squares);
    void (*sums)(const float *x, Py_ssize_t n, Py_ssize_t d, double *s, double *q);
} kernels_t;

/* The last n terms of a row (fewer than 8), added in order to its combined partial sums da and dq,
 * and the row's results stored. */
static inline void dot_tail(const float *r, const double *c, Py_ssize_t n, double da, double dq, double *dot,
                            double *square) {
    for (Py_ssize_t j = 0; j < n; j++) {
        double v = r[j];
        da += v * c[j];
        dq += v * v;
    }
    *dot = da;
    *square = dq;
}

/* dots[i] = x[i] . c and squares[i] = x[i] . x[i] for the n rows of x (d float32s each). */
static void dots_baseline(const float *restrict x, Py_ssize_t n, Py_ssize_t d, const double *restrict c,
                          double *restrict dots, double *restrict squares) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *r = x + i * d;
        v2d a0 = {0, 0}, a1 = {0, 0}, a2 = {0, 0}, a3 = {0, 0}, q0 = {0, 0}, q1 = {0, 0}, q2 = {0, 0}, q3 = {0, 0};
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8) {
            v2d v0 = load2f(r + j), v1 = load2f(r + j + 2), v2 = load2f(r + j + 4), v3 = load2f(r + j + 6);
            a0 += v0 * load2d(c + j), a1 += v1 * load2d(c + j + 2);
            a2 += v2 * load2d(c + j + 4), a3 += v3 * load2d(c + j + 6);
            q0 += v0 * v0, q1 += v1 * v1, q2 += v2 * v2, q3 += v3 * v3;
        }
        /* Partial sums j mod 8 = 0..7 are a0[0], a0[1], a1[0], a1[1], a2[0], ...: (0 + 4), (1 + 5), ... */
        v2d alo = a0 + a2, ahi = a1 + a3, qlo = q0 + q2, qhi = q1 + q3;
        double da = (alo[0] + ahi[0]) + (alo[1] + ahi[1]), dq = (qlo[0] + qhi[0]) + (qlo[1] + qhi[1]);
        dot_tail(r + j, c + j, d - j, da, dq, dots + i, squares + i);
    }
}

/* Add the n rows of x (d float32s each), in order, into s, and their squares into q unless NULL. */
static void sums_baseline(const float *restrict x, Py_ssize_t n, Py_ssize_t d, double *restrict s,
                          double *restrict q) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *r = x + i * d;
        Py_ssize_t j = 0;
        if (q != NULL) {
            for (; j + 2 <= d; j += 2) {
                v2d v = load2f(r + j);
                store2d(s + j, load2d(s + j) + v);
                store2d(q + j, load2d(q + j) + v * v);
            }
            for (; j < d; j++) {
                double v = r[j];
                s[j] += v;
                q[j] += v * v;
            }
        } else {
            for (; j + 2 <= d; j += 2)
                store2d(s + j, load2d(s + j) + load2f(r + j));
            for (; j < d; j++)
                s[j] += (double)r[j];
        }
    }
}

static const kernels_t kernels_baseline = {"baseline", dots_baseline, sums_baseline};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_KERNELS 1
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2")))
typedef double v4d __attribute__((vector_size(32)));

/* (GCC 12 makes two 2-lane conversions of __builtin_convertvector here; the intrinsic is one.) */
AVX2 static inline v4d load4f(const float *p) { return (v4d)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
AVX2 static inline v4d load4d(const double *p) { return (v4d)_mm256_loadu_pd(p); }
AVX2 static inline void store4d(double *p, v4d v) { _mm256_storeu_pd(p, (__m256d)v); }

AVX2 static void dots_avx2(const float *restrict x, Py_ssize_t n, Py_ssize_t d, const double *restrict c,
                           double *restrict dots, double *restrict squares) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *r = x + i * d;
        v4d a0 = {0}, a1 = {0}, q0 = {0}, q1 = {0};
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8) {
            v4d v0 = load4f(r + j), v1 = load4f(r + j + 4);
            a0 += v0 * load4d(c + j), a1 += v1 * load4d(c + j + 4);
            q0 += v0 * v0, q1 += v1 * v1;
        }
        v4d a = a0 + a1, q = q0 + q1; /* lanes (0 + 4), (1 + 5), (2 + 6), (3 + 7), as in the baseline */
        double da = (a[0] + a[2]) + (a[1] + a[3]), dq = (q[0] + q[2]) + (q[1] + q[3]);
        dot_tail(r + j, c + j, d - j, da, dq, dots + i, squares + i);
    }
}

/* As sums_baseline. The rows are taken 8 at a time, and for those the columns 16 at a time, whose
 * sums stay in registers over the 8 rows: a row at a time the sums are loaded and stored for each
 * row, and a column block over all the rows reads them a row apart, which at 768-d puts them in a few
 * sets of the L1 cache (both measured slower). */
AVX2 static void sums_avx2(const float *restrict x, Py_ssize_t n, Py_ssize_t d, double *restrict s,
                           double *restrict q) {
    const int squares = q != NULL;
    for (Py_ssize_t i0 = 0; i0 < n; i0 += 8) {
        const Py_ssize_t i1 = i0 + 8 < n ? i0 + 8 : n;
        Py_ssize_t j = 0;
        for (; j + 16 <= d; j += 16) {
            v4d s0 = load4d(s + j), s1 = load4d(s + j + 4), s2 = load4d(s + j + 8), s3 = load4d(s + j + 12);
            v4d q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
            if (squares)
                q0 = load4d(q + j), q1 = load4d(q + j + 4), q2 = load4d(q + j + 8), q3 = load4d(q + j + 12);
            for (Py_ssize_t i = i0; i < i1; i++) {
                const float *r = x + i * d + j;
                v4d v0 = load4f(r), v1 = load4f(r + 4), v2 = load4f(r + 8), v3 = load4f(r + 12);
                s0 += v0, s1 += v1, s2 += v2, s3 += v3;
                if (squares)
                    q0 += v0 * v0, q1 += v1 * v1, q2 += v2 * v2, q3 += v3 * v3;
            }
            store4d(s + j, s0), store4d(s + j + 4, s1), store4d(s + j + 8, s2), store4d(s + j + 12, s3);
            if (squares)
                store4d(q + j, q0), store4d(q + j + 4, q1), store4d(q + j + 8, q2), store4d(q + j + 12, q3);
        }
        for (; j < d; j++) {
            for (Py_ssize_t i = i0; i < i1; i++) {
                double v = x[i * d + j];
                s[j] += v;
                if (squares)
                    q[j] += v * v;
            }
        }
    }
}

static const kernels_t kernels_avx2 = {"avx2", dots_avx2, sums_avx2};
#endif

static const kernels_t *kernels = &kernels_baseline;

/* What an argument must be: a C-contiguous buffer of ndim dimensions and format fmt ("f" float32,
 * "d" float64, "int64": "q", or "l" where long is 64 bits), writable if asked. */
typedef struct {
    const char *name, *fmt;
    int ndim, writable;
} spec_t;

static void release(Py_buffer *b, int n) {
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&b[i]);
}

/* The buffers of the n objects o, as spec says; 0, or -1 with an exception set and none held. */
static int get_buffers(PyObject *const *o, const spec_t *spec, int n, Py_buffer *b) {
    for (int i = 0; i < n; i++) {
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (spec[i].writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(o[i], &b[i], flags) < 0) {
            release(b, i);
            return -1;
        }
        const char *f = b[i].format;
        int ok = b[i].ndim == spec[i].ndim
                 && (strcmp(spec[i].fmt, "int64") == 0
                         ? b[i].itemsize == 8 && (strcmp(f, "q") == 0 || strcmp(f, "l") == 0)
                         : strcmp(f, spec[i].fmt) == 0);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s: expected a %d-d buffer of format '%s', got %d-d '%s'", spec[i].name,
                         spec[i].ndim, spec[i].fmt, b[i].ndim, f);
            release(b, i + 1);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(dots_and_squares_doc,
             "dots_and_squares(x, c, dots, squares)\n--\n\n"
             "For each row i of x (n, d) float32: dots[i] = x[i] . c and squares[i] = x[i] . x[i], in float64.");

static PyObject *dots_and_squares(PyObject *self, PyObject *args) {
    (void)self;
    static const spec_t spec[] = {{"x", "f", 2, 0}, {"c", "d", 1, 0}, {"dots", "d", 1, 1}, {"squares", "d", 1, 1}};
    PyObject *o[4];
    Py_buffer b[4];
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3]) || get_buffers(o, spec, 4, b) < 0)
        return NULL;
    Py_ssize_t n = b[0].shape[0], d = b[0].shape[1];
    if (b[1].shape[0] != d || b[2].shape[0] != n || b[3].shape[0] != n) {
        release(b, 4);
        PyErr_SetString(PyExc_ValueError, "dots_and_squares: c must have x's columns, dots and squares its rows");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kernels->dots(b[0].buf, n, d, b[1].buf, b[2].buf, b[3].buf);
    Py_END_ALLOW_THREADS
    release(b, 4);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(add_rows_doc,
             "add_rows(x, sums, squares)\n--\n\n"
             "Add the rows of x (n, d) float32, in order, into sums (d,) float64, and their squares into "
             "squares (d,) float64 unless it is None.");

static PyObject *add_rows(PyObject *self, PyObject *args) {
    (void)self;
    static const spec_t spec[] = {{"x", "f", 2, 0}, {"sums", "d", 1, 1}, {"squares", "d", 1, 1}};
    PyObject *o[3];
    Py_buffer b[3];
    if (!PyArg_ParseTuple(args, "OOO", &o[0], &o[1], &o[2]))
        return NULL;
    int nb = o[2] == Py_None ? 2 : 3; /* no squares: the sums only */
    if (get_buffers(o, spec, nb, b) < 0)
        return NULL;
    Py_ssize_t n = b[0].shape[0], d = b[0].shape[1];
    if (b[1].shape[0] != d || (nb == 3 && b[2].shape[0] != d)) {
        release(b, nb);
        PyErr_SetString(PyExc_ValueError, "add_rows: sums and squares must have x's columns");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kernels->sums(b[0].buf, n, d, b[1].buf, nb == 3 ? b[2].buf : NULL);
    Py_END_ALLOW_THREADS
    release(b, nb);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(segment_sums_doc,
             "segment_sums(x, out)\n--\n\n"
             "out[k] = the sum of rows k*e .. k*e + e - 1 of x (n, d) float32, in float64, for out (n / e, d) "
             "float64 (n a multiple of out's rows).");

static PyObject *segment_sums(PyObject *self, PyObject *args) {
    (void)self;
    static const spec_t spec[] = {{"x", "f", 2, 0}, {"out", "d", 2, 1}};
    PyObject *o[2];
    Py_buffer b[2];
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || get_buffers(o, spec, 2, b) < 0)
        return NULL;
    Py_ssize_t n = b[0].shape[0], d = b[0].shape[1], c = b[1].shape[0];
    if (b[1].shape[1] != d || (c == 0 ? n != 0 : n % c != 0)) {
        release(b, 2);
        PyErr_SetString(PyExc_ValueError, "segment_sums: out must have x's columns and divide its rows");
        return NULL;
    }
    const float *x = b[0].buf;
    double *out = b[1].buf;
    Py_BEGIN_ALLOW_THREADS
    if (c > 0) {
        Py_ssize_t e = n / c;
        memset(out, 0, (size_t)(c * d) * sizeof(double));
        for (Py_ssize_t k = 0; k < c; k++)
            kernels->sums(x + k * e * d, e, d, out + k * d, NULL);
    }
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pair_distances_doc,
             "pair_distances(rows, a, b, scale, center, out)\n--\n\n"
             "out[i] = || (rows[a[i], :d] - rows[b[i], :d]) * scale[i] - center ||^2 for rows (r, w) float64, "
             "a and b (p,) int64 row numbers, scale (p,) and out (p,) float64, center (d,) float64, d <= w.");

static PyObject *pair_distances(PyObject *self, PyObject *args) {
    (void)self;
    static const spec_t spec[] = {{"rows", "d", 2, 0},  {"a", "int64", 1, 0},  {"b", "int64", 1, 0},
                                  {"scale", "d", 1, 0}, {"center", "d", 1, 0}, {"out", "d", 1, 1}};
    PyObject *o[6], *result = NULL;
    Py_buffer b[6];
    if (!PyArg_ParseTuple(args, "OOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5]) || get_buffers(o, spec, 6, b) < 0)
        return NULL;
    Py_ssize_t r = b[0].shape[0], w = b[0].shape[1], p = b[1].shape[0], d = b[4].shape[0];
    if (b[2].shape[0] != p || b[3].shape[0] != p || b[5].shape[0] != p || d > w) {
        PyErr_SetString(PyExc_ValueError, "pair_distances: a, b, scale and out must have one length, center at "
                                          "most rows' columns");
        goto done;
    }
    const double *rows = b[0].buf, *scale = b[3].buf, *center = b[4].buf;
    const int64_t *ia = b[1].buf, *ib = b[2].buf;
    double *out = b[5].buf;
    for (Py_ssize_t i = 0; i < p; i++) {
        if (ia[i] < 0 || ia[i] >= r || ib[i] < 0 || ib[i] >= r) {
            PyErr_SetString(PyExc_IndexError, "pair_distances: a row number is out of range");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < p; i++) {
        const double *x = rows + ia[i] * w, *y = rows + ib[i] * w;
        v2d s = {scale[i], scale[i]}, acc0 = {0, 0}, acc1 = {0, 0};
        Py_ssize_t j = 0;
        for (; j + 4 <= d; j += 4) {
            v2d z0 = (load2d(x + j) - load2d(y + j)) * s - load2d(center + j);
            v2d z1 = (load2d(x + j + 2) - load2d(y + j + 2)) * s - load2d(center + j + 2);
            acc0 += z0 * z0;
            acc1 += z1 * z1;
        }
        double acc = (acc0[0] + acc1[0]) + (acc0[1] + acc1[1]);
        for (; j < d; j++) {
            double z = (x[j] - y[j]) * scale[i] - center[j];
            acc += z * z;
        }
        out[i] = acc;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(b, 6);
    return result;
}

PyDoc_STRVAR(row_peaks_doc,
             "row_peaks(x, out)\n--\n\n"
             "out[i] = the largest magnitude in row i of x (n, d) float32, NaN if the row holds a NaN, "
             "for out (n,) float32.");

typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4i max4i(v4i a, v4i b) {
    v4i up = a > b;
    return (a & up) | (b & ~up);
}

/* The decoder's check of every event (embedwatch.events): numpy's abs(x).max(axis=1) makes an
 * (n, d) temporary and reduces each short row on its own, about 0.2 us of a 384-d event. Here each
 * row is read once, as int32s: with the sign bit cleared, a float's bits order as its magnitude
 * does, and every NaN's lie above infinity's, so the largest is the row's peak, or a NaN. A maximum
 * does not depend on the order, so no AVX2 twin is needed. */
static PyObject *row_peaks(PyObject *self, PyObject *args) {
    (void)self;
    static const spec_t spec[] = {{"x", "f", 2, 0}, {"out", "f", 1, 1}};
    PyObject *o[2];
    Py_buffer b[2];
    if (!PyArg_ParseTuple(args, "OO", &o[0], &o[1]) || get_buffers(o, spec, 2, b) < 0)
        return NULL;
    Py_ssize_t n = b[0].shape[0], d = b[0].shape[1];
    if (b[1].shape[0] != n) {
        release(b, 2);
        PyErr_SetString(PyExc_ValueError, "row_peaks: out must have x's rows");
        return NULL;
    }
    const int32_t *x = b[0].buf; /* the float32s' bits */
    float *out = b[1].buf;
    Py_BEGIN_ALLOW_THREADS
    const v4i magnitude = {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX}; /* clears the sign bit */
    for (Py_ssize_t i = 0; i < n; i++) {
        const int32_t *r = x + i * d;
        v4i m0 = {0, 0, 0, 0}, m1 = m0, m2 = m0, m3 = m0; /* 4 chains: a compare and a blend each */
        Py_ssize_t j = 0;
        for (; j + 16 <= d; j += 16) {
            v4i v0, v1, v2, v3;
            memcpy(&v0, r + j, sizeof v0), memcpy(&v1, r + j + 4, sizeof v1);
            memcpy(&v2, r + j + 8, sizeof v2), memcpy(&v3, r + j + 12, sizeof v3);
            m0 = max4i(m0, v0 & magnitude), m1 = max4i(m1, v1 & magnitude);
            m2 = max4i(m2, v2 & magnitude), m3 = max4i(m3, v3 & magnitude);
        }
        v4i m = max4i(max4i(m0, m1), max4i(m2, m3));
        int32_t peak = 0;
        for (int k = 0; k < 4; k++)
            peak = m[k] > peak ? m[k] : peak;
        for (; j < d; j++) {
            int32_t a = r[j] & INT32_MAX;
            peak = a > peak ? a : peak;
        }
        memcpy(&out[i], &peak, sizeof peak);
    }
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(isa_doc, "isa()\n--\n\nThe instruction set of the loops in use: 'avx2' or 'baseline'.");

static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyUnicode_FromString(kernels->name);
}

/* The AVX2 loops when the CPU has them (GCC and clang on x86-64), else NULL. */
static const kernels_t *avx2_kernels(void) {
#ifdef HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return &kernels_avx2;
#endif
    return NULL;
}

PyDoc_STRVAR(use_isa_doc,
             "use_isa(name)\n--\n\n"
             "Run the loops of instruction set name ('avx2' or 'baseline') from now on; ValueError if this "
             "build or CPU has no such loops. For the tests, which hold the two to the same results.");

static PyObject *use_isa(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    const kernels_t *k = strcmp(name, "baseline") == 0 ? &kernels_baseline
                         : strcmp(name, "avx2") == 0   ? avx2_kernels()
                                                       : NULL;
    if (k == NULL)
        return PyErr_Format(PyExc_ValueError, "use_isa: no '%s' loops in this build or on this CPU", name);
    kernels = k;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"dots_and_squares", dots_and_squares, METH_VARARGS, dots_and_squares_doc},
    {"add_rows", add_rows, METH_VARARGS, add_rows_doc},
    {"segment_sums", segment_sums, METH_VARARGS, segment_sums_doc},
    {"pair_distances", pair_distances, METH_VARARGS, pair_distances_doc},
    {"row_peaks", row_peaks, METH_VARARGS, row_peaks_doc},
    {"isa", isa, METH_NOARGS, isa_doc},
    {"use_isa", use_isa, METH_O, use_isa_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowsums",
    "float64 sums over the rows of a float32 batch, in one pass each (see embedwatch.rowsums).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rowsums(void) {
    const kernels_t *k = avx2_kernels();
    if (k != NULL)
        kernels = k;
    return PyModule_Create(&module);
}
