/* UDP echo load for bench/perf.py: datagrams through one SOCKS5 UDP association.
 *
 *   udpload --target HOST:PORT [--proxy HOST:PORT] --src IP [--total N] [--window W]
 *           [--size BYTES] [--deadline-s S]
 *
 * With --proxy: a TCP control connection, no-auth greeting, UDP ASSOCIATE announcing
 * our UDP socket, then every datagram carries the RFC 1928 section 7 header (IPv4).
 * Without: straight to the target ("no proxy"). Keeps W datagrams in flight; a datagram
 * not echoed within 200 ms is counted lost and its place reused. Prints one JSON line:
 * sent, received, lost, elapsed_s, rate (echoes per second), user_s, sys_s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void parse_addr(const char *text, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || colon - text >= (long)sizeof host) die("address");
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons(atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) die("inet_pton");
}

static void read_exact(int fd, uint8_t *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) die("control read");
        got += (size_t)r;
    }
}

int main(int argc, char **argv) {
    struct sockaddr_in target, proxy, src = {.sin_family = AF_INET};
    int use_proxy = 0, total = 200000, window = 32, size = 64, deadline_s = 60;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--target")) parse_addr(argv[i + 1], &target);
        else if (!strcmp(argv[i], "--proxy")) use_proxy = 1, parse_addr(argv[i + 1], &proxy);
        else if (!strcmp(argv[i], "--src")) inet_pton(AF_INET, argv[i + 1], &src.sin_addr);
        else if (!strcmp(argv[i], "--total")) total = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--window")) window = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--deadline-s")) deadline_s = atoi(argv[i + 1]);
    }
    if (size < 8 || size > 1400) size = 64;
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (udp < 0 || bind(udp, (struct sockaddr *)&src, sizeof src) < 0) die("udp bind");
    socklen_t sl = sizeof src;
    getsockname(udp, (struct sockaddr *)&src, &sl);

    struct sockaddr_in dest = target;
    uint8_t header[10];
    size_t hlen = 0;
    int ctl = -1;
    if (use_proxy) {
        ctl = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in csrc = src;
        csrc.sin_port = 0;
        if (bind(ctl, (struct sockaddr *)&csrc, sizeof csrc) < 0) die("ctl bind");
        if (connect(ctl, (struct sockaddr *)&proxy, sizeof proxy) < 0) die("ctl connect");
        uint8_t buf[16];
        if (write(ctl, "\x05\x01\x00", 3) != 3) die("greeting");
        read_exact(ctl, buf, 2);
        if (buf[0] != 5 || buf[1] != 0) die("method");
        uint8_t req[10] = {5, 3, 0, 1};
        memcpy(req + 4, &src.sin_addr, 4);
        memcpy(req + 8, &src.sin_port, 2);
        if (write(ctl, req, 10) != 10) die("request");
        read_exact(ctl, buf, 10);
        if (buf[1] != 0 || buf[3] != 1) die("associate refused");
        memset(&dest, 0, sizeof dest);
        dest.sin_family = AF_INET;
        memcpy(&dest.sin_addr, buf + 4, 4);
        memcpy(&dest.sin_port, buf + 8, 2);
        uint8_t h[10] = {0, 0, 0, 1};
        memcpy(h + 4, &target.sin_addr, 4);
        memcpy(h + 8, &target.sin_port, 2);
        memcpy(header, h, 10);
        hlen = 10;
    }
    uint8_t out[1500], in[2048];
    memcpy(out, header, hlen);
    memset(out + hlen, 'x', size);
    uint64_t *sent_at = calloc(window, sizeof *sent_at);
    int sent = 0, received = 0, lost = 0, in_flight = 0;
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)deadline_s * 1000000000ull;
    while ((sent < total || in_flight > 0) && now_ns() < deadline) {
        while (sent < total && in_flight < window) {
            int slot = -1;
            for (int s = 0; s < window; s++)
                if (!sent_at[s]) { slot = s; break; }
            if (slot < 0) break;
            uint32_t tag = (uint32_t)slot;
            memcpy(out + hlen, &tag, 4);
            if (sendto(udp, out, hlen + size, 0, (struct sockaddr *)&dest, sizeof dest) < 0) {
                if (errno == EAGAIN) break;
                die("sendto");
            }
            sent_at[slot] = now_ns();
            sent++, in_flight++;
        }
        struct pollfd pfd = {.fd = udp, .events = POLLIN};
        poll(&pfd, 1, 1);
        for (;;) {
            ssize_t n = recv(udp, in, sizeof in, 0);
            if (n < 0) break;
            if ((size_t)n < hlen + 4) continue;
            uint32_t tag;
            memcpy(&tag, in + hlen, 4);
            if (tag < (uint32_t)window && sent_at[tag]) {
                sent_at[tag] = 0;
                in_flight--, received++;
            }
        }
        uint64_t now = now_ns();
        for (int s = 0; s < window; s++)
            if (sent_at[s] && now - sent_at[s] > 200000000ull) {
                sent_at[s] = 0;
                in_flight--, lost++;
            }
    }
    double elapsed = (now_ns() - t0) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"sent\":%d,\"received\":%d,\"lost\":%d,\"elapsed_s\":%.6f,\"rate\":%.1f,"
           "\"user_s\":%.3f,\"sys_s\":%.3f}\n",
           sent, received, lost + in_flight, elapsed, elapsed > 0 ? received / elapsed : 0.0,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    if (ctl >= 0) close(ctl);
    return 0;
}
