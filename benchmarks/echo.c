/* echo: a small, fast WebSocket echo backend for the clawgate load benchmark.
 *
 * Single-threaded epoll (level-triggered). Handles the HTTP/1.1 upgrade (computes
 * Sec-WebSocket-Accept with its own SHA-1), then streams frames back: each client
 * frame is unmasked and sent back unmasked with the same FIN/RSV/opcode, so
 * fragmented messages stay fragmented. Frames of any length (64 KiB and more) are
 * streamed, never buffered whole; frame headers split across reads are handled.
 * Ping -> pong, pong dropped, close -> close echoed (same code), then the server
 * closes the TCP connection (RFC 6455 7.1.1). A request without Sec-WebSocket-Key
 * gets "200 ok" and a close (health checks). Loopback only.
 *
 * usage: echo [--host 127.0.0.1] [--port 0]
 * prints "READY <port>" on stdout once listening.
 *
 * build: gcc -O2 -o echo echo.c
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
#include "ws_common.h"

#define RBUF (256 * 1024)
#define OBUF (RBUF + 8192)
#define HEAD_MAX 16384
#define WB_HIGH (8u << 20)   /* stop reading a connection while this much is queued */

enum { S_HEAD, S_WS, S_CLOSING, S_DRAIN_CLOSE };

typedef struct conn {
    int fd;
    uint8_t state;
    uint8_t fhlen;           /* bytes of the current frame header collected */
    uint8_t masked, discard, is_close, close_after_flush, out_armed, rd_paused, in_payload;
    uint8_t fh[14];
    uint8_t mask[4];
    uint32_t moff;
    uint64_t remain;         /* payload bytes of the current frame still to come */
    char *head;
    uint32_t hlen;
    uint8_t *wbuf;
    size_t wlen, woff, wcap;
    struct conn *next_dead;
} conn;

static int ep;
static uint8_t rbuf[RBUF];
static uint8_t obuf[OBUF];
static conn **table;
static size_t table_n;
static long nconns;
static conn *dead;   /* closed during this epoll batch; freed after it (no use-after-free) */

static void conn_close(conn *c) {
    if (c->fd < 0) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if ((size_t)c->fd < table_n) table[c->fd] = NULL;
    c->fd = -1;
    free(c->head); c->head = NULL;
    free(c->wbuf); c->wbuf = NULL;
    c->next_dead = dead;
    dead = c;
    nconns--;
}

static void set_events(conn *c) {
    struct epoll_event ev = {0};
    ev.events = (c->rd_paused ? 0 : EPOLLIN) | (c->out_armed ? EPOLLOUT : 0);
    ev.data.ptr = c;
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static int wbuf_append(conn *c, const uint8_t *p, size_t n) {
    if (c->woff > 0 && c->woff == c->wlen) c->woff = c->wlen = 0;
    if (c->wlen + n > c->wcap) {
        if (c->woff > 0) {
            memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
            c->wlen -= c->woff; c->woff = 0;
        }
        if (c->wlen + n > c->wcap) {
            size_t nc = c->wcap ? c->wcap : 65536;
            while (nc < c->wlen + n) nc *= 2;
            uint8_t *nb = realloc(c->wbuf, nc);
            if (!nb) return -1;
            c->wbuf = nb; c->wcap = nc;
        }
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
    return 0;
}

/* Returns -1 if the connection was closed. */
static int flush(conn *c) {
    while (c->woff < c->wlen) {
        ssize_t w = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            conn_close(c);
            return -1;
        }
        c->woff += (size_t)w;
    }
    int pending = c->woff < c->wlen;
    if (!pending) {
        c->woff = c->wlen = 0;
        if (c->wcap > (1u << 20)) { free(c->wbuf); c->wbuf = NULL; c->wcap = 0; }
        if (c->close_after_flush) { conn_close(c); return -1; }
    }
    uint8_t want_out = pending;
    uint8_t want_pause = (c->wlen - c->woff) > WB_HIGH;
    if (want_out != c->out_armed || want_pause != c->rd_paused) {
        c->out_armed = want_out; c->rd_paused = want_pause;
        set_events(c);
    }
    return 0;
}

static int out_send(conn *c, const uint8_t *p, size_t n) {
    if (n == 0) return c->close_after_flush && c->wlen == c->woff ? flush(c) : 0;
    if (c->wlen == c->woff) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR) { conn_close(c); return -1; }
            w = 0;
        }
        p += w; n -= (size_t)w;
    }
    if (n > 0 && wbuf_append(c, p, n) < 0) { conn_close(c); return -1; }
    return flush(c);
}

/* o[i] = d[i] ^ mask[(mo + i) & 3], 8 bytes at a time */
static void unmask_copy(uint8_t *o, const uint8_t *d, size_t n, const uint8_t mask[4], uint32_t mo) {
    uint8_t m[8];
    for (int k = 0; k < 8; k++) m[k] = mask[(mo + (uint32_t)k) & 3];
    uint64_t m64;
    memcpy(&m64, m, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, d + i, 8);
        x ^= m64;
        memcpy(o + i, &x, 8);
    }
    for (; i < n; i++) o[i] = d[i] ^ m[i & 3];
}

/* Frame streaming: consume data, append echo output to obuf at *olen. */
static void ws_process(conn *c, const uint8_t *d, size_t n, size_t *olen) {
    while (n > 0) {
        if (c->state != S_WS) return;               /* after a close: ignore input */
        if (!c->in_payload) {
            /* collect header bytes */
            c->fh[c->fhlen++] = *d++; n--;
            if (c->fhlen < 2) continue;
            size_t need = 2 + ((c->fh[1] & 0x7f) == 126 ? 2 : (c->fh[1] & 0x7f) == 127 ? 8 : 0) +
                          ((c->fh[1] & 0x80) ? 4 : 0);
            while (c->fhlen < need && n > 0) { c->fh[c->fhlen++] = *d++; n--; }
            if (c->fhlen < need) return;
            /* header complete */
            uint8_t b0 = c->fh[0], l7 = c->fh[1] & 0x7f;
            uint64_t len; size_t p = 2;
            if (l7 == 126) { len = ((uint64_t)c->fh[2] << 8) | c->fh[3]; p = 4; }
            else if (l7 == 127) { len = 0; for (int i = 0; i < 8; i++) len = (len << 8) | c->fh[2 + i]; p = 10; }
            else len = l7;
            c->masked = (c->fh[1] & 0x80) != 0;
            if (c->masked) memcpy(c->mask, c->fh + p, 4);
            c->moff = 0;
            c->remain = len;
            uint8_t op = b0 & 0x0f;
            c->discard = (op == 0x0a);              /* pong: drop */
            c->is_close = (op == 0x08);
            if (op == 0x09) b0 = (uint8_t)((b0 & 0xf0) | 0x0a);   /* ping -> pong */
            if (!c->discard) {
                uint8_t *o = obuf + *olen;
                o[0] = b0;
                if (len < 126) { o[1] = (uint8_t)len; *olen += 2; }
                else if (len < 65536) { o[1] = 126; o[2] = (uint8_t)(len >> 8); o[3] = (uint8_t)len; *olen += 4; }
                else { o[1] = 127; for (int i = 0; i < 8; i++) o[2 + i] = (uint8_t)(len >> (56 - 8 * i)); *olen += 10; }
            }
            c->fhlen = 0;
            if (len == 0) {
                if (c->is_close) { c->state = S_CLOSING; c->close_after_flush = 1; return; }
                continue;
            }
            c->in_payload = 1;
            continue;
        }
        /* payload */
        size_t take = n < c->remain ? n : (size_t)c->remain;
        if (!c->discard) {
            uint8_t *o = obuf + *olen;
            if (c->masked) {
                unmask_copy(o, d, take, c->mask, c->moff);
            } else {
                memcpy(o, d, take);
            }
            *olen += take;
        }
        c->moff += (uint32_t)take;
        c->remain -= take;
        d += take; n -= take;
        if (c->remain == 0) {
            c->in_payload = 0;
            if (c->is_close) { c->state = S_CLOSING; c->close_after_flush = 1; return; }
        }
    }
}

static void handle_head(conn *c, const uint8_t *d, size_t n, size_t *olen) {
    size_t room = HEAD_MAX - c->hlen;
    if (!c->head) c->head = malloc(HEAD_MAX + 1);
    size_t take = n < room ? n : room;
    memcpy(c->head + c->hlen, d, take);
    size_t old = c->hlen;
    c->hlen += (uint32_t)take;
    c->head[c->hlen] = 0;
    size_t scan_from = old > 3 ? old - 3 : 0;
    char *end = strstr(c->head + scan_from, "\r\n\r\n");
    if (!end) {
        if (c->hlen >= HEAD_MAX) { c->state = S_DRAIN_CLOSE; c->close_after_flush = 1; }
        return;
    }
    size_t head_len = (size_t)(end - c->head) + 4;
    end[2] = 0;   /* keep a trailing CRLF so the last header line is found */
    size_t klen = 0;
    const char *key = http_header(c->head, "Sec-WebSocket-Key", &klen);
    if (key && klen > 0 && klen < 64) {
        char acc[29];
        ws_accept(key, klen, acc);
        *olen += (size_t)snprintf((char *)obuf + *olen, 256,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n\r\n", acc);
        c->state = S_WS;
        size_t used_from_d = head_len - old;    /* bytes of d that belonged to the head */
        free(c->head); c->head = NULL; c->hlen = 0;
        if (used_from_d < n) ws_process(c, d + used_from_d, n - used_from_d, olen);
    } else {
        static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                                 "Connection: close\r\n\r\nok\n";
        memcpy(obuf + *olen, ok, sizeof(ok) - 1);
        *olen += sizeof(ok) - 1;
        c->state = S_DRAIN_CLOSE;
        c->close_after_flush = 1;
        free(c->head); c->head = NULL; c->hlen = 0;
    }
}

static void on_readable(conn *c) {
    ssize_t n = recv(c->fd, rbuf, RBUF, 0);
    if (n == 0) { conn_close(c); return; }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        conn_close(c);
        return;
    }
    size_t olen = 0;
    if (c->state == S_HEAD) handle_head(c, rbuf, (size_t)n, &olen);
    else if (c->state == S_WS) ws_process(c, rbuf, (size_t)n, &olen);
    /* S_CLOSING / S_DRAIN_CLOSE: input ignored */
    out_send(c, obuf, olen);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else { fprintf(stderr, "usage: %s [--host 127.0.0.1] [--port N]\n", argv[0]); return 2; }
    }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    /* 0.0.0.0 only inside the harness's own server namespace (lo + one veth to its client
     * namespace): there it serves both the proxies (127.0.0.1) and the direct client */
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1 ||
        ((ntohl(sa.sin_addr.s_addr) >> 24) != 127 && sa.sin_addr.s_addr != 0)) {
        fprintf(stderr, "echo: --host must be a 127.0.0.0/8 address (or 0.0.0.0 in the benchmark netns)\n");
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    table_n = rl.rlim_cur > 1048576 ? 1048576 : rl.rlim_cur;
    table = calloc(table_n, sizeof(conn *));
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 4096) < 0) {
        perror("echo: bind/listen");
        return 1;
    }
    socklen_t sl = sizeof(sa);
    getsockname(ls, (struct sockaddr *)&sa, &sl);
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("READY %d\n", ntohs(sa.sin_port));
    fflush(stdout);
    struct epoll_event evs[512];
    for (;;) {
        int k = epoll_wait(ep, evs, 512, -1);
        if (k < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < k; i++) {
            conn *c = evs[i].data.ptr;
            if (!c) {
                for (int a = 0; a < 256; a++) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    if ((size_t)fd >= table_n) { close(fd); continue; }
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    conn *nc = calloc(1, sizeof(conn));
                    nc->fd = fd;
                    nc->state = S_HEAD;
                    table[fd] = nc;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                    nconns++;
                }
                continue;
            }
            if (c->fd < 0) continue;   /* closed earlier in this batch */
            uint32_t e = evs[i].events;
            if (e & EPOLLOUT) {
                if (flush(c) < 0) continue;
            }
            if (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->rd_paused && !(e & (EPOLLHUP | EPOLLERR))) continue;
                on_readable(c);
            }
        }
        while (dead) { conn *x = dead; dead = x->next_dead; free(x); }
    }
}
