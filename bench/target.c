/* Benchmark targets for bench/perf.py: an echo server and a bulk sender in one epoll loop.
 *
 *   target HOST ECHO_PORT BULK_PORT LIFETIME_S
 *
 * Echo port: every byte read is written back; the connection closes on the peer's EOF.
 *   The same port number over UDP echoes every datagram to its sender.
 * Bulk port: the client sends an 8-byte big-endian byte count; the target sends that many
 *   bytes (zeros) with sendfile() from a memfd, so the sender costs no user-space copy,
 *   then closes.
 * Prints "ready\n" on stdout once both ports listen. Exits after LIFETIME_S at the latest
 * (alarm), so a crashed parent never leaves it running. Built by perf.py with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#define ZEROS_SIZE (4 << 20) /* memfd size: one sendfile() call sends at most this */
#define ECHO_BUF 16384
#define MAX_EVENTS 256
#define ACCEPT_BATCH 64

enum kind { FREE = 0, ECHO, BULK_REQ, BULK_SEND };

struct conn {
    enum kind kind;
    uint32_t pending;    /* echo: bytes in buf not yet written back */
    uint32_t off;        /* echo: start of pending bytes */
    uint8_t req_len;     /* bulk: request bytes read so far */
    uint8_t req[8];
    uint64_t remaining;  /* bulk: bytes still to send */
    off_t file_off;      /* bulk: position in the memfd */
    char *buf;           /* echo: allocated on first partial write only */
};

static struct conn *conns;
static int nconns;
static int epfd, zeros_fd, echo_lfd, bulk_lfd, udp_fd;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int listen_on(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("inet_pton");
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void watch(int fd, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, op, fd, &ev) < 0) die("epoll_ctl");
}

static void drop(int fd) {
    free(conns[fd].buf);
    memset(&conns[fd], 0, sizeof conns[fd]);
    close(fd); /* close() also removes it from the epoll set */
}

static void accept_some(int lfd, enum kind kind) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != ECONNABORTED) perror("accept4");
            return;
        }
        if (fd >= nconns) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[fd].kind = kind;
        watch(fd, EPOLLIN, EPOLL_CTL_ADD);
    }
}

/* Echo: read, write back; keep what could not be written and stop reading until flushed. */
static void on_echo(int fd, uint32_t events) {
    struct conn *c = &conns[fd];
    char stack[ECHO_BUF];
    if (c->pending) {
        ssize_t n = send(fd, c->buf + c->off, c->pending, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN) return drop(fd);
        if (n > 0) {
            c->off += n;
            c->pending -= n;
        }
        if (c->pending) return;
        watch(fd, EPOLLIN, EPOLL_CTL_MOD);
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    ssize_t n = recv(fd, stack, sizeof stack, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN)) return drop(fd);
    if (n < 0) return;
    ssize_t w = send(fd, stack, n, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN) return drop(fd);
    if (w < 0) w = 0;
    if (w < n) {
        if (!c->buf && !(c->buf = malloc(ECHO_BUF))) die("malloc");
        memcpy(c->buf, stack + w, n - w);
        c->off = 0;
        c->pending = n - w;
        watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
    }
}

static void on_bulk(int fd) {
    struct conn *c = &conns[fd];
    if (c->kind == BULK_REQ) {
        ssize_t n = recv(fd, c->req + c->req_len, sizeof c->req - c->req_len, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) return drop(fd);
        if (n < 0) return;
        c->req_len += n;
        if (c->req_len < sizeof c->req) return;
        for (int i = 0; i < 8; i++) c->remaining = c->remaining << 8 | c->req[i];
        c->kind = BULK_SEND;
        watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
    }
    while (c->remaining) {
        if (c->file_off >= ZEROS_SIZE) c->file_off = 0;
        size_t chunk = ZEROS_SIZE - c->file_off;
        if (chunk > c->remaining) chunk = c->remaining;
        ssize_t n = sendfile(fd, zeros_fd, &c->file_off, chunk);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) return drop(fd);
        c->remaining -= n;
    }
    drop(fd); /* all sent: close; the kernel still delivers the queued bytes, then FIN */
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST ECHO_PORT BULK_PORT LIFETIME_S\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    alarm(atoi(argv[4])); /* default SIGALRM action: terminate */

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; /* the idle-tunnel test holds one fd per tunnel here */
    setrlimit(RLIMIT_NOFILE, &rl);
    nconns = (int)rl.rlim_cur;
    if (!(conns = calloc(nconns, sizeof *conns))) die("calloc");

    zeros_fd = memfd_create("zeros", MFD_CLOEXEC);
    if (zeros_fd < 0 || ftruncate(zeros_fd, ZEROS_SIZE) < 0) die("memfd");
    char *page = calloc(1, 1 << 20); /* write real zero pages: a hole would be read each time */
    for (int i = 0; i < ZEROS_SIZE / (1 << 20); i++)
        if (pwrite(zeros_fd, page, 1 << 20, (off_t)i << 20) != 1 << 20) die("pwrite");
    free(page);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    echo_lfd = listen_on(argv[1], atoi(argv[2]));
    bulk_lfd = listen_on(argv[1], atoi(argv[3]));
    udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (udp_fd < 0 || inet_pton(AF_INET, argv[1], &ua.sin_addr) != 1 ||
        bind(udp_fd, (struct sockaddr *)&ua, sizeof ua) < 0)
        die("udp echo");
    watch(udp_fd, EPOLLIN, EPOLL_CTL_ADD);
    watch(echo_lfd, EPOLLIN, EPOLL_CTL_ADD);
    watch(bulk_lfd, EPOLLIN, EPOLL_CTL_ADD);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) { /* bounded by alarm() above and by the parent's kill */
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == udp_fd) {
                char dgram[2048];
                struct sockaddr_storage from;
                for (int k = 0; k < 64; k++) { /* bounded burst, like the TCP accepts */
                    socklen_t fl = sizeof from;
                    ssize_t m = recvfrom(udp_fd, dgram, sizeof dgram, 0,
                                         (struct sockaddr *)&from, &fl);
                    if (m < 0) break;
                    sendto(udp_fd, dgram, (size_t)m, 0, (struct sockaddr *)&from, fl);
                }
            } else if (fd == echo_lfd) accept_some(fd, ECHO);
            else if (fd == bulk_lfd) accept_some(fd, BULK_REQ);
            else if (conns[fd].kind == ECHO) on_echo(fd, evs[i].events);
            else if (conns[fd].kind != FREE) on_bulk(fd);
        }
    }
}
