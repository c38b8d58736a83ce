/* loadgen: a fast, bounded WebSocket load client for the clawgate benchmark.
 *
 * One thread, epoll (edge-triggered), non-blocking sockets. A minimal but correct
 * RFC 6455 client: HTTP/1.1 upgrade with a random Sec-WebSocket-Key, checks the
 * 101 and Sec-WebSocket-Accept, sends masked frames, parses unmasked frames from the
 * server (split across reads), close handshake. Targets: loopback (127.0.0.0/8) or the
 * benchmark's own network namespaces (100.64.0.0/10, see harness.py); nothing else.
 * --tls: the same over TLS (OpenSSL, no certificate verification: a self-signed
 * benchmark certificate; every connection is a full handshake, no session resumption).
 * --first-text STR: right after the 101, send STR as a masked text frame and expect it
 * echoed back before the mode's own traffic (the gateway-token first-frame gate).
 *
 * Modes (one JSON object on stdout at the end; optional "tick" lines on stderr):
 *   conns       --conc N sessions in flight; each: connect, upgrade, one --size B
 *               echo, close handshake (--close eof|frame|rst). Rate = sessions/s.
 *   rtt         --conc K connections, ping-pong one --size B message each;
 *               latency histogram (1 us buckets) -> p50/p90/p99/p99.9.
 *   throughput  --conc K connections, --window W messages in flight each,
 *               --size B; msgs/s echoed back.
 *   idle        open --count N connections (--conc handshakes in flight), print
 *               "READY up=.. failed=.. secs=.." on stdout, hold until stdin gets a
 *               line/EOF or --hold S, then echo one message on each (alive check),
 *               close all.
 *   refused     --conc N connects in flight; each connects, sends the request head
 *               and waits for the server to close (EOF/RST). Rate = closes/s; a 101
 *               counts as an error ("accepted").
 *
 * Hard bounds in every mode: --duration (<= 600 s), --count (<= 50M), per-step
 * --timeout, and an alarm() watchdog that kills the process if it ever overruns.
 *
 * build: gcc -O2 -o loadgen loadgen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <openssl/ssl.h>
#include <openssl/err.h>
#include "ws_common.h"

#define MAX_DURATION 600.0
#define MAX_COUNT 50000000ull
#define MAX_CONC 60000
#define MAX_SIZE (16u << 20)
#define MAX_HEADERS 16
#define RBUF (512 * 1024)
#define HEAD_MAX 8192
#define HIST_N 1000000        /* 1 us buckets up to 1 s; above goes to overflow */

enum { M_CONNS, M_RTT, M_TPUT, M_IDLE, M_REFUSED };
enum { C_FREE, C_CONNECTING, C_HEAD, C_OPEN, C_CLOSING, C_REFWAIT, C_TLS };
enum { CL_EOF, CL_FRAME, CL_RST };

typedef struct conn {
    int fd;
    uint8_t state, in_payload, fhlen, opcode, got_close, counted_open, need_flush, first_wait;
    SSL *ssl;
    uint8_t fh[14];
    uint64_t remain, poff;
    uint64_t t_start, t_step, t_sent;
    char *head; uint32_t hlen;
    char accept[29];
    /* pending write: an owned buffer (request head) or a static one (close frame) */
    const uint8_t *wp; size_t wleft; char *wown;
    /* message stream: identical frames written from the burst buffer */
    uint64_t stream_left;     /* bytes of message frames still to write */
    uint64_t stream_pos;      /* bytes of message frames written so far (mod flen = offset) */
    uint64_t msgs_sent, msgs_recv;
    uint32_t idx;
} conn;

/* ---- options ---- */
static int mode = -1;
static struct sockaddr_in target;
static char host_str[64] = "127.0.0.1";
static int port = 0;
static const char *path = "/";
static const char *hdrs[MAX_HEADERS];
static int nhdrs;
static int conc = 50;
static uint64_t count_cap = 0;
static double duration = 10.0, warmup = 1.0, step_timeout = 10.0, hold = 30.0;
static size_t msg_size = 100;
static int window = 16;
static int close_mode = CL_EOF;
static int verify = -1;
static int progress = 0;
static uint32_t src_base = 0, src_count = 0;
static int send_head_refused = 1;
static int use_tls = 0;
static SSL_CTX *sslctx;
static const char *first_text;  /* --first-text: payload of the first (text) message */
static size_t first_len;
static uint8_t *first_frame; static size_t first_flen;

/* ---- state ---- */
static int ep;
static conn *conns;
static int *free_list; static int nfree;
static uint8_t rbuf[RBUF];
static uint8_t *pattern;        /* expected payload bytes */
static uint8_t *frame;          /* one masked message frame */
static size_t flen;
static uint8_t *burst;          /* several consecutive message frames */
static size_t burst_len;
static uint8_t close_frame[8];
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t src_next;

static uint64_t t0_ns, meas_start_ns, meas_end_ns, stop_ns;
static int stopping, released, ready_printed;
static uint64_t started, ok_total, ok_meas, msgs_total, msgs_meas, bytes_meas;
static uint64_t up, failed, alive, verify_done;
static uint64_t accepted_err;
static uint32_t *hist; static uint64_t hist_over, hist_n, hist_max; static double hist_sum;
static struct rusage ru_meas0; static int ru_meas_taken; static struct rusage ru_meas1;
static int active;
static int nhand;   /* connections still connecting / waiting for the 101 */
#define IN_WINDOW(t) ((t) >= meas_start_ns && (t) < stop_ns)

#define NERR 13
static const char *err_names[NERR] = {"connect", "reset", "eof_early", "bad_status", "bad_accept",
    "protocol", "timeout", "payload_mismatch", "write", "head_too_big", "accepted", "socket", "tls"};
static uint64_t errs[NERR];
static char first_err[256];
enum { E_CONNECT, E_RESET, E_EOF, E_STATUS, E_ACCEPT, E_PROTO, E_TIMEOUT, E_PAYLOAD, E_WRITE,
       E_HEADBIG, E_ACCEPTED, E_SOCKET, E_TLS };
static uint64_t status_counts[6];   /* by first digit of a non-101 status */

static uint64_t xrand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void note_err(int kind, const char *detail) {
    errs[kind]++;
    if (!first_err[0]) snprintf(first_err, sizeof(first_err), "%s: %s", err_names[kind], detail ? detail : "");
}

/* plain or TLS socket I/O with one contract: >0 bytes, 0 = EOF, -1 + errno (EAGAIN = retry
 * on the next readiness event; OpenSSL's WANT_READ/WANT_WRITE map to EAGAIN because the fd
 * is registered for both directions, edge-triggered) */
static ssize_t io_send(conn *c, const void *p, size_t n) {
    if (!c->ssl) return send(c->fd, p, n, MSG_NOSIGNAL);
    size_t w = 0;
    ERR_clear_error();
    int r = SSL_write_ex(c->ssl, p, n, &w);
    if (r > 0) return (ssize_t)w;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) { errno = EAGAIN; return -1; }
    if (e == SSL_ERROR_SYSCALL && errno) return -1;
    errno = EPIPE;
    return -1;
}

static ssize_t io_recv(conn *c, void *p, size_t n) {
    if (!c->ssl) return recv(c->fd, p, n, 0);
    size_t rd = 0;
    ERR_clear_error();
    int r = SSL_read_ex(c->ssl, p, n, &rd);
    if (r > 0) return (ssize_t)rd;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) { errno = EAGAIN; return -1; }
    if (e == SSL_ERROR_ZERO_RETURN) return 0;
    if (e == SSL_ERROR_SYSCALL && errno) return -1;
    errno = ECONNRESET;
    return -1;
}

static void hist_add(uint64_t ns) {
    uint64_t us = ns / 1000;
    if (us < HIST_N) hist[us]++; else hist_over++;
    hist_n++;
    hist_sum += (double)ns / 1000.0;
    if (us > hist_max) hist_max = us;
}

static double hist_pct(double p) {
    if (hist_n == 0) return -1;
    uint64_t want = (uint64_t)(p * (double)hist_n);
    if (want >= hist_n) want = hist_n - 1;
    uint64_t acc = 0;
    for (uint64_t i = 0; i < HIST_N; i++) {
        acc += hist[i];
        if (acc > want) return (double)i + 0.5;
    }
    return (double)hist_max;
}

/* ---- connection lifecycle ---- */
static void conn_release(conn *c) {
    if (c->fd >= 0) {
        if (close_mode == CL_RST) {
            struct linger lg = {1, 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        close(c->fd);   /* also removes it from the epoll set */
    }
    if (c->state == C_CONNECTING || c->state == C_HEAD || c->state == C_TLS) nhand--;
    if (c->ssl) { SSL_free(c->ssl); c->ssl = NULL; }
    c->fd = -1;
    free(c->head); c->head = NULL; c->hlen = 0;
    free(c->wown); c->wown = NULL; c->wp = NULL; c->wleft = 0;
    c->state = C_FREE;
    free_list[nfree++] = (int)c->idx;
    active--;
}

static void conn_fail(conn *c, int kind, const char *detail) {
    note_err(kind, detail);
    if (mode == M_IDLE && c->state != C_OPEN && !c->counted_open) failed++;
    if (mode == M_IDLE && c->counted_open) { verify_done++; }
    conn_release(c);
}

static int want_more_conns(void);
static void start_conn(void);

static void build_request(conn *c) {
    uint8_t key[16];
    uint64_t a = xrand(), b = xrand();
    memcpy(key, &a, 8); memcpy(key + 8, &b, 8);
    char k64[32];
    size_t kl = b64_encode(key, 16, k64);
    ws_accept(k64, kl, c->accept);
    size_t cap = 512 + strlen(path);
    for (int i = 0; i < nhdrs; i++) cap += strlen(hdrs[i]) + 2;
    char *r = malloc(cap);
    int n = snprintf(r, cap,
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", path, host_str, port, k64);
    for (int i = 0; i < nhdrs; i++) n += snprintf(r + n, cap - (size_t)n, "%s\r\n", hdrs[i]);
    n += snprintf(r + n, cap - (size_t)n, "\r\n");
    c->wown = r; c->wp = (uint8_t *)r; c->wleft = (size_t)n;
}

/* write whatever is pending; returns -1 if the connection failed */
static int conn_flush(conn *c) {
    while (c->wleft > 0) {
        ssize_t w = io_send(c, c->wp, c->wleft);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            if (mode == M_REFUSED && (errno == ECONNRESET || errno == EPIPE)) return 0; /* read side reports */
            conn_fail(c, errno == ECONNRESET || errno == EPIPE ? E_RESET : E_WRITE, strerror(errno));
            return -1;
        }
        c->wp += w; c->wleft -= (size_t)w;
    }
    if (c->wown) { free(c->wown); c->wown = NULL; }
    while (c->stream_left > 0) {
        size_t off = (size_t)(c->stream_pos % flen);
        size_t len = burst_len - off;
        if (len > c->stream_left) len = (size_t)c->stream_left;
        ssize_t w = io_send(c, burst + off, len);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            conn_fail(c, errno == ECONNRESET || errno == EPIPE ? E_RESET : E_WRITE, strerror(errno));
            return -1;
        }
        c->stream_pos += (uint64_t)w; c->stream_left -= (uint64_t)w;
    }
    return 0;
}

static int send_msgs(conn *c, uint64_t k) {
    c->stream_left += k * flen;
    c->msgs_sent += k;
    return conn_flush(c);
}

static int send_close(conn *c) {
    c->wp = close_frame; c->wleft = sizeof(close_frame);
    c->state = C_CLOSING;
    c->t_step = now_ns();
    return conn_flush(c);
}

static void session_done(conn *c) {
    uint64_t t = now_ns();
    ok_total++;
    if (IN_WINDOW(t)) {
        ok_meas++;
        hist_add(t - c->t_start);
    }
    conn_release(c);
    if (count_cap && ok_total >= count_cap) stopping = 1;
}

/* called when the 101 has been verified */
static int on_open(conn *c) {
    nhand--;
    c->state = C_OPEN;
    c->t_step = now_ns();
    if (first_text) {
        /* nothing else is pending: the request head was written before the 101 arrived */
        c->first_wait = 1;
        c->wp = first_frame; c->wleft = first_flen;
        if (mode != M_CONNS && conn_flush(c) < 0) return -1;
    }
    switch (mode) {
    case M_CONNS:
        c->t_sent = c->t_step;
        return send_msgs(c, 1);
    case M_IDLE:
        up++; c->counted_open = 1;
        return 0;
    default:
        up++;
        return 0;   /* rtt/throughput start together once all are open */
    }
}

/* a complete data message arrived */
static int on_message(conn *c) {
    uint64_t t = now_ns();
    c->msgs_recv++;
    c->t_step = t;
    switch (mode) {
    case M_CONNS:
        if (close_mode == CL_RST) { session_done(c); return -1; }
        return send_close(c);
    case M_RTT:
        msgs_total++;
        if (IN_WINDOW(t)) { msgs_meas++; hist_add(t - c->t_sent); }
        if (count_cap && msgs_total >= count_cap) stopping = 1;
        if (stopping) return 0;
        c->t_sent = now_ns();
        return send_msgs(c, 1);
    case M_TPUT:
        msgs_total++;
        if (IN_WINDOW(t)) { msgs_meas++; bytes_meas += msg_size; }
        if (count_cap && msgs_total >= count_cap) stopping = 1;
        if (stopping) return 0;
        /* queue the next message; written once per readiness event (on_readable) */
        c->stream_left += flen;
        c->msgs_sent++;
        c->need_flush = 1;
        return 0;
    case M_IDLE:
        alive++; verify_done++;
        conn_release(c);
        return -1;
    }
    return 0;
}

static int handle_frames(conn *c, const uint8_t *d, size_t n) {
    while (n > 0) {
        if (!c->in_payload) {
            c->fh[c->fhlen++] = *d++; n--;
            if (c->fhlen < 2) continue;
            if (c->fh[1] & 0x80) { conn_fail(c, E_PROTO, "masked frame from server"); return -1; }
            size_t need = 2 + ((c->fh[1] & 0x7f) == 126 ? 2 : (c->fh[1] & 0x7f) == 127 ? 8 : 0);
            while (c->fhlen < need && n > 0) { c->fh[c->fhlen++] = *d++; n--; }
            if (c->fhlen < need) return 0;
            uint8_t l7 = c->fh[1] & 0x7f;
            uint64_t len = l7;
            if (l7 == 126) len = ((uint64_t)c->fh[2] << 8) | c->fh[3];
            else if (l7 == 127) { len = 0; for (int i = 0; i < 8; i++) len = (len << 8) | c->fh[2 + i]; }
            c->opcode = c->fh[0] & 0x0f;
            c->fhlen = 0;
            c->remain = len;
            c->poff = 0;
            if (c->opcode == 0x8) {
                c->got_close = 1;
                if (mode == M_CONNS && c->state == C_CLOSING) {
                    if (close_mode == CL_FRAME) { session_done(c); return -1; }
                }
            } else if (c->opcode <= 2 && c->first_wait) {
                if (len != first_len || c->opcode != 1) { conn_fail(c, E_PROTO, "first message not echoed as sent"); return -1; }
            } else if (c->opcode <= 2) {
                if (len != msg_size) { conn_fail(c, E_PROTO, "unexpected message length"); return -1; }
            }
            if (len == 0) {
                if (c->opcode <= 2 && c->first_wait) { c->first_wait = 0; continue; }
                if (c->opcode <= 2) { if (on_message(c) < 0) return -1; }
                continue;
            }
            c->in_payload = 1;
            continue;
        }
        size_t take = n < c->remain ? n : (size_t)c->remain;
        if (verify && c->opcode <= 2 &&
            memcmp(d, (c->first_wait ? (const uint8_t *)first_text : pattern) + c->poff, take) != 0) {
            conn_fail(c, E_PAYLOAD, "echoed payload differs");
            return -1;
        }
        c->poff += take; c->remain -= take; d += take; n -= take;
        if (c->remain == 0) {
            c->in_payload = 0;
            if (c->opcode <= 2 && (c->fh[0] & 0x80) && c->first_wait) {
                c->first_wait = 0;   /* the first message's echo: not counted */
            } else if (c->opcode <= 2 && (c->fh[0] & 0x80)) {
                if (on_message(c) < 0) return -1;
            }
        }
    }
    return 0;
}

static int handle_head(conn *c, const uint8_t *d, size_t n) {
    if (!c->head) c->head = malloc(HEAD_MAX + 1);
    size_t room = HEAD_MAX - c->hlen;
    size_t take = n < room ? n : room;
    memcpy(c->head + c->hlen, d, take);
    size_t old = c->hlen;
    c->hlen += (uint32_t)take;
    c->head[c->hlen] = 0;
    char *end = strstr(c->head + (old > 3 ? old - 3 : 0), "\r\n\r\n");
    if (!end) {
        if (c->hlen >= HEAD_MAX) { conn_fail(c, E_HEADBIG, "response head too big"); return -1; }
        return 0;
    }
    size_t head_len = (size_t)(end - c->head) + 4;
    end[2] = 0;
    int is101 = strncmp(c->head, "HTTP/1.1 101", 12) == 0;
    if (mode == M_REFUSED) {
        if (is101) { accepted_err++; conn_fail(c, E_ACCEPTED, "server accepted (101)"); return -1; }
        int d0 = (c->head[9] >= '1' && c->head[9] <= '5') ? c->head[9] - '0' : 0;
        status_counts[d0]++;
        c->state = C_REFWAIT;   /* HTTP-level refusal: wait for the close */
        return 0;
    }
    if (!is101) {
        char line[96]; size_t ll = strcspn(c->head, "\r\n"); if (ll > 95) ll = 95;
        memcpy(line, c->head, ll); line[ll] = 0;
        int d0 = (c->head[9] >= '1' && c->head[9] <= '5') ? c->head[9] - '0' : 0;
        status_counts[d0]++;
        conn_fail(c, E_STATUS, line);
        return -1;
    }
    size_t al = 0;
    const char *acc = http_header(c->head, "Sec-WebSocket-Accept", &al);
    if (!acc || al != 28 || memcmp(acc, c->accept, 28) != 0) {
        conn_fail(c, E_ACCEPT, "Sec-WebSocket-Accept missing or wrong");
        return -1;
    }
    size_t rest_from = head_len - old;
    free(c->head); c->head = NULL; c->hlen = 0;
    if (on_open(c) < 0) return -1;
    if (rest_from < n) return handle_frames(c, d + rest_from, n - rest_from);
    return 0;
}

static void tls_handshake(conn *c);

static void on_readable(conn *c) {
    if (c->state == C_TLS) { tls_handshake(c); if (c->state == C_TLS || c->state == C_FREE) return; }
    for (;;) {
        ssize_t n = io_recv(c, rbuf, RBUF);
        if (n > 0) {
            int r;
            if (c->state == C_HEAD || (mode == M_REFUSED && c->state != C_REFWAIT))
                r = handle_head(c, rbuf, (size_t)n);
            else if (c->state == C_REFWAIT)
                r = 0;
            else
                r = handle_frames(c, rbuf, (size_t)n);
            if (r < 0 || c->state == C_FREE) return;
            continue;
        }
        if (n == 0 || errno == ECONNRESET) {
            if (mode == M_REFUSED) { session_done(c); return; }
            if (mode == M_CONNS && c->state == C_CLOSING && (c->got_close || n == 0)) {
                session_done(c);
                return;
            }
            if (mode == M_IDLE && c->counted_open && released) { verify_done++; conn_release(c); return; }
            conn_fail(c, n == 0 ? E_EOF : E_RESET, n == 0 ? "EOF before close handshake" : "reset");
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
            if (c->need_flush) { c->need_flush = 0; conn_flush(c); }
            return;
        }
        conn_fail(c, E_RESET, strerror(errno));
        return;
    }
}

static void tls_handshake(conn *c) {
    ERR_clear_error();
    int r = SSL_connect(c->ssl);
    if (r == 1) {
        c->state = C_HEAD;
        c->t_step = now_ns();
        build_request(c);
        conn_flush(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
    char buf[160];
    unsigned long le = ERR_peek_error();
    if (le) ERR_error_string_n(le, buf, sizeof(buf));
    else snprintf(buf, sizeof(buf), "handshake failed (ssl error %d, %s)", e, errno ? strerror(errno) : "EOF");
    conn_fail(c, E_TLS, buf);
}

static void on_writable(conn *c) {
    if (c->state == C_TLS) { tls_handshake(c); if (c->state != C_HEAD) return; }
    if (c->state == C_CONNECTING) {
        int err = 0; socklen_t el = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { conn_fail(c, E_CONNECT, strerror(err)); return; }
        if (use_tls && mode != M_REFUSED) {
            c->ssl = SSL_new(sslctx);
            if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) { conn_fail(c, E_TLS, "SSL_new"); return; }
            c->state = C_TLS;
            c->t_step = now_ns();
            tls_handshake(c);
            return;
        }
        c->state = C_HEAD;   /* refused mode too: parse a head if the server answers */
        c->t_step = now_ns();
        if (mode == M_REFUSED && !send_head_refused) return;
        c->t_step = now_ns();
        build_request(c);
    }
    conn_flush(c);
}

static void start_conn(void) {
    if (nfree == 0) return;
    int idx = free_list[--nfree];
    conn *c = &conns[idx];
    memset(c, 0, sizeof(*c));
    c->idx = (uint32_t)idx;
    c->fd = -1;
    active++;
    started++;
    nhand++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { c->state = C_CONNECTING; conn_fail(c, E_SOCKET, strerror(errno)); return; }
    c->fd = fd;
    c->state = C_CONNECTING;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (src_count) {
        struct sockaddr_in sa = {0};
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(src_base + (uint32_t)(src_next++ % src_count));
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
#endif
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) { conn_fail(c, E_SOCKET, strerror(errno)); return; }
    }
    c->t_start = c->t_step = now_ns();
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { conn_fail(c, E_SOCKET, strerror(errno)); return; }
    int r = connect(fd, (struct sockaddr *)&target, sizeof(target));
    if (r < 0 && errno != EINPROGRESS) { conn_fail(c, E_CONNECT, strerror(errno)); return; }
}

static int want_more_conns(void) {
    if (stopping) return 0;
    switch (mode) {
    case M_CONNS: case M_REFUSED:
        return started < count_cap;
    case M_IDLE:
        return started < count_cap;
    default:
        return started < (uint64_t)conc;
    }
}

static void check_timeouts(uint64_t t) {
    uint64_t lim = (uint64_t)(step_timeout * 1e9);
    int n = (mode == M_IDLE) ? (int)count_cap : conc;
    for (int i = 0; i < n; i++) {
        conn *c = &conns[i];
        if (c->state == C_FREE) continue;
        if (mode == M_IDLE && c->state == C_OPEN && !released) continue;   /* held on purpose */
        if ((mode == M_RTT || mode == M_TPUT) && c->state == C_OPEN) {
            if (c->msgs_sent == c->msgs_recv) continue;  /* nothing outstanding */
            /* stalled = no echo for `timeout` since the last one (or since traffic started) */
            if ((int64_t)(t - c->t_step) > (int64_t)lim) conn_fail(c, E_TIMEOUT, "no echo");
            continue;
        }
        if ((int64_t)(t - c->t_step) > (int64_t)lim) conn_fail(c, E_TIMEOUT, c->state == C_CONNECTING ? "connect" :
                                          c->state == C_TLS ? "TLS handshake" :
                                          c->state == C_HEAD ? "waiting for response head" :
                                          c->state == C_CLOSING ? "waiting for close" : "waiting");
    }
}

static void cpu_now(struct rusage *r) { getrusage(RUSAGE_SELF, r); }
static double ru_secs(const struct rusage *r) {
    return (double)r->ru_utime.tv_sec + r->ru_utime.tv_usec * 1e-6 + (double)r->ru_stime.tv_sec + r->ru_stime.tv_usec * 1e-6;
}

static void usage(void) {
    fprintf(stderr,
        "usage: loadgen MODE --port P [--host 127.0.0.1] [--path /] [-H 'Name: value']...\n"
        "  MODE: conns | rtt | throughput | idle | refused\n"
        "  --conc N --count N --duration S --warmup S --timeout S --hold S\n"
        "  --size BYTES --window W --close eof|frame|rst --verify 0|1 --progress\n"
        "  --src-base A.B.C.D --src-count N   (bind source addresses; 127/8 or 100.64/10 only)\n"
        "  --no-head (refused: connect and wait, send nothing)\n"
        "  --tls (TLS client, no certificate verification, full handshake per connection)\n"
        "  --first-text STR (send STR as the first text message, expect its echo)\n");
    exit(2);
}

/* network etiquette: loopback, or 100.64.0.0/10 (the CGNAT range that the harness's own
 * network namespaces use; never routed off this machine by them) */
static int allowed_addr(uint32_t h) { return (h >> 24) == 127 || (h >> 22) == ((100u << 2) | 1u); }

static int parse_loopback(const char *s, uint32_t *out) {
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1) return -1;
    uint32_t h = ntohl(a.s_addr);
    if (!allowed_addr(h)) return -1;
    *out = h;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *m = argv[1];
    if (!strcmp(m, "conns")) mode = M_CONNS;
    else if (!strcmp(m, "rtt")) mode = M_RTT;
    else if (!strcmp(m, "throughput")) mode = M_TPUT;
    else if (!strcmp(m, "idle")) mode = M_IDLE;
    else if (!strcmp(m, "refused")) mode = M_REFUSED;
    else usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = (i + 1 < argc) ? argv[i + 1] : NULL;
#define ARG(name) (!strcmp(a, name) && v && (i++, 1))
        if (ARG("--host")) snprintf(host_str, sizeof(host_str), "%s", v);
        else if (ARG("--port")) port = atoi(v);
        else if (ARG("--path")) path = v;
        else if (ARG("-H")) { if (nhdrs < MAX_HEADERS) hdrs[nhdrs++] = v; }
        else if (ARG("--conc")) conc = atoi(v);
        else if (ARG("--count")) count_cap = strtoull(v, NULL, 10);
        else if (ARG("--duration")) duration = atof(v);
        else if (ARG("--warmup")) warmup = atof(v);
        else if (ARG("--timeout")) step_timeout = atof(v);
        else if (ARG("--hold")) hold = atof(v);
        else if (ARG("--size")) msg_size = (size_t)strtoull(v, NULL, 10);
        else if (ARG("--window")) window = atoi(v);
        else if (ARG("--verify")) verify = atoi(v);
        else if (ARG("--close")) close_mode = !strcmp(v, "frame") ? CL_FRAME : !strcmp(v, "rst") ? CL_RST : CL_EOF;
        else if (ARG("--src-base")) { if (parse_loopback(v, &src_base) < 0) { fprintf(stderr, "--src-base must be in 127/8 or 100.64/10\n"); return 2; } }
        else if (ARG("--first-text")) first_text = v;
        else if (!strcmp(a, "--tls")) use_tls = 1;
        else if (ARG("--src-count")) src_count = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--progress")) progress = 1;
        else if (!strcmp(a, "--no-head")) send_head_refused = 0;
        else usage();
#undef ARG
    }
    uint32_t th;
    if (port <= 0 || port > 65535 || parse_loopback(host_str, &th) < 0) {
        fprintf(stderr, "loadgen: --port required and --host must be in 127.0.0.0/8 or 100.64.0.0/10\n");
        return 2;
    }
    if (src_count && (!allowed_addr(src_base + src_count - 1) ||
                      (src_base >> 24) != ((src_base + src_count - 1) >> 24))) {
        fprintf(stderr, "loadgen: source range leaves 127.0.0.0/8 or 100.64.0.0/10\n");
        return 2;
    }
    if (use_tls) {
        sslctx = SSL_CTX_new(TLS_client_method());
        if (!sslctx) { fprintf(stderr, "loadgen: SSL_CTX_new failed\n"); return 2; }
        SSL_CTX_set_verify(sslctx, SSL_VERIFY_NONE, NULL);   /* self-signed benchmark cert */
        SSL_CTX_set_mode(sslctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        SSL_CTX_set_options(sslctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
        SSL_CTX_set_session_cache_mode(sslctx, SSL_SESS_CACHE_OFF);   /* full handshakes */
    }
    if (first_text) {
        first_len = strlen(first_text);
        if (first_len == 0 || first_len > 65535) { fprintf(stderr, "loadgen: --first-text 1..65535 bytes\n"); return 2; }
    }
    /* hard bounds */
    if (duration <= 0 || duration > MAX_DURATION) duration = MAX_DURATION;
    if (hold < 0 || hold > MAX_DURATION) hold = MAX_DURATION;
    if (step_timeout <= 0 || step_timeout > 60) step_timeout = 60;
    if (count_cap == 0 || count_cap > MAX_COUNT) count_cap = MAX_COUNT;
    if (conc < 1) conc = 1;
    if (conc > MAX_CONC) conc = MAX_CONC;
    if (window < 1) window = 1;
    if (window > 4096) window = 4096;
    if (msg_size > MAX_SIZE) msg_size = MAX_SIZE;
    if (warmup < 0 || warmup >= duration) warmup = 0;
    if (mode == M_IDLE && count_cap > MAX_CONC) count_cap = MAX_CONC;
    if (verify < 0) verify = (mode != M_TPUT);
    /* watchdog: nothing below may outlive this */
    alarm((unsigned)(2 * duration + hold + 3 * step_timeout + 30));
    signal(SIGPIPE, SIG_IGN);

    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    target.sin_addr.s_addr = htonl(th);

    /* payload pattern, one masked frame, and a burst of frames */
    pattern = malloc(msg_size + 1);
    for (size_t i = 0; i < msg_size; i++) pattern[i] = (uint8_t)('a' + (i * 7 + i / 251) % 26);
    uint8_t mk[4] = {0x37, 0xfa, 0x21, 0x3d};
    size_t hl = msg_size < 126 ? 2 : msg_size < 65536 ? 4 : 10;
    flen = hl + 4 + msg_size;
    frame = malloc(flen);
    frame[0] = 0x82;  /* FIN + binary */
    if (hl == 2) frame[1] = 0x80 | (uint8_t)msg_size;
    else if (hl == 4) { frame[1] = 0x80 | 126; frame[2] = (uint8_t)(msg_size >> 8); frame[3] = (uint8_t)msg_size; }
    else { frame[1] = 0x80 | 127; for (int i = 0; i < 8; i++) frame[2 + i] = (uint8_t)((uint64_t)msg_size >> (56 - 8 * i)); }
    memcpy(frame + hl, mk, 4);
    for (size_t i = 0; i < msg_size; i++) frame[hl + 4 + i] = pattern[i] ^ mk[i & 3];
    size_t nb = (256 * 1024) / flen;
    if (nb < 1) nb = 1;
    if (nb > (size_t)window && mode == M_TPUT) nb = (size_t)window;
    if (mode != M_TPUT) nb = 1;
    burst_len = nb * flen;
    burst = malloc(burst_len);
    for (size_t i = 0; i < nb; i++) memcpy(burst + i * flen, frame, flen);
    /* close frame: FIN+close, masked, code 1000 */
    close_frame[0] = 0x88; close_frame[1] = 0x82;
    memcpy(close_frame + 2, mk, 4);
    close_frame[6] = 0x03 ^ mk[0]; close_frame[7] = 0xe8 ^ mk[1];
    if (first_text) {   /* masked FIN+text frame */
        size_t fh = first_len < 126 ? 2 : 4;
        first_flen = fh + 4 + first_len;
        first_frame = malloc(first_flen);
        first_frame[0] = 0x81;
        if (fh == 2) first_frame[1] = 0x80 | (uint8_t)first_len;
        else { first_frame[1] = 0x80 | 126; first_frame[2] = (uint8_t)(first_len >> 8); first_frame[3] = (uint8_t)first_len; }
        memcpy(first_frame + fh, mk, 4);
        for (size_t i = 0; i < first_len; i++) first_frame[fh + 4 + i] = (uint8_t)first_text[i] ^ mk[i & 3];
    }

    rng ^= now_ns() ^ ((uint64_t)getpid() << 32);
    hist = calloc(HIST_N, sizeof(uint32_t));
    int slots = (mode == M_IDLE) ? (int)count_cap : conc;
    conns = calloc((size_t)slots, sizeof(conn));
    free_list = malloc(sizeof(int) * (size_t)slots);
    for (int i = slots - 1; i >= 0; i--) { conns[i].state = C_FREE; conns[i].fd = -1; free_list[nfree++] = i; }

    ep = epoll_create1(0);
    int stdin_watch = 0;
    struct stat st;
    if (mode == M_IDLE && fstat(0, &st) == 0 && S_ISFIFO(st.st_mode)) stdin_watch = 1;

    t0_ns = now_ns();
    uint64_t dur_ns = (uint64_t)(duration * 1e9);
    /* rtt/throughput: connection setup gets at most min(duration, 15 s), then traffic runs
     * for --duration; idle: setup gets --duration */
    uint64_t setup_deadline = t0_ns + ((mode == M_RTT || mode == M_TPUT) && duration > 15 ? 15000000000ull : dur_ns);
    int traffic_started = (mode == M_CONNS || mode == M_REFUSED);
    if (traffic_started) {
        meas_start_ns = t0_ns + (uint64_t)(warmup * 1e9);
        stop_ns = t0_ns + dur_ns;
    }
    uint64_t ready_ns = 0, release_ns = 0, verify_deadline = 0, hold_deadline = 0;
    uint64_t last_tick = t0_ns, last_tick_ok = 0, last_to = t0_ns;
    int conc_handshakes = conc;   /* idle: handshakes in flight */
    struct epoll_event evs[1024];

    for (;;) {
        uint64_t t = now_ns();
        /* start connections */
        if (mode == M_IDLE) {
            if (!ready_printed)
                while (want_more_conns() && nhand < conc_handshakes && nfree > 0) start_conn();
        } else if (mode == M_CONNS || mode == M_REFUSED) {
            while (want_more_conns() && nfree > 0) start_conn();
        } else if (!traffic_started) {
            while (want_more_conns() && nfree > 0) start_conn();
        }
        /* phase transitions */
        if ((mode == M_RTT || mode == M_TPUT) && !traffic_started) {
            if ((started >= (uint64_t)conc && nhand == 0) || t > setup_deadline) {
                traffic_started = 1;
                t = now_ns();
                meas_start_ns = t + (uint64_t)(warmup * 1e9);
                stop_ns = t + dur_ns;
                for (int i = 0; i < conc; i++) {
                    conn *c = &conns[i];
                    if (c->state != C_OPEN) continue;
                    c->t_sent = c->t_step = now_ns();
                    send_msgs(c, mode == M_TPUT ? (uint64_t)window : 1);
                }
            }
        }
        if (traffic_started && mode != M_IDLE && !ru_meas_taken && t >= meas_start_ns) {
            cpu_now(&ru_meas0); ru_meas_taken = 1;
        }
        if (mode == M_IDLE) {
            if (!ready_printed && ((up + failed) >= count_cap || t > setup_deadline)) {
                ready_printed = 1; ready_ns = t;
                hold_deadline = t + (uint64_t)(hold * 1e9);
                printf("READY up=%llu failed=%llu secs=%.3f\n", (unsigned long long)up,
                       (unsigned long long)failed, (double)(t - t0_ns) / 1e9);
                fflush(stdout);
                if (stdin_watch) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
                    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
                }
            }
            if (ready_printed && !released && t > hold_deadline) released = 2;
            if (released && !release_ns) {
                release_ns = t;
                verify_deadline = t + (uint64_t)(step_timeout * 1e9);
                for (uint64_t i = 0; i < count_cap; i++) {
                    conn *c = &conns[i];
                    if (c->state != C_OPEN) continue;
                    c->t_step = c->t_sent = now_ns();
                    send_msgs(c, 1);
                }
            }
            if (release_ns && (verify_done >= up || t > verify_deadline)) break;
        }
        if (traffic_started && mode != M_IDLE && !stopping && t >= stop_ns) stopping = 1;
        if (stopping && mode != M_IDLE) break;
        if (mode == M_CONNS || mode == M_REFUSED) {
            if (!want_more_conns() && active == 0) break;
        }
        if (progress && t - last_tick >= 1000000000ull) {
            uint64_t cur = (mode == M_CONNS || mode == M_REFUSED) ? ok_total : (mode == M_IDLE ? up : msgs_total);
            uint64_t e = 0; for (int i = 0; i < NERR; i++) e += errs[i];
            fprintf(stderr, "tick t=%.1f done=%llu rate=%.0f errors=%llu active=%d\n", (double)(t - t0_ns) / 1e9,
                    (unsigned long long)cur, (double)(cur - last_tick_ok) * 1e9 / (double)(t - last_tick),
                    (unsigned long long)e, active);
            last_tick = t; last_tick_ok = cur;
        }
        if (t - last_to >= 100000000ull) { check_timeouts(t); last_to = t; }

        int k = epoll_wait(ep, evs, 1024, 20);
        if (k < 0) { if (errno == EINTR) continue; perror("epoll_wait"); break; }
        for (int i = 0; i < k; i++) {
            conn *c = evs[i].data.ptr;
            if (!c) {   /* stdin: release the held connections */
                char b[64];
                ssize_t r = read(0, b, sizeof(b));
                (void)r;
                epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
                if (!released) released = 1;
                continue;
            }
            if (c->state == C_FREE) continue;
            uint32_t e = evs[i].events;
            if (e & EPOLLOUT) { on_writable(c); if (c->state == C_FREE) continue; }
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
                if (c->state == C_CONNECTING) {
                    on_writable(c);   /* reports the connect error */
                    if (c->state == C_FREE) continue;
                }
                on_readable(c);
            }
        }
    }
    uint64_t t_end = now_ns();
    if (!meas_end_ns) meas_end_ns = (stop_ns && t_end > stop_ns) ? stop_ns : t_end;
    if (mode != M_IDLE && stop_ns && meas_end_ns > stop_ns) meas_end_ns = stop_ns;
    cpu_now(&ru_meas1);
    if (!ru_meas_taken) ru_meas0 = ru_meas1;
    stopping = 1;
    int slots_n = (mode == M_IDLE) ? (int)count_cap : conc;
    for (int i = 0; i < slots_n; i++) if (conns[i].state != C_FREE) conn_release(&conns[i]);

    double wall = (double)(t_end - t0_ns) / 1e9;
    double meas = meas_start_ns && meas_end_ns > meas_start_ns ? (double)(meas_end_ns - meas_start_ns) / 1e9 : 0;
    struct rusage ru_all; cpu_now(&ru_all);
    double cpu_meas = ru_secs(&ru_meas1) - ru_secs(&ru_meas0);
    uint64_t etot = 0; for (int i = 0; i < NERR; i++) etot += errs[i];

    printf("{\"tls\":%d,\"first_text_len\":%zu,", use_tls, first_len);
    printf("\"mode\":\"%s\",\"port\":%d,\"conc\":%d,\"size\":%zu,\"window\":%d,\"wall_s\":%.3f,\"measure_s\":%.3f,",
           m, port, conc, msg_size, window, wall, meas);
    printf("\"started\":%llu,", (unsigned long long)started);
    printf("\"client_cpu_s\":%.3f,\"client_cpu_frac\":%.3f,\"client_cpu_frac_measure\":%.3f,",
           ru_secs(&ru_all), wall > 0 ? ru_secs(&ru_all) / wall : 0, meas > 0 ? cpu_meas / meas : 0);
    if (mode == M_CONNS || mode == M_REFUSED) {
        printf("\"ok_total\":%llu,\"ok_measure\":%llu,\"rate\":%.1f,", (unsigned long long)ok_total,
               (unsigned long long)ok_meas, meas > 0 ? (double)ok_meas / meas : 0);
    } else if (mode == M_RTT || mode == M_TPUT) {
        printf("\"connections_up\":%llu,\"msgs_total\":%llu,\"msgs_measure\":%llu,\"rate\":%.1f,\"mbytes_per_s\":%.2f,",
               (unsigned long long)up, (unsigned long long)msgs_total, (unsigned long long)msgs_meas,
               meas > 0 ? (double)msgs_meas / meas : 0, meas > 0 ? (double)bytes_meas / meas / 1e6 : 0);
    } else {
        printf("\"requested\":%llu,\"up\":%llu,\"failed\":%llu,\"ready_s\":%.3f,\"held_s\":%.3f,\"alive\":%llu,",
               (unsigned long long)count_cap, (unsigned long long)up, (unsigned long long)failed,
               ready_ns ? (double)(ready_ns - t0_ns) / 1e9 : -1.0,
               release_ns && ready_ns ? (double)(release_ns - ready_ns) / 1e9 : -1.0, (unsigned long long)alive);
    }
    if (hist_n) {
        printf("\"lat_n\":%llu,\"lat_mean_us\":%.1f,\"lat_p50_us\":%.1f,\"lat_p90_us\":%.1f,\"lat_p99_us\":%.1f,"
               "\"lat_p999_us\":%.1f,\"lat_max_us\":%llu,",
               (unsigned long long)hist_n, hist_sum / (double)hist_n, hist_pct(0.50), hist_pct(0.90),
               hist_pct(0.99), hist_pct(0.999), (unsigned long long)hist_max);
    }
    if (mode == M_REFUSED || status_counts[1] + status_counts[2] + status_counts[3] + status_counts[4] + status_counts[5])
        printf("\"http_status\":{\"1xx\":%llu,\"2xx\":%llu,\"3xx\":%llu,\"4xx\":%llu,\"5xx\":%llu},",
               (unsigned long long)status_counts[1], (unsigned long long)status_counts[2],
               (unsigned long long)status_counts[3], (unsigned long long)status_counts[4],
               (unsigned long long)status_counts[5]);
    printf("\"errors_total\":%llu,\"errors\":{", (unsigned long long)etot);
    int first = 1;
    for (int i = 0; i < NERR; i++) if (errs[i]) { printf("%s\"%s\":%llu", first ? "" : ",", err_names[i], (unsigned long long)errs[i]); first = 0; }
    printf("},\"first_error\":\"");
    for (char *p = first_err; *p; p++) { if (*p == '"' || *p == '\\') putchar('\\'); if ((unsigned char)*p >= 32) putchar(*p); }
    printf("\"}\n");
    fflush(stdout);
    return 0;
}
