/* portfwd-keeper: the supervisor's long quiet life (hook/oci_portfwd/supervisor.py), without
 * an interpreter: ~0.3 MB instead of a second CPython per forwarded container (issue 12).
 *
 * The Python supervisor binds nothing and decides nothing here: once its core serves (it
 * said "ready" and, builtin, handed up its seccomp listener) it execs
 *
 *     portfwd-keeper NAME LOG_FD LEVEL CONTAINER_PID CONTAINER_FD CORE_PID CORE_FD NOTIFY_FD
 *                    RECORD COUNTERS LISTENER_FDS -- PYTHON_ARGV...
 *
 *   NAME          the process name (portfwd:<id>; exec set it to the file's name)
 *   LOG_FD        the container's log (O_APPEND), LEVEL the log level (10 debug ... 40 error)
 *   CONTAINER_FD  a pidfd of the container's process, CORE_FD one of the core (our child)
 *   NOTIFY_FD     the core's seccomp listener (a forbidden call waits there), or -1
 *   RECORD        the state file; COUNTERS the traffic page (stats.py); both go at the end
 *   LISTENER_FDS  the host listeners, comma-separated: held here, closed at the end
 *   PYTHON_ARGV   what to exec when there is something to decide: the supervisor again
 *                 (supervisor.resume), with every descriptor above still open
 *
 * and waits. Three things end the wait:
 *   - SIGTERM, SIGINT or SIGHUP (poststop), or the container's exit: the teardown, here, as
 *     supervisor.py's: the core gets SIGTERM (SIGKILL after 1 s), the listeners are closed,
 *     every child is reaped (killed after 1 s), the state file and the counters go (the
 *     state file only if it still names this process), exit 0. The container's delete waits
 *     for this: no interpreter starts on that path.
 *   - the core's exit, or a forbidden system call on its listener: exec PYTHON_ARGV, which
 *     logs it, names the call, restarts the core with its backoff, and execs this again.
 *   - SIGCHLD: the dialers of dead cores (we are their subreaper) are reaped, a SIGSYS named.
 * Signals are blocked across both execs (the handlers are installed, then unblocked): a stop
 * that comes meanwhile waits, and is seen, instead of killing the process mid-way. No
 * signal stays blocked while this waits (tests/e2e/test_signals.py).
 *
 * Log lines as logs.HookLog writes them: into LOG_FD, and to syslog when there is one
 * (non-blocking: a syslog that does not read loses the line there, never in the file).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STOP_GRACE_MS 1000 /* supervisor.STOP_GRACE */
#define LOG_USER_FACILITY 1

static int log_fd = -1, log_level = 20, syslog_fd = -1;
static int wake[2] = {-1, -1};
static pid_t me;

static int pidfd_send(int pidfd, int sig)
{
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

static void syslog_connect(void)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX, .sun_path = "/dev/log"};
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return;
    }
    syslog_fd = fd;
}

static void to_syslog(int priority, const char *text)
{
    char line[2048];
    int n = snprintf(line, sizeof line, "<%d>oci-portfwd-hook[%d]: %s", (LOG_USER_FACILITY << 3) | priority,
                     (int)me, text);
    if (n < 0)
        return;
    if (n >= (int)sizeof line)
        n = sizeof line - 1;
    size_t len = (size_t)n + 1; /* with the NUL, as SysLogHandler frames it */
    if (syslog_fd >= 0 && send(syslog_fd, line, len, 0) >= 0)
        return;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return; /* the syslog does not read: dropped there, kept in the file */
    if (syslog_fd >= 0) {
        close(syslog_fd); /* gone (journald restarted): once more, on a new connection */
        syslog_fd = -1;
    }
    syslog_connect();
    if (syslog_fd >= 0)
        (void)send(syslog_fd, line, len, 0);
}

/* One line: "2026-11-27 22:47:09,123 PID LEVEL message" (logs.format_line). */
static void say(int level, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void say(int level, const char *format, ...)
{
    static const struct {
        int level, priority;
        const char *name;
    } levels[] = {{10, 7, "DEBUG"}, {20, 6, "INFO"}, {30, 4, "WARNING"}, {40, 3, "ERROR"}};
    if (level < log_level)
        return;
    int i = level / 10 - 1;
    char text[1536], line[1800], stamp[32];
    va_list ap;
    va_start(ap, format);
    vsnprintf(text, sizeof text, format, ap);
    va_end(ap);
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    localtime_r(&now.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    int n = snprintf(line, sizeof line, "%s,%03ld %d %s %s\n", stamp, now.tv_nsec / 1000000, (int)me,
                     levels[i].name, text);
    if (n > (int)sizeof line - 1)
        n = sizeof line - 1;
    to_syslog(levels[i].priority, text);
    if (log_fd >= 0 && n > 0)
        (void)!write(log_fd, line, (size_t)n);
}

static void on_signal(int signum)
{
    int saved = errno;
    unsigned char b = (unsigned char)signum;
    (void)!write(wake[1], &b, 1);
    errno = saved;
}

static void signal_name(int signum, char *out, size_t size)
{
    const char *abbrev = sigabbrev_np(signum);
    if (abbrev)
        snprintf(out, size, "SIG%s", abbrev);
    else
        snprintf(out, size, "signal %d", signum);
}

static void describe_status(int status, char *out, size_t size)
{
    if (WIFSIGNALED(status)) {
        char name[32];
        signal_name(WTERMSIG(status), name, sizeof name);
        snprintf(out, size, "killed by %s", name);
    } else {
        snprintf(out, size, "exit code %d", WEXITSTATUS(status));
    }
}

/* Our children, from /proc (procfs.children): the core and the dialers left to us. */
static int children(pid_t *out, int max)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)me);
    FILE *f = fopen(path, "re");
    int n = 0;
    if (!f)
        return 0;
    int pid;
    while (n < max && fscanf(f, "%d", &pid) == 1)
        out[n++] = pid;
    fclose(f);
    return n;
}

static void reap_orphans(pid_t core)
{
    pid_t kids[64];
    int n = children(kids, 64);
    for (int i = 0; i < n; i++) {
        int status;
        if (kids[i] == core || waitpid(kids[i], &status, WNOHANG) <= 0)
            continue;
        if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS)
            say(30,
                "the core's dialer pid %d was killed by its seccomp filter: a forbidden system call "
                "(the kernel's audit log names it)",
                (int)kids[i]);
    }
}

static int readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r;
    do
        r = poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    return r > 0;
}

static void drain_wake(int *stop_signal, int *child_signal)
{
    unsigned char buf[64];
    ssize_t n;
    while ((n = read(wake[0], buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == SIGCHLD)
                *child_signal = 1;
            else if (!*stop_signal)
                *stop_signal = buf[i];
        }
}

/* supervisor._reap_all: every child, killed if it lingers past the grace. */
static void reap_all(void)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int killed = 0;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == ECHILD)
            return;
        if (pid > 0)
            continue;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long waited = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (waited >= STOP_GRACE_MS && !killed) {
            pid_t kids[64];
            int n = children(kids, 64);
            for (int i = 0; i < n; i++)
                kill(kids[i], SIGKILL);
            killed = 1;
        }
        /* A SIGCHLD writes to the wake pipe: wait for it, not a fixed sleep. */
        readable(wake[0], 50);
        unsigned char buf[64];
        while (read(wake[0], buf, sizeof buf) > 0)
            ;
    }
}

/* statefile.remove_record(owner_pid=me): the state file goes only while it names us (a
 * newer forwarding of the same container id may have written its own). */
static void remove_record(const char *record, const char *counters)
{
    char buf[8192];
    int fd = open(record, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    const char *key = strstr(buf, "\"supervisor_pid\"");
    if (!key)
        return;
    key += strlen("\"supervisor_pid\"");
    while (*key == ' ' || *key == ':')
        key++;
    if (!isdigit((unsigned char)*key) || strtol(key, NULL, 10) != me)
        return;
    unlink(counters);
    unlink(record);
}

/* The listeners, "3,4,7": closed first at the teardown, so that the ports are free while the
 * children are still being reaped (the exit would close them only after). */
static void close_listeners(const char *text)
{
    char *end;
    while (*text) {
        long fd = strtol(text, &end, 10);
        if (end == text)
            return;
        close((int)fd);
        text = *end == ',' ? end + 1 : end;
    }
}

static void block_signals(int how)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGCHLD);
    sigprocmask(how, &set, NULL);
}

int main(int argc, char **argv)
{
    if (argc < 13 || strcmp(argv[12], "--") != 0) {
        fprintf(stderr, "portfwd-keeper: exec'd by the supervisor only (hook/native/portfwd-keeper.c)\n");
        return 2;
    }
    me = getpid();
    prctl(PR_SET_NAME, argv[1], 0, 0, 0);
    /* exec made the process dumpable again: supervisor._settle's setting, once more. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    log_fd = atoi(argv[2]);
    log_level = atoi(argv[3]);
    pid_t container_pid = atoi(argv[4]);
    int container_fd = atoi(argv[5]);
    pid_t core_pid = atoi(argv[6]);
    int core_fd = atoi(argv[7]);
    int notify_fd = atoi(argv[8]);
    const char *record = argv[9], *counters = argv[10], *listeners = argv[11];
    char **python = argv + 13;
    /* The Python supervisor opens its own log when it comes back. */
    fcntl(log_fd, F_SETFD, FD_CLOEXEC);
    if (access("/dev/log", F_OK) == 0)
        syslog_connect();

    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        /* Back to Python for good (supervisor.PYTHON_SUPERVISOR_ENV), not back and forth. */
        say(40, "portfwd-keeper: pipe: %s; the supervisor continues in Python", strerror(errno));
        setenv("OCI_PORTFWD_PYTHON_SUPERVISOR", "1", 1);
        execv(python[0], python);
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGCHLD, &sa, NULL);
    block_signals(SIG_UNBLOCK); /* a stop that came during the exec arrives now */
    say(10, "the supervisor waits in portfwd-keeper (core pid %d)", (int)core_pid);

    char reason[128] = "";
    int stop_signal = 0, child_signal = 1; /* a child may have exited during the exec */
    for (;;) {
        drain_wake(&stop_signal, &child_signal);
        if (child_signal) {
            child_signal = 0;
            reap_orphans(core_pid);
        }
        if (stop_signal) {
            char name[32];
            signal_name(stop_signal, name, sizeof name);
            snprintf(reason, sizeof reason, "%s received (poststop)", name);
            break;
        }
        struct pollfd p[4] = {
            {.fd = wake[0], .events = POLLIN},
            {.fd = container_fd, .events = POLLIN},
            {.fd = core_fd, .events = POLLIN},
            {.fd = notify_fd, .events = POLLIN},
        };
        if (poll(p, notify_fd >= 0 ? 4 : 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            say(40, "portfwd-keeper: poll: %s", strerror(errno));
            break;
        }
        if (p[1].revents) {
            snprintf(reason, sizeof reason, "container process %d exited", (int)container_pid);
            break;
        }
        if (p[2].revents || (notify_fd >= 0 && p[3].revents)) {
            /* The core died, or broke its sandbox. If the container is gone too, this is
             * its end (the core goes with it); else the supervisor decides, in Python. */
            if (readable(container_fd, 0)) {
                snprintf(reason, sizeof reason, "container process %d exited", (int)container_pid);
                break;
            }
            block_signals(SIG_BLOCK);
            /* A stop caught meanwhile would be lost with this process's handler: raised
             * again, it waits blocked across the exec for the supervisor's handler. */
            drain_wake(&stop_signal, &child_signal);
            if (stop_signal)
                kill(me, stop_signal);
            execv(python[0], python);
            say(40, "cannot restart the forwarding core: exec %s: %s", python[0], strerror(errno));
            block_signals(SIG_UNBLOCK);
            snprintf(reason, sizeof reason, "the supervisor could not restart the core");
            break;
        }
    }

    say(20, "tearing down: %s", reason);
    int status;
    if (pidfd_send(core_fd, SIGTERM) == 0 && !readable(core_fd, STOP_GRACE_MS))
        pidfd_send(core_fd, SIGKILL);
    if (waitpid(core_pid, &status, 0) == core_pid) {
        char how[64];
        describe_status(status, how, sizeof how);
        say(10, "core pid %d stopped (%s)", (int)core_pid, how);
    }
    close_listeners(listeners);
    reap_all();
    remove_record(record, counters);
    return 0;
}
