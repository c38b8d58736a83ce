/* proxy/core/_head.c: the request head's common case in C (issue 15, lever 4).
 *
 * Part of the compiled build only (setup.py; the pure build has no trace of it). http1.py
 * calls parse() first and rewrite() for the heads parse() accepted; both answer None to
 * defer to the Python code, which is the oracle: parse_request_head_py and
 * rewrite_request_head_py in proxy/core/http1.py.
 *
 * The rule: DEFER, NEVER REFUSE. C never refuses a head and never decides anything the
 * Python code would not. parse(raw, max_lines) returns the fields only for a narrow,
 * strictly validated subset of heads where the Python parser (httptools/llhttp plus our
 * own checks) is certain to return exactly the same fields; for anything else, every error
 * case included, it returns None and Python parses (and raises the right 400 or 431). It
 * raises only for real errors (MemoryError, a wrong number of arguments).
 *
 * The subset parse() accepts:
 * - raw is a bytes object ending in CRLF CRLF; in front of that, lines separated by CRLF,
 *   each non-empty, no other CR or LF, no NUL, no line starting with SP or HTAB (obs-fold);
 *   at most max_lines header lines (Python's 431 is deferred, so is a negative max_lines);
 * - the request line is exactly METHOD SP target SP HTTP/1.1 or HTTP/1.0, METHOD one of
 *   GET HEAD POST PUT DELETE PATCH OPTIONS, the target a '/' and bytes 0x21..0x7e only;
 * - each header line is  name ":" [one SP] value : the name one or more RFC 9110 tchars,
 *   the value non-empty, its first and last bytes 0x21..0x7e, the others 0x20..0x7e (no
 *   HTAB, no obs-text, no leading or trailing white space);
 * - Content-Length at most once, 1..15 digits, no leading zero (but "0"), never with
 *   Transfer-Encoding; Transfer-Encoding at most once, "chunked" in any case, never in
 *   HTTP/1.0; Host exactly once in HTTP/1.1, at most once in HTTP/1.0; Upgrade at most
 *   once and "websocket" in any case; a WebSocket upgrade (Upgrade and "upgrade" among the
 *   Connection tokens) only as GET, HTTP/1.1, without a body; Authorization at most once;
 *   no http2-settings, content_length, transfer_encoding or proxy-connection (any case,
 *   '_' or '-').
 * The fields are those of parse_request_head_py: names lower-cased, values as llhttp
 * reports them (the bytes after ":" and its one optional SP), Connection tokens split on
 * ',' and compared stripped and lower-cased.
 *
 * rewrite(...) returns what rewrite_request_head_py returns for the same head and
 * arguments, or None: when an argument is not of the exact type expected, when an
 * injected (add) value holds CR, LF or NUL (Python raises ValueError), when client_ip is
 * not ASCII, when the session cookie appears in a Cookie line (cookie stripping stays
 * Python), or when identity_headers holds anything but bytes.
 *
 * Held to the oracle by tests/unit/test_head_fast.py (hypothesis on realistic and mutated
 * heads, every byte in every part of a head, every head of tests/unit/test_http1.py,
 * reference-count checks) and tests/fuzz/fuzz_head.py (atheris; tests/unit/
 * test_fuzz_head.py runs it on a build of this file with AddressSanitizer and UBSan).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <string.h>

typedef unsigned char u8;

typedef struct {
    const char *s;
    Py_ssize_t n;
} Lit;

#define LIT(x) {(x), (Py_ssize_t)(sizeof(x) - 1)}
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* RFC 9110 tchar: filled by the module's init. */
static u8 TCHAR[256];

static const Lit METHODS[] = {
    LIT("GET"), LIT("HEAD"), LIT("POST"), LIT("PUT"), LIT("DELETE"), LIT("PATCH"), LIT("OPTIONS"),
};
#define N_METHODS ((int)COUNT(METHODS))
static PyObject *method_objs[COUNT(METHODS)];
static PyObject *version_11;
static PyObject *version_10;

/* http1._PROTECTED, _HOP_BY_HOP and _SPOOF_EXACT / _SPOOF_PREFIXES, normalised names. */
static const Lit PROTECTED[] = {
    LIT("host"),
    LIT("content-length"),
    LIT("transfer-encoding"),
    LIT("upgrade"),
    LIT("sec-websocket-key"),
    LIT("sec-websocket-version"),
    LIT("sec-websocket-protocol"),
    LIT("sec-websocket-extensions"),
    LIT("origin"),
    LIT("x-forwarded-for"),
    LIT("x-forwarded-proto"),
    LIT("x-forwarded-host"),
    LIT("authorization"),
};
static const Lit HOP_BY_HOP[] = {
    LIT("connection"),
    LIT("keep-alive"),
    LIT("proxy-connection"),
    LIT("te"),
    LIT("trailer"),
    LIT("upgrade"),
    LIT("proxy-authorization"),
    LIT("proxy-authenticate"),
    LIT("http2-settings"),
};
static const Lit SPOOF_EXACT[] = {
    LIT("forwarded"),
    LIT("x-real-ip"),
    LIT("x-client-ip"),
    LIT("true-client-ip"),
    LIT("client-ip"),
    LIT("x-cluster-client-ip"),
    LIT("cf-connecting-ip"),
    LIT("fastly-client-ip"),
    LIT("x-original-forwarded-for"),
    LIT("x-remote-ip"),
    LIT("x-remote-addr"),
    LIT("x-originating-ip"),
};
static const Lit SPOOF_PREFIXES[] = {LIT("x-forwarded-"), LIT("tailscale-")};

static inline u8 lower(u8 c) { return (c >= 'A' && c <= 'Z') ? (u8)(c | 0x20) : c; }

/* bytes.lower() then '_' -> '-': http1.normalise_header_name, one byte. */
static inline u8 normch(u8 c) {
    c = lower(c);
    return c == '_' ? (u8)'-' : c;
}

/* bytes.strip()'s white space (Py_ISSPACE): SP HT LF VT FF CR. */
static inline int is_space(u8 c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* lower(s) == lit (lit is lower case). */
static int ieq(const u8 *s, Py_ssize_t n, Lit lit) {
    if (n != lit.n) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (lower(s[i]) != (u8)lit.s[i]) {
            return 0;
        }
    }
    return 1;
}

/* normalise(s) == lit (lit normalised). */
static int neq(const u8 *s, Py_ssize_t n, const u8 *lit, Py_ssize_t litn) {
    if (n != litn) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (normch(s[i]) != lit[i]) {
            return 0;
        }
    }
    return 1;
}

static int neq_any(const u8 *s, Py_ssize_t n, const Lit *tab, size_t count) {
    for (size_t i = 0; i < count; i++) {
        if (neq(s, n, (const u8 *)tab[i].s, tab[i].n)) {
            return 1;
        }
    }
    return 0;
}

/* normalise(a) == normalise(b). */
static int nneq(const u8 *a, Py_ssize_t an, const u8 *b, Py_ssize_t bn) {
    if (an != bn) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < an; i++) {
        if (normch(a[i]) != normch(b[i])) {
            return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------------------- parse */

typedef struct {
    Py_ssize_t start; /* the line and its name start here */
    Py_ssize_t colon; /* the name ends here */
    Py_ssize_t vstart; /* the value starts here */
    Py_ssize_t end; /* the line and its value end here (a CR, or the end of the body) */
} Span;

#define STACK_SPANS 64

/* The Connection tokens parse_request_head_py looks at. */
#define CONN_CLOSE 1
#define CONN_KEEP_ALIVE 2
#define CONN_UPGRADE 4

static const Lit TOK_CLOSE = LIT("close");
static const Lit TOK_KEEP_ALIVE = LIT("keep-alive");
static const Lit TOK_UPGRADE = LIT("upgrade");

static int connection_tokens(const u8 *v, Py_ssize_t n) {
    int flags = 0;
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t j = i;
        while (j < n && v[j] != ',') {
            j++;
        }
        Py_ssize_t s = i, e = j; /* values here hold no white space but SP */
        while (s < e && v[s] == ' ') {
            s++;
        }
        while (e > s && v[e - 1] == ' ') {
            e--;
        }
        if (ieq(v + s, e - s, TOK_CLOSE)) {
            flags |= CONN_CLOSE;
        } else if (ieq(v + s, e - s, TOK_KEEP_ALIVE)) {
            flags |= CONN_KEEP_ALIVE;
        } else if (ieq(v + s, e - s, TOK_UPGRADE)) {
            flags |= CONN_UPGRADE;
        }
        i = j + 1;
    }
    return flags;
}

static const Lit H_CONTENT_LENGTH = LIT("content-length");
static const Lit H_TRANSFER_ENCODING = LIT("transfer-encoding");
static const Lit H_HOST = LIT("host");
static const Lit H_UPGRADE = LIT("upgrade");
static const Lit H_CONNECTION = LIT("connection");
static const Lit H_AUTHORIZATION = LIT("authorization");
static const Lit V_CHUNKED = LIT("chunked");
static const Lit V_WEBSOCKET = LIT("websocket");
/* Deferred whatever their value, in either spelling ('_' or '-'). */
static const Lit DEFERRED_NAMES[] = {
    LIT("content-length"), /* content_length: Python refuses it */
    LIT("transfer-encoding"), /* transfer_encoding: Python refuses it */
    LIT("http2-settings"), /* Python refuses it */
    LIT("proxy-connection"), /* llhttp reads it as Connection: left to Python */
};

/* Build the 12-tuple from the validated spans; NULL with an exception on failure. */
static PyObject *build(const u8 *buf, int method, Py_ssize_t ts, Py_ssize_t te, int http10,
                       Py_ssize_t rl_end, const Span *spans, Py_ssize_t k,
                       long long content_length, int chunked, int websocket, int keep_alive,
                       Py_ssize_t host_idx) {
    PyObject *target = NULL, *request_line = NULL, *lines = NULL, *names = NULL,
             *values = NULL, *cl = NULL, *host = NULL, *tuple = NULL;
    target = PyBytes_FromStringAndSize((const char *)buf + ts, te - ts);
    request_line = PyBytes_FromStringAndSize((const char *)buf, rl_end);
    lines = PyList_New(k);
    names = PyList_New(k);
    values = PyList_New(k);
    if (target == NULL || request_line == NULL || lines == NULL || names == NULL ||
        values == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        const Span *sp = &spans[i];
        PyObject *line =
            PyBytes_FromStringAndSize((const char *)buf + sp->start, sp->end - sp->start);
        if (line == NULL) {
            goto error;
        }
        PyList_SET_ITEM(lines, i, line);
        Py_ssize_t nlen = sp->colon - sp->start;
        PyObject *name = PyBytes_FromStringAndSize(NULL, nlen);
        if (name == NULL) {
            goto error;
        }
        u8 *dst = (u8 *)PyBytes_AS_STRING(name);
        for (Py_ssize_t j = 0; j < nlen; j++) {
            dst[j] = lower(buf[sp->start + j]);
        }
        PyList_SET_ITEM(names, i, name);
        PyObject *value =
            PyBytes_FromStringAndSize((const char *)buf + sp->vstart, sp->end - sp->vstart);
        if (value == NULL) {
            goto error;
        }
        PyList_SET_ITEM(values, i, value);
    }
    if (content_length >= 0) {
        cl = PyLong_FromLongLong(content_length);
        if (cl == NULL) {
            goto error;
        }
    } else {
        cl = Py_NewRef(Py_None);
    }
    host = host_idx >= 0 ? Py_NewRef(PyList_GET_ITEM(values, host_idx)) : Py_NewRef(Py_None);
    tuple = PyTuple_New(12);
    if (tuple == NULL) {
        goto error;
    }
    PyTuple_SET_ITEM(tuple, 0, Py_NewRef(method_objs[method]));
    PyTuple_SET_ITEM(tuple, 1, target);
    PyTuple_SET_ITEM(tuple, 2, Py_NewRef(http10 ? version_10 : version_11));
    PyTuple_SET_ITEM(tuple, 3, request_line);
    PyTuple_SET_ITEM(tuple, 4, lines);
    PyTuple_SET_ITEM(tuple, 5, names);
    PyTuple_SET_ITEM(tuple, 6, values);
    PyTuple_SET_ITEM(tuple, 7, cl);
    PyTuple_SET_ITEM(tuple, 8, PyBool_FromLong(chunked));
    PyTuple_SET_ITEM(tuple, 9, PyBool_FromLong(websocket));
    PyTuple_SET_ITEM(tuple, 10, PyBool_FromLong(keep_alive));
    PyTuple_SET_ITEM(tuple, 11, host);
    return tuple;

error:
    Py_XDECREF(target);
    Py_XDECREF(request_line);
    Py_XDECREF(lines); /* a list's unset items are NULL: freed safely */
    Py_XDECREF(names);
    Py_XDECREF(values);
    Py_XDECREF(cl);
    Py_XDECREF(host);
    return NULL;
}

PyDoc_STRVAR(parse_doc,
             "parse(raw, max_lines, /)\n--\n\n"
             "The fields of parse_request_head_py for a head in the common subset, else None.");

static PyObject *head_parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "parse() takes exactly 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *raw = args[0];
    if (!PyBytes_CheckExact(raw) || !PyLong_CheckExact(args[1])) {
        Py_RETURN_NONE;
    }
    int overflow = 0;
    long long max_lines = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (max_lines == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow > 0) {
        max_lines = LLONG_MAX;
    } else if (overflow < 0 || max_lines < 0) {
        Py_RETURN_NONE; /* every head has too many lines: Python's 431 */
    }
    const u8 *buf = (const u8 *)PyBytes_AS_STRING(raw);
    const Py_ssize_t n = PyBytes_GET_SIZE(raw);
    /* The shortest head in the subset: "GET / HTTP/1.0" CRLF CRLF. */
    if (n < 18 || memcmp(buf + n - 4, "\r\n\r\n", 4) != 0) {
        Py_RETURN_NONE;
    }
    const Py_ssize_t b = n - 4; /* the body: raw[:-4] */

    /* LFs in the body: at least the header lines (one CRLF each); more than max_lines of
       them is a 431 or a bare LF, both Python's. It also sizes the span array. */
    Py_ssize_t nl = 0;
    for (const u8 *q = buf, *end = buf + b;
         (q = memchr(q, '\n', (size_t)(end - q))) != NULL; q++) {
        nl++;
    }
    if ((long long)nl > max_lines) {
        Py_RETURN_NONE;
    }

    /* The request line. */
    int method = -1;
    for (int i = 0; i < N_METHODS; i++) {
        Py_ssize_t mlen = METHODS[i].n;
        if (b > mlen && memcmp(buf, METHODS[i].s, (size_t)mlen) == 0 && buf[mlen] == ' ') {
            method = i;
            break;
        }
    }
    if (method < 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t p = METHODS[method].n + 1;
    const Py_ssize_t ts = p;
    if (p >= b || buf[p] != '/') {
        Py_RETURN_NONE;
    }
    while (p < b && buf[p] >= 0x21 && buf[p] <= 0x7e) {
        p++;
    }
    const Py_ssize_t te = p;
    if (p >= b || buf[p] != ' ') {
        Py_RETURN_NONE;
    }
    p++;
    if (b - p < 8 || memcmp(buf + p, "HTTP/1.", 7) != 0 || (buf[p + 7] != '0' && buf[p + 7] != '1')) {
        Py_RETURN_NONE;
    }
    const int http10 = buf[p + 7] == '0';
    p += 8;
    const Py_ssize_t rl_end = p;

    /* The header lines. */
    Span stack[STACK_SPANS];
    Span *spans = stack;
    if (nl > STACK_SPANS) {
        spans = PyMem_Malloc((size_t)nl * sizeof(Span));
        if (spans == NULL) {
            return PyErr_NoMemory();
        }
    }
    PyObject *result = NULL;
    Py_ssize_t k = 0;
    if (p < b) {
        /* p + 1 <= b < n: when p + 1 == b, buf[p + 1] is the terminator's CR. */
        if (buf[p] != '\r' || buf[p + 1] != '\n') {
            goto defer;
        }
        p += 2;
        for (;;) {
            if (p >= b) {
                goto defer; /* an empty line */
            }
            const Py_ssize_t s = p;
            while (p < b && TCHAR[buf[p]]) {
                p++;
            }
            if (p == s || p >= b || buf[p] != ':') {
                goto defer;
            }
            const Py_ssize_t colon = p++;
            if (p < b && buf[p] == ' ') {
                p++;
            }
            const Py_ssize_t vs = p;
            if (p >= b || buf[p] < 0x21 || buf[p] > 0x7e) {
                goto defer;
            }
            p++;
            while (p < b && buf[p] >= 0x20 && buf[p] <= 0x7e) {
                p++;
            }
            if (buf[p - 1] == ' ' || k >= nl) {
                goto defer;
            }
            spans[k].start = s;
            spans[k].colon = colon;
            spans[k].vstart = vs;
            spans[k].end = p;
            k++;
            if (p == b) {
                break;
            }
            if (buf[p] != '\r' || buf[p + 1] != '\n') {
                goto defer;
            }
            p += 2;
        }
    }

    /* What parse_request_head_py reads off the headers. */
    long long content_length = -1;
    int te_seen = 0, upgrade_seen = 0, host_count = 0, auth_count = 0, conn = 0;
    Py_ssize_t host_idx = -1;
    for (Py_ssize_t i = 0; i < k; i++) {
        const u8 *name = buf + spans[i].start;
        const Py_ssize_t nlen = spans[i].colon - spans[i].start;
        const u8 *v = buf + spans[i].vstart;
        const Py_ssize_t vlen = spans[i].end - spans[i].vstart;
        if (ieq(name, nlen, H_CONTENT_LENGTH)) {
            if (content_length >= 0 || vlen > 15 || (vlen > 1 && v[0] == '0')) {
                goto defer;
            }
            long long x = 0;
            for (Py_ssize_t j = 0; j < vlen; j++) {
                if (v[j] < '0' || v[j] > '9') {
                    goto defer;
                }
                x = x * 10 + (v[j] - '0');
            }
            content_length = x;
        } else if (ieq(name, nlen, H_TRANSFER_ENCODING)) {
            if (te_seen || !ieq(v, vlen, V_CHUNKED)) {
                goto defer;
            }
            te_seen = 1;
        } else if (ieq(name, nlen, H_HOST)) {
            host_count++;
            host_idx = i;
        } else if (ieq(name, nlen, H_UPGRADE)) {
            if (upgrade_seen || !ieq(v, vlen, V_WEBSOCKET)) {
                goto defer;
            }
            upgrade_seen = 1;
        } else if (ieq(name, nlen, H_CONNECTION)) {
            conn |= connection_tokens(v, vlen);
        } else if (ieq(name, nlen, H_AUTHORIZATION)) {
            auth_count++;
        } else if (neq_any(name, nlen, DEFERRED_NAMES, COUNT(DEFERRED_NAMES))) {
            goto defer;
        }
    }
    if ((content_length >= 0 && te_seen) || auth_count > 1 || host_count > 1 ||
        (host_count == 0 && !http10) || (te_seen && http10)) {
        goto defer;
    }
    int websocket = 0;
    if (upgrade_seen && (conn & CONN_UPGRADE)) {
        if (method != 0 || te_seen || content_length > 0 || http10) {
            goto defer;
        }
        websocket = 1;
    }
    const int keep_alive = http10 ? (conn & CONN_KEEP_ALIVE) != 0 : (conn & CONN_CLOSE) == 0;
    result = build(buf, method, ts, te, http10, rl_end, spans, k, content_length, te_seen,
                   websocket, keep_alive, host_count ? host_idx : -1);
    if (spans != stack) {
        PyMem_Free(spans);
    }
    return result;

defer:
    if (spans != stack) {
        PyMem_Free(spans);
    }
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------------- rewrite */

#define STACK_TOKENS 32
#define STACK_LINES 128
#define STACK_IDS 8

typedef struct {
    const u8 *p;
    Py_ssize_t n;
} Bytes;

static const u8 CRLF[] = "\r\n";
static const u8 XFF[] = "X-Forwarded-For: ";
static const u8 XFP[] = "X-Forwarded-Proto: ";
static const u8 XFH[] = "X-Forwarded-Host: ";
static const u8 CONN_WS[] = "Upgrade: websocket\r\nConnection: Upgrade";
static const u8 CONN_CLOSE_LINE[] = "Connection: close";
static const u8 CONN_KA_LINE[] = "Connection: keep-alive";
#define SLEN(x) ((Py_ssize_t)(sizeof(x) - 1))

static const Lit N_AUTHORIZATION = LIT("authorization");
static const Lit N_COOKIE = LIT("cookie");

/* total += x, failing (MemoryError) on overflow. */
static int grow(Py_ssize_t *total, Py_ssize_t x) {
    if (x < 0 || *total > PY_SSIZE_T_MAX - x) {
        PyErr_NoMemory();
        return -1;
    }
    *total += x;
    return 0;
}

/* Is the bool argument True (1), False (0), or not a bool (-1: defer)? */
static int exact_bool(PyObject *o) {
    if (o == Py_True) {
        return 1;
    }
    if (o == Py_False) {
        return 0;
    }
    return -1;
}

PyDoc_STRVAR(rewrite_doc,
             "rewrite(request_line, lines, names, values, host, websocket, keep_alive, http10,\n"
             "        client_ip, proto, identity_headers, add, drop_authorization,\n"
             "        session_cookie, /)\n--\n\n"
             "rewrite_request_head_py's result for these fields, or None to defer to it.");

static PyObject *head_rewrite(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 14) {
        PyErr_Format(PyExc_TypeError, "rewrite() takes exactly 14 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *request_line = args[0], *lines = args[1], *names = args[2], *values = args[3];
    PyObject *host = args[4], *client_ip = args[8], *proto = args[9], *ids = args[10];
    PyObject *add = args[11], *session_cookie = args[13];
    const int websocket = exact_bool(args[5]), keep_alive = exact_bool(args[6]),
              http10 = exact_bool(args[7]), drop_auth = exact_bool(args[12]);
    if (websocket < 0 || keep_alive < 0 || http10 < 0 || drop_auth < 0 ||
        !PyBytes_CheckExact(request_line) || !PyList_CheckExact(lines) ||
        !PyList_CheckExact(names) || !PyList_CheckExact(values) ||
        (host != Py_None && !PyBytes_CheckExact(host)) || !PyUnicode_CheckExact(client_ip) ||
        !PyBytes_CheckExact(proto) || !PyAnySet_CheckExact(ids) ||
        (!PyList_CheckExact(add) && !PyTuple_CheckExact(add)) ||
        (session_cookie != Py_None && !PyBytes_CheckExact(session_cookie))) {
        Py_RETURN_NONE;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(client_ip) < 0) {
        return NULL;
    }
#endif
    if (!PyUnicode_IS_ASCII(client_ip)) {
        Py_RETURN_NONE; /* Python's encode("ascii") raises */
    }

    /* identity_headers first: iterating it allocates (the only allocation of a tracked
       object here, so the only point where a collection could run finalizers), before any
       item of the lists is borrowed. Only bytes members: anything else could compare equal
       to a name by code of its own. */
    Bytes id_stack[STACK_IDS];
    const Py_ssize_t n_ids = PySet_GET_SIZE(ids);
    if (n_ids > 0) {
        PyObject *it = PyObject_GetIter(ids);
        if (it == NULL) {
            return NULL;
        }
        Py_ssize_t i = 0;
        PyObject *item;
        int ok = 1;
        while ((item = PyIter_Next(it)) != NULL) {
            if (!PyBytes_CheckExact(item)) {
                ok = 0;
            } else if (i < STACK_IDS) {
                /* Borrowed from the set, which the caller holds and nothing changes now. */
                id_stack[i].p = (const u8 *)PyBytes_AS_STRING(item);
                id_stack[i].n = PyBytes_GET_SIZE(item);
            }
            i++;
            Py_DECREF(item);
        }
        Py_DECREF(it);
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (!ok || i != n_ids) {
            Py_RETURN_NONE;
        }
    }

    const Py_ssize_t nlines = PyList_GET_SIZE(lines);
    if (PyList_GET_SIZE(names) != nlines || PyList_GET_SIZE(values) != nlines) {
        Py_RETURN_NONE; /* zip(strict=True) raises */
    }
    PyObject *const *line_items = ((PyListObject *)lines)->ob_item;
    PyObject *const *name_items = ((PyListObject *)names)->ob_item;
    PyObject *const *value_items = ((PyListObject *)values)->ob_item;
    Py_ssize_t n_conn_tokens = 0;
    for (Py_ssize_t i = 0; i < nlines; i++) {
        if (!PyBytes_CheckExact(line_items[i]) || !PyBytes_CheckExact(name_items[i]) ||
            !PyBytes_CheckExact(value_items[i])) {
            Py_RETURN_NONE;
        }
        PyObject *nm = name_items[i];
        if (PyBytes_GET_SIZE(nm) == 10 && memcmp(PyBytes_AS_STRING(nm), "connection", 10) == 0) {
            const char *v = PyBytes_AS_STRING(value_items[i]);
            const Py_ssize_t vlen = PyBytes_GET_SIZE(value_items[i]);
            n_conn_tokens++;
            for (Py_ssize_t j = 0; j < vlen; j++) {
                n_conn_tokens += v[j] == ',';
            }
        }
    }

    /* The output's size, as it is computed; add's values are checked on the way. */
    const char *ip = PyUnicode_AsUTF8AndSize(client_ip, NULL);
    if (ip == NULL) {
        return NULL;
    }
    const Py_ssize_t ip_len = PyUnicode_GET_LENGTH(client_ip);
    Py_ssize_t total = 0;
    if (grow(&total, PyBytes_GET_SIZE(request_line) + 2) < 0 ||
        grow(&total, SLEN(XFF) + ip_len + 2) < 0 ||
        grow(&total, SLEN(XFP) + PyBytes_GET_SIZE(proto) + 2) < 0 ||
        (host != Py_None && grow(&total, SLEN(XFH) + PyBytes_GET_SIZE(host) + 2) < 0)) {
        return NULL;
    }
    const Py_ssize_t n_add = PySequence_Fast_GET_SIZE(add);
    PyObject *const *add_items = PySequence_Fast_ITEMS(add);
    for (Py_ssize_t i = 0; i < n_add; i++) {
        PyObject *pair = add_items[i];
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 1))) {
            Py_RETURN_NONE;
        }
        PyObject *value = PyTuple_GET_ITEM(pair, 1);
        const char *v = PyBytes_AS_STRING(value);
        const Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        for (Py_ssize_t j = 0; j < vlen; j++) {
            if (v[j] == '\r' || v[j] == '\n' || v[j] == '\0') {
                Py_RETURN_NONE; /* Python raises ValueError */
            }
        }
        if (grow(&total, PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0))) < 0 ||
            grow(&total, 2 + vlen + 2) < 0) {
            return NULL;
        }
    }
    const u8 *conn_line = NULL;
    Py_ssize_t conn_len = 0;
    if (websocket) {
        conn_line = CONN_WS;
        conn_len = SLEN(CONN_WS);
    } else if (!keep_alive) {
        conn_line = CONN_CLOSE_LINE;
        conn_len = SLEN(CONN_CLOSE_LINE);
    } else if (http10) {
        conn_line = CONN_KA_LINE;
        conn_len = SLEN(CONN_KA_LINE);
    }
    if (conn_line != NULL && grow(&total, conn_len + 2) < 0) {
        return NULL;
    }

    Bytes tok_stack[STACK_TOKENS];
    u8 keep_stack[STACK_LINES];
    Bytes *tokens = tok_stack;
    u8 *keep = keep_stack;
    PyObject *out = NULL;
    if (n_conn_tokens > STACK_TOKENS) {
        tokens = PyMem_Malloc((size_t)n_conn_tokens * sizeof(Bytes));
        if (tokens == NULL) {
            PyErr_NoMemory();
            goto error;
        }
    }
    if (nlines > STACK_LINES) {
        keep = PyMem_Malloc((size_t)nlines);
        if (keep == NULL) {
            PyErr_NoMemory();
            goto error;
        }
    }

    /* The headers named in Connection: each token stripped, normalised, not empty, not
       protected (compared normalised, so kept as they are). */
    Py_ssize_t n_named = 0;
    for (Py_ssize_t i = 0; i < nlines; i++) {
        PyObject *nm = name_items[i];
        if (PyBytes_GET_SIZE(nm) != 10 || memcmp(PyBytes_AS_STRING(nm), "connection", 10) != 0) {
            continue;
        }
        const u8 *v = (const u8 *)PyBytes_AS_STRING(value_items[i]);
        const Py_ssize_t vlen = PyBytes_GET_SIZE(value_items[i]);
        Py_ssize_t j = 0;
        while (j <= vlen) {
            Py_ssize_t e = j;
            while (e < vlen && v[e] != ',') {
                e++;
            }
            Py_ssize_t s = j, t = e;
            while (s < t && is_space(v[s])) {
                s++;
            }
            while (t > s && is_space(v[t - 1])) {
                t--;
            }
            if (t > s && !neq_any(v + s, t - s, PROTECTED, COUNT(PROTECTED))) {
                if (n_named >= n_conn_tokens) {
                    PyErr_SetString(PyExc_SystemError, "_head.rewrite: token count");
                    goto error;
                }
                tokens[n_named].p = v + s;
                tokens[n_named].n = t - s;
                n_named++;
            }
            j = e + 1;
        }
    }

    /* Which client lines stay. */
    for (Py_ssize_t i = 0; i < nlines; i++) {
        const u8 *nm = (const u8 *)PyBytes_AS_STRING(name_items[i]);
        const Py_ssize_t nlen = PyBytes_GET_SIZE(name_items[i]);
        keep[i] = 0;
        if (neq_any(nm, nlen, HOP_BY_HOP, COUNT(HOP_BY_HOP))) {
            continue;
        }
        int drop = 0;
        for (Py_ssize_t t = 0; t < n_named && !drop; t++) {
            drop = nneq(nm, nlen, tokens[t].p, tokens[t].n);
        }
        if (drop || neq_any(nm, nlen, SPOOF_EXACT, COUNT(SPOOF_EXACT))) {
            continue;
        }
        for (size_t t = 0; t < COUNT(SPOOF_PREFIXES) && !drop; t++) {
            drop = nlen >= SPOOF_PREFIXES[t].n &&
                   neq(nm, SPOOF_PREFIXES[t].n, (const u8 *)SPOOF_PREFIXES[t].s,
                       SPOOF_PREFIXES[t].n);
        }
        if (drop) {
            continue;
        }
        if (n_ids > STACK_IDS) {
            /* normalise(name) in identity_headers, with a bytes key (bytes members only). */
            PyObject *key = PyBytes_FromStringAndSize(NULL, nlen);
            if (key == NULL) {
                goto error;
            }
            u8 *dst = (u8 *)PyBytes_AS_STRING(key);
            for (Py_ssize_t j = 0; j < nlen; j++) {
                dst[j] = normch(nm[j]);
            }
            int found = PySet_Contains(ids, key);
            Py_DECREF(key);
            if (found < 0) {
                goto error;
            }
            drop = found;
        } else {
            for (Py_ssize_t t = 0; t < n_ids && !drop; t++) {
                drop = neq(nm, nlen, id_stack[t].p, id_stack[t].n);
            }
        }
        if (drop) {
            continue;
        }
        if (drop_auth && neq(nm, nlen, (const u8 *)N_AUTHORIZATION.s, N_AUTHORIZATION.n)) {
            continue;
        }
        if (session_cookie != Py_None && neq(nm, nlen, (const u8 *)N_COOKIE.s, N_COOKIE.n)) {
            int has = PySequence_Contains(value_items[i], session_cookie);
            if (has < 0) {
                goto error;
            }
            if (has) {
                goto defer; /* the cookie-stripping path stays Python */
            }
        }
        keep[i] = 1;
        if (grow(&total, PyBytes_GET_SIZE(line_items[i]) + 2) < 0) {
            goto error;
        }
    }
    if (grow(&total, 2) < 0) {
        goto error;
    }

    /* One bytes object, filled in order. */
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        goto error;
    }
    u8 *o = (u8 *)PyBytes_AS_STRING(out);
    u8 *const oend = o + total;
#define PUT(src, len)                                                                          \
    do {                                                                                       \
        Py_ssize_t len_ = (len);                                                               \
        if (len_ < 0 || len_ > oend - o) {                                                     \
            goto overrun;                                                                      \
        }                                                                                      \
        memcpy(o, (src), (size_t)len_);                                                        \
        o += len_;                                                                             \
    } while (0)
#define PUT_BYTES(obj) PUT(PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj))
    PUT_BYTES(request_line);
    PUT(CRLF, 2);
    PUT(XFF, SLEN(XFF));
    PUT(ip, ip_len);
    PUT(CRLF, 2);
    PUT(XFP, SLEN(XFP));
    PUT_BYTES(proto);
    PUT(CRLF, 2);
    if (host != Py_None) {
        PUT(XFH, SLEN(XFH));
        PUT_BYTES(host);
        PUT(CRLF, 2);
    }
    for (Py_ssize_t i = 0; i < n_add; i++) {
        PUT_BYTES(PyTuple_GET_ITEM(add_items[i], 0));
        PUT(": ", 2);
        PUT_BYTES(PyTuple_GET_ITEM(add_items[i], 1));
        PUT(CRLF, 2);
    }
    if (conn_line != NULL) {
        PUT(conn_line, conn_len);
        PUT(CRLF, 2);
    }
    for (Py_ssize_t i = 0; i < nlines; i++) {
        if (keep[i]) {
            PUT_BYTES(line_items[i]);
            PUT(CRLF, 2);
        }
    }
    PUT(CRLF, 2);
#undef PUT_BYTES
#undef PUT
    if (o != oend) {
        goto overrun;
    }
    if (tokens != tok_stack) {
        PyMem_Free(tokens);
    }
    if (keep != keep_stack) {
        PyMem_Free(keep);
    }
    return out;

overrun:
    PyErr_SetString(PyExc_SystemError, "_head.rewrite: output size mismatch");
    goto error;
defer:
    if (tokens != tok_stack) {
        PyMem_Free(tokens);
    }
    if (keep != keep_stack) {
        PyMem_Free(keep);
    }
    Py_RETURN_NONE;
error:
    Py_XDECREF(out);
    if (tokens != tok_stack) {
        PyMem_Free(tokens);
    }
    if (keep != keep_stack) {
        PyMem_Free(keep);
    }
    return NULL;
}

/* ------------------------------------------------------------------------------ module */

static PyMethodDef head_methods[] = {
    {"parse", (PyCFunction)(void (*)(void))head_parse, METH_FASTCALL, parse_doc},
    {"rewrite", (PyCFunction)(void (*)(void))head_rewrite, METH_FASTCALL, rewrite_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc, "The request head's common case in C: see proxy/core/_head.c.");

static struct PyModuleDef head_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_head",
    .m_doc = module_doc,
    .m_size = -1,
    .m_methods = head_methods,
};

PyMODINIT_FUNC PyInit__head(void) {
    static const char tchar_punct[] = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (u8)((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
                        (c >= 'A' && c <= 'Z') || (c != 0 && strchr(tchar_punct, c) != NULL));
    }
    if (version_11 == NULL) {
        for (int i = 0; i < N_METHODS; i++) {
            method_objs[i] = PyBytes_FromStringAndSize(METHODS[i].s, METHODS[i].n);
            if (method_objs[i] == NULL) {
                return NULL;
            }
        }
        version_10 = Py_BuildValue("(ii)", 1, 0);
        if (version_10 == NULL) {
            return NULL;
        }
        version_11 = Py_BuildValue("(ii)", 1, 1);
        if (version_11 == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&head_module);
}
