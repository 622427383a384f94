/*
 * Open-loop HTTP/1.1 load generator for benchmarks/proxy_http1.py: the same schedule,
 * measurement and JSON output as that module's Python paced_load(), at a fraction of its CPU.
 *
 * Why C: the Python generator costs ~52 us of CPU per request, half a core at 10,000 req/s on
 * a 2-core box that also runs both proxies and the backend, so it inflated every path's tail.
 *
 * Usage: paced_load PORT RATE DURATION CONNS REQUEST
 *   Opens CONNS keep-alive TCP connections to 127.0.0.1:PORT (TCP_NODELAY), sends REQUEST (the
 *   exact request bytes) once on each to warm up, then schedules requests at
 *   start + i / RATE (CLOCK_MONOTONIC) for DURATION seconds. A request goes out on an idle
 *   connection at its slot; when every connection is busy the slot waits in a FIFO backlog and
 *   goes out when one frees up. Each latency is completion time minus *scheduled* time, so
 *   queueing behind a busy connection counts (no coordinated omission).
 *   Prints {"rps", "total", "p50", "p99" (ms), "errors" (non-2xx)} as one JSON line.
 *
 * Exit status: 0 on success; 1 if a connection fails, a response is malformed, or responses
 * are still missing DRAIN_SECONDS after the schedule ends (message on stderr); 2 for bad usage.
 *
 * Build: cc -O2 -Wall -Wextra -o paced_load paced_load.c   (Linux >= 5.11 for epoll_pwait2)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_SECONDS 10
#define WARMUP_SECONDS 10
#define HEAD_MAX 16384
#define MAX_CONNS 1024
#define NS 1000000000LL

struct conn {
    int fd;
    int busy;           /* a request is outstanding */
    int64_t due;        /* its scheduled time */
    int in_body;        /* head parsed, counting body bytes */
    int64_t body_left;  /* body bytes still expected */
    int ok;             /* status line starts "HTTP/1.1 2" */
    size_t head_len;
    char head[HEAD_MAX];
};

static void die(const char *what)
{
    fprintf(stderr, "paced_load: %s\n", what);
    exit(1);
}

static void die_errno(const char *what)
{
    fprintf(stderr, "paced_load: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* Content-Length from a response head ("name:" then optional blanks then digits, name matched
 * case-insensitively, as the Python generator's regex does); 0 if absent. */
static int64_t content_length(const char *head, size_t len)
{
    static const char name[] = "content-length:";
    const size_t nlen = sizeof name - 1;
    for (size_t i = 0; i + 2 + nlen <= len; i++) {
        if (head[i] != '\r' || head[i + 1] != '\n')
            continue;
        const char *line = head + i + 2;
        if (i + 2 + 18 <= len && strncasecmp(line, "transfer-encoding:", 18) == 0)
            die("a response uses Transfer-Encoding; only Content-Length bodies are supported");
        if (strncasecmp(line, name, nlen) != 0)
            continue;
        size_t j = i + 2 + nlen;
        while (j < len && (head[j] == ' ' || head[j] == '\t'))
            j++;
        if (j >= len || head[j] < '0' || head[j] > '9')
            die("a response has a malformed Content-Length");
        int64_t value = 0;
        for (; j < len && head[j] >= '0' && head[j] <= '9'; j++) {
            if (value > (INT64_MAX - 9) / 10)
                die("a response's Content-Length is too large");
            value = value * 10 + (head[j] - '0');
        }
        return value;
    }
    return 0;
}

/* Consume bytes received on c. Returns 1 when they complete c's response, else 0. Bytes for
 * which no request is outstanding are a protocol error: one request per connection is in
 * flight at a time, so the server can have nothing more to say. */
static int feed(struct conn *c, const char *data, size_t len)
{
    while (len > 0) {
        if (!c->busy)
            die("bytes arrived on a connection with no request outstanding");
        if (!c->in_body) {
            size_t old = c->head_len;
            size_t take = len < HEAD_MAX - old ? len : HEAD_MAX - old;
            memcpy(c->head + old, data, take);
            c->head_len += take;
            /* the blank line may straddle two reads: look back 3 bytes */
            size_t from = old >= 3 ? old - 3 : 0;
            char *end = memmem(c->head + from, c->head_len - from, "\r\n\r\n", 4);
            if (end == NULL) {
                if (c->head_len == HEAD_MAX)
                    die("a response head is longer than 16 KiB");
                return 0;
            }
            size_t head_end = (size_t)(end - c->head) + 4;
            c->ok = c->head_len >= 10 && memcmp(c->head, "HTTP/1.1 2", 10) == 0;
            c->body_left = content_length(c->head, head_end - 2)
                           - (int64_t)(c->head_len - head_end);
            if (c->body_left < 0)
                die("bytes arrived beyond the end of a response");
            c->in_body = 1;
            c->head_len = 0;
            data += take;
            len -= take;
        }
        size_t take = (int64_t)len < c->body_left ? len : (size_t)c->body_left;
        c->body_left -= (int64_t)take;
        data += take;
        len -= take;
        if (c->body_left == 0) {
            c->in_body = 0;
            c->busy = 0;
            if (len > 0)
                die("bytes arrived beyond the end of a response");
            return 1;
        }
    }
    return 0;
}

static void send_request(struct conn *c, const char *req, size_t len)
{
    /* The connection is idle, so its send buffer is empty and a short write cannot happen. */
    ssize_t n = send(c->fd, req, len, MSG_NOSIGNAL);
    if (n < 0)
        die_errno("send");
    if ((size_t)n != len)
        die("a request was only partly sent");
    c->busy = 1;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static struct timespec ns_to_ts(int64_t ns)
{
    if (ns < 0)
        ns = 0;
    struct timespec ts = {.tv_sec = (time_t)(ns / NS), .tv_nsec = (long)(ns % NS)};
    return ts;
}

static double parse_positive(const char *s, const char *what)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !(v > 0)) {
        fprintf(stderr, "paced_load: %s must be a positive number, got '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static char scratch[65536];

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: paced_load PORT RATE DURATION CONNS REQUEST\n");
        return 2;
    }
    double port_d = parse_positive(argv[1], "PORT");
    double rate = parse_positive(argv[2], "RATE");
    double duration = parse_positive(argv[3], "DURATION");
    double conns_d = parse_positive(argv[4], "CONNS");
    const char *req = argv[5];
    size_t req_len = strlen(req);
    if (port_d > 65535 || port_d != (int)port_d || conns_d > MAX_CONNS
        || conns_d != (int)conns_d || req_len == 0) {
        fprintf(stderr, "paced_load: PORT must be 1-65535, CONNS 1-%d, REQUEST non-empty\n",
                MAX_CONNS);
        return 2;
    }
    int conns = (int)conns_d;
    /* The default 50 us timer slack is kept, as the Python generator's select() has it. Measured
     * on the 2-vCPU Firecracker VM at 10,000 req/s: with a 1 ns slack (prctl) sends were 35-39 us
     * late on average instead of ~52 us (waking a halted vCPU costs most of that), but the
     * generator used ~36 us of CPU per request instead of ~27, and CPU is what it competes for
     * with the proxies. The lateness counts as latency on every path alike. */

    struct conn *cs = calloc((size_t)conns, sizeof *cs);
    int *idle = malloc((size_t)conns * sizeof *idle);
    if (cs == NULL || idle == NULL)
        die("out of memory");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_d)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval rcv_timeout = {.tv_sec = WARMUP_SECONDS};
    for (int i = 0; i < conns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die_errno("socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
            die_errno("connect");
        int one = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0
            || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &rcv_timeout, sizeof rcv_timeout) != 0)
            die_errno("setsockopt");
        cs[i].fd = fd;
    }
    /* Warm up: one request on every connection at once, so the proxies' pooled mesh
     * connections (and their handshakes) exist before the schedule starts. */
    for (int i = 0; i < conns; i++)
        send_request(&cs[i], req, req_len);
    for (int i = 0; i < conns; i++) {
        while (cs[i].busy) {
            ssize_t n = recv(cs[i].fd, scratch, sizeof scratch, 0);
            if (n < 0)
                die_errno("warm-up recv");
            if (n == 0)
                die("the server closed a benchmark connection");
            feed(&cs[i], scratch, (size_t)n);
        }
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die_errno("epoll_create1");
    for (int i = 0; i < conns; i++) {
        int flags = fcntl(cs[i].fd, F_GETFL);
        if (flags < 0 || fcntl(cs[i].fd, F_SETFL, flags | O_NONBLOCK) != 0)
            die_errno("fcntl");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) != 0)
            die_errno("epoll_ctl");
        idle[i] = i;
    }
    int n_idle = conns;

    const int64_t start = now_ns() + 50000000LL;
    const int64_t end = start + (int64_t)(duration * 1e9);
    const int64_t deadline = end + DRAIN_SECONDS * NS;
    /* Slot i is due at start + i / rate. Requests leave in slot order, so the backlog FIFO is
     * just the slot numbers in [sent, scheduled): no queue to store. */
    int64_t total_slots = (int64_t)((double)(end - start) * rate / 1e9) + 2;
    int64_t *lat = malloc((size_t)total_slots * sizeof *lat);
    if (lat == NULL)
        die("out of memory");
#define SLOT_TIME(i) (start + (int64_t)((double)(i) * 1e9 / rate + 0.5))
    int64_t scheduled = 0, sent = 0, done = 0, errors = 0;
    int64_t next = SLOT_TIME(0);
    int busy = 0;
    struct epoll_event events[MAX_CONNS];

    while (next < end || busy > 0 || sent < scheduled) {
        int64_t now = now_ns();
        while (next <= now && next < end) {
            scheduled++;
            next = SLOT_TIME(scheduled);
        }
        if (sent < scheduled && n_idle > 0) {
            while (sent < scheduled && n_idle > 0) {
                if (sent >= total_slots)
                    die("internal error: more slots than allocated");
                struct conn *c = &cs[idle[--n_idle]];
                c->due = SLOT_TIME(sent);
                sent++;
                send_request(c, req, req_len);
                busy++;
            }
            now = now_ns();
        }
        if (now > deadline) {
            fprintf(stderr,
                    "paced_load: %lld of %lld responses still missing %d s after the schedule "
                    "ended\n",
                    (long long)(scheduled - done), (long long)scheduled, DRAIN_SECONDS);
            return 1;
        }
        int64_t wake = next < end ? next : deadline;
        struct timespec timeout = ns_to_ts(wake - now);
        int n = epoll_pwait2(ep, events, conns, &timeout, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die_errno("epoll_pwait2");
        }
        for (int k = 0; k < n; k++) {
            int i = (int)events[k].data.u32;
            struct conn *c = &cs[i];
            ssize_t got = recv(c->fd, scratch, sizeof scratch, 0);
            if (got < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                    continue;
                die_errno("recv");
            }
            if (got == 0)
                die("the server closed a benchmark connection");
            if (feed(c, scratch, (size_t)got)) {
                lat[done++] = now_ns() - c->due;
                errors += !c->ok;
                idle[n_idle++] = i;
                busy--;
            }
        }
    }
#undef SLOT_TIME
    if (done == 0)
        die("no response completed");
    qsort(lat, (size_t)done, sizeof *lat, cmp_i64);
    printf("{\"rps\": %.3f, \"total\": %lld, \"p50\": %.6f, \"p99\": %.6f, \"errors\": %lld}\n",
           (double)done / duration, (long long)done, (double)lat[done / 2] / 1e6,
           (double)lat[(int64_t)((double)done * 0.99)] / 1e6, (long long)errors);
    for (int i = 0; i < conns; i++)
        close(cs[i].fd);
    close(ep);
    free(lat);
    free(idle);
    free(cs);
    return 0;
}
