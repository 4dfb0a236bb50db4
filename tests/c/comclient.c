/*
 * comclient.c - the chapter's original "comclient", kept as a test oracle.
 *
 * IPv4 only, ONE send() of the message plus its terminating NUL (49 bytes), ONE recv().
 * That single recv() is the original's bug: TCP may hand the echo back in pieces, and this
 * client would see only the first. Exit status is added so tests can use it as an oracle:
 * 0 if recv() returned exactly the 49 bytes sent, 1 otherwise.
 *
 *   usage: comclient [IPV4-ADDRESS [PORT]]   (defaults: 127.0.0.1 12345)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define DEFAULT_ADDRESS "127.0.0.1"
#define DEFAULT_PORT 12345

int main(int argc, char *argv[])
{
    const char *msg = "This is a test message from a stupid client lol!";
    const char *address = argc > 1 ? argv[1] : DEFAULT_ADDRESS;
    long port = DEFAULT_PORT;
    size_t len = strlen(msg) + 1; /* + 1: the terminating NUL goes on the wire too */
    char buffer[1024];
    struct sockaddr_in server;
    ssize_t sent;
    ssize_t received;
    int fd;
    int ok;

    if (argc > 2) {
        char *end = NULL;
        errno = 0;
        port = strtol(argv[2], &end, 10);
        if (errno != 0 || end == argv[2] || *end != '\0' || port < 1 || port > 65535) {
            fprintf(stderr, "comclient: bad port: %s\n", argv[2]);
            return 2;
        }
    }

    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, address, &server.sin_addr) != 1) {
        fprintf(stderr, "comclient: not an IPv4 address: %s\n", address);
        return 2;
    }

    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("socket()");
        return 1;
    }
    printf("socket() is OK\n");

    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0) {
        perror("connect()");
        close(fd);
        return 1;
    }
    printf("connect() is OK\n");

    /* ONE send(), as the original: it assumes the kernel took all 49 bytes. */
    sent = send(fd, msg, len, 0);
    if (sent < 0) {
        perror("send()");
        close(fd);
        return 1;
    }
    printf("send() is OK\n");
    printf("%d bytes sent.\n", (int)sent);

    /* ONE recv(), as the original: it assumes the whole echo arrived at once. */
    received = recv(fd, buffer, sizeof buffer - 1, 0);
    if (received < 0) {
        perror("recv()");
        close(fd);
        return 1;
    }
    printf("recv() is OK\n");
    printf("%d bytes received.\n", (int)received);

    ok = (size_t)sent == len && (size_t)received == len && memcmp(buffer, msg, len) == 0;
    if (ok)
        printf("The sent message: \"%s\" successfully received by server and echoed back to "
               "client!\n",
               msg);
    else
        printf("The echo does not match the sent message.\n");

    close(fd);
    return ok ? 0 : 1;
}
