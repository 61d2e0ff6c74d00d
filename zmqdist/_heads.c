/* zmqdist._heads: a message head packed, or its fields read, in one C call (zmqdist/protocol.py).
 *
 * `pack(prefix, fields)` returns prefix + the msgpack array of `fields` (a tuple, or a list: the
 * frames of a BATCH are packed with it too), byte for byte what
 * msgpack.Packer().pack(fields) writes (use_bin_type, float64), for the types a head holds: None,
 * bool, int (64 bits), float, str, bytes, and tuples or lists of them. For anything else (a dict,
 * an int past 64 bits, a str that is not valid UTF-8, deeper nesting) it returns None and the
 * caller packs with msgpack, which packs it or raises its own error. msgpack's Packer.pack costs
 * about 3,900 instructions a head through its Python-level call, where packing is 2,200 of them.
 *
 * `fields(data, start)` reads the msgpack array at data[start:] as msgpack.unpackb(...,
 * use_list=False) does, when it holds only nil, bools, ints, str, bytes and arrays of those (the
 * heads of every request); anything else, or anything malformed, returns None and the caller
 * reads it with msgpack, which reads it or raises. Every length is checked against the data left.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 8

typedef struct {
    char *p;
    Py_ssize_t n, cap;
    int fixed; /* p is storage sized exactly (pack_frames): it never grows */
    char local[256];
} buf;

static int grow(buf *b, Py_ssize_t more) {
    if (b->n + more <= b->cap)
        return 0;
    if (b->fixed) {
        PyErr_SetString(PyExc_SystemError, "pack: a batch's size was miscounted");
        return -1;
    }
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->n + more)
        cap *= 2;
    char *p = b->p == b->local ? PyMem_Malloc((size_t)cap) : PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL)
        return -1;
    if (b->p == b->local)
        memcpy(p, b->local, (size_t)b->n);
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int put(buf *b, const void *data, Py_ssize_t len) {
    if (b->n + len > b->cap && grow(b, len) < 0)
        return -1;
    memcpy(b->p + b->n, data, (size_t)len);
    b->n += len;
    return 0;
}

/* One byte (most of a head is one-byte items: a tag, a small int, a short string's length). */
static inline int put1(buf *b, unsigned char c) {
    if (b->n + 1 > b->cap && grow(b, 1) < 0)
        return -1;
    b->p[b->n++] = (char)c;
    return 0;
}

static inline int put_be(buf *b, unsigned char tag, uint64_t v, int width) {
    if (b->n + 1 + width > b->cap && grow(b, 1 + width) < 0)
        return -1;
    unsigned char *out = (unsigned char *)b->p + b->n;
    out[0] = tag;
    for (int i = 0; i < width; i++)
        out[1 + i] = (unsigned char)(v >> (8 * (width - 1 - i)));
    b->n += 1 + width;
    return 0;
}

static int put_len(buf *b, Py_ssize_t len, unsigned char fix, Py_ssize_t fix_max, unsigned char t8,
                   unsigned char t16, unsigned char t32) {
    if (len <= fix_max)
        return put1(b, (unsigned char)(fix | len));
    if (t8 != 0 && len < 256)
        return put_be(b, t8, (uint64_t)len, 1);
    if (len < 65536)
        return put_be(b, t16, (uint64_t)len, 2);
    if ((uint64_t)len <= 0xffffffffULL)
        return put_be(b, t32, (uint64_t)len, 4);
    return 1; /* too long: msgpack raises */
}

/* 0 packed, 1 not a head's type (the caller packs with msgpack), -1 out of memory */
static int pack_items(buf *b, PyObject *o, Py_ssize_t n, int depth);

static int pack_one(buf *b, PyObject *o, int depth) {
    if (o == Py_None)
        return put1(b, 0xc0);
    if (PyBool_Check(o))
        return put1(b, o == Py_True ? 0xc3 : 0xc2);
    if (PyLong_Check(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 1;
        }
        if (overflow < 0)
            return 1;
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 1; /* past 64 bits */
            }
            return put_be(b, 0xcf, u, 8);
        }
        if (v >= 0) {
            if (v < 128)
                return put1(b, (unsigned char)v);
            if (v < 256)
                return put_be(b, 0xcc, (uint64_t)v, 1);
            if (v < 65536)
                return put_be(b, 0xcd, (uint64_t)v, 2);
            if (v <= 0xffffffffLL)
                return put_be(b, 0xce, (uint64_t)v, 4);
            return put_be(b, 0xcf, (uint64_t)v, 8);
        }
        if (v >= -32)
            return put1(b, (unsigned char)(int8_t)v);
        if (v >= -128)
            return put_be(b, 0xd0, (uint64_t)v, 1);
        if (v >= -32768)
            return put_be(b, 0xd1, (uint64_t)v, 2);
        if (v >= -2147483648LL)
            return put_be(b, 0xd2, (uint64_t)v, 4);
        return put_be(b, 0xd3, (uint64_t)v, 8);
    }
    if (PyFloat_Check(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t u;
        memcpy(&u, &d, 8);
        return put_be(b, 0xcb, u, 8);
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(o, &len);
        if (s == NULL) {
            PyErr_Clear();
            return 1; /* not valid UTF-8 (a lone surrogate): msgpack raises */
        }
        int rc = put_len(b, len, 0xa0, 31, 0xd9, 0xda, 0xdb);
        return rc != 0 ? rc : put(b, s, len);
    }
    if (PyBytes_Check(o)) {
        Py_ssize_t len = PyBytes_GET_SIZE(o);
        int rc = put_len(b, len, 0xc4, -1, 0xc4, 0xc5, 0xc6);
        return rc != 0 ? rc : put(b, PyBytes_AS_STRING(o), len);
    }
    if (PyTuple_Check(o) || PyList_Check(o)) {
        if (depth >= MAX_DEPTH)
            return 1;
        return pack_items(b, o, PySequence_Fast_GET_SIZE(o), depth);
    }
    return 1;
}

/* The first n items of tuple or list o, as a msgpack array of n. */
static int pack_items(buf *b, PyObject *o, Py_ssize_t n, int depth) {
    int rc = put_len(b, n, 0x90, 15, 0, 0xdc, 0xdd);
    /* (no conversion here runs Python code: a list cannot change while it is packed) */
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++)
        rc = pack_one(b, PySequence_Fast_GET_ITEM(o, i), depth + 1);
    return rc;
}

/* A list of byte strings (a BATCH's frames), sized first and written once into the bytes object
 * returned: no buffer grown by copies, and none copied out at the end. NULL with no error set
 * when an item is not bytes (or over msgpack's limits): the general path packs (or refuses) it. */
static PyObject *pack_frames(PyObject *prefix, PyObject *list) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    if ((uint64_t)n > 0xffffffffULL)
        return NULL;
    Py_ssize_t total = PyBytes_GET_SIZE(prefix) + (n <= 15 ? 1 : n < 65536 ? 3 : 5);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyBytes_Check(item))
            return NULL;
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        if ((uint64_t)len > 0xffffffffULL)
            return NULL;
        total += (len < 256 ? 2 : len < 65536 ? 3 : 5) + len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    buf b; /* over the new object's storage, sized exactly: nothing grows */
    b.p = PyBytes_AS_STRING(out);
    b.n = 0;
    b.cap = total;
    b.fixed = 1;
    memcpy(b.p, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix));
    b.n = PyBytes_GET_SIZE(prefix);
    int rc = put_len(&b, n, 0x90, 15, 0, 0xdc, 0xdd);
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        rc = put_len(&b, len, 0xc4, -1, 0xc4, 0xc5, 0xc6);
        if (rc == 0)
            rc = put(&b, PyBytes_AS_STRING(item), len);
    }
    if (rc != 0 || b.n != total) { /* cannot happen: sized above */
        Py_DECREF(out);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "pack: a batch's size was miscounted");
        return NULL;
    }
    return out;
}

/* pack(prefix: bytes, fields: tuple | list, n: int = -1) -> bytes | None (a list: a BATCH's
 * frames). n >= 0: only the first n items of a tuple, as an array of n (a message's leading
 * fields, without a tuple of them made and freed). */
static PyObject *h_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 2 || nargs > 3 || !PyBytes_Check(args[0]) || !(PyTuple_Check(args[1]) || PyList_Check(args[1]))
        || (nargs == 3 && !PyLong_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError, "pack(prefix: bytes, fields: tuple | list, n: int = -1)");
        return NULL;
    }
    Py_ssize_t count = -1;
    if (nargs == 3) {
        count = PyLong_AsSsize_t(args[2]);
        if (count == -1 && PyErr_Occurred())
            return NULL;
        if (count < -1 || (count >= 0 && (!PyTuple_Check(args[1]) || count > PyTuple_GET_SIZE(args[1])))) {
            PyErr_SetString(PyExc_ValueError, "pack: n is -1 (all) or 0 to len(fields) of a tuple");
            return NULL;
        }
    }
    if (count < 0 && PyList_Check(args[1])) {
        PyObject *frames = pack_frames(args[0], args[1]);
        if (frames != NULL || PyErr_Occurred())
            return frames;
    }
    buf b;
    b.p = b.local;
    b.n = 0;
    b.cap = (Py_ssize_t)sizeof b.local;
    b.fixed = 0;
    int rc = put(&b, PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]));
    if (rc == 0)
        rc = count < 0 ? pack_one(&b, args[1], 0) : pack_items(&b, args[1], count, 0);
    PyObject *out = NULL;
    if (rc == 0)
        out = PyBytes_FromStringAndSize(b.p, b.n);
    else if (rc > 0)
        out = Py_NewRef(Py_None);
    else
        PyErr_NoMemory();
    if (b.p != b.local)
        PyMem_Free(b.p);
    return out;
}

typedef struct {
    const unsigned char *p, *end;
} reader;

static int take(reader *r, size_t n, const unsigned char **at) {
    if ((size_t)(r->end - r->p) < n)
        return -1;
    *at = r->p;
    r->p += n;
    return 0;
}

static int take_be(reader *r, int width, uint64_t *v) {
    const unsigned char *at;
    if (take(r, (size_t)width, &at) < 0)
        return -1;
    uint64_t x = 0;
    for (int i = 0; i < width; i++)
        x = (x << 8) | at[i];
    *v = x;
    return 0;
}

/* The next item: a new reference; NULL with an exception (out of memory); or NULL without one:
 * not a head's type, or malformed (the caller falls back to msgpack). */
static PyObject *read_item(reader *r, int depth);

static PyObject *read_array(reader *r, uint64_t n, int depth) {
    if (depth >= MAX_DEPTH || n > 256 || n > (uint64_t)(r->end - r->p)) /* every item takes a byte */
        return NULL;
    PyObject *t = PyTuple_New((Py_ssize_t)n);
    if (t == NULL)
        return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *it = read_item(r, depth + 1);
        if (it == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, it);
    }
    return t;
}

#define STRS 64     /* a power of two */
#define MAX_KEPT 32 /* longer strings (a request's key, a message) are each new */

/* Short ASCII strings read lately (service names), reused: a str that is the object already in a
 * dict (the broker's pools, a worker's handlers) is found by identity, its hash computed once.
 * Direct-mapped by an FNV-1a hash of the bytes; a miss decodes a new str and keeps it. The GIL
 * guards it: every caller holds it. */
static PyObject *strs[STRS];

static PyObject *kept_str(const unsigned char *at, Py_ssize_t n) {
    unsigned int h = 2166136261u;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (at[k] >= 0x80)
            return NULL; /* not ASCII: decoded as UTF-8, not kept */
        h = (h ^ at[k]) * 16777619u;
    }
    PyObject **slot = &strs[h & (STRS - 1)];
    PyObject *s = *slot;
    if (s != NULL && PyUnicode_GET_LENGTH(s) == n && memcmp(PyUnicode_DATA(s), at, (size_t)n) == 0)
        return Py_NewRef(s);
    s = PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, at, n); /* ASCII: a compact ASCII str */
    if (s == NULL)
        return NULL;
    Py_XSETREF(*slot, Py_NewRef(s));
    return s;
}

static PyObject *read_str(reader *r, uint64_t n, int bin) {
    const unsigned char *at;
    if (take(r, (size_t)n, &at) < 0 || n > (uint64_t)PY_SSIZE_T_MAX)
        return NULL;
    if (bin)
        return PyBytes_FromStringAndSize((const char *)at, (Py_ssize_t)n);
    if (n > 0 && n <= MAX_KEPT) {
        PyObject *s = kept_str(at, (Py_ssize_t)n);
        if (s != NULL || PyErr_Occurred())
            return s;
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)at, (Py_ssize_t)n, NULL);
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        PyErr_Clear(); /* not UTF-8: msgpack raises its own error */
    return s;
}

static PyObject *read_item(reader *r, int depth) {
    const unsigned char *at;
    if (take(r, 1, &at) < 0)
        return NULL;
    unsigned char c = *at;
    uint64_t v;
    if (c <= 0x7f)
        return PyLong_FromLong(c);
    if (c >= 0xe0)
        return PyLong_FromLong((long)(int8_t)c);
    if (c >= 0xa0 && c <= 0xbf)
        return read_str(r, c & 0x1f, 0);
    if (c >= 0x90 && c <= 0x9f)
        return read_array(r, c & 0x0f, depth);
    switch (c) {
    case 0xc0:
        return Py_NewRef(Py_None);
    case 0xc2:
        return Py_NewRef(Py_False);
    case 0xc3:
        return Py_NewRef(Py_True);
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xcf:
        if (take_be(r, 1 << (c - 0xcc), &v) < 0)
            return NULL;
        /* PyLong_FromLong has a fast path for one-digit values (below 2**30: tickets, ids, budgets) */
        return v <= (uint64_t)LONG_MAX ? PyLong_FromLong((long)v) : PyLong_FromUnsignedLongLong(v);
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        int width = 1 << (c - 0xd0);
        if (take_be(r, width, &v) < 0)
            return NULL;
        if (width == 8)
            return PyLong_FromLongLong((long long)(int64_t)v);
        int64_t sign = (int64_t)1 << (8 * width - 1); /* sign-extend a narrower one: (v ^ sign) - sign */
        return PyLong_FromLongLong((long long)((int64_t)v ^ sign) - sign);
    }
    case 0xd9:
    case 0xda:
    case 0xdb:
        if (take_be(r, 1 << (c - 0xd9), &v) < 0)
            return NULL;
        return read_str(r, v, 0);
    case 0xc4:
    case 0xc5:
    case 0xc6:
        if (take_be(r, 1 << (c - 0xc4), &v) < 0)
            return NULL;
        return read_str(r, v, 1);
    case 0xdc:
    case 0xdd:
        if (take_be(r, c == 0xdc ? 2 : 4, &v) < 0)
            return NULL;
        return read_array(r, v, depth);
    default: /* floats, maps, ext: msgpack reads them */
        return NULL;
    }
}

/* fields(data: bytes, start: int) -> tuple | None */
static PyObject *h_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "fields(data: bytes, start: int)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t len = PyBytes_GET_SIZE(args[0]);
    if (start < 0 || start > len) {
        PyErr_SetString(PyExc_ValueError, "fields: start is outside the data");
        return NULL;
    }
    reader r;
    r.p = (const unsigned char *)PyBytes_AS_STRING(args[0]) + start;
    r.end = (const unsigned char *)PyBytes_AS_STRING(args[0]) + len;
    unsigned char c = r.p < r.end ? *r.p : 0;
    if (!((c >= 0x90 && c <= 0x9f) || c == 0xdc || c == 0xdd))
        Py_RETURN_NONE; /* not an array (or no data): msgpack reads it (the caller refuses it) */
    PyObject *t = read_item(&r, 0);
    if (t == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (r.p != r.end) { /* trailing bytes: msgpack's ExtraData */
        Py_DECREF(t);
        Py_RETURN_NONE;
    }
    return t;
}

/* key(client, rid) -> "<client's bytes in hex>:<rid>": a request's default key (the TASK's key
 * when its caller gave none), in one allocation. Made in Python, the hex, the decimal and their
 * concatenation cost about 850 instructions at every dispatch. A negative rid or one past 64 bits
 * (never a valid id) is formatted by Python. */
static PyObject *h_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "key(client: bytes, rid: int)");
        return NULL;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (overflow != 0 || v < 0) {
        PyObject *hex = PyObject_CallMethod(args[0], "hex", NULL);
        if (hex == NULL)
            return NULL;
        PyObject *out = PyUnicode_FromFormat("%U:%S", hex, args[1]);
        Py_DECREF(hex);
        return out;
    }
    static const char digits_of[] = "0123456789abcdef";
    char dec[24];
    int k = 0;
    unsigned long long u = (unsigned long long)v;
    do {
        dec[k++] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    PyObject *out = PyUnicode_New(2 * n + 1 + k, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(out);
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    for (Py_ssize_t i = 0; i < n; i++) {
        d[2 * i] = (Py_UCS1)digits_of[b[i] >> 4];
        d[2 * i + 1] = (Py_UCS1)digits_of[b[i] & 15];
    }
    d[2 * n] = ':';
    for (int j = 0; j < k; j++)
        d[2 * n + 1 + j] = (Py_UCS1)dec[k - 1 - j];
    return out;
}

/* message(cls, fields) -> cls: what tuple.__new__(cls, fields) makes, for a tuple subclass (a
 * NamedTuple message) and a tuple of its fields, without the method lookup and the call through
 * tuple's __new__ wrapper (about 1,300 instructions a message from compiled code). */
static PyObject *h_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyTuple_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "message(cls: type, fields: tuple)");
        return NULL;
    }
    PyObject *cls = args[0], *fields = args[1];
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_Format(PyExc_TypeError, "message: %R is not a subclass of tuple", cls);
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)cls;
    if (tp == &PyTuple_Type) {
        Py_INCREF(fields);
        return fields;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    PyObject *obj = tp->tp_alloc(tp, n); /* as CPython's tuple_subtype_new */
    if (obj == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(fields, i);
        Py_INCREF(item);
        PyTuple_SET_ITEM(obj, i, item);
    }
    return obj;
}

static PyMethodDef methods[] = {
    {"pack", (PyCFunction)(void (*)(void))h_pack, METH_FASTCALL,
     "pack(prefix, fields, n=-1): prefix + msgpack of fields (n >= 0: of its first n), or None for what only msgpack packs."},
    {"fields", (PyCFunction)(void (*)(void))h_fields, METH_FASTCALL,
     "fields(data, start): the msgpack array at data[start:] as a tuple, or None for what only msgpack reads."},
    {"message", (PyCFunction)(void (*)(void))h_message, METH_FASTCALL,
     "message(cls, fields): tuple.__new__(cls, fields), in one C call."},
    {"key", (PyCFunction)(void (*)(void))h_key, METH_FASTCALL,
     "key(client, rid): client.hex() + ':' + str(rid), in one C call."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_heads", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__heads(void) { return PyModule_Create(&module); }
