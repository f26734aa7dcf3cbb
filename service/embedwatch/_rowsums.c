/* embedwatch._rowsums: float64 sums over the rows of a float32 batch, in one pass each.
 *
 * The statistics of embedwatch.window and embedwatch.monitor read every event three times in
 * float64: the similarity summary (each row's dot product with the centroid and its squared norm),
 * the bucket sums (column sums of the rows and of their squares) and the mean-shift scan's segment
 * sums. In numpy each of these first converts the rows to a float64 buffer and then runs BLAS on it:
 * about 0.8 us of a 384-d event together. Here each is one loop that converts as it reads, about
 * 0.4 us together. A fourth loop, pair_distances, gives the scan the squared distance of each
 * window's mean (a difference of two running sums, scaled) to a point, where numpy made three
 * (windows, d) temporaries. embedwatch.rowsums holds the numpy versions, used without a C compiler,
 * and the tests hold these to them.
 *
 * Order of additions, which decides the rounding:
 * - column sums and segment sums add the rows in order, one at a time, into each column, so a sum
 *   does not depend on how a stream's events were split into batches;
 * - a row's dot product and squared norm add their terms in 4 interleaved partial sums (2 vectors of
 *   2), combined at the end: within a few ulps of the BLAS result, not equal to it.
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

/* Add row r (d float32s) into s, and its squares into q when q is not NULL. */
static inline void add_row(const float *restrict r, Py_ssize_t d, double *restrict s, double *restrict q) {
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
    const float *x = b[0].buf;
    const double *c = b[1].buf;
    double *dots = b[2].buf, *squares = b[3].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *r = x + i * d;
        v2d a0 = {0, 0}, a1 = {0, 0}, q0 = {0, 0}, q1 = {0, 0};
        Py_ssize_t j = 0;
        for (; j + 4 <= d; j += 4) {
            v2d v0 = load2f(r + j), v1 = load2f(r + j + 2);
            a0 += v0 * load2d(c + j);
            a1 += v1 * load2d(c + j + 2);
            q0 += v0 * v0;
            q1 += v1 * v1;
        }
        double a = (a0[0] + a1[0]) + (a0[1] + a1[1]), q = (q0[0] + q1[0]) + (q0[1] + q1[1]);
        for (; j < d; j++) {
            double v = r[j];
            a += v * c[j];
            q += v * v;
        }
        dots[i] = a;
        squares[i] = q;
    }
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
    const float *x = b[0].buf;
    double *s = b[1].buf, *q = nb == 3 ? b[2].buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        add_row(x + i * d, d, s, q);
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
        for (Py_ssize_t i = 0; i < n; i++)
            add_row(x + i * d, d, out + (i / e) * d, NULL);
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

static PyMethodDef methods[] = {
    {"dots_and_squares", dots_and_squares, METH_VARARGS, dots_and_squares_doc},
    {"add_rows", add_rows, METH_VARARGS, add_rows_doc},
    {"segment_sums", segment_sums, METH_VARARGS, segment_sums_doc},
    {"pair_distances", pair_distances, METH_VARARGS, pair_distances_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowsums",
    "float64 sums over the rows of a float32 batch, in one pass each (see embedwatch.rowsums).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rowsums(void) { return PyModule_Create(&module); }
