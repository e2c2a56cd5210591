/* Load generator for bench/perf.py: one epoll loop, non-blocking sockets, C at a time.
 *
 *   loadgen MODE [--proxy IP:PORT] --target IP:PORT [--concurrency C] [--total N]
 *           [--bytes B] [--discard] [--src IP --src-count K] [--timeout-ms T]
 *           [--deadline-s D] [--auth USER:PASSWORD] [--target-name NAME] [--http]
 *
 * MODE tunnels: each tunnel = TCP connect (to the proxy, or straight to the target when
 *   there is no --proxy), SOCKS5 no-auth greeting, wait for the method, CONNECT to the
 *   target (ATYP IPv4), wait for the reply, send 64 bytes, read the 64-byte echo, close.
 *   N tunnels, C in flight. TTFB = connect() start to the first echo byte.
 * --auth USER:PASSWORD (the customer's path): the greeting offers only method 0x02 and,
 *   once the proxy picks it, the RFC 1929 sub-negotiation (VER 1, ULEN, UNAME, PLEN,
 *   PASSWD) follows; a status other than 0 fails the tunnel as "auth:<status>".
 * --target-name NAME: CONNECT names the target (ATYP 0x03, NAME, the --target port)
 *   instead of sending --target's IPv4 address; the proxy resolves NAME. Without these
 *   two options every byte on the wire is as it was before they existed.
 * --http: an HTTP proxy's CONNECT instead of SOCKS5 (RFC 9110 section 9.3.6):
 *   "CONNECT HOST:PORT HTTP/1.1", Host, and with --auth a Proxy-Authorization: Basic
 *   header; HOST is --target-name or --target's IP. The response head must say 200;
 *   another status fails the tunnel as "http:<status>".
 * MODE hold: open N tunnels (C handshakes in flight) and keep them idle; print
 *   "held N" on stdout, then hold until stdin is readable (a line or EOF) or D seconds
 *   passed since the start, then close them all.
 * MODE bulk: C streams (N is ignored); each sends an 8-byte big-endian count B/C to the
 *   target's bulk port after the handshake, reads that many bytes, closes. With
 *   --discard it reads them with MSG_TRUNC: TCP frees them without copying them out.
 * Client sockets bind K source addresses IP, IP+1, ... with IP_BIND_ADDRESS_NO_PORT, so
 * the client side has K ephemeral port ranges towards the proxy (TIME_WAIT is ours:
 * the client closes first).
 * Prints one JSON object on stdout at the end. Failure kinds: "connect:<ERRNO>",
 * "reply:<code>", "timeout:<stage>", "short_read:<stage>" (EOF or reset before the
 * expected bytes), "bad_method" (another method than offered: "method:255" when the
 * proxy accepts none), "auth:<status>", "bad_auth_version", "bad_echo", "send:<ERRNO>",
 * "closed_while_held".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define PAYLOAD 64
#define MAX_EVENTS 512
#define BULK_BUF (256 << 10)
#define MAX_KINDS 64
#define STDIN_TAG UINT32_MAX

enum mode { TUNNELS, HOLD, BULK };
enum stage { FREE = 0, CONNECTING, METHOD, AUTH, REPLY, ECHO, STREAM, HELD };
static const char *stage_names[] = {"free", "connect", "method", "auth", "reply", "echo",
                                    "stream", "held"};

struct conn {
    int fd;
    enum stage stage;
    uint32_t got;       /* bytes of the current stage's answer read so far */
    uint64_t t0;        /* ns, connect() start */
    uint64_t received;  /* bulk */
    uint8_t buf[272];   /* method / reply / echo bytes */
};

static enum mode mode;
static int use_proxy;
static struct sockaddr_in proxy_addr, target_addr;
static int concurrency = 64, total = 20000, src_count;
static uint32_t src_base;
static uint64_t bulk_bytes = 1ull << 30, per_stream;
static int bulk_flags; /* MSG_TRUNC with --discard: TCP drops the bytes, no copy to us */
static uint64_t timeout_ns = 10ull * 1000000000, deadline_ns = 300ull * 1000000000;
/* --http: the CONNECT request head, built once (0: SOCKS5) */
static char http_req[2048];
static size_t http_req_len;
static const char *auth_text; /* --auth as given, for --http's Basic credentials */
/* --auth: the RFC 1929 request, built once; auth_len 0 = no-auth (the default path) */
static uint8_t auth_req[3 + 2 * 255];
static size_t auth_len;
/* --target-name: the CONNECT request with ATYP 0x03, built once; 0 = ATYP IPv4 */
static uint8_t name_req[4 + 1 + 255 + 2];
static size_t name_req_len;

static int epfd;
static struct conn *conns;
static int nslots;
static int *free_slots, nfree;
static int started, finished, ok, in_flight, held;
static uint32_t *ttfb_us;
static int nttfb;
static uint8_t payload[PAYLOAD];
static char bulk_buf[BULK_BUF];

static struct { char name[40]; int count; } kinds[MAX_KINDS];
static int nkinds;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void count_failure(const char *kind, const char *detail) {
    char name[40];
    snprintf(name, sizeof name, detail ? "%s:%s" : "%s", kind, detail);
    for (int i = 0; i < nkinds; i++)
        if (!strcmp(kinds[i].name, name)) {
            kinds[i].count++;
            return;
        }
    if (nkinds == MAX_KINDS) return;
    strcpy(kinds[nkinds].name, name);
    kinds[nkinds++].count = 1;
}

static const char *errname(int err) {
    const char *n = strerrorname_np(err);
    return n ? n : "unknown";
}

static void finish(int i, int success) {
    struct conn *c = &conns[i];
    if (c->stage == HELD) held--;
    else in_flight--;
    close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->stage = FREE;
    finished++;
    ok += success;
    free_slots[nfree++] = i;
}

static void fail(int i, const char *kind, const char *detail) {
    count_failure(kind, detail);
    finish(i, 0);
}

static void watch(int i, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, op, conns[i].fd, &ev) < 0) die("epoll_ctl");
}

/* Small writes on a fresh socket: the send buffer is empty, so all or nothing. */
static int send_all(int i, const void *data, size_t len) {
    ssize_t n = send(conns[i].fd, data, len, MSG_NOSIGNAL);
    if (n == (ssize_t)len) return 0;
    fail(i, "send", n < 0 ? errname(errno) : "partial");
    return -1;
}

static void tunnel_ready(int i) {
    struct conn *c = &conns[i];
    c->got = 0;
    if (mode == TUNNELS) {
        if (send_all(i, payload, PAYLOAD) == 0) c->stage = ECHO;
    } else if (mode == BULK) {
        uint8_t req[8];
        for (int k = 0; k < 8; k++) req[k] = (uint8_t)(per_stream >> (56 - 8 * k));
        if (send_all(i, req, sizeof req) == 0) c->stage = STREAM;
    } else {
        c->stage = HELD;
        in_flight--;
        held++;
    }
}

static void start_one(void) {
    int i = free_slots[--nfree];
    struct conn *c = &conns[i];
    int one = 1;
    started++;
    in_flight++;
    c->got = 0;
    c->received = 0;
    c->t0 = now_ns();
    c->stage = CONNECTING;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        /* no fd: count it like a connect failure, the slot stays free */
        count_failure("connect", errname(errno));
        c->stage = FREE;
        in_flight--;
        finished++;
        free_slots[nfree++] = i;
        return;
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (src_count) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(src_base + (uint32_t)(started % src_count));
        /* NO_PORT: the port is chosen at connect() against the full 4-tuple */
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0)
            return fail(i, "connect", errname(errno));
    }
    struct sockaddr_in *dst = use_proxy ? &proxy_addr : &target_addr;
    if (connect(c->fd, (struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS)
        return fail(i, "connect", errname(errno));
    watch(i, EPOLLOUT, EPOLL_CTL_ADD);
}

static void on_connected(int i) {
    struct conn *c = &conns[i];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) return fail(i, "connect", errname(err));
    watch(i, EPOLLIN, EPOLL_CTL_MOD);
    if (!use_proxy) return tunnel_ready(i);
    if (http_req_len) {
        c->got = 0;
        if (send_all(i, (const uint8_t *)http_req, http_req_len) == 0) c->stage = REPLY;
        return;
    }
    static const uint8_t greeting[] = {5, 1, 0}; /* RFC 1928: VER, NMETHODS, no-auth */
    static const uint8_t greeting_auth[] = {5, 1, 2}; /* the same, username/password */
    const uint8_t *hello = auth_len ? greeting_auth : greeting;
    if (send_all(i, hello, sizeof greeting) == 0) c->stage = METHOD;
}

/* The CONNECT request, once the method (and the password, if any) went through. */
static void send_connect(int i) {
    struct conn *c = &conns[i];
    c->got = 0;
    if (name_req_len) {
        if (send_all(i, name_req, name_req_len) == 0) c->stage = REPLY;
        return;
    }
    uint8_t req[10] = {5, 1, 0, 1}; /* VER, CMD=CONNECT, RSV, ATYP=IPv4 */
    memcpy(req + 4, &target_addr.sin_addr, 4);
    memcpy(req + 8, &target_addr.sin_port, 2);
    if (send_all(i, req, sizeof req) == 0) c->stage = REPLY;
}

/* Bytes of the CONNECT reply, known once its first 5 bytes are in (RFC 1928 section 6). */
static uint32_t reply_len(const struct conn *c) {
    if (c->got < 5) return 5;
    switch (c->buf[3]) {
    case 1: return 4 + 4 + 2;
    case 4: return 4 + 16 + 2;
    case 3: return 4 + 1 + c->buf[4] + 2;
    default: return 0;
    }
}

/* --http: read the CONNECT response head (byte by byte up to its blank line: the
 * tunnel's first bytes must stay in the socket for the echo), then the tunnel. */
static void on_http_response(int i) {
    struct conn *c = &conns[i];
    for (;;) {
        if (c->got >= sizeof c->buf) return fail(i, "http", "head_too_long");
        ssize_t n = recv(c->fd, c->buf + c->got, 1, 0);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) return fail(i, "short_read", stage_names[c->stage]);
        c->got += 1;
        if (c->got >= 4 && !memcmp(c->buf + c->got - 4, "\r\n\r\n", 4)) break;
    }
    if (c->got < 12 || memcmp(c->buf, "HTTP/1.", 7) || memcmp(c->buf + 9, "200", 3)) {
        char code[4] = {0};
        if (c->got >= 12) memcpy(code, c->buf + 9, 3);
        return fail(i, "http", code);
    }
    return tunnel_ready(i);
}

static void on_readable(int i) {
    struct conn *c = &conns[i];
    uint32_t want;
    if (c->stage == STREAM) {
        for (int k = 0; k < 16; k++) { /* bounded per wakeup, so other streams get a turn */
            ssize_t n = recv(c->fd, bulk_buf, sizeof bulk_buf, bulk_flags);
            if (n < 0 && errno == EAGAIN) return;
            if (n <= 0) return fail(i, "short_read", stage_names[c->stage]);
            c->received += n;
            if (c->received >= per_stream) return finish(i, 1);
        }
        return;
    }
    if (http_req_len && c->stage == REPLY) return on_http_response(i);
    switch (c->stage) {
    case METHOD: want = 2; break;
    case AUTH: want = 2; break;
    case REPLY: want = reply_len(c); break;
    case ECHO: want = PAYLOAD; break;
    default: want = sizeof c->buf; break; /* HELD: anything means the proxy spoke */
    }
    if (want == 0) return fail(i, "reply", "bad_atyp");
    ssize_t n = recv(c->fd, c->buf + c->got, want - c->got, 0);
    if (n < 0 && errno == EAGAIN) return;
    if (c->stage == HELD) return fail(i, "closed_while_held", NULL);
    if (n <= 0) return fail(i, "short_read", stage_names[c->stage]);
    if (c->stage == ECHO && c->got == 0) {
        uint64_t us = (now_ns() - c->t0) / 1000;
        ttfb_us[nttfb++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    }
    c->got += n;
    if (c->stage == REPLY && c->got >= 2 && c->buf[1] != 0) {
        char code[8];
        snprintf(code, sizeof code, "%d", c->buf[1]);
        return fail(i, "reply", code);
    }
    if (c->stage == REPLY && c->got == 5) want = reply_len(c); /* now known */
    if (c->got < want) return;
    switch (c->stage) {
    case METHOD:
        if (c->buf[0] == 5 && c->buf[1] == 0xff) return fail(i, "method", "255");
        if (c->buf[0] != 5 || c->buf[1] != (auth_len ? 2 : 0)) return fail(i, "bad_method", NULL);
        if (!auth_len) return send_connect(i);
        c->got = 0;
        if (send_all(i, auth_req, auth_len) == 0) c->stage = AUTH;
        return;
    case AUTH: /* RFC 1929: VER 1, STATUS (0 = success) */
        if (c->buf[0] != 1) return fail(i, "bad_auth_version", NULL);
        if (c->buf[1] != 0) {
            char code[8];
            snprintf(code, sizeof code, "%d", c->buf[1]);
            return fail(i, "auth", code);
        }
        return send_connect(i);
    case REPLY: return tunnel_ready(i);
    case ECHO:
        if (memcmp(c->buf, payload, PAYLOAD)) return fail(i, "bad_echo", NULL);
        return finish(i, 1);
    default: return;
    }
}

static void expire(uint64_t now) {
    for (int i = 0; i < nslots; i++) {
        struct conn *c = &conns[i];
        if (c->stage != FREE && c->stage != HELD && now - c->t0 > timeout_ns)
            fail(i, "timeout", stage_names[c->stage]);
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t pct(double p) {
    if (!nttfb) return 0;
    int k = (int)(p / 100.0 * nttfb + 0.999999) - 1; /* nearest rank */
    if (k < 0) k = 0;
    if (k >= nttfb) k = nttfb - 1;
    return ttfb_us[k];
}

static void parse_addr(const char *text, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || colon - text >= (long)sizeof host) die("address must be IP:PORT");
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    sa->sin_family = AF_INET;
    sa->sin_port = htons(atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) die("address must be IPv4");
}

/* --auth USER:PASSWORD -> VER 1, ULEN, UNAME, PLEN, PASSWD (RFC 1929 section 2). */
static void set_auth(const char *text) {
    const char *colon = strchr(text, ':');
    size_t ulen = colon ? (size_t)(colon - text) : 0, plen = colon ? strlen(colon + 1) : 0;
    if (!colon || ulen < 1 || ulen > 255 || plen < 1 || plen > 255) {
        fprintf(stderr, "--auth takes USER:PASSWORD, each 1..255 bytes\n");
        exit(2);
    }
    auth_req[0] = 1;
    auth_req[1] = (uint8_t)ulen;
    memcpy(auth_req + 2, text, ulen);
    auth_req[2 + ulen] = (uint8_t)plen;
    memcpy(auth_req + 3 + ulen, colon + 1, plen);
    auth_len = 3 + ulen + plen;
}

/* --http: the CONNECT head; Basic credentials from --auth (RFC 7617). */
static void set_http(const char *name) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char host[300], cred[800] = "";
    if (name) snprintf(host, sizeof host, "%s", name);
    else inet_ntop(AF_INET, &target_addr.sin_addr, host, sizeof host);
    if (auth_text) {
        const unsigned char *s = (const unsigned char *)auth_text;
        size_t len = strlen(auth_text), k = 0;
        char enc[700];
        for (size_t j = 0; j < len; j += 3) {
            uint32_t v = (uint32_t)s[j] << 16 | (j + 1 < len ? (uint32_t)s[j + 1] << 8 : 0) |
                         (j + 2 < len ? s[j + 2] : 0);
            enc[k++] = b64[v >> 18 & 63];
            enc[k++] = b64[v >> 12 & 63];
            enc[k++] = j + 1 < len ? b64[v >> 6 & 63] : '=';
            enc[k++] = j + 2 < len ? b64[v & 63] : '=';
        }
        enc[k] = 0;
        snprintf(cred, sizeof cred, "Proxy-Authorization: Basic %s\r\n", enc);
    }
    int n = snprintf(http_req, sizeof http_req, "CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n",
                     host, ntohs(target_addr.sin_port), host, ntohs(target_addr.sin_port), cred);
    http_req_len = (size_t)n;
}

/* --target-name NAME -> CONNECT with ATYP 0x03: VER, CMD, RSV, 3, LEN, NAME, PORT. */
static void set_target_name(const char *name) {
    size_t len = strlen(name);
    if (len < 1 || len > 255) {
        fprintf(stderr, "--target-name takes 1..255 bytes\n");
        exit(2);
    }
    uint8_t head[5] = {5, 1, 0, 3, (uint8_t)len};
    memcpy(name_req, head, sizeof head);
    memcpy(name_req + 5, name, len);
    memcpy(name_req + 5 + len, &target_addr.sin_port, 2);
    name_req_len = 5 + len + 2;
}

static void parse_args(int argc, char **argv) {
    static const struct option opts[] = {
        {"proxy", 1, 0, 'p'},   {"target", 1, 0, 't'},     {"concurrency", 1, 0, 'c'},
        {"total", 1, 0, 'n'},   {"bytes", 1, 0, 'b'},      {"src", 1, 0, 's'},
        {"src-count", 1, 0, 'k'}, {"timeout-ms", 1, 0, 'o'}, {"deadline-s", 1, 0, 'd'},
        {"discard", 0, 0, 'x'}, {"auth", 1, 0, 'a'},      {"target-name", 1, 0, 'N'},
        {"http", 0, 0, 'H'},    {0, 0, 0, 0}};
    int http = 0;
    int opt, have_target = 0;
    const char *name = NULL;
    if (argc < 2) die("usage: loadgen tunnels|hold|bulk --target IP:PORT ...");
    if (!strcmp(argv[1], "tunnels")) mode = TUNNELS;
    else if (!strcmp(argv[1], "hold")) mode = HOLD;
    else if (!strcmp(argv[1], "bulk")) mode = BULK;
    else die("mode must be tunnels, hold or bulk");
    optind = 2;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'p': parse_addr(optarg, &proxy_addr); use_proxy = 1; break;
        case 't': parse_addr(optarg, &target_addr); have_target = 1; break;
        case 'c': concurrency = atoi(optarg); break;
        case 'n': total = atoi(optarg); break;
        case 'b': bulk_bytes = strtoull(optarg, NULL, 10); break;
        case 's': {
            struct in_addr a;
            if (inet_pton(AF_INET, optarg, &a) != 1) die("--src must be IPv4");
            src_base = ntohl(a.s_addr);
            break;
        }
        case 'k': src_count = atoi(optarg); break;
        case 'o': timeout_ns = strtoull(optarg, NULL, 10) * 1000000; break;
        case 'd': deadline_ns = strtoull(optarg, NULL, 10) * 1000000000; break;
        case 'x': bulk_flags = MSG_TRUNC; break;
        case 'a': set_auth(optarg); auth_text = optarg; break;
        case 'H': http = 1; break;
        case 'N': name = optarg; break;
        default: exit(2);
        }
    }
    if (!have_target || concurrency < 1 || total < 1) die("need --target, C >= 1, N >= 1");
    if (http) set_http(name);
    else if (name) set_target_name(name);
    if (mode == BULK) {
        total = concurrency;
        per_stream = bulk_bytes / concurrency;
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; /* hold mode keeps one fd per tunnel */
    setrlimit(RLIMIT_NOFILE, &rl);
    for (int k = 0; k < PAYLOAD; k++) payload[k] = (uint8_t)('A' + k % 26);

    nslots = mode == HOLD ? total : concurrency;
    conns = calloc(nslots, sizeof *conns);
    free_slots = calloc(nslots, sizeof *free_slots);
    ttfb_us = calloc(total, sizeof *ttfb_us);
    if (!conns || !free_slots || !ttfb_us) die("calloc");
    for (int i = nslots - 1; i >= 0; i--) {
        conns[i].fd = -1;
        free_slots[nfree++] = i;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    uint64_t t_start = now_ns(), t_end = t_start, last_scan = t_start;
    struct epoll_event evs[MAX_EVENTS];
    int announced = 0, stop_holding = 0;
    /* Bounded: ends when every tunnel finished, or at the deadline. */
    for (;;) {
        uint64_t now = now_ns();
        if (now - t_start > deadline_ns) break;
        if (mode != HOLD && finished >= total) break;
        if (mode == HOLD && stop_holding) break;
        while (started < total && in_flight < concurrency && nfree > 0) start_one();
        if (mode == HOLD && !announced && started >= total && in_flight == 0) {
            t_end = now_ns();
            printf("held %d\n", held);
            fflush(stdout);
            announced = 1;
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) stop_holding = 1;
        }
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 20);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            uint32_t i = evs[e].data.u32;
            if (i == STDIN_TAG) {
                stop_holding = 1;
                continue;
            }
            if (conns[i].stage == CONNECTING) on_connected(i);
            else if (conns[i].stage != FREE) on_readable(i);
        }
        now = now_ns();
        if (now - last_scan > 50000000) {
            expire(now);
            last_scan = now;
        }
    }
    if (mode != HOLD) t_end = now_ns();
    int unfinished = 0;
    for (int i = 0; i < nslots; i++)
        if (conns[i].stage != FREE && conns[i].stage != HELD) unfinished++;
    for (int i = 0; i < unfinished; i++) count_failure("timeout", "deadline");
    for (int i = started; mode != HOLD && i < total; i++) count_failure("timeout", "not_started");
    for (int i = 0; i < nslots; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);

    qsort(ttfb_us, nttfb, sizeof *ttfb_us, cmp_u32);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    double sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    double elapsed = (t_end - t_start) / 1e9;
    uint64_t bytes = mode == BULK ? per_stream * (uint64_t)ok : 0;
    printf("{\"mode\":\"%s\",\"ok\":%d,\"held\":%d,\"started\":%d,\"elapsed_s\":%.6f,"
           "\"rate\":%.1f,\"bytes\":%llu,\"mib_s\":%.1f,"
           "\"ttfb_us\":{\"p50\":%u,\"p99\":%u,\"max\":%u,\"n\":%d},"
           "\"user_s\":%.3f,\"sys_s\":%.3f,\"failures\":{",
           argv[1], mode == HOLD ? held : ok, held, started, elapsed,
           elapsed > 0 ? (mode == HOLD ? held : ok) / elapsed : 0.0, (unsigned long long)bytes,
           elapsed > 0 ? bytes / elapsed / (1 << 20) : 0.0, pct(50), pct(99),
           nttfb ? ttfb_us[nttfb - 1] : 0, nttfb, user, sys);
    for (int k = 0; k < nkinds; k++)
        printf("%s\"%s\":%d", k ? "," : "", kinds[k].name, kinds[k].count);
    printf("}}\n");
    return 0;
}
