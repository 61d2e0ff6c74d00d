/* zmqdist.transport._wire: a socket's whole message in one call (see zmqdist/transport/wire.py).
 *
 * pyzmq reads a message a frame at a time, each frame a Python call and, for its `more` flag, a
 * zmq.Frame object: about 5 us for a 3-frame message here, against 1.2 us for this module's one
 * call (docs/performance.md). libzmq is the one pyzmq uses: `load` takes pyzmq's backend module,
 * already loaded (dlopen with RTLD_NOLOAD), and dlsym on its handle finds libzmq's functions among
 * that module's own dependencies. This module links against nothing and needs no zmq.h.
 *
 * A Poller waits on sockets and file descriptors in one call: pyzmq's zmq_poll parses its list of
 * (socket, flags) tuples, asks each socket for its handle and builds a list of result tuples at
 * every wake-up (about 2,000 instructions a turn of a loop that does 40,000-90,000 per request).
 *
 * A Port holds a pyzmq socket and its raw handle (Socket.underlying). Only the thread that owns
 * the socket uses it. Like pyzmq, every call first asks the socket's `_closed` (set by close() and
 * by a context's destroy(), from any thread), and `detach` (called before the socket is closed)
 * makes every later call raise: a closed socket's handle is never used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <string.h>

typedef struct {
    _Alignas(8) unsigned char _[64];
} zmsg; /* zmq_msg_t: 64 opaque bytes, stable since libzmq 4.0 */

static int (*z_msg_init)(zmsg *);
static int (*z_msg_recv)(zmsg *, void *, int);
static void *(*z_msg_data)(zmsg *);
static size_t (*z_msg_size)(const zmsg *);
static int (*z_msg_more)(const zmsg *);
static int (*z_msg_close)(zmsg *);
static const char *(*z_msg_gets)(const zmsg *, const char *);
static int (*z_send)(void *, const void *, size_t, int);
static int (*z_errno)(void);

typedef struct {
    void *socket;
    int fd;
    short events;
    short revents;
} zpollitem; /* zmq_pollitem_t on POSIX systems, stable since libzmq 3 */

static int (*z_poll)(zpollitem *, int, long);
static PyObject *zmq_error; /* zmq.ZMQError: raised with the errno, as pyzmq would */
static PyObject *str_closed, *str_underlying;
static int loaded;

#define Z_DONTWAIT 1
#define Z_SNDMORE 2
#define Z_POLLIN 1

static PyObject *raise_errno(int e) {
    PyObject *exc = PyObject_CallFunction(zmq_error, "i", e);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* load(path, ZMQError): find libzmq's functions through the library at `path` (pyzmq's backend),
 * already loaded. */
static PyObject *w_load(PyObject *self, PyObject *args) {
    const char *path;
    PyObject *err;
    if (!PyArg_ParseTuple(args, "sO:load", &path, &err))
        return NULL;
    if (!PyExceptionClass_Check(err)) {
        PyErr_SetString(PyExc_TypeError, "load: the error must be an exception class (zmq.ZMQError)");
        return NULL;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        PyErr_Format(PyExc_OSError, "%s is not loaded: %s", path, dlerror());
        return NULL;
    }
    /* every function found before any is replaced: a failed load leaves a loaded module as it was */
    static const char *names[] = {"zmq_msg_init", "zmq_msg_recv", "zmq_msg_data", "zmq_msg_size", "zmq_msg_more",
                                  "zmq_msg_close", "zmq_msg_gets", "zmq_send", "zmq_errno", "zmq_poll"};
    void *found[sizeof names / sizeof names[0]];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        found[i] = dlsym(h, names[i]);
        if (found[i] == NULL) {
            PyErr_Format(PyExc_OSError, "no %s found through %s", names[i], path);
            dlclose(h); /* (RTLD_NOLOAD took a reference) */
            return NULL;
        }
    }
    *(void **)(&z_msg_init) = found[0];
    *(void **)(&z_msg_recv) = found[1];
    *(void **)(&z_msg_data) = found[2];
    *(void **)(&z_msg_size) = found[3];
    *(void **)(&z_msg_more) = found[4];
    *(void **)(&z_msg_close) = found[5];
    *(void **)(&z_msg_gets) = found[6];
    *(void **)(&z_send) = found[7];
    *(void **)(&z_errno) = found[8];
    *(void **)(&z_poll) = found[9];
    Py_INCREF(err);
    Py_XSETREF(zmq_error, err);
    loaded = 1;
    Py_RETURN_NONE;
}

/* 0 if the pyzmq socket `owner` is open; -1 with an exception set if it is closed (ZMQError
 * ENOTSOCK) or its `_closed` cannot be read. */
static int check_open(PyObject *owner) {
    /* The generic lookup: `_closed` is the backend type's data descriptor, and it skips the
     * Python-level __getattr__ hook of pyzmq's Socket class (about 1,300 instructions a call) */
    PyObject *closed = PyObject_GenericGetAttr(owner, str_closed);
    if (closed == NULL)
        return -1;
    int c = PyObject_IsTrue(closed);
    Py_DECREF(closed);
    if (c < 0)
        return -1;
    if (c) {
        raise_errno(ENOTSOCK);
        return -1;
    }
    return 0;
}

/* The raw handle of pyzmq socket `owner` (Socket.underlying), or NULL with an exception set. */
static void *handle_of(PyObject *owner) {
    PyObject *handle = PyObject_GetAttr(owner, str_underlying);
    if (handle == NULL)
        return NULL;
    void *sock = PyLong_AsVoidPtr(handle);
    Py_DECREF(handle);
    if (sock == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "the socket's handle is 0");
    return sock;
}

#define IDENTS 64     /* a power of two */
#define MAX_IDENT 255 /* libzmq's longest routing id */

typedef struct {
    PyObject_HEAD void *sock;
    PyObject *owner;          /* the pyzmq socket */
    int ids;                  /* a ROUTER's: its first frames are routing ids, kept */
    PyObject *idents[IDENTS]; /* recent routing ids read, reused: see ident_of */
} Port;

/* A message's first frame (a ROUTER's routing id: the peer) as bytes, the very object read the last
 * time when the same bytes are still in the port's cache (direct-mapped by an FNV-1a hash). The
 * broker keys its tables by peer: a key found by identity is not compared byte by byte, about ten
 * lookups a request. A miss makes a new object and keeps it; correctness never depends on a hit. */
static PyObject *ident_of(Port *self, const char *data, Py_ssize_t size) {
    if (size > MAX_IDENT)
        return PyBytes_FromStringAndSize(data, size);
    unsigned int h = 2166136261u;
    for (Py_ssize_t k = 0; k < size; k++)
        h = (h ^ (unsigned char)data[k]) * 16777619u;
    PyObject **slot = &self->idents[h & (IDENTS - 1)];
    PyObject *b = *slot;
    if (b != NULL && PyBytes_GET_SIZE(b) == size && memcmp(PyBytes_AS_STRING(b), data, (size_t)size) == 0) {
        Py_INCREF(b);
        return b;
    }
    b = PyBytes_FromStringAndSize(data, size);
    if (b == NULL)
        return NULL;
    Py_INCREF(b);
    Py_XSETREF(*slot, b);
    return b;
}

static int port_init(Port *self, PyObject *args, PyObject *kw) {
    PyObject *owner;
    int ids = 0;
    if (!PyArg_ParseTuple(args, "O|p:Port", &owner, &ids))
        return -1;
    if (!loaded) {
        PyErr_SetString(PyExc_RuntimeError, "zmqdist.transport._wire: load() was not called");
        return -1;
    }
    void *sock = handle_of(owner);
    if (sock == NULL)
        return -1;
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    self->sock = sock;
    self->ids = ids;
    return 0;
}

static void port_dealloc(Port *self) {
    Py_XDECREF(self->owner);
    for (int k = 0; k < IDENTS; k++)
        Py_CLEAR(self->idents[k]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The handle, or NULL with an exception set: detached (ValueError), closed (ZMQError ENOTSOCK). */
static void *attached(Port *self) {
    if (self->sock == NULL || self->owner == NULL) {
        PyErr_SetString(PyExc_ValueError, "Port: its socket was detached (closed)");
        return NULL;
    }
    return check_open(self->owner) < 0 ? NULL : self->sock;
}

static int recv_frame(zmsg *m, void *sock, int flags) {
    for (;;) {
        if (z_msg_recv(m, sock, flags) >= 0)
            return 0;
        int e = z_errno();
        if (e != EINTR)
            return e;
    }
}

/* recv(cap, props=None): the frames of the next message as bytes, or None if none waits.
 * At most `cap` frames are kept: a longer message comes back as cap + 1 items, the last b"" (its
 * other frames are read and dropped). With `props` (a tuple of str), returns (frames, values): the
 * value of each metadata property of the message's second frame (its first if it has one), "" for
 * one the message does not carry. */
static PyObject *port_recv(Port *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "recv(cap, props=None)");
        return NULL;
    }
    void *sock = attached(self);
    if (sock == NULL)
        return NULL;
    Py_ssize_t cap = PyLong_AsSsize_t(args[0]);
    if (cap == -1 && PyErr_Occurred())
        return NULL;
    if (cap < 1) {
        PyErr_SetString(PyExc_ValueError, "recv: cap must be at least 1");
        return NULL;
    }
    PyObject *props = nargs == 2 && args[1] != Py_None ? args[1] : NULL;
    if (props != NULL && !PyTuple_Check(props)) {
        PyErr_SetString(PyExc_TypeError, "recv: props must be a tuple of str");
        return NULL;
    }
    zmsg m;
    PyObject *out = NULL, *values = NULL;
    int flags = Z_DONTWAIT;
    for (Py_ssize_t i = 0;; i++) {
        z_msg_init(&m);
        int e = recv_frame(&m, sock, flags);
        if (e != 0) {
            z_msg_close(&m);
            Py_XDECREF(out);
            Py_XDECREF(values);
            if (i == 0 && e == EAGAIN)
                Py_RETURN_NONE;
            return raise_errno(e);
        }
        flags = 0; /* the rest of a message is there once its first frame is */
        int more = z_msg_more(&m);
        if (out == NULL && (out = PyList_New(0)) == NULL)
            goto fail;
        if (i <= cap) {
            const char *data = (const char *)z_msg_data(&m);
            Py_ssize_t size = (Py_ssize_t)z_msg_size(&m);
            PyObject *b = i == 0 && more && self->ids ? ident_of(self, data, size)
                          : i < cap                   ? PyBytes_FromStringAndSize(data, size)
                                                      : PyBytes_FromStringAndSize("", 0);
            if (b == NULL)
                goto fail;
            int rc = PyList_Append(out, b);
            Py_DECREF(b);
            if (rc < 0)
                goto fail;
        }
        if (props != NULL && (i == 1 || (i == 0 && !more))) {
            Py_ssize_t n = PyTuple_GET_SIZE(props);
            Py_XSETREF(values, PyTuple_New(n));
            if (values == NULL)
                goto fail;
            for (Py_ssize_t k = 0; k < n; k++) {
                const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(props, k));
                if (name == NULL)
                    goto fail;
                const char *v = z_msg_gets(&m, name);
                if (v == NULL) /* the property is not there: "" (pyzmq's Frame.get raises EINVAL) */
                    v = "";
                PyObject *s = PyUnicode_DecodeUTF8(v, (Py_ssize_t)strlen(v), "replace");
                if (s == NULL)
                    goto fail;
                PyTuple_SET_ITEM(values, k, s);
            }
        }
        z_msg_close(&m);
        if (!more)
            break;
    }
    if (props == NULL)
        return out;
    PyObject *pair = PyTuple_Pack(2, out, values);
    Py_DECREF(out);
    Py_DECREF(values);
    return pair;
fail:
    /* out of memory mid-message: drop its other frames, so the next read starts a message */
    while (z_msg_more(&m)) {
        z_msg_close(&m);
        z_msg_init(&m);
        if (recv_frame(&m, sock, 0) != 0)
            break;
    }
    z_msg_close(&m);
    Py_XDECREF(out);
    Py_XDECREF(values);
    return NULL;
}

/* send(*frames): send bytes frames as one message, never blocking; 0, or the errno of the frame
 * that failed (EAGAIN: a full queue or, after the first frame, a pipe that closed meanwhile, when
 * libzmq drops the whole message; EHOSTUNREACH: a ROUTER's unknown peer). A closed socket raises
 * ZMQError (ENOTSOCK), as a read does. */
static PyObject *port_send(Port *self, PyObject *const *args, Py_ssize_t nargs) {
    void *sock = attached(self);
    if (sock == NULL)
        return NULL;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "send: at least one frame");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (!PyBytes_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "send: frame %zd is %.100s, not bytes", i, Py_TYPE(args[i])->tp_name);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        int flags = i + 1 < nargs ? (Z_SNDMORE | Z_DONTWAIT) : Z_DONTWAIT;
        for (;;) {
            if (z_send(sock, PyBytes_AS_STRING(args[i]), (size_t)PyBytes_GET_SIZE(args[i]), flags) >= 0)
                break;
            int e = z_errno();
            if (e != EINTR)
                return PyLong_FromLong(e);
        }
    }
    return PyLong_FromLong(0);
}

static PyObject *port_detach(Port *self, PyObject *unused) {
    self->sock = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef port_methods[] = {
    {"recv", (PyCFunction)(void (*)(void))port_recv, METH_FASTCALL, "The next message's frames, or None."},
    {"send", (PyCFunction)(void (*)(void))port_send, METH_FASTCALL, "Send frames as one message: 0 or errno."},
    {"detach", (PyCFunction)port_detach, METH_NOARGS, "Forget the socket (before it is closed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PortType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zmqdist.transport._wire.Port",
    .tp_basicsize = sizeof(Port),
    .tp_dealloc = (destructor)port_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A socket's messages read and written whole (see the module docstring).",
    .tp_methods = port_methods,
    .tp_init = (initproc)port_init,
    .tp_new = PyType_GenericNew,
};

/* Poller(items): waits on `items`, each a pyzmq socket or a file descriptor (int), for input.
 * It holds the sockets and asks each one's `_closed` before every wait, as a Port does. A call
 * works on its own copy of the items: two threads taking turns with one Poller never share one. */
typedef struct {
    PyObject_HEAD Py_ssize_t n;
    zpollitem *items;
    PyObject **owners; /* the pyzmq socket of each item; NULL for a file descriptor */
} Poller;

static void poller_clear(Poller *self) {
    if (self->owners != NULL)
        for (Py_ssize_t i = 0; i < self->n; i++)
            Py_XDECREF(self->owners[i]);
    PyMem_Free(self->owners);
    PyMem_Free(self->items);
    self->owners = NULL;
    self->items = NULL;
    self->n = 0;
}

static int poller_init(Poller *self, PyObject *args, PyObject *kw) {
    PyObject *given;
    if (!PyArg_ParseTuple(args, "O:Poller", &given))
        return -1;
    if (!loaded) {
        PyErr_SetString(PyExc_RuntimeError, "zmqdist.transport._wire: load() was not called");
        return -1;
    }
    PyObject *seq = PySequence_Fast(given, "Poller: items must be a sequence of sockets and file descriptors");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 1024) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "Poller: at most 1024 items");
        return -1;
    }
    zpollitem *items = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(zpollitem));
    PyObject **owners = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(PyObject *));
    if (items == NULL || owners == NULL) {
        PyMem_Free(items);
        PyMem_Free(owners);
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        items[i].events = Z_POLLIN;
        if (PyLong_Check(it)) {
            long fd = PyLong_AsLong(it);
            if (fd == -1 && PyErr_Occurred())
                goto fail;
            if (fd < 0 || fd > INT_MAX) {
                PyErr_Format(PyExc_ValueError, "Poller: item %zd is not a file descriptor (%ld)", i, fd);
                goto fail;
            }
            items[i].fd = (int)fd;
        } else {
            void *sock = handle_of(it);
            if (sock == NULL) {
                if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
                    PyErr_Clear();
                    PyErr_Format(PyExc_TypeError, "Poller: item %zd is %.100s, not a socket or a file descriptor", i,
                                 Py_TYPE(it)->tp_name);
                }
                goto fail;
            }
            items[i].socket = sock;
            Py_INCREF(it);
            owners[i] = it;
        }
    }
    Py_DECREF(seq);
    poller_clear(self);
    self->items = items;
    self->owners = owners;
    self->n = n;
    return 0;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(owners[i]);
    PyMem_Free(items);
    PyMem_Free(owners);
    Py_DECREF(seq);
    return -1;
}

static void poller_dealloc(Poller *self) {
    poller_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* poll(timeout_ms): wait until an item has input (or an error), at most timeout_ms (-1: no limit);
 * the list of the indices of the ready items, empty at the timeout. The GIL is released while it
 * waits. The Python handlers of signals caught meanwhile run before it returns (an exception one
 * raises is raised); a signal that interrupted the wait makes it return an empty list: a loop
 * computes its next timeout again. A closed socket raises ZMQError (ENOTSOCK), a failed wait
 * ZMQError with its errno (ETERM: the context was terminated). */
static PyObject *poller_poll(Poller *self, PyObject *arg) {
    if (!loaded) { /* (a Poller made with __new__ alone, before load) */
        PyErr_SetString(PyExc_RuntimeError, "zmqdist.transport._wire: load() was not called");
        return NULL;
    }
    long timeout = PyLong_AsLong(arg);
    if (timeout == -1 && PyErr_Occurred())
        return NULL;
    if (timeout < -1) {
        PyErr_SetString(PyExc_ValueError, "poll: timeout_ms must be -1 (no limit) or more");
        return NULL;
    }
    Py_ssize_t n = self->n;
    zpollitem local[16];
    zpollitem *items = n <= 16 ? local : PyMem_Malloc((size_t)n * sizeof(zpollitem));
    if (items == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        if (self->owners[i] != NULL && check_open(self->owners[i]) < 0)
            goto fail;
        items[i] = self->items[i];
        items[i].revents = 0;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = z_poll(items, (int)n, timeout);
    Py_END_ALLOW_THREADS
    int e = rc < 0 ? z_errno() : 0;
    /* Every return, as pyzmq does: a signal caught by another thread interrupts no wait, and
     * compiled callers run no bytecode that would run its handler later. */
    if (PyErr_CheckSignals() < 0)
        goto fail;
    if (rc < 0) {
        if (e != EINTR) {
            raise_errno(e);
            goto fail;
        }
        rc = 0;
    }
    PyObject *ready = PyList_New(0);
    if (ready == NULL)
        goto fail;
    for (Py_ssize_t i = 0; rc > 0 && i < n; i++) {
        if (items[i].revents == 0)
            continue;
        rc--;
        PyObject *k = PyLong_FromSsize_t(i);
        if (k == NULL || PyList_Append(ready, k) < 0) {
            Py_XDECREF(k);
            Py_DECREF(ready);
            goto fail;
        }
        Py_DECREF(k);
    }
    if (items != local)
        PyMem_Free(items);
    return ready;
fail:
    if (items != local)
        PyMem_Free(items);
    return NULL;
}

static PyMethodDef poller_methods[] = {
    {"poll", (PyCFunction)poller_poll, METH_O, "Wait for input: the indices of the ready items."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PollerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zmqdist.transport._wire.Poller",
    .tp_basicsize = sizeof(Poller),
    .tp_dealloc = (destructor)poller_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Waits for input on sockets and file descriptors (see poll).",
    .tp_methods = poller_methods,
    .tp_init = (initproc)poller_init,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef methods[] = {
    {"load", w_load, METH_VARARGS, "load(path, ZMQError): use the libzmq of pyzmq's backend at path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire", NULL, -1, methods};

PyMODINIT_FUNC PyInit__wire(void) {
    if (PyType_Ready(&PortType) < 0 || PyType_Ready(&PollerType) < 0)
        return NULL;
    if ((str_closed = PyUnicode_InternFromString("_closed")) == NULL)
        return NULL;
    if ((str_underlying = PyUnicode_InternFromString("underlying")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PortType);
    if (PyModule_AddObject(m, "Port", (PyObject *)&PortType) < 0) {
        Py_DECREF(&PortType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&PollerType);
    if (PyModule_AddObject(m, "Poller", (PyObject *)&PollerType) < 0) {
        Py_DECREF(&PollerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
