/* embedwatch._b64scan: the b64 pass of embedwatch.events.Decoder in one C loop per batch.
 *
 * The pure-Python pass (Decoder._b64_pass) parses each message with msgspec and checks and groups
 * it in Python, about 3 us of a b64 event's 11.5 end to end. This loop does the same work for the
 * common form of a b64 event and returns the batch grouped, so that Python works per group, not per
 * event. It takes a message only when it is sure of every value; anything it is not sure of goes to
 * the general path (orjson or simdjson and the Python checks), which judges and words it. So this
 * file only ever decides "take" or "leave to the general path", never "reject", and a property test
 * (tests/unit/test_events.py) holds its outcome to the general path's on hostile input.
 *
 * Taken: one JSON object, JSON whitespace only, no string escapes, every string ASCII without
 * control characters, no nested object or array, no repeated known key; model, model_version and
 * embedding_b64 strings; segment a string or null (absent: the default segment); ts and latency_ms
 * numbers or null, ts within [0, ts_max], latency_ms within [0, inf); id a string of at most max_id
 * characters, an integer of at most 18 digits (not -0), or null; query_id, results and relevant_ids
 * absent or null; the base64 a whole number of float32s, at most max_bytes of them once decoded.
 * The base64 text itself is not checked here: Python decodes each group's texts joined, with
 * pybase64's validate=True, which refuses any character outside the alphabet (a backslash, a quote,
 * a non-ASCII byte), and leaves a bad row to the general path.
 *
 * Numbers are read by PyOS_string_to_double (correctly rounded, locale-independent), as orjson and
 * msgspec read them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const char *p;
    Py_ssize_t n;
} span_t;

/* One message's fields, as found. */
typedef struct {
    span_t model, version, segment, b64, id;
    int has_segment, segment_null;
    int has_ts, has_lat;
    double ts, lat;
    int id_kind; /* 0 absent or null, 1 string, 2 integer */
} fields_t;

/* The messages of one (model, model_version, segment, base64 length): one group in Python. */
typedef struct {
    span_t model, version, segment;
    int segment_null;
    Py_ssize_t n; /* base64 characters per row */
    int pad;      /* its trailing "=": one value only leaves a whole number of float32s */
    uint64_t hash;
    Py_ssize_t rows;
    /* The rows' base64 joined, made once every row is known: one copy of each (growing a buffer as
     * rows come copied each one again, and a bytes object made of it once more). */
    PyObject *text;
    PyObject *msgs, *ts, *lat, *ids, *payloads;
} class_t;

typedef struct {
    class_t *cls;
    Py_ssize_t n_cls, cap_cls;
    Py_ssize_t *slots; /* open addressing: class index + 1, 0 = empty */
    Py_ssize_t n_slots;
} table_t;

enum { K_MODEL, K_VERSION, K_B64, K_SEGMENT, K_TS, K_ID, K_LAT, K_QUERY_ID, K_RESULTS, K_RELEVANT, K_OTHER };

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && is_ws(*p)) p++;
    return p;
}

/* A string at p (after its opening quote) without escapes, ASCII and no control characters: its
 * span, and the position after its closing quote; NULL if it is not one. */
static const char *plain_string(const char *p, const char *end, span_t *out) {
    const char *s = p;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            out->p = s;
            out->n = p - s;
            return p + 1;
        }
        if (c < 0x20 || c >= 0x80 || c == '\\') return NULL;
        p++;
    }
    return NULL;
}

/* A JSON number at p: the position after it, or NULL. *is_int: no fraction and no exponent;
 * *digits: the integer part's digits. */
static const char *json_number(const char *p, const char *end, int *is_int, Py_ssize_t *digits) {
    const char *d;
    if (p < end && *p == '-') p++;
    d = p;
    if (p >= end) return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return NULL;
    }
    *digits = p - d;
    *is_int = 1;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
        *is_int = 0;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
        *is_int = 0;
    }
    return p;
}

/* The number at p as a double (finite), or NULL. Integers of more than 18 digits are left to the
 * general path: they are where parsers part ways (big integers, ranges). */
static const char *number_value(const char *p, const char *end, double *out) {
    int is_int;
    Py_ssize_t digits;
    const char *q = json_number(p, end, &is_int, &digits);
    char buf[64];
    if (q == NULL || q - p >= (Py_ssize_t)sizeof(buf) || (is_int && digits > 18)) return NULL;
    memcpy(buf, p, (size_t)(q - p));
    buf[q - p] = '\0';
    *out = PyOS_string_to_double(buf, NULL, NULL);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (!isfinite(*out)) return NULL;
    return q;
}

static int literal(const char *p, const char *end, const char *word, Py_ssize_t n) {
    return end - p >= n && memcmp(p, word, (size_t)n) == 0;
}

static int key_of(span_t k) {
#define KEY(s, id) if (k.n == (Py_ssize_t)sizeof(s) - 1 && memcmp(k.p, s, sizeof(s) - 1) == 0) return id
    switch (k.n) {
    case 2: KEY("ts", K_TS); KEY("id", K_ID); break;
    case 5: KEY("model", K_MODEL); break;
    case 7: KEY("segment", K_SEGMENT); KEY("results", K_RESULTS); break;
    case 8: KEY("query_id", K_QUERY_ID); break;
    case 10: KEY("latency_ms", K_LAT); break;
    case 12: KEY("relevant_ids", K_RELEVANT); break;
    case 13: KEY("model_version", K_VERSION); KEY("embedding_b64", K_B64); break;
    }
#undef KEY
    return K_OTHER;
}

/* Parse one message; 1: its fields are in f, 0: leave it to the general path. ``guess``: where
 * the base64 text's closing quote may be (the last taken text's length). */
static int parse(const char *p, const char *end, Py_ssize_t guess, fields_t *f) {
    unsigned seen = 0;
    memset(f, 0, sizeof(*f));
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return 0;
    p = skip_ws(p + 1, end);
    for (;;) {
        span_t k, s;
        int key;
        if (p >= end || *p != '"') return 0;
        p = plain_string(p + 1, end, &k);
        if (p == NULL) return 0;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return 0;
        p = skip_ws(p + 1, end);
        if (p >= end) return 0;
        key = key_of(k);
        if (key != K_OTHER) {
            if (seen & (1u << key)) return 0; /* a repeated key: the parsers disagree on which wins */
            seen |= 1u << key;
        }
        int is_null = literal(p, end, "null", 4);
        switch (key) {
        case K_MODEL:
        case K_VERSION:
        case K_B64:
            if (*p != '"') return 0;
            if (key == K_B64) {
                /* Up to its closing quote, looked for where the last message's was first: a b64
                 * event's text is about all of its bytes, and this way they are read once, by the
                 * copy, not twice. A wrong guess is harmless: the text up to the first quote is then
                 * shorter and this span holds that quote (or a backslash escaping the guessed one),
                 * which the base64 check refuses, so the message goes to the general path. */
                const char *s = p + 1, *q;
                if (guess > 0 && guess < end - s && s[guess] == '"') {
                    q = s + guess;
                } else {
                    q = memchr(s, '"', (size_t)(end - s));
                }
                if (q == NULL) return 0;
                f->b64.p = p + 1;
                f->b64.n = q - p - 1;
                p = q + 1;
            } else {
                p = plain_string(p + 1, end, key == K_MODEL ? &f->model : &f->version);
                if (p == NULL) return 0;
            }
            break;
        case K_SEGMENT:
            f->has_segment = 1;
            if (is_null) {
                f->segment_null = 1;
                p += 4;
            } else {
                if (*p != '"') return 0;
                p = plain_string(p + 1, end, &f->segment);
                if (p == NULL) return 0;
            }
            break;
        case K_TS:
        case K_LAT:
            if (is_null) {
                p += 4;
            } else {
                p = number_value(p, end, key == K_TS ? &f->ts : &f->lat);
                if (p == NULL) return 0;
                if (key == K_TS) f->has_ts = 1; else f->has_lat = 1;
            }
            break;
        case K_ID:
            if (is_null) {
                p += 4;
            } else if (*p == '"') {
                p = plain_string(p + 1, end, &f->id);
                if (p == NULL) return 0;
                f->id_kind = 1;
            } else {
                int is_int;
                Py_ssize_t digits;
                const char *q = json_number(p, end, &is_int, &digits);
                /* An integer id is its decimal string; "-0" is the integer 0, "0". */
                if (q == NULL || !is_int || digits > 18 || (q - p == 2 && p[0] == '-')) return 0;
                f->id.p = p;
                f->id.n = q - p;
                f->id_kind = 2;
                p = q;
            }
            break;
        case K_QUERY_ID:
        case K_RESULTS:
        case K_RELEVANT:
            if (!is_null) return 0; /* a query event's field: the general path tells its kind */
            p += 4;
            break;
        default: /* a field the checks ignore: skipped if it is a plain scalar */
            if (*p == '"') {
                p = plain_string(p + 1, end, &s);
            } else if (is_null) {
                p += 4;
            } else if (literal(p, end, "true", 4)) {
                p += 4;
            } else if (literal(p, end, "false", 5)) {
                p += 5;
            } else {
                double unused; /* read as orjson reads it: one beyond double range, it refuses */
                p = number_value(p, end, &unused);
            }
            if (p == NULL) return 0;
        }
        p = skip_ws(p, end);
        if (p >= end) return 0;
        if (*p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (*p != '}') return 0;
        p = skip_ws(p + 1, end);
        break;
    }
    if (p != end) return 0;
    return (seen & (1u << K_MODEL)) && (seen & (1u << K_VERSION)) && (seen & (1u << K_B64));
}

static uint64_t fnv(uint64_t h, const char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static int same(span_t a, span_t b) { return a.n == b.n && memcmp(a.p, b.p, (size_t)a.n) == 0; }

static void table_free(table_t *t) {
    for (Py_ssize_t i = 0; i < t->n_cls; i++) {
        class_t *c = &t->cls[i];
        Py_XDECREF(c->text);
        Py_XDECREF(c->msgs);
        Py_XDECREF(c->ts);
        Py_XDECREF(c->lat);
        Py_XDECREF(c->ids);
        Py_XDECREF(c->payloads);
    }
    PyMem_Free(t->cls);
    PyMem_Free(t->slots);
}

static int table_grow(table_t *t) {
    Py_ssize_t n = t->n_slots ? 2 * t->n_slots : 64;
    Py_ssize_t *slots = PyMem_Calloc((size_t)n, sizeof(Py_ssize_t));
    if (slots == NULL) return -1;
    for (Py_ssize_t i = 0; i < t->n_cls; i++) {
        Py_ssize_t j = (Py_ssize_t)(t->cls[i].hash & (uint64_t)(n - 1));
        while (slots[j]) j = (j + 1) & (n - 1);
        slots[j] = i + 1;
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->n_slots = n;
    return 0;
}

/* The class of f's labels and base64 length, made if new; NULL on a memory error. */
static class_t *class_of(table_t *t, const fields_t *f, span_t segment, int pad) {
    uint64_t h = 14695981039346656037ULL;
    h = fnv(h, f->model.p, f->model.n);
    h = fnv(h ^ 0xff, f->version.p, f->version.n);
    h = fnv(h ^ (f->segment_null ? 0xfe : 0xfd), segment.p, segment.n);
    h ^= (uint64_t)f->b64.n * 0x9E3779B97F4A7C15ULL;
    if (2 * (t->n_cls + 1) > t->n_slots && table_grow(t) < 0) return NULL;
    Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)(t->n_slots - 1));
    while (t->slots[j]) {
        class_t *c = &t->cls[t->slots[j] - 1];
        if (c->hash == h && c->n == f->b64.n && c->segment_null == f->segment_null && same(c->model, f->model)
            && same(c->version, f->version) && same(c->segment, segment))
            return c;
        j = (j + 1) & (t->n_slots - 1);
    }
    if (t->n_cls == t->cap_cls) {
        Py_ssize_t cap = t->cap_cls ? 2 * t->cap_cls : 8;
        class_t *cls = PyMem_Realloc(t->cls, (size_t)cap * sizeof(class_t));
        if (cls == NULL) return NULL;
        t->cls = cls;
        t->cap_cls = cap;
    }
    class_t *c = &t->cls[t->n_cls];
    memset(c, 0, sizeof(*c));
    t->n_cls++;
    t->slots[j] = t->n_cls;
    c->model = f->model;
    c->version = f->version;
    c->segment = segment;
    c->segment_null = f->segment_null;
    c->n = f->b64.n;
    c->pad = pad;
    c->hash = h;
    c->msgs = PyList_New(0);
    c->ts = PyList_New(0);
    c->lat = PyList_New(0);
    c->ids = PyList_New(0);
    c->payloads = PyList_New(0);
    if (!c->msgs || !c->ts || !c->lat || !c->ids || !c->payloads) return NULL;
    return c;
}

static int append_new(PyObject *list, PyObject *item) {
    if (item == NULL) return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* Add one taken message to its class (all but its base64 text); -1 on a memory error. */
static int add(class_t *c, Py_ssize_t mi, double ts, double lat, const fields_t *f, PyObject *value) {
    PyObject *id;
    if (f->id_kind == 0) {
        id = Py_NewRef(Py_None);
    } else {
        id = PyUnicode_FromStringAndSize(f->id.p, f->id.n); /* ASCII: no decoding error */
    }
    c->rows++;
    if (append_new(c->msgs, PyLong_FromSsize_t(mi)) < 0 || append_new(c->ts, PyFloat_FromDouble(ts)) < 0
        || append_new(c->lat, PyFloat_FromDouble(lat)) < 0 || append_new(c->ids, id) < 0
        || PyList_Append(c->payloads, value) < 0)
        return -1;
    return 0;
}

static PyObject *str_value, *str_topic;

PyDoc_STRVAR(scan_doc,
"scan(messages, query_topics, default_segment, max_message, max_bytes, max_id, ts_max, now, default_ts)\n"
"--\n\n"
"The b64 pass over ``messages`` (a list of Message): ``(rest, classes)``. ``rest``: the indices of\n"
"the messages left to the general path, in order. ``classes``: one tuple per (labels, base64\n"
"length) taken, ``((model, model_version, segment), n, pad, text, msgs, ts, lat, ids, payloads)``:\n"
"``text`` the rows' base64 joined (``n`` characters each, undecoded, each ending in ``pad`` \"=\"),\n"
"``lat`` in seconds (NaN: none), ``ids`` strings or None. ``default_ts(message, now)`` gives the\n"
"time of an event without ``ts``.");

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *messages, *query_topics, *default_segment, *now, *default_ts;
    Py_ssize_t max_message, max_bytes, max_id;
    double ts_max;
    if (!PyArg_ParseTuple(args, "O!OUnnndOO", &PyList_Type, &messages, &query_topics, &default_segment,
                          &max_message, &max_bytes, &max_id, &ts_max, &now, &default_ts))
        return NULL;
    Py_ssize_t seg_n;
    const char *seg_p = PyUnicode_AsUTF8AndSize(default_segment, &seg_n);
    if (seg_p == NULL) return NULL;
    span_t default_seg = {seg_p, seg_n};
    int check_topics = PyObject_IsTrue(query_topics);
    if (check_topics < 0) return NULL;

    table_t t = {0};
    PyObject *rest = PyList_New(0), *out = NULL, *classes = NULL;
    /* Each taken message's class and base64 text, for the copy into its class's joined text. */
    Py_ssize_t count = PyList_GET_SIZE(messages), taken = 0, guess = 0;
    Py_ssize_t *row_class = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(Py_ssize_t));
    const char **row_text = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(char *));
    if (row_class == NULL || row_text == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* The taken messages' values stay referenced by their class's payloads, so spans into them stay
     * valid; a value left to the general path is released at once. */
    if (rest == NULL) goto done;
    for (Py_ssize_t mi = 0; mi < count; mi++) {
        PyObject *msg = PyList_GET_ITEM(messages, mi);
        PyObject *value = PyObject_GetAttr(msg, str_value);
        fields_t f;
        int take = 0;
        double ts = 0.0, lat = NAN;
        int pad = 0;
        if (value == NULL) goto done;
        if (PyBytes_CheckExact(value) && PyBytes_GET_SIZE(value) > 0 && PyBytes_GET_SIZE(value) <= max_message) {
            take = 1;
            if (check_topics) {
                PyObject *topic = PyObject_GetAttr(msg, str_topic);
                if (topic == NULL) {
                    Py_DECREF(value);
                    goto done;
                }
                int in = PySequence_Contains(query_topics, topic);
                Py_DECREF(topic);
                if (in < 0) {
                    Py_DECREF(value);
                    goto done;
                }
                take = !in;
            }
        }
        if (take) {
            const char *p = PyBytes_AS_STRING(value);
            take = parse(p, p + PyBytes_GET_SIZE(value), guess, &f);
            if (take) guess = f.b64.n;
        }
        if (take) {
            Py_ssize_t n = f.b64.n;
            pad = n > 0 && (n & 3) == 0 && f.b64.p[n - 1] == '=' ? (f.b64.p[n - 2] == '=' ? 2 : 1) : 0;
            Py_ssize_t size = (3 * n >> 2) - pad;
            take = n > 0 && (n & 3) == 0 && (size & 3) == 0 && size <= max_bytes
                   && (f.id_kind != 1 || f.id.n <= max_id) && (!f.has_lat || (f.lat >= 0.0 && f.lat < INFINITY));
            if (f.has_lat) lat = f.lat / 1000.0;
        }
        if (take) {
            if (f.has_ts) {
                ts = f.ts;
            } else {
                PyObject *d = PyObject_CallFunctionObjArgs(default_ts, msg, now, NULL);
                if (d == NULL) {
                    Py_DECREF(value);
                    goto done;
                }
                ts = PyFloat_AsDouble(d);
                Py_DECREF(d);
                if (ts == -1.0 && PyErr_Occurred()) {
                    Py_DECREF(value);
                    goto done;
                }
            }
            take = ts >= 0.0 && ts <= ts_max; /* a time ahead of ts_max: the general path words it */
        }
        if (take) {
            span_t segment = f.has_segment ? (f.segment_null ? (span_t){"", 0} : f.segment) : default_seg;
            class_t *c = class_of(&t, &f, segment, pad);
            if (c == NULL || add(c, mi, ts, lat, &f, value) < 0) {
                if (!PyErr_Occurred()) PyErr_NoMemory();
                Py_DECREF(value);
                goto done;
            }
            row_class[taken] = c - t.cls;
            row_text[taken++] = f.b64.p;
        } else if (append_new(rest, PyLong_FromSsize_t(mi)) < 0) {
            Py_DECREF(value);
            goto done;
        }
        Py_DECREF(value);
    }
    for (Py_ssize_t i = 0; i < t.n_cls; i++) {
        class_t *c = &t.cls[i];
        c->text = PyBytes_FromStringAndSize(NULL, c->rows * c->n);
        if (c->text == NULL) goto done;
        c->rows = 0;
    }
    for (Py_ssize_t r = 0; r < taken; r++) {
        class_t *c = &t.cls[row_class[r]];
        memcpy(PyBytes_AS_STRING(c->text) + c->rows++ * c->n, row_text[r], (size_t)c->n);
    }
    classes = PyList_New(t.n_cls);
    if (classes == NULL) goto done;
    for (Py_ssize_t i = 0; i < t.n_cls; i++) {
        class_t *c = &t.cls[i];
        PyObject *seg = c->segment_null ? Py_NewRef(Py_None) : PyUnicode_FromStringAndSize(c->segment.p, c->segment.n);
        PyObject *labels = seg == NULL ? NULL : Py_BuildValue("(s#s#N)", c->model.p, c->model.n, c->version.p,
                                                              c->version.n, seg);
        PyObject *item = labels == NULL ? NULL : Py_BuildValue(
            "(NniOOOOOO)", labels, c->n, c->pad, c->text, c->msgs, c->ts, c->lat,
            c->ids, c->payloads);
        if (item == NULL) goto done;
        PyList_SET_ITEM(classes, i, item);
    }
    out = PyTuple_Pack(2, rest, classes);
done:
    PyMem_Free(row_class);
    PyMem_Free(row_text);
    Py_XDECREF(rest);
    Py_XDECREF(classes);
    table_free(&t);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_b64scan",
    "The b64 pass of embedwatch.events.Decoder in one C loop per batch (see events.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__b64scan(void) {
    str_value = PyUnicode_InternFromString("value");
    str_topic = PyUnicode_InternFromString("topic");
    if (str_value == NULL || str_topic == NULL) return NULL;
    return PyModule_Create(&module);
}
