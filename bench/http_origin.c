/* The origin server of bench/http_forward.py: the least an HTTP/1.1 origin can do.
 *
 *     http_origin HOST PORT LIFETIME_S
 *
 * Single-threaded, epoll, non-blocking. For every complete request head (up to
 * "\r\n\r\n"; GET only, no bodies) it answers "HTTP/1.1 200 OK", Content-Length: 64
 * and 64 bytes. The connection stays open for the next request unless the request
 * has a `Connection: close` header (name and value case-insensitive; also an HTTP/1.0
 * request without `Connection: keep-alive`), in which case it is closed once the
 * answer is written. Anything but GET is answered 405 and closed; a head over 8 KiB,
 * 400 and closed. Prints "ready" once listening (backlog 4096) and exits after
 * LIFETIME_S seconds (alarm), so it never outlives a crashed parent.
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
#include <sys/socket.h>
#include <unistd.h>

#define HEAD_MAX 8192
#define OUT_MAX 4096
#define BODY_LEN 64

static const char BODY[BODY_LEN + 1] =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
static const char OK_HEAD[] = "HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n";
static const char BAD_METHOD[] =
    "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
static const char TOO_LARGE[] =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

struct conn {
    int fd;
    size_t in_len;
    size_t out_len, out_sent;
    int closing;       /* close once `out` is written */
    unsigned mask;     /* the epoll events it is registered for */
    char in[HEAD_MAX];
    char out[OUT_MAX];
};

static struct conn **conns; /* by fd */
static size_t conns_cap;
static int ep;

static struct conn *conn_new(int fd) {
    if ((size_t)fd >= conns_cap) {
        size_t cap = conns_cap ? conns_cap : 1024;
        while (cap <= (size_t)fd)
            cap *= 2;
        struct conn **grown = realloc(conns, cap * sizeof *conns);
        if (!grown)
            return NULL;
        memset(grown + conns_cap, 0, (cap - conns_cap) * sizeof *conns);
        conns = grown;
        conns_cap = cap;
    }
    struct conn *c = malloc(sizeof *c);
    if (!c)
        return NULL;
    c->fd = fd;
    c->in_len = c->out_len = c->out_sent = 0;
    c->closing = 0;
    c->mask = EPOLLIN;
    conns[fd] = c;
    return c;
}

static void conn_close(struct conn *c) {
    conns[c->fd] = NULL;
    close(c->fd); /* also removes it from the epoll set */
    free(c);
}

/* Whether the head [head, head+len) asks for the connection to be closed. */
static int wants_close(const char *head, size_t len) {
    const char *end = head + len;
    const char *eol = memmem(head, len, "\r\n", 2);
    if (!eol)
        return 1;
    /* request line: METHOD SP TARGET SP HTTP/1.x */
    int http10 = eol - head >= 8 && memcmp(eol - 8, "HTTP/1.0", 8) == 0;
    int keep_alive = 0;
    const char *line = eol + 2;
    while (line < end) {
        const char *next = memmem(line, end - line, "\r\n", 2);
        if (!next)
            next = end;
        if (next - line > 11 && strncasecmp(line, "connection:", 11) == 0) {
            /* the value's tokens, comma-separated */
            const char *p = line + 11;
            while (p < next) {
                while (p < next && (*p == ' ' || *p == '\t' || *p == ','))
                    p++;
                const char *tok = p;
                while (p < next && *p != ',' && *p != ' ' && *p != '\t')
                    p++;
                if (p - tok == 5 && strncasecmp(tok, "close", 5) == 0)
                    return 1;
                if (p - tok == 10 && strncasecmp(tok, "keep-alive", 10) == 0)
                    keep_alive = 1;
            }
        }
        line = next + 2;
    }
    return http10 && !keep_alive;
}

static int queue_out(struct conn *c, const char *data, size_t len) {
    if (c->out_len + len > OUT_MAX)
        return -1;
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    return 0;
}

/* Write what is owed; 1: all written, 0: the rest waits for EPOLLOUT, -1: error. */
static int flush_out(struct conn *c) {
    while (c->out_sent < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_sent, c->out_len - c->out_sent,
                         MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        c->out_sent += (size_t)n;
    }
    c->out_len = c->out_sent = 0;
    return 1;
}

static void set_mask(struct conn *c, unsigned events) {
    if (c->mask == events)
        return;
    struct epoll_event ev = {.events = events, .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->mask = events;
}

/* Answer the complete heads in the input, as many as `out` takes; the rest waits.
 * Returns the bytes of input consumed. */
static size_t serve_heads(struct conn *c) {
    size_t start = 0;
    while (!c->closing) {
        char *head = c->in + start;
        size_t avail = c->in_len - start;
        char *end = memmem(head, avail, "\r\n\r\n", 4);
        if (!end) {
            if (start == 0 && c->in_len == HEAD_MAX &&
                queue_out(c, TOO_LARGE, sizeof TOO_LARGE - 1) == 0)
                c->closing = 1;
            break;
        }
        size_t len = (size_t)(end - head) + 4;
        if (memcmp(head, "GET ", 4) != 0) {
            if (queue_out(c, BAD_METHOD, sizeof BAD_METHOD - 1) < 0)
                break;
            c->closing = 1;
            break;
        }
        if (c->out_len + sizeof OK_HEAD - 1 + BODY_LEN > OUT_MAX)
            break; /* `out` is full: the next heads after it is written */
        queue_out(c, OK_HEAD, sizeof OK_HEAD - 1);
        queue_out(c, BODY, BODY_LEN);
        if (wants_close(head, len))
            c->closing = 1;
        start += len;
    }
    if (start) {
        memmove(c->in, c->in + start, c->in_len - start);
        c->in_len -= start;
    }
    return start;
}

/* Answer what can be answered, write it, and close or wait as the answers say. */
static void progress(struct conn *c) {
    int r;
    do { /* pipelined heads beyond what `out` holds: served once it is written */
        size_t used = serve_heads(c);
        r = flush_out(c);
        if (!used)
            break;
    } while (r == 1 && !c->closing);
    if (r < 0 || (r == 1 && c->closing)) {
        conn_close(c);
        return;
    }
    /* Output pending: stop reading until it is written. */
    set_mask(c, r == 0 ? EPOLLOUT : EPOLLIN);
}

static void on_readable(struct conn *c) {
    ssize_t n = recv(c->fd, c->in + c->in_len, HEAD_MAX - c->in_len, 0);
    if (n < 0) {
        if (errno != EINTR && errno != EAGAIN)
            conn_close(c);
        return;
    }
    if (n == 0) { /* the client is done */
        conn_close(c);
        return;
    }
    c->in_len += (size_t)n;
    progress(c);
}

static void on_writable(struct conn *c) {
    int r = flush_out(c);
    if (r < 0 || (r == 1 && c->closing)) {
        conn_close(c);
        return;
    }
    if (r == 1)
        progress(c); /* heads that waited for room, then reading again */
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT LIFETIME_S\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    alarm((unsigned)atoi(argv[3]));

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        perror("socket");
        return 1;
    }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", argv[1]);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0)
                        break; /* EAGAIN, or EMFILE & co: retried on the next event */
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *c = conn_new(cfd);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    if (!c || epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev) < 0) {
                        if (c)
                            conn_close(c);
                        else
                            close(cfd);
                    }
                }
                continue;
            }
            struct conn *c = (size_t)fd < conns_cap ? conns[fd] : NULL;
            if (!c)
                continue; /* closed earlier in this batch */
            if (events[i].events & EPOLLOUT)
                on_writable(c);
            else if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
    }
}
