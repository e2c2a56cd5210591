/* The kernel's ceiling for a splice(2) relay: a reference for perf.py's bulk figures.
 *
 *   splice_relay HOST PORT LIFETIME_S
 *
 * A minimal SOCKS5 server for the bench's load generator only: no-auth greeting, then
 * CONNECT to an IPv4 address (ATYP 1), nothing else. One thread per direction moves the
 * bytes socket -> pipe -> socket with blocking splice() calls through a 256 KiB pipe
 * (socksd's PIPE_SIZE): no user-space copy, no event loop, no Python, no policy. What it
 * reaches in a run is what a splice relay can reach on that machine, so socksd's
 * single-stream figure is read against it as well as against "no proxy".
 * Not a proxy to deploy: no timeouts, no limits, no logging. Exits after LIFETIME_S at
 * the latest (alarm), so a crashed parent never leaves it running. Built by perf.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_BYTES (256 << 10)

struct pump {
    int src, dst;
};

static int read_full(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* src -> pipe -> dst until EOF or an error, then pass the FIN on. */
static void *pump(void *arg) {
    struct pump *p = arg;
    int pipefd[2];
    if (pipe(pipefd) == 0) {
        fcntl(pipefd[1], F_SETPIPE_SZ, PIPE_BYTES);
        for (;;) {
            ssize_t n = splice(p->src, NULL, pipefd[1], NULL, PIPE_BYTES, SPLICE_F_MOVE);
            if (n <= 0) break;
            while (n > 0) {
                ssize_t m = splice(pipefd[0], NULL, p->dst, NULL, (size_t)n, SPLICE_F_MOVE);
                if (m <= 0) goto out;
                n -= m;
            }
        }
    out:
        close(pipefd[0]);
        close(pipefd[1]);
    }
    shutdown(p->dst, SHUT_WR);
    return NULL;
}

static void *tunnel(void *arg) {
    int client = (int)(long)arg, upstream = -1, one = 1;
    unsigned char buf[262];
    /* greeting: VER NMETHODS METHODS; request: VER CMD RSV ATYP=1 ADDR(4) PORT(2) */
    if (read_full(client, buf, 2) || read_full(client, buf + 2, buf[1])) goto done;
    if (write(client, "\x05\x00", 2) != 2) goto done;
    if (read_full(client, buf, 10) || buf[1] != 1 || buf[3] != 1) goto done;
    struct sockaddr_in to = {.sin_family = AF_INET};
    memcpy(&to.sin_addr, buf + 4, 4);
    memcpy(&to.sin_port, buf + 8, 2);
    upstream = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (upstream < 0 || connect(upstream, (struct sockaddr *)&to, sizeof to) != 0) {
        (void)!write(client, "\x05\x05\x00\x01\0\0\0\0\0\0", 10);
        goto done;
    }
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (write(client, "\x05\x00\x00\x01\0\0\0\0\0\0", 10) != 10) goto done;
    struct pump up = {client, upstream}, down = {upstream, client};
    pthread_t t;
    if (pthread_create(&t, NULL, pump, &up) != 0) goto done;
    pump(&down);
    pthread_join(t, NULL);
done:
    if (upstream >= 0) close(upstream);
    close(client);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: splice_relay HOST PORT LIFETIME_S\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    alarm((unsigned)atoi(argv[3]));
    int one = 1, listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(listener, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (inet_pton(AF_INET, argv[1], &at.sin_addr) != 1 ||
        bind(listener, (struct sockaddr *)&at, sizeof at) != 0 || listen(listener, 4096) != 0) {
        perror("splice_relay");
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 << 10);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) continue;
        pthread_t t;
        if (pthread_create(&t, &attr, tunnel, (void *)(long)client) != 0) close(client);
    }
}
