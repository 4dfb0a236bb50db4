/*
 * iterative_server.c - the chapter's original iterative echo server, kept as a test oracle.
 *
 * One client at a time: accept(), ONE recv() of at most 100 bytes, send it back, close().
 * It deliberately keeps the original's limits (a single recv, so a message longer than
 * 100 bytes -- or one that arrives in pieces -- is not fully echoed); only the undefined
 * behaviour is fixed (the buffer is NUL-terminated before printing) and a few lines are
 * added so tests can drive it:
 *
 *   usage: iterative_server [PORT [CONNECTIONS]]
 *     PORT         TCP port to listen on (default 12345; 0 = let the kernel choose)
 *     CONNECTIONS  serve this many connections, then exit 0 (default: forever)
 *
 * After listen() it prints "ready port=N" with the port actually bound (getsockname), so a
 * test can ask for port 0. stdout is flushed after every line: a pipe is block-buffered.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define DEFAULT_PORT 12345
#define MAX_MSG 100

static void say(const char *line)
{
    printf("%s\n", line);
    fflush(stdout);
}

static long parse_number(const char *text, long min, long max, const char *what)
{
    char *end = NULL;
    long value;

    errno = 0;
    value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min || value > max) {
        fprintf(stderr, "iterative_server: bad %s: %s\n", what, text);
        exit(2);
    }
    return value;
}

int main(int argc, char *argv[])
{
    int listen_fd;
    int on = 1;
    long port = DEFAULT_PORT;
    long connections = -1; /* -1: serve forever */
    long served = 0;
    struct sockaddr_in addr;
    socklen_t addr_len;

    if (argc > 1)
        port = parse_number(argv[1], 0, 65535, "port");
    if (argc > 2)
        connections = parse_number(argv[2], 1, 1000000, "connection count");

    /* The original would be killed by SIGPIPE if a client vanished before the echo;
     * ignoring it turns that into an EPIPE error from send() instead. */
    signal(SIGPIPE, SIG_IGN);

    listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (listen_fd < 0) {
        perror("socket()");
        return 1;
    }
    say("socket() is OK");

    /* Lets a restarted server bind the port while old connections sit in TIME_WAIT. */
    if (setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0) {
        perror("setsockopt(SO_REUSEADDR)");
        return 1;
    }

    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons((unsigned short)port);
    if (bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("bind()");
        return 1;
    }
    say("bind() is OK");

    if (listen(listen_fd, 5) < 0) {
        perror("listen()");
        return 1;
    }
    say("listen() is OK");

    addr_len = sizeof addr;
    if (getsockname(listen_fd, (struct sockaddr *)&addr, &addr_len) < 0) {
        perror("getsockname()");
        return 1;
    }
    printf("ready port=%d\n", ntohs(addr.sin_port));
    fflush(stdout);

    while (connections < 0 || served < connections) {
        char buffer[MAX_MSG + 1];
        ssize_t got;
        int conn_fd = accept(listen_fd, NULL, NULL);

        if (conn_fd < 0) {
            perror("accept()");
            continue;
        }
        say("accept() is OK");
        served++;

        /* ONE recv(): whatever has arrived, up to 100 bytes. TCP may deliver less. */
        got = recv(conn_fd, buffer, MAX_MSG, 0);
        if (got < 0) {
            perror("recv()");
            close(conn_fd);
            continue;
        }
        if (got == 0) {
            fprintf(stderr, "recv(): client closed without sending\n");
            close(conn_fd);
            continue;
        }
        buffer[got] = '\0'; /* the original printed an unterminated buffer with %s */
        printf("The message from client: %s\n", buffer);
        fflush(stdout);

        if (send(conn_fd, buffer, (size_t)got, 0) < 0) {
            perror("send()");
            close(conn_fd);
            continue;
        }
        say("send() is OK");
        close(conn_fd);
    }

    close(listen_fd);
    return 0;
}
