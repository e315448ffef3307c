/*
 * The app of the wrap test (tests/ship.rs): a tiny static HTTP server that
 * knows nothing about drover beyond the systemd socket-activation protocol.
 * It serves on the listening socket it inherits as fd 3 (LISTEN_FDS=1), one
 * connection at a time, answering every GET with a JSON line that names the
 * worker drover says it is (DROVER_WORKER_ID) and its context
 * (DROVER_WORKER_CONTEXT); `GET /sleep?ms=N` answers after N ms. On SIGTERM
 * it finishes the request it is serving, then exits 0, as gunicorn and
 * uvicorn do. Built with `cc -static` and put FROM scratch: no shell, no
 * libc, no drover in its image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;

static void on_term(int sig) {
    (void)sig;
    stopping = 1;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
        /* A SIGTERM mid-request: finish the request first. */
    }
}

static void serve(int c) {
    char req[4096];
    size_t n = 0;
    while (n < sizeof req - 1) {
        ssize_t r = read(c, req + n, sizeof req - 1 - n);
        if (r <= 0) {
            return;
        }
        n += (size_t)r;
        req[n] = 0;
        if (strstr(req, "\r\n\r\n")) {
            break;
        }
    }
    const char *ms = strstr(req, "GET /sleep?ms=");
    if (ms == req) {
        sleep_ms(atol(ms + strlen("GET /sleep?ms=")));
    }
    const char *id = getenv("DROVER_WORKER_ID");
    const char *ctx = getenv("DROVER_WORKER_CONTEXT");
    char body[2048];
    int len = snprintf(body, sizeof body, "{\"app\":\"static-server\",\"pid\":%d,\"worker\":%s,\"context\":%s}\n",
                       (int)getpid(), id ? id : "null", ctx ? ctx : "null");
    char head[256];
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n",
                        len);
    if (write(c, head, (size_t)hlen) == hlen) {
        ssize_t w = write(c, body, (size_t)len);
        (void)w;
    }
}

int main(void) {
    const char *fds = getenv("LISTEN_FDS");
    if (!fds || atoi(fds) < 1) {
        fprintf(stderr, "server: no LISTEN_FDS: run me under drover (or systemd)\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term; /* no SA_RESTART: accept() returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    while (!stopping) {
        int c = accept(3, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR) {
                continue;
            }
            perror("server: accept");
            return 1;
        }
        serve(c);
        close(c);
    }
    return 0;
}
