/*
 * lab-cpeer: the C reference peers ("C ceilings") the lab measures its Python designs against.
 *
 *   lab-cpeer MODE [--host H] [--port P] [--backlog B] [--workers N] [--max-children N]
 *
 * MODE is one of
 *   prefork  N workers, forked after listen(), each blocking in accept() on the shared socket;
 *   fork     one process: accept(), fork() a child per connection, the child echoes, _exit(0)s;
 *            at most --max-children (256) alive, as the lab's `fork`: at the cap the parent
 *            accepts nothing until a child is reaped, and new connections wait in the backlog;
 *   epoll    N workers, each an epoll loop on the shared socket (EPOLLEXCLUSIVE), non-blocking
 *            connections, partial writes finished on EPOLLOUT;
 *   sendmsg  one process accepts and passes each connection (SCM_RIGHTS over a SOCK_SEQPACKET
 *            socketpair) to N workers blocking in recvmsg(): the floor of the lab's `sendmsg`.
 *
 * Every mode serves the lab's echo service: read up to 64 KiB, write all of it back, until EOF.
 * Once listening it prints one line, `ready design=peer-c-MODE address=A port=P pid=N backlog=B`.
 * SIGUSR1 prints a statistics line (JSON); SIGTERM/SIGINT stop it: the parent SIGTERMs its
 * workers or children, waits for every one, prints the statistics line and exits 0. Workers and
 * children die with the parent (PR_SET_PDEATHSIG), so a SIGKILLed parent leaves nothing behind.
 * Exit codes: 0 stopped, 1 unexpected error, 2 bad usage, 3 cannot listen.
 *
 * Build (Makefile target `cpeer`): gcc -O2 -Wall -Wextra -static -o lab-cpeer peer.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_SIZE (64 * 1024)
#define MAX_WORKERS 1024
#define MAX_EVENTS 64
#define ACCEPT_BATCH 16 /* accept()s per wake-up, so one worker cannot take a whole burst */
/* fork's cap on children not yet reaped: `lab serve --design fork`'s --max-children default.
 * Without one, a burst of exits the parent has not reaped yet (each an unreaped child, counted
 * by the kernel as a process) runs into a container's pids limit, fork() fails with EAGAIN and
 * the connection is closed unserved: a reset that is the peer's, not the design's. */
#define MAX_CHILDREN_DEFAULT 256

enum { EXIT_OK = 0, EXIT_ERROR = 1, EXIT_USAGE = 2, EXIT_LISTEN = 3 };
enum mode { MODE_PREFORK, MODE_FORK, MODE_EPOLL, MODE_SENDMSG };
static const char *const MODE_NAMES[] = {"prefork", "fork", "epoll", "sendmsg"};

static const char USAGE[] = "usage: lab-cpeer prefork|fork|epoll|sendmsg [--host H] [--port P] "
                            "[--backlog B] [--workers N] [--max-children N]\n";

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t stats_requested;
static volatile sig_atomic_t child_exited;

static enum mode mode;
static pid_t parent_pid;
/* Connections accepted, by every process: a counter in memory shared across fork(). */
static unsigned long *accepted;
/* What the ready line says, once listening. */
static char ready_address[INET6_ADDRSTRLEN];
static unsigned ready_port;
static long ready_backlog;

static void on_stop(int sig) { (void)sig; stop_requested = 1; }
static void on_usr1(int sig) { (void)sig; stats_requested = 1; }
static void on_chld(int sig) { (void)sig; child_exited = 1; }

static void fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("lab-cpeer: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void usage_error(const char *fmt, const char *arg) {
    fputs(USAGE, stderr);
    fputs("lab-cpeer: error: ", stderr);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(EXIT_USAGE);
}

static long parse_number(const char *option, const char *text, long low, long high) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < low || value > high) {
        fputs(USAGE, stderr);
        fprintf(stderr, "lab-cpeer: error: %s must be a number from %ld to %ld, not '%s'\n",
                option, low, high, text);
        exit(EXIT_USAGE);
    }
    return value;
}

static void print_stats(void) {
    printf("{\"event\": \"stats\", \"design\": \"peer-c-%s\", \"pid\": %ld, \"accepted\": %lu}\n",
           MODE_NAMES[mode], (long)getpid(), __atomic_load_n(accepted, __ATOMIC_RELAXED));
    fflush(stdout);
}

static void count_accept(void) { __atomic_add_fetch(accepted, 1, __ATOMIC_RELAXED); }

/* --- the listening socket ------------------------------------------------------------------ */

/* The host is a numeric IPv4 or IPv6 address (0.0.0.0, ::, 127.0.0.1 …): names would need
 * getaddrinfo(), which a static glibc binary cannot use without the host's NSS libraries. */
static socklen_t parse_host(const char *host, long port, struct sockaddr_storage *addr) {
    memset(addr, 0, sizeof *addr);
    struct sockaddr_in *v4 = (struct sockaddr_in *)addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        return sizeof *v4;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        return sizeof *v6;
    }
    fail(EXIT_LISTEN, "cannot use --host '%s': give a numeric address of this host, e.g. "
         "0.0.0.0, :: or 127.0.0.1", host);
    return 0;
}

static int listen_on(const char *host, long port, int backlog) {
    struct sockaddr_storage addr;
    socklen_t addrlen = parse_host(host, port, &addr);
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail(EXIT_LISTEN, "socket(): %s", strerror(errno));
    /* SO_REUSEADDR: a restarted peer binds while old connections sit in TIME_WAIT. It does not
     * let two servers listen on one port (that would be SO_REUSEPORT). */
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, addrlen) < 0 || listen(fd, backlog) < 0) {
        int err = errno;
        if (err == EADDRINUSE)
            fail(EXIT_LISTEN, "port %ld is already in use on %s: stop whatever holds it "
                 "(ss -ltnp) or choose another with --port", port, host);
        if (err == EACCES)
            fail(EXIT_LISTEN, "no permission to bind port %ld: choose a port above 1023 with "
                 "--port", port);
        if (err == EADDRNOTAVAIL)
            fail(EXIT_LISTEN, "%s is not an address of this host: use 0.0.0.0, :: or one of "
                 "its own", host);
        fail(EXIT_LISTEN, "cannot listen on %s:%ld: %s", host, port, strerror(err));
    }
    /* The real address and port (--port 0: the kernel picked one), for the ready line. */
    socklen_t len = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
        fail(EXIT_ERROR, "getsockname(): %s", strerror(errno));
    const void *raw = addr.ss_family == AF_INET
                          ? (const void *)&((struct sockaddr_in *)&addr)->sin_addr
                          : (const void *)&((struct sockaddr_in6 *)&addr)->sin6_addr;
    inet_ntop(addr.ss_family, raw, ready_address, sizeof ready_address);
    ready_port = ntohs(addr.ss_family == AF_INET ? ((struct sockaddr_in *)&addr)->sin_port
                                                 : ((struct sockaddr_in6 *)&addr)->sin6_port);
    return fd;
}

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        fail(EXIT_ERROR, "fcntl(O_NONBLOCK): %s", strerror(errno));
}

/* accept() failed: wait a moment when out of descriptors (the connection stays queued), so a
 * full descriptor table is not a busy loop; anything else (ECONNABORTED …) is the client's. */
static void accept_failed(void) {
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

/* --- the echo ------------------------------------------------------------------------------ */

/* write() all of buf; a blocking socket may still take only part of it (a signal, a full
 * send buffer), so loop. Returns 0, or -1 when the peer is gone. */
static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A blocking connection: read up to 64 KiB, write it all back, until EOF (or an error). */
static void echo_blocking(int fd, char *buf) {
    for (;;) {
        ssize_t n = read(fd, buf, BUFFER_SIZE);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || write_all(fd, buf, (size_t)n) < 0)
            return;
    }
}

/* --- processes ----------------------------------------------------------------------------- */

static sigset_t handled_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGCHLD);
    return set;
}

static void set_handler(int sig, void (*handler)(int)) {
    struct sigaction sa = {0};
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: a signal interrupts sigsuspend()/ppoll() */
    sigaction(sig, &sa, NULL);
}

/* In a new worker or child: SIGTERM (the parent's stop) kills it; SIGINT (a terminal's Ctrl-C,
 * sent to the whole group) and SIGUSR1 are the parent's business; the parent's signal mask is
 * lifted only after that. PR_SET_PDEATHSIG: when the parent dies, even by SIGKILL, so does it. */
static void become_child(void) {
    set_handler(SIGTERM, SIG_DFL);
    set_handler(SIGCHLD, SIG_DFL);
    set_handler(SIGINT, SIG_IGN);
    set_handler(SIGUSR1, SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent_pid)
        _exit(EXIT_OK); /* the parent died before prctl(): nobody is left to serve for */
}

/* --- prefork: N workers blocking in accept() ------------------------------------------------ */

/* All workers block in accept() on one listening socket. Linux queues them on the socket's
 * wait queue as *exclusive* waiters, so a new connection wakes exactly one of them (wake-one:
 * no thundering herd since 2.6); the kernel, not a lock of ours, hands out connections. */
static void prefork_worker(int lfd) {
    char *buf = malloc(BUFFER_SIZE);
    if (buf == NULL)
        _exit(EXIT_ERROR);
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            accept_failed();
            continue;
        }
        count_accept();
        echo_blocking(fd, buf);
        close(fd);
    }
}

/* --- epoll: N workers, each an event loop on the shared socket ------------------------------ */

struct conn {
    int fd;
    size_t pending; /* bytes of buf not yet echoed back, from offset `sent` */
    size_t sent;
    char buf[BUFFER_SIZE];
};

static void conn_close(int epfd, struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Write what is pending; 0 when all of it went, 1 when the socket is full, -1 on an error. */
static int conn_flush(struct conn *c) {
    while (c->pending > 0) {
        ssize_t n = write(c->fd, c->buf + c->sent, c->pending);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 1 : -1;
        }
        c->sent += (size_t)n;
        c->pending -= (size_t)n;
    }
    return 0;
}

static int conn_watch(int epfd, struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    return epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* One event of a connection. Level-triggered, one read() per event: a busy connection cannot
 * starve the others, and epoll reports it again while data is left. A connection whose echo
 * is not fully sent is not read (EPOLLOUT only) until the rest is written: the client's
 * unread echo, not our memory, then holds it back (TCP flow control). */
static void conn_event(int epfd, struct conn *c) {
    int state;
    if (c->pending > 0) { /* waiting for EPOLLOUT (or an error, reported with it) */
        state = conn_flush(c);
        if (state < 0 || (state == 0 && conn_watch(epfd, c, EPOLLIN) < 0))
            conn_close(epfd, c);
        return;
    }
    ssize_t n = read(c->fd, c->buf, BUFFER_SIZE);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) { /* EOF (the client is done) or an error */
        conn_close(epfd, c);
        return;
    }
    c->sent = 0;
    c->pending = (size_t)n;
    state = conn_flush(c);
    if (state < 0 || (state == 1 && conn_watch(epfd, c, EPOLLOUT) < 0))
        conn_close(epfd, c);
}

static void accept_ready(int epfd, int lfd) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                accept_failed();
            return; /* EAGAIN: another worker took it, or the queue is empty */
        }
        count_accept();
        struct conn *c = malloc(sizeof *c);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->pending = c->sent = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
        }
    }
}

/* Every worker registers the shared listening socket in its own epoll instance with
 * EPOLLEXCLUSIVE (Linux 4.5): a new connection then wakes one (or a few) of the waiting
 * workers, not all of them — without it each epoll_wait() on the socket would wake and race
 * for one accept(). The listener is non-blocking (a file status flag, shared by every worker):
 * the worker that loses that race gets EAGAIN instead of blocking. */
static void epoll_worker(int lfd) {
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = NULL};
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        fprintf(stderr, "lab-cpeer: error: epoll on the listener: %s: needs Linux 4.5 or later\n",
                strerror(errno));
        _exit(EXIT_ERROR);
    }
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "lab-cpeer: error: epoll_wait(): %s\n", strerror(errno));
            _exit(EXIT_ERROR);
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                accept_ready(epfd, lfd);
            else
                conn_event(epfd, events[i].data.ptr);
        }
    }
}

static void child_started(pid_t pid);
static void reap_children(void);
static pid_t *children;
static size_t nchildren;
/* Accept only while fewer children than this are unreaped (fork mode; the pools have none). */
static size_t child_cap = SIZE_MAX;

/* --- the accepting parent (fork, sendmsg) ---------------------------------------------------- */

/* The parent waits in ppoll() with the signals unblocked only for the wait (atomically, so a
 * SIGTERM or SIGCHLD that comes just before it is not lost), reaps every child that ended
 * (no zombies), and accepts until the queue is empty (at most ACCEPT_BATCH), handing each
 * connection to `handle`, which owns it from then on. Returns once a stop was requested, with
 * the listener closed. */
static void accept_until_stopped(int lfd, const sigset_t *waitmask, void (*handle)(int, int)) {
    while (!stop_requested) {
        if (stats_requested) {
            stats_requested = 0;
            print_stats();
        }
        if (child_exited) {
            child_exited = 0;
            reap_children();
        }
        /* At the cap, wait for SIGCHLD alone (no descriptor): the loop's top then reaps. */
        struct pollfd p = {.fd = lfd, .events = POLLIN};
        if (ppoll(&p, nchildren < child_cap ? 1 : 0, NULL, waitmask) < 0) {
            if (errno == EINTR)
                continue;
            fail(EXIT_ERROR, "ppoll(): %s", strerror(errno));
        }
        for (int i = 0; i < ACCEPT_BATCH && nchildren < child_cap; i++) {
            int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC); /* blocking, unlike the listener */
            if (fd < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                    accept_failed();
                break;
            }
            count_accept();
            handle(lfd, fd);
        }
    }
    close(lfd);
}

/* SIGTERM every child still alive (never the process group: it may be the shell's), wait for
 * each, print the statistics line. */
static int stop_children(void) {
    for (size_t i = 0; i < nchildren; i++)
        kill(children[i], SIGTERM);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
        ;
    print_stats();
    return EXIT_OK;
}

/* --- sendmsg: the parent accepts, workers recvmsg() the descriptors ----------------------- */

/* The descriptor rides in an SCM_RIGHTS control message: the kernel installs a new descriptor
 * for the same connection in whichever worker receives the message. A blocking recvmsg() on
 * the shared end is an exclusive wait, like accept(): one worker wakes per message. */
static void sendmsg_worker(int chan) {
    char *buf = malloc(BUFFER_SIZE);
    if (buf == NULL)
        _exit(EXIT_ERROR);
    for (;;) {
        char byte;
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        union {
            struct cmsghdr align;
            char space[CMSG_SPACE(sizeof(int))];
        } control;
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof control.space};
        ssize_t n = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(EXIT_OK); /* the parent is gone */
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        if (c == NULL || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int fd;
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        echo_blocking(fd, buf);
        close(fd);
    }
}

/* The parent's end of the channel. */
static int channel = -1;

/* Pass one descriptor (blocking: a full queue waits for a worker to take one), then close the
 * parent's copy. */
static void pass_descriptor(int lfd, int fd) {
    (void)lfd;
    char byte = 'c';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fd);
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    while (sendmsg(channel, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
    close(fd);
}

/* The parent accepts (accept_until_stopped), passes each connection and closes its copy: the
 * message in the channel's queue holds the connection open until a worker receives it. */
static int run_sendmsg(int lfd, int workers, const sigset_t *waitmask, void (*ready)(void)) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
        fail(EXIT_ERROR, "socketpair(): %s", strerror(errno));
    for (int i = 0; i < workers; i++) {
        pid_t pid = fork();
        if (pid < 0)
            fail(EXIT_ERROR, "fork(): %s: raise the process limit or use fewer --workers",
                 strerror(errno));
        if (pid == 0) {
            become_child();
            close(lfd);
            close(pair[0]);
            sendmsg_worker(pair[1]);
        }
        child_started(pid);
    }
    close(pair[1]);
    ready();
    channel = pair[0];
    accept_until_stopped(lfd, waitmask, pass_descriptor);
    close(pair[0]); /* the workers' recvmsg() then sees EOF once the queue is served */
    return stop_children();
}

/* --- the parent of a pool (prefork, epoll) -------------------------------------------------- */

static pid_t start_worker(int lfd) {
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        become_child();
        if (mode == MODE_PREFORK)
            prefork_worker(lfd);
        else
            epoll_worker(lfd);
        _exit(EXIT_OK);
    }
    return pid;
}

/* The parent only supervises: it sleeps in sigsuspend() (signals are blocked everywhere else,
 * so none is lost between a check and the wait), answers SIGUSR1, replaces a worker that was
 * killed, and on SIGTERM/SIGINT stops the pool. A worker that exits by itself failed to set up
 * (it said why on stderr): then the peer stops, exit 1. */
static int run_pool(int lfd, int workers, const sigset_t *waitmask, void (*ready)(void)) {
    pid_t pids[MAX_WORKERS];
    int code = EXIT_OK;
    for (int i = 0; i < workers; i++)
        if ((pids[i] = start_worker(lfd)) < 0)
            fail(EXIT_ERROR, "fork(): %s: raise the process limit or use fewer --workers",
                 strerror(errno));
    ready();
    while (!stop_requested) {
        sigsuspend(waitmask);
        if (stats_requested) {
            stats_requested = 0;
            print_stats();
        }
        if (!child_exited)
            continue;
        child_exited = 0;
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < workers; i++) {
                if (pids[i] != pid)
                    continue;
                pids[i] = 0;
                if (WIFSIGNALED(status) && !stop_requested) {
                    pids[i] = start_worker(lfd); /* killed: replace it */
                    if (pids[i] < 0)
                        pids[i] = 0;
                } else if (!stop_requested) {
                    fprintf(stderr, "lab-cpeer: error: worker %ld exited with status %d: "
                            "see its error above\n", (long)pid, WEXITSTATUS(status));
                    code = EXIT_ERROR;
                    stop_requested = 1;
                }
            }
        }
    }
    for (int i = 0; i < workers; i++)
        if (pids[i] > 0)
            kill(pids[i], SIGTERM);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
        ;
    print_stats();
    return code;
}

/* --- fork: a child per connection ------------------------------------------------------------ */

/* The children alive (`children`, declared above), so that a stop can SIGTERM exactly them. */
static size_t children_cap;

static void child_started(pid_t pid) {
    if (nchildren == children_cap) {
        size_t cap = children_cap ? children_cap * 2 : 256;
        pid_t *grown = realloc(children, cap * sizeof *grown);
        if (grown == NULL)
            return; /* untracked: it still dies with us (PR_SET_PDEATHSIG) */
        children = grown;
        children_cap = cap;
    }
    children[nchildren++] = pid;
}

static void reap_children(void) {
    pid_t pid;
    while ((pid = waitpid(-1, NULL, WNOHANG)) > 0) {
        for (size_t i = 0; i < nchildren; i++) {
            if (children[i] == pid) {
                children[i] = children[--nchildren];
                break;
            }
        }
    }
}

/* The children's buffer: allocated once, inherited by fork(). */
static char *child_buf;

/* Each connection gets a fork()ed child that echoes and _exit(0)s; the parent closes its copy
 * of the connection at once. */
static void fork_child(int lfd, int fd) {
    pid_t pid = fork();
    if (pid == 0) {
        become_child();
        close(lfd);
        echo_blocking(fd, child_buf);
        _exit(EXIT_OK);
    }
    if (pid < 0)
        fprintf(stderr, "lab-cpeer: fork(): %s: connection closed\n", strerror(errno));
    else
        child_started(pid);
    close(fd);
}

static int run_fork(int lfd, const sigset_t *waitmask, void (*ready)(void)) {
    child_buf = malloc(BUFFER_SIZE);
    if (child_buf == NULL)
        fail(EXIT_ERROR, "out of memory");
    ready();
    accept_until_stopped(lfd, waitmask, fork_child);
    return stop_children();
}

/* --- main ---------------------------------------------------------------------------------- */

static void announce_ready(void) {
    printf("ready design=peer-c-%s address=%s port=%u pid=%ld backlog=%ld\n", MODE_NAMES[mode],
           ready_address, ready_port, (long)parent_pid, ready_backlog);
    fflush(stdout);
}

int main(int argc, char **argv) {
    const char *host = "0.0.0.0";
    long port = 12345, backlog = 128, workers = 2, max_children = MAX_CHILDREN_DEFAULT;

    if (argc < 2)
        usage_error("give a mode: %s", "prefork, fork, epoll or sendmsg");
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(USAGE, stdout);
        return EXIT_OK;
    }
    if (strcmp(argv[1], "prefork") == 0)
        mode = MODE_PREFORK;
    else if (strcmp(argv[1], "fork") == 0)
        mode = MODE_FORK;
    else if (strcmp(argv[1], "epoll") == 0)
        mode = MODE_EPOLL;
    else if (strcmp(argv[1], "sendmsg") == 0)
        mode = MODE_SENDMSG;
    else
        usage_error("unknown mode '%s': choose prefork, fork, epoll or sendmsg", argv[1]);

    for (int i = 2; i < argc; i++) {
        char *arg = argv[i], *value = strchr(arg, '=');
        size_t len = value ? (size_t)(value - arg) : strlen(arg);
        if (value)
            value++;
        else if (i + 1 < argc)
            value = argv[++i];
        else
            usage_error("option %s needs a value", arg);
        if (len == 6 && strncmp(arg, "--host", len) == 0)
            host = value;
        else if (len == 6 && strncmp(arg, "--port", len) == 0)
            port = parse_number("--port", value, 0, 65535);
        else if (len == 9 && strncmp(arg, "--backlog", len) == 0)
            backlog = parse_number("--backlog", value, 1, INT_MAX);
        else if (len == 9 && strncmp(arg, "--workers", len) == 0)
            workers = parse_number("--workers", value, 1, MAX_WORKERS);
        else if (len == 14 && strncmp(arg, "--max-children", len) == 0)
            max_children = parse_number("--max-children", value, 1, MAX_WORKERS);
        else
            usage_error("unknown option '%s'", arg);
    }

    parent_pid = getpid();
    accepted = mmap(NULL, sizeof *accepted, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                    -1, 0);
    if (accepted == MAP_FAILED)
        fail(EXIT_ERROR, "mmap(): %s", strerror(errno));

    /* The handled signals stay blocked except while the parent waits (sigsuspend/ppoll with
     * `waitmask`): a flag is never set between its check and the wait. A peer that has gone
     * away makes write() fail with EPIPE instead of killing the process. */
    sigset_t handled = handled_signals(), waitmask;
    sigprocmask(SIG_BLOCK, &handled, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    sigdelset(&waitmask, SIGUSR1);
    sigdelset(&waitmask, SIGCHLD);
    set_handler(SIGTERM, on_stop);
    set_handler(SIGINT, on_stop);
    set_handler(SIGUSR1, on_usr1);
    set_handler(SIGCHLD, on_chld);
    signal(SIGPIPE, SIG_IGN);

    ready_backlog = backlog;
    int lfd = listen_on(host, port, (int)backlog);

    if (mode == MODE_PREFORK)
        return run_pool(lfd, (int)workers, &waitmask, announce_ready);
    set_nonblocking(lfd); /* epoll and fork wait for readiness, then accept() until EAGAIN */
    if (mode == MODE_EPOLL)
        return run_pool(lfd, (int)workers, &waitmask, announce_ready);
    if (mode == MODE_SENDMSG)
        return run_sendmsg(lfd, (int)workers, &waitmask, announce_ready);
    child_cap = (size_t)max_children;
    return run_fork(lfd, &waitmask, announce_ready);
}
