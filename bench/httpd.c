/* bench-httpd: the benchmark's HTTP server. One thread, epoll, non-blocking sockets, one fixed
 * small response for every request. Fast enough that the forwarders, not the server, are what
 * the HTTP figures measure (busybox httpd forks per connection). bench/run.py compiles it.
 *
 * HTTP/1.1 keeps the connection open unless "Connection: close"; HTTP/1.0 (ab) closes after
 * the response unless "Connection: keep-alive". Pipelined requests are answered in order.
 *
 *   bench-httpd PORT        listens on 0.0.0.0:PORT and [::]:PORT (dual stack), backlog 4096
 *   bench-httpd PORT ADDR   listens on the IPv4 address ADDR only (the loopback baseline)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BODY "<html><body><p>oci-portfwd bench: hello from the container</p></body></html>\n"
#define INBUF 8192

static char resp_keep[256], resp_close[256];
static size_t resp_keep_len, resp_close_len;

struct conn {
    int fd;
    size_t in_len;
    char in[INBUF];
    char *out;          /* pending response bytes (only when a write was short) */
    size_t out_len, out_off;
    int close_after;    /* close once `out` is flushed */
};

static void die(const char *what) { perror(what); exit(1); }

static void conn_free(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out);
    free(c);
}

/* Queue bytes; write what the socket takes now. Returns -1 on a dead socket. */
static int conn_send(struct conn *c, const char *buf, size_t len) {
    if (c->out_len == c->out_off) {
        ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN) return -1;
        if (n < 0) n = 0;
        buf += n;
        len -= (size_t)n;
        if (len == 0) return 0;
    }
    size_t pending = c->out_len - c->out_off;
    char *out = malloc(pending + len);
    if (!out) return -1;
    memcpy(out, c->out + c->out_off, pending);
    memcpy(out + pending, buf, len);
    free(c->out);
    c->out = out;
    c->out_off = 0;
    c->out_len = pending + len;
    return 0;
}

static int flush_out(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->out_off += (size_t)n;
    }
    return 0;
}

static int has_token(const char *hdrs, size_t len, const char *token) {
    /* case-insensitive search of "connection: <token>" in the header block */
    const char *p = hdrs, *end = hdrs + len;
    size_t tl = strlen(token);
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        if ((size_t)(eol - p) > 11 && strncasecmp(p, "connection:", 11) == 0) {
            const char *v = p + 11;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            if ((size_t)(eol - v) >= tl && strncasecmp(v, token, tl) == 0) return 1;
        }
        p = eol + 1;
    }
    return 0;
}

/* Answer every complete request in the buffer. Returns -1 to close now. */
static int handle_input(struct conn *c) {
    size_t off = 0;
    for (;;) {
        char *start = c->in + off;
        size_t avail = c->in_len - off;
        char *hdr_end = memmem(start, avail, "\r\n\r\n", 4);
        if (!hdr_end) break;
        size_t req_len = (size_t)(hdr_end - start) + 4;
        int http10 = memmem(start, req_len, "HTTP/1.0", 8) != NULL;
        int close_it = http10 ? !has_token(start, req_len, "keep-alive")
                              : has_token(start, req_len, "close");
        if (close_it) {
            if (conn_send(c, resp_close, resp_close_len) < 0) return -1;
            c->close_after = 1;
            c->in_len = 0;
            return c->out_off == c->out_len ? -1 : 0;
        }
        if (conn_send(c, resp_keep, resp_keep_len) < 0) return -1;
        off += req_len;
    }
    if (off) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
    if (c->in_len == INBUF) return -1; /* header larger than the buffer: not ours */
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: bench-httpd PORT [IPV4-ADDR]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    resp_keep_len = (size_t)snprintf(resp_keep, sizeof resp_keep,
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %zu\r\n\r\n%s",
        strlen(BODY), BODY);
    resp_close_len = (size_t)snprintf(resp_close, sizeof resp_close,
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %zu\r\n"
        "Connection: close\r\n\r\n%s", strlen(BODY), BODY);

    int port = atoi(argv[1]);
    int lfd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1, zero = 0;
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((unsigned short)port),
                              .sin6_addr = IN6ADDR_ANY_INIT};
    if (argc == 3) {                 /* IPv4 address given: skip the dual-stack socket */
        close(lfd);
        lfd = -1;
    }
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) < 0 ||
        bind(lfd, (struct sockaddr *)&a6, sizeof a6) < 0) {
        /* No IPv6 in this namespace: IPv4 only. */
        if (lfd >= 0) close(lfd);
        struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                                 .sin_addr.s_addr = htonl(INADDR_ANY)};
        if (argc == 3 && inet_pton(AF_INET, argv[2], &a4.sin_addr) != 1) {
            fprintf(stderr, "bench-httpd: bad IPv4 address %s\n", argv[2]);
            return 2;
        }
        lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (lfd < 0) die("socket");
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(lfd, (struct sockaddr *)&a4, sizeof a4) < 0) die("bind");
    }
    if (listen(lfd, 4096) < 0) die("listen");

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl");

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break; /* EAGAIN, or a transient error: epoll tells again */
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    if (!nc) { close(fd); continue; }
                    nc->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = nc};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) < 0) { close(fd); free(nc); }
                }
                continue;
            }
            int dead = 0;
            if (events[i].events & EPOLLOUT) {
                if (flush_out(c) < 0) dead = 1;
                else if (c->out_off == c->out_len) {
                    if (c->close_after) dead = 1;
                    else {
                        struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                    }
                }
            }
            if (!dead && !c->close_after && (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                for (;;) {
                    ssize_t r = recv(c->fd, c->in + c->in_len, INBUF - c->in_len, 0);
                    if (r > 0) {
                        c->in_len += (size_t)r;
                        if (handle_input(c) < 0) { dead = 1; break; }
                        if (c->close_after) break;
                        continue;
                    }
                    if (r == 0 || errno != EAGAIN) dead = 1;
                    break;
                }
                if (!dead && c->out_off < c->out_len) {
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                }
            }
            if (dead) conn_free(ep, c);
        }
    }
}
