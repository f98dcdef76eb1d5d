/* portfwd-dialer: the dialer's long-lived loop (hook/oci_portfwd/dialer_process.py), without an
 * interpreter: ~0.2 MB instead of a forked CPython's ~6 MB per container (issue 12).
 *
 * The Python dialer joins the container's user and network namespaces, says hello, brings
 * lo up, sets up the client-address routing, keeps CAP_NET_ADMIN only (no_new_privs set),
 * builds this loop's seccomp filter with libseccomp (seccomp_filter.export_native_dialer)
 * and execs
 *
 *     portfwd-dialer SOCKET_FD FILTER_FD MARK [4] [6] [cc=NAME]
 *
 *   SOCKET_FD  its end of the SOCK_SEQPACKET socketpair with the core (the only other
 *              descriptors are 0, 1, 2: /dev/null and the container's log)
 *   FILTER_FD  a pipe holding the filter as BPF (struct sock_filter[]); read and closed here
 *   MARK       SO_MARK of transparent sockets (client_routing.MARK)
 *   4, 6       the families whose client-address routing is ready: their sockets get
 *              IP_TRANSPARENT / IPV6_TRANSPARENT and the mark
 *   cc=NAME    TCP sockets get this congestion control, not the netns's default, which paces
 *              (hook/oci_portfwd/congestion_control.py: the dialer chose NAME and checked it)
 *
 * Not dumpable, from the exec on: the file is installed execute-only (mode 0111), which the
 * dialer (no CAP_DAC_*) cannot read, so the kernel (would_dump) execs it non-dumpable and gives
 * its memory to the user namespace where the file's owner is mapped: the host's for root's
 * file. Exec'ing a readable file in the container's user namespace would give the memory to
 * that namespace, where a process with CAP_SYS_PTRACE could attach even after
 * PR_SET_DUMPABLE 0 (tests/e2e/test_privileges.py checks that it cannot).
 *
 * Here: PR_SET_DUMPABLE 0 all the same (a warning if the file was readable), no capability
 * but CAP_NET_ADMIN, the filter, then the protocol of dialer.py: request `kind " " count` (kind t4 t6 u4 u6), reply
 * "S" kind with count non-blocking, close-on-exec sockets as SCM_RIGHTS, TCP ones with
 * SO_LINGER {1, 0}, TCP_NODELAY, cc=NAME's congestion control and, transparent ones,
 * SO_REUSEADDR. Exits 0 when the core closes its end; on an error one line on stderr
 * (the container's log) and exit 1, after which the core exits and the supervisor restarts
 * both. Nothing is allocated once the filter is loaded: no mmap, no brk.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif
#ifndef IPV6_TRANSPARENT
#define IPV6_TRANSPARENT 75
#endif

#define MAX_BATCH 32 /* dialer.MAX_BATCH */
#define MAX_FILTER (BPF_MAXINSNS * sizeof(struct sock_filter))
/* seccomp_filter.PROBE_ENV and PROBES: tests only (tests/e2e/test_privileges.py). */
#define PROBE_ENV "OCI_PORTFWD_TEST_SANDBOX_PROBE"

static const char *const probes[] = {"open", "exec", "ptrace", "socket", "raise"};
static pid_t self, parent; /* before the filter: getpid and getppid are not allowed */
static char *const true_argv[] = {"true", NULL};

/* One line on stderr, in a single write (the log is shared with supervisor and core). */
static void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *format, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, "portfwd-dialer pid %d: ", (int)self);
    va_list args;
    va_start(args, format);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, format, args);
    va_end(args);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, (size_t)n);
    (void)ignored;
}

static void fail(const char *what, int err) __attribute__((noreturn));
static void fail(const char *what, int err)
{
    if (err)
        say("%s: %s", what, strerror(err));
    else
        say("%s", what);
    _exit(1);
}

static int parse_int(const char *text, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 0);
    if (errno || end == text || *end || value < min || value > max)
        return -1;
    *out = value;
    return 0;
}

/* --- capabilities --------------------------------------------------------------------- */

/* The Python side raised CAP_NET_ADMIN into the inheritable and ambient sets so that it
 * survives the exec also where this process is not uid 0 of its user namespace (a rootful
 * container with a user namespace, which does not map host root). Neither is needed any
 * longer; what is left must be CAP_NET_ADMIN or less, everywhere. */
static void limit_capabilities(void)
{
    const unsigned long long allowed = 1ULL << CAP_NET_ADMIN;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];

    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        fail("clearing the ambient capabilities", errno);
    if (syscall(SYS_capget, &header, data) != 0)
        fail("capget", errno);
    data[0].inheritable = data[1].inheritable = 0;
    if (syscall(SYS_capset, &header, data) != 0)
        fail("capset", errno);
    if (syscall(SYS_capget, &header, data) != 0)
        fail("capget", errno);
    unsigned long long permitted = data[0].permitted | (unsigned long long)data[1].permitted << 32;
    unsigned long long effective = data[0].effective | (unsigned long long)data[1].effective << 32;
    unsigned long long inheritable = data[0].inheritable | (unsigned long long)data[1].inheritable << 32;
    unsigned long long bounding = 0;
    for (int cap = 0; cap < 64; cap++) {
        int r = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
        if (r < 0)
            break; /* past the kernel's last capability */
        if (r > 0)
            bounding |= 1ULL << cap;
    }
    if ((permitted | effective | inheritable | bounding) & ~allowed) {
        say("refusing to run with capabilities other than CAP_NET_ADMIN (permitted %#llx, "
            "effective %#llx, inheritable %#llx, bounding %#llx)",
            permitted, effective, inheritable, bounding);
        _exit(1);
    }
    if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        fail("refusing to run without no_new_privs", 0);
}

/* --- seccomp -------------------------------------------------------------------------- */

static void load_filter(int fd)
{
    static struct sock_filter code[BPF_MAXINSNS + 1]; /* one more: to see a longer one */
    size_t size = 0;
    for (;;) {
        ssize_t n = read(fd, (char *)code + size, sizeof code - size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("reading the seccomp filter", errno);
        if (n == 0)
            break;
        size += (size_t)n;
        if (size > MAX_FILTER)
            fail("the seccomp filter is too long", 0);
    }
    close(fd);
    if (size == 0 || size % sizeof code[0])
        fail("the seccomp filter is empty or truncated", 0);
    struct sock_fprog program = {(unsigned short)(size / sizeof code[0]), code};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0) != 0)
        fail("loading the seccomp filter", errno);
}

/* Tests only: SIGRTMIN+N attempts probe N, as seccomp_filter._install_probes does in Python:
 * each forbidden call must kill this process (SIGSYS) before it returns. */
static void probe(int signum)
{
    int n = signum - SIGRTMIN;
    switch (n) {
    case 0:
        openat(AT_FDCWD, "/etc/hostname", O_RDONLY | O_CLOEXEC);
        break;
    case 1:
        execve("/bin/true", true_argv, environ);
        break;
    case 2:
        ptrace(PTRACE_ATTACH, parent, 0, 0);
        break;
    case 3: {
        int s = socket(AF_INET, SOCK_STREAM, 0); /* allowed here: the dialer's job */
        if (s >= 0)
            close(s);
        break;
    }
    default:
        fail("sandbox probe: a bug", 0);
    }
    say("sandbox probe %s: the call was allowed", probes[n]);
}

static void install_probes(void)
{
    const char *on = getenv(PROBE_ENV);
    if (!on || !*on)
        return;
    parent = getppid();
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = probe;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (int n = 0; n < (int)(sizeof probes / sizeof probes[0]); n++)
        if (sigaction(SIGRTMIN + n, &action, NULL) != 0)
            fail("sigaction", errno);
}

/* --- the loop ------------------------------------------------------------------------- */

struct kind {
    char name[3];
    int family, type;
    int transparent;
};

static struct kind kinds[] = {
    {"t4", AF_INET, SOCK_STREAM, 0},
    {"t6", AF_INET6, SOCK_STREAM, 0},
    {"u4", AF_INET, SOCK_DGRAM, 0},
    {"u6", AF_INET6, SOCK_DGRAM, 0},
};

static void set_transparent(int family, int on)
{
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (kinds[i].family == family)
            kinds[i].transparent = on;
}

static int make_transparent(int s, int family, int mark)
{
    int one = 1;
    if (family == AF_INET6 ? setsockopt(s, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof one)
                           : setsockopt(s, SOL_IP, IP_TRANSPARENT, &one, sizeof one))
        return -1;
    return setsockopt(s, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
}

/* A request is `kind` or `kind " " count`; NULL for anything else. */
static struct kind *parse_request(char *request, ssize_t length, int *count)
{
    struct kind *found = NULL;
    if (length < 2)
        return NULL;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (request[0] == kinds[i].name[0] && request[1] == kinds[i].name[1])
            found = &kinds[i];
    if (!found)
        return NULL;
    long n = 1;
    if (length > 2) {
        if (request[2] != ' ')
            return NULL;
        request[length] = '\0';
        if (length > 3 && parse_int(request + 3, 0, 1L << 30, &n) != 0)
            return NULL;
    }
    *count = n < 1 ? 1 : n > MAX_BATCH ? MAX_BATCH : (int)n;
    return found;
}

static void send_sockets(int sock, struct kind *kind, const int *fds, int count)
{
    char reply[3] = {'S', kind->name[0], kind->name[1]};
    struct iovec iov = {reply, sizeof reply};
    union {
        char buf[CMSG_SPACE(MAX_BATCH * sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(count * sizeof(int));
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(count * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, count * sizeof(int));
    while (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) {
        if (errno == EINTR)
            continue;
        if (errno == EPIPE || errno == ECONNRESET)
            _exit(0); /* the core is gone: nobody to make sockets for */
        fail("sending sockets to the core", errno);
    }
}

/* congestion_control.py's choice ("" to keep the netns's default); TCP_CA_NAME_MAX is 16 */
static char congestion[16];

static void serve(int sock, int mark)
{
    static const int linger_reset[2] = {1, 0}; /* struct linger {l_onoff 1, l_linger 0} */
    char request[64];
    int fds[MAX_BATCH];
    for (;;) {
        ssize_t length = recv(sock, request, sizeof request - 1, 0);
        if (length < 0 && errno == EINTR)
            continue;
        if (length == 0 || (length < 0 && errno == ECONNRESET))
            _exit(0);
        if (length < 0)
            fail("reading a request from the core", errno);
        int count;
        struct kind *kind = parse_request(request, length, &count);
        if (!kind)
            fail("a request of the core is not `kind count`", 0);
        for (int i = 0; i < count; i++) {
            fds[i] = socket(kind->family, kind->type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fds[i] < 0)
                fail(kind->family == AF_INET ? "making an IPv4 socket" : "making an IPv6 socket", errno);
        }
        if (kind->transparent) {
            for (int i = 0; i < count; i++) {
                if (make_transparent(fds[i], kind->family, mark) != 0) {
                    /* Not expected once the routing is set up; the core's bind of such a
                     * socket then fails and it dials from loopback (as dialer.py does). */
                    say("IPv%c sockets cannot be made transparent (%s): services see loopback",
                        kind->name[1], strerror(errno));
                    set_transparent(kind->family, 0);
                    break;
                }
            }
        }
        if (kind->type == SOCK_STREAM) {
            /* Reset, not FIN, if the core dies holding the connection (see tcp_relay); no
             * Nagle in a relay (listeners._bind_one). */
            static const int on = 1;
            for (int i = 0; i < count; i++) {
                if (setsockopt(fds[i], SOL_SOCKET, SO_LINGER, linger_reset, sizeof linger_reset) != 0)
                    fail("SO_LINGER", errno);
                if (setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) != 0)
                    fail("TCP_NODELAY", errno);
                /* The core binds a transparent one to the client's address and port, which
                 * our last connection from that client may hold in TIME_WAIT: connect() then
                 * tells whether the 4-tuple is free (source_address.py). Set here, it costs
                 * the core's loop nothing per connection. */
                if (kind->transparent && setsockopt(fds[i], SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) != 0)
                    fail("SO_REUSEADDR", errno);
                if (congestion[0] &&
                    setsockopt(fds[i], IPPROTO_TCP, TCP_CONGESTION, congestion, strlen(congestion)) != 0) {
                    /* The dialer set it on a socket of this netns before the exec: not
                     * expected. The connections still work, paced. */
                    say("TCP sockets keep the netns's congestion control: %s cannot be set (%s)",
                        congestion, strerror(errno));
                    congestion[0] = '\0';
                }
            }
        }
        send_sockets(sock, kind, fds, count);
        for (int i = 0; i < count; i++)
            close(fds[i]);
    }
}

int main(int argc, char **argv)
{
    /* First: a process in the container's user namespace must not ptrace it or read its
     * memory. Exec of an execute-only file made it non-dumpable already (see the top). */
    int dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    self = getpid();
    long sock, filter, mark;
    if (argc < 4 || parse_int(argv[1], 3, 1 << 20, &sock) || parse_int(argv[2], 3, 1 << 20, &filter) ||
        parse_int(argv[3], 0, 0xffffffffL, &mark))
        fail("usage: portfwd-dialer SOCKET_FD FILTER_FD MARK [4] [6] [cc=NAME] (started by the core's dialer)", 0);
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "4") == 0)
            set_transparent(AF_INET, 1);
        else if (strcmp(argv[i], "6") == 0)
            set_transparent(AF_INET6, 1);
        else if (strncmp(argv[i], "cc=", 3) == 0 && argv[i][3] && strlen(argv[i] + 3) < sizeof congestion)
            strcpy(congestion, argv[i] + 3);
        else
            fail("usage: portfwd-dialer SOCKET_FD FILTER_FD MARK [4] [6] [cc=NAME] (started by the core's dialer)", 0);
    }
    limit_capabilities();
    if (dumpable == 1)
        say("warning: the dialer could read this program's file; install it mode 0111 "
            "(execute-only), or the container's user namespace may trace the dialer");
    install_probes();
    /* strerror's first call must not happen under the filter, should it ever load a table. */
    (void)strerror(EPIPE);
    load_filter((int)filter);
    serve((int)sock, (int)mark);
}
