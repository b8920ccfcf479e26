/* Rows in Postgres' binary COPY format, encoded in one pass of C (scripts/build_native.py builds
 * it into build/native with the compiled identity modules; services/identity/copy.py falls back
 * to asyncpg's own encoder without it).
 *
 * encode(rows, types) -> bytes: a whole COPY stream (header, rows, trailer). `rows` is a list of
 * tuples, `types` one letter per column:
 *   t text (str)        b bytea (bytes)          j jsonb (bytes: jsonb's binary form, or JSON text)
 *   q int8 (int)        i int4 (int)             ? bool (bool)
 *   T timestamptz as (microseconds since 2000-01-01 UTC,), the raw_times pools' form
 *   A text[] (a list or tuple of str)
 * None is NULL in any column. A value of another type raises TypeError naming its row and column.
 *
 * asyncpg's encoder looks up a codec and calls it for every value of every row; for the identity
 * consumer's rows that was 15 % of its CPU (bench/RESULTS.md, stop 18).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
} Out;

static int
grow(Out *o, Py_ssize_t need)
{
    if (o->len + need <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 1 << 16;
    while (cap < o->len + need)
        cap *= 2;
    char *b = PyMem_Realloc(o->buf, cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = b;
    o->cap = cap;
    return 0;
}

static inline void
put16(Out *o, int16_t v)
{
    uint16_t u = (uint16_t)v;
    o->buf[o->len++] = (char)(u >> 8);
    o->buf[o->len++] = (char)u;
}

static inline void
put32(Out *o, int32_t v)
{
    uint32_t u = (uint32_t)v;
    char *p = o->buf + o->len;
    p[0] = (char)(u >> 24);
    p[1] = (char)(u >> 16);
    p[2] = (char)(u >> 8);
    p[3] = (char)u;
    o->len += 4;
}

static inline void
put64(Out *o, int64_t v)
{
    uint64_t u = (uint64_t)v;
    char *p = o->buf + o->len;
    for (int k = 7; k >= 0; k--) {
        p[k] = (char)u;
        u >>= 8;
    }
    o->len += 8;
}

static int
bad(PyObject *value, const char *want, Py_ssize_t row, Py_ssize_t col)
{
    PyErr_Format(PyExc_TypeError, "row %zd, column %zd: expected %s, got %.80s", row, col, want,
                 Py_TYPE(value)->tp_name);
    return -1;
}

static int
put_bytes(Out *o, const char *data, Py_ssize_t n, const char *prefix, Py_ssize_t pn)
{
    if (n + pn > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a value longer than 2 GB");
        return -1;
    }
    if (grow(o, 4 + pn + n) < 0)
        return -1;
    put32(o, (int32_t)(n + pn));
    if (pn) {
        memcpy(o->buf + o->len, prefix, pn);
        o->len += pn;
    }
    memcpy(o->buf + o->len, data, n);
    o->len += n;
    return 0;
}

static int
put_text(Out *o, PyObject *v, Py_ssize_t row, Py_ssize_t col)
{
    if (!PyUnicode_Check(v))
        return bad(v, "str", row, col);
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL)
        return -1;
    return put_bytes(o, s, n, NULL, 0);
}

static int
put_int(Out *o, PyObject *v, int wide, Py_ssize_t row, Py_ssize_t col)
{
    if (!PyLong_Check(v) || PyBool_Check(v))
        return bad(v, "int", row, col);
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || (!wide && (x < INT32_MIN || x > INT32_MAX))) {
        PyErr_Format(PyExc_OverflowError, "row %zd, column %zd: out of range for %s", row, col,
                     wide ? "int8" : "int4");
        return -1;
    }
    if (grow(o, 12) < 0)
        return -1;
    if (wide) {
        put32(o, 8);
        put64(o, (int64_t)x);
    }
    else {
        put32(o, 4);
        put32(o, (int32_t)x);
    }
    return 0;
}

static int
put_value(Out *o, PyObject *v, char type, Py_ssize_t row, Py_ssize_t col)
{
    if (v == Py_None) {
        if (grow(o, 4) < 0)
            return -1;
        put32(o, -1);
        return 0;
    }
    switch (type) {
    case 't':
        return put_text(o, v, row, col);
    case 'b':
        if (!PyBytes_Check(v))
            return bad(v, "bytes", row, col);
        return put_bytes(o, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), NULL, 0);
    case 'j': {
        if (!PyBytes_Check(v))
            return bad(v, "bytes (jsonb)", row, col);
        const char *s = PyBytes_AS_STRING(v);
        Py_ssize_t n = PyBytes_GET_SIZE(v);
        /* jsonb's binary form is a version byte (1), then the text; no JSON text starts with it */
        if (n > 0 && s[0] == 1)
            return put_bytes(o, s, n, NULL, 0);
        return put_bytes(o, s, n, "\x01", 1);
    }
    case 'q':
        return put_int(o, v, 1, row, col);
    case 'i':
        return put_int(o, v, 0, row, col);
    case '?':
        if (!PyBool_Check(v))
            return bad(v, "bool", row, col);
        if (grow(o, 5) < 0)
            return -1;
        put32(o, 1);
        o->buf[o->len++] = (char)(v == Py_True);
        return 0;
    case 'T': {
        if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 1)
            return bad(v, "a (microseconds,) tuple", row, col);
        return put_int(o, PyTuple_GET_ITEM(v, 0), 1, row, col);
    }
    case 'A': {
        if (!PyList_Check(v) && !PyTuple_Check(v))
            return bad(v, "a list of str", row, col);
        PyObject *seq = v;
        Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
        if (grow(o, 4 + 20) < 0)
            return -1;
        Py_ssize_t at = o->len; /* the array's length, filled in at the end */
        put32(o, 0);
        Py_ssize_t start = o->len;
        if (m == 0) {
            put32(o, 0);  /* dimensions */
            put32(o, 0);  /* flags */
            put32(o, 25); /* element type: text */
        }
        else {
            put32(o, 1);
            put32(o, 0);
            put32(o, 25);
            put32(o, (int32_t)m);
            put32(o, 1); /* lower bound */
            for (Py_ssize_t k = 0; k < m; k++) {
                PyObject *e = PySequence_Fast_GET_ITEM(seq, k);
                if (e == Py_None) {
                    PyErr_Format(PyExc_TypeError, "row %zd, column %zd: NULL in an array", row, col);
                    return -1;
                }
                if (put_text(o, e, row, col) < 0)
                    return -1;
            }
        }
        Py_ssize_t n = o->len - start;
        if (n > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "an array longer than 2 GB");
            return -1;
        }
        Py_ssize_t end = o->len;
        o->len = at;
        put32(o, (int32_t)n);
        o->len = end;
        return 0;
    }
    default:
        PyErr_Format(PyExc_ValueError, "unknown column type %c", type);
        return -1;
    }
}

static const char HEADER[] = "PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

static PyObject *
encode(PyObject *self, PyObject *args)
{
    PyObject *rows;
    const char *types;
    Py_ssize_t ncols;
    if (!PyArg_ParseTuple(args, "O!s#", &PyList_Type, &rows, &types, &ncols))
        return NULL;
    if (ncols > INT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many columns");
        return NULL;
    }
    Out o = {NULL, 0, 0};
    Py_ssize_t nrows = PyList_GET_SIZE(rows);
    if (grow(&o, sizeof(HEADER) - 1 + 2) < 0)
        return NULL;
    memcpy(o.buf, HEADER, sizeof(HEADER) - 1);
    o.len = sizeof(HEADER) - 1;
    for (Py_ssize_t r = 0; r < nrows; r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != ncols) {
            PyErr_Format(PyExc_TypeError, "row %zd: expected a tuple of %zd values", r, ncols);
            goto fail;
        }
        if (grow(&o, 2) < 0)
            goto fail;
        put16(&o, (int16_t)ncols);
        for (Py_ssize_t c = 0; c < ncols; c++) {
            if (put_value(&o, PyTuple_GET_ITEM(row, c), types[c], r, c) < 0)
                goto fail;
        }
    }
    if (grow(&o, 2) < 0)
        goto fail;
    put16(&o, -1);
    PyObject *result = PyBytes_FromStringAndSize(o.buf, o.len);
    PyMem_Free(o.buf);
    return result;
fail:
    PyMem_Free(o.buf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "encode(rows, types) -> bytes: a binary COPY stream of the rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copybin", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__copybin(void)
{
    return PyModule_Create(&module);
}
