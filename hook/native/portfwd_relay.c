/* portfwd_relay: the established TCP pairs of a core, relayed by a thread in C (issue 15).
 *
 * The core's Python loop accepts, dials, writes a PROXY header if asked, and then hands
 * the pair over: add() puts both sockets into a thread's epoll set and the loop forgets
 * them (the thread shares the process's descriptor table; no message, no wake-up for the
 * hand-over itself). From there, that thread alone relays:
 *
 *     client ◀──▶ this thread's epoll ◀──▶ container-side socket
 *       input on a socket feeds the way it is the source of (tcp_relay.py's Direction):
 *         small messages: recv into one shared buffer, send; what dst does not take goes
 *           into a pipe and the way splices from there (nothing is allocated per message)
 *         a read that fills the buffer means bulk: src → pipe → dst with splice, zero copy,
 *           the pipe borrowed from a pool while bytes are in flight
 *       EOF on one side → SO_LINGER off, shutdown(SHUT_WR) on the other once every byte is
 *         out; both ways done → close both (FIN both ways)
 *       a reset or an error on one side → close both with SO_LINGER {1, 0}: reset both
 *
 * The same rules as tcp_relay.py, so the same guarantees: half-close, resets both ways, a
 * process death resets every socket (SO_LINGER {1, 0} from accept/socket() until a way is
 * complete), no truncated transfer that looks complete. Why a thread: a keep-alive request
 * through the Python loop cost the core ~17 µs of CPU, through this ~12 (most of it the
 * kernel's: waking the reader, being preempted by it), and the threads run beside the loop
 * and each other (docs/data-path.md). A thread shares the core's descriptors, memory,
 * privileges and death (no process to start, watch or restart; no interpreter: ~0.1 MB).
 * It touches no Python object (the GIL is never taken) and takes no lock: add() fills a
 * pair, puts its sockets in the thread's epoll set and marks it armed; the thread frees
 * closed pairs back to add() through an atomic list (see "hand-over"). A lock held by the
 * thread over its events made every hand-over, and the accepting loop behind it, wait for
 * the sends and closes of a whole batch (docs/data-path.md).
 *
 * Counters: the traffic page (stats.py) gets bytes_to_container / bytes_to_client from the
 * threads only (atomic adds; Python relays nothing once they run) and closes in a slot of
 * their own (stats.RELAY_CLOSED), so that Python and C never write the same slot.
 *
 * Least privilege: the thread starts after the core dropped its privileges (it inherits
 * the dropped credentials) and before the core's filter is loaded; it loads its own, the
 * allow-list seccomp_filter.RELAY_SYSCALLS exported as BPF by Python (a forbidden call
 * kills the process, as in the dialer; the core is then restarted). Signals are blocked
 * here: they are the Python thread's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "udp_batch.h"

#define COPY_SIZE (1 << 16)
#define PIPE_SIZE (1 << 20)
#define KEEP_PIPES 64
#define MAX_EVENTS 256
#define INPUT_EVENTS (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define END_EVENTS (EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
#define CTL_TAG ((void *)1)

/* stats.py's slots */
enum { TO_CONTAINER = 3, TO_CLIENT = 4, RELAY_CLOSED = 7 };

struct pair;

struct end {  /* epoll's data: which socket of which pair */
    struct pair *pair;
    int side;  /* 0 the client, 1 the container side */
};

struct way {  /* src → dst */
    int src, dst;  /* sides */
    int pipe_r, pipe_w;  /* -1: none borrowed */
    size_t buffered;  /* bytes in the pipe */
    int eof, done, bulk;
    int slot;
};

struct pair {
    int fd[2];
    int out_watched[2];  /* EPOLLOUT asked for on this socket (once needed, kept) */
    int closed;
    int armed;  /* set by add_pair once both sockets are in the epoll set (atomic) */
    struct end ends[2];
    struct way ways[2];  /* 0: client → container, 1: container → client */
    struct pair *next_free;  /* on one of the lists below */
};

struct relay {
    int epfd, ctl, report;
    struct pair *free_pairs;  /* add_pair's own: pairs' memory, reused (see new_pair) */
    struct pair *returned;  /* atomic: freed by the thread, taken whole by add_pair */
    struct pair *failed;  /* atomic: pairs add_pair could not arm, freed by the thread */
    int64_t *counts;
    int idle_pipes[KEEP_PIPES][2];
    int n_idle;
    struct pair *to_free;  /* the thread's: closed during this batch, returned after it */
    struct sock_fprog filter;
    int ready_errno;
    sem_t ready;
    char buffer[COPY_SIZE];  /* one per thread, for every connection it relays */
};

/* Pairs come from mmap'd slabs and go back to a free list, not to malloc: glibc's malloc,
 * shrinking a thread's heap, opens /proc/sys/vm/overcommit_memory, and openat is not on
 * this thread's list. The slabs stay for the process's life: the peak of open connections
 * (~170 bytes each: 5,000 connections, ~0.8 MB). */
static struct pair *new_pair(struct relay *r)
{
    if (r->free_pairs == NULL)  /* what the thread gave back since the last time */
        r->free_pairs = __atomic_exchange_n(&r->returned, NULL, __ATOMIC_ACQUIRE);
    if (r->free_pairs == NULL) {
        size_t size = 1 << 16, n = size / sizeof(struct pair);
        struct pair *slab = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (slab == MAP_FAILED)
            return NULL;
        for (size_t i = 0; i < n; i++) {
            slab[i].next_free = r->free_pairs;
            r->free_pairs = &slab[i];
        }
    }
    struct pair *p = r->free_pairs;
    r->free_pairs = p->next_free;
    memset(p, 0, sizeof *p);
    return p;
}

/* Pushes a chain (first … last) on an atomic list: the thread gives pairs back to add_pair,
 * add_pair gives the thread the pairs it could not arm. Each list has one taker, which takes
 * it whole (exchange): no ABA. */
static void push_chain(struct pair **list, struct pair *first, struct pair *last)
{
    struct pair *head = __atomic_load_n(list, __ATOMIC_RELAXED);
    do
        last->next_free = head;
    while (!__atomic_compare_exchange_n(list, &head, first, 1, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
}

static void add_count(struct relay *r, int slot, int64_t n)
{
    /* The relay threads share these slots (the Python loop writes none of them while they
     * run): an atomic add, ~5 ns uncontended; `ps` reads aligned 8-byte words, never torn. */
    __atomic_fetch_add(&r->counts[slot], n, __ATOMIC_RELAXED);
}

/* --- pipes ------------------------------------------------------------------------------ */

static int take_pipe(struct relay *r, struct way *w)
{
    if (r->n_idle) {
        r->n_idle--;
        w->pipe_r = r->idle_pipes[r->n_idle][0];
        w->pipe_w = r->idle_pipes[r->n_idle][1];
        return 0;
    }
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0)
        return -errno;
    fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE);  /* over the limit: the default size still works */
    w->pipe_r = p[0];
    w->pipe_w = p[1];
    return 0;
}

static void return_pipe(struct relay *r, struct way *w)
{
    if (w->pipe_r < 0)
        return;
    if (!w->buffered && r->n_idle < KEEP_PIPES) {
        r->idle_pipes[r->n_idle][0] = w->pipe_r;
        r->idle_pipes[r->n_idle][1] = w->pipe_w;
        r->n_idle++;
    } else {  /* bytes left in it (a reset): only closing empties it */
        close(w->pipe_r);
        close(w->pipe_w);
    }
    w->pipe_r = w->pipe_w = -1;
    w->buffered = 0;
}

/* --- one pair --------------------------------------------------------------------------- */

static void close_pair(struct relay *r, struct pair *p, int graceful)
{
    static const struct linger reset = {1, 0};
    if (p->closed)
        return;
    p->closed = 1;
    for (int side = 0; side < 2; side++) {
        /* Graceful: both ways ended in FIN and shutdown_write turned the reset off on both.
         * Otherwise SO_LINGER {1, 0} resets the peer (set again: one way may have cleared
         * it when it was complete). close() takes the socket out of the epoll set. */
        if (!graceful)
            setsockopt(p->fd[side], SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(p->fd[side]);
        return_pipe(r, &p->ways[side]);
    }
    add_count(r, RELAY_CLOSED, 1);
    p->next_free = r->to_free;  /* events of this batch may still name it */
    r->to_free = p;
}

static void watch_out(struct relay *r, struct pair *p, int side)
{
    if (p->out_watched[side])
        return;
    struct epoll_event ev = {
        .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &p->ends[side]};
    if (epoll_ctl(r->epfd, EPOLL_CTL_MOD, p->fd[side], &ev) == 0)
        p->out_watched[side] = 1;
}

/* Every byte of this way is queued: FIN after it, and from here a close (even this
 * process's death) delivers, not resets, what is left in the send buffer. 0 or an errno. */
static int shutdown_write(int fd)
{
    static const struct linger off = {0, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &off, sizeof off) != 0 ||
        (shutdown(fd, SHUT_WR) != 0 && errno != ENOTCONN))
        return errno;
    return 0;
}

/* The bulk mode, and what dst did not take: src → pipe → dst. 0 or an errno (reset). */
static int splice_way(struct relay *r, struct pair *p, struct way *w)
{
    size_t read = 0;
    while (!w->done) {
        if (w->buffered) {
            ssize_t n = splice(w->pipe_r, NULL, p->fd[w->dst], NULL, w->buffered, SPLICE_FLAGS);
            if (n < 0) {
                if (errno != EAGAIN)
                    return errno;
                watch_out(r, p, w->dst);
                return 0;
            }
            w->buffered -= (size_t)n;
            add_count(r, w->slot, n);
        } else if (w->eof) {
            return_pipe(r, w);
            int err = shutdown_write(p->fd[w->dst]);
            if (err)
                return err;
            w->done = 1;
        } else {
            if (w->pipe_r < 0) {
                int err = take_pipe(r, w);
                if (err)
                    return -err;
            }
            ssize_t n = splice(p->fd[w->src], NULL, w->pipe_w, NULL, PIPE_SIZE, SPLICE_FLAGS);
            if (n < 0) {
                if (errno != EAGAIN)
                    return errno;
                /* src is empty (the pipe was): less than a buffer's worth since the
                 * last wake-up means small messages again, copied. */
                return_pipe(r, w);
                w->bulk = read >= COPY_SIZE;
                return 0;
            }
            if (n == 0)
                w->eof = 1;
            w->buffered += (size_t)n;
            read += (size_t)n;
        }
    }
    return 0;
}

/* Small messages. A short read means src was empty when read: new bytes, EOF or an error
 * raise a new edge, so it ends the pump unless `drain` (the event said an EOF or an error
 * is pending: read to it). 0 or an errno. */
static int copy_way(struct relay *r, struct pair *p, struct way *w, int drain)
{
    for (;;) {
        if (w->eof) {
            int err = shutdown_write(p->fd[w->dst]);
            if (err)
                return err;
            w->done = 1;
            return 0;
        }
        ssize_t n = recv(p->fd[w->src], r->buffer, COPY_SIZE, 0);
        if (n < 0)
            return errno == EAGAIN ? 0 : errno;
        if (n == 0) {
            w->eof = 1;
            continue;
        }
        ssize_t sent = send(p->fd[w->dst], r->buffer, (size_t)n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EAGAIN)
                return errno;
            sent = 0;
        }
        add_count(r, w->slot, sent);
        if (sent < n) {
            /* dst is full: the rest waits in a pipe (it holds 64 KiB at least), and the
             * way splices from there when dst is writable again. */
            int err = take_pipe(r, w);
            if (err)
                return -err;
            ssize_t kept = write(w->pipe_w, r->buffer + sent, (size_t)(n - sent));
            if (kept != n - sent)
                return kept < 0 ? errno : EIO;
            w->buffered = (size_t)kept;
            watch_out(r, p, w->dst);
            return 0;
        }
        if (n == COPY_SIZE) {
            w->bulk = 1;
            return splice_way(r, p, w);
        }
        if (!drain)
            return 0;
    }
}

static int pump(struct relay *r, struct pair *p, struct way *w, int drain)
{
    if (w->done)
        return 0;
    if (w->buffered || w->bulk)
        return splice_way(r, p, w);
    return copy_way(r, p, w, drain);
}

static void on_event(struct relay *r, struct end *e, uint32_t events)
{
    struct pair *p = e->pair;
    /* An event of a pair add_pair is still adding (its first socket is in the set, the
     * second not yet): wait the microseconds until it is; an edge-triggered event cannot be
     * put off. */
    while (!__atomic_load_n(&p->armed, __ATOMIC_ACQUIRE))
        sched_yield();
    if (p->closed)
        return;
    int side = e->side, err = 0;
    struct way *from = &p->ways[side], *to = &p->ways[1 - side];
    if (events & INPUT_EVENTS)
        err = pump(r, p, from, events & END_EVENTS);
    if (!err && events & EPOLLOUT && to->buffered)
        err = pump(r, p, to, 0);
    if (err) {
        /* A reset, or an error no relay can go on after (out of pipes: ENFILE): both
         * sides get a reset, never a FIN that would say "complete". */
        close_pair(r, p, 0);
    } else if (p->ways[0].done && p->ways[1].done) {
        close_pair(r, p, 1);
    }
}

/* --- hand-over ---------------------------------------------------------------------------- */

/* Called by the core's Python thread (add()): the pair goes straight into this thread's
 * epoll set, no message and no wake-up of its own (the thread wakes when the pair has
 * something to relay, which is often at once: the client's first request). No lock: the
 * pair is filled before its first socket enters the set (epoll_ctl orders that before the
 * thread's epoll_wait sees it), the thread waits for `armed` before it touches a pair, and
 * a pair that could not be armed (its sockets reset and closed) goes to the thread, which
 * frees it after the batch its events may be in. 0, or an errno (the pair is then reset
 * and counted). */
static int add_pair(struct relay *r, int client, int upstream)
{
    static const struct linger reset = {1, 0};
    int fds[2] = {client, upstream}, err = 0;
    struct pair *p = new_pair(r);
    if (p == NULL) {
        err = ENOMEM;
    } else {
        for (int side = 0; side < 2; side++) {
            p->fd[side] = fds[side];
            p->ends[side].pair = p;
            p->ends[side].side = side;
            struct way *w = &p->ways[side];
            w->src = side;
            w->dst = 1 - side;
            w->pipe_r = w->pipe_w = -1;
            w->slot = side == 0 ? TO_CONTAINER : TO_CLIENT;
        }
        /* The container side first: a socket with bytes or an EOF already waiting queues
         * its event (and wakes the thread) as it enters the set, and that is the client's
         * request far more often than a service speaking first. Added second, the client
         * wakes the thread with nothing left between that and `armed` but this call's
         * return; added first, the thread woke a whole epoll_ctl early and yielded, or
         * preempted this thread, until the pair was armed (~0.5 sched_yield per new
         * connection under wrk -H "Connection: close"). */
        for (int i = 0; i < 2 && !err; i++) {
            int side = 1 - i;
            struct epoll_event ev = {
                .events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = &p->ends[side]};
            if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, fds[side], &ev) != 0)
                err = errno;
        }
        if (err)
            p->closed = 1;  /* an event of its first socket may be out already: ignored */
    }
    if (err) {
        for (int side = 0; side < 2; side++) {
            setsockopt(fds[side], SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
            close(fds[side]);  /* out of the epoll set: no event after this one */
        }
        add_count(r, RELAY_CLOSED, 1);
    }
    if (p != NULL) {
        __atomic_store_n(&p->armed, 1, __ATOMIC_RELEASE);
        if (err)
            push_chain(&r->failed, p, p);
    }
    return err;
}

static void *relay_main(void *arg)
{
    struct relay *r = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    r->ready_errno = 0;
    if (r->filter.len && (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
                          prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &r->filter, 0, 0) != 0))
        r->ready_errno = errno;
    if (!r->ready_errno) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = CTL_TAG};
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->ctl, &ev) != 0)
            r->ready_errno = errno;
    }
    int failed = r->ready_errno;
    sem_post(&r->ready);  /* r->filter's memory is the starter's: not used after this */
    if (failed)
        return NULL;

    struct epoll_event events[MAX_EVENTS];
    int why = 0;
    for (;;) {
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            why = errno;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == CTL_TAG)
                goto out;  /* the core closed its end (or wrote to it, which nothing does) */
            on_event(r, events[i].data.ptr, events[i].events);
        }
        /* Pairs closed in this batch, and those add_pair could not arm, go back to add_pair
         * once no event of this batch can name them (their sockets are closed: no later
         * event does). */
        struct pair *first = r->to_free, *last = first;
        r->to_free = NULL;
        if (last)
            while (last->next_free)
                last = last->next_free;
        struct pair *failed = __atomic_exchange_n(&r->failed, NULL, __ATOMIC_ACQUIRE);
        if (failed) {  /* appended: each pair is walked over once */
            if (last)
                last->next_free = failed;
            else
                first = failed;
            for (last = failed; last->next_free; last = last->next_free) {
            }
        }
        if (first)
            push_chain(&r->returned, first, last);
    }
out:
    /* The core reads this, says so in its log and exits to be restarted: its connections
     * are reset by the process's end. */
    if (write(r->report, &why, sizeof why) < 0) {
    }
    return NULL;
}

/* --- Python ----------------------------------------------------------------------------- */

/* The threads this process started (a core starts one per CPU, at most four, once): add()
 * names one by its index. They live as long as the process. */
#define MAX_RELAYS 64
static struct relay *relays[MAX_RELAYS];
static int n_relays;

static PyObject *start(PyObject *self, PyObject *args)
{
    int ctl, report;
    Py_buffer counts, filter;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiw*y*", &ctl, &report, &counts, &filter))
        return NULL;
    if (n_relays == MAX_RELAYS) {
        PyBuffer_Release(&counts);
        PyBuffer_Release(&filter);
        PyErr_SetString(PyExc_RuntimeError, "too many relay threads");
        return NULL;
    }
    /* mmap: zeroed pages that cost nothing until used (the buffer, the first request). */
    struct relay *r = mmap(NULL, sizeof *r, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) {
        PyBuffer_Release(&counts);
        PyBuffer_Release(&filter);
        return PyErr_NoMemory();
    }
    r->ctl = ctl;
    r->report = report;
    /* The page stays mapped for the process's life (the core never unmaps it): the buffer
     * is released here, its memory is not. */
    r->counts = counts.buf;
    PyBuffer_Release(&counts);
    r->filter.len = (unsigned short)(filter.len / sizeof(struct sock_filter));
    r->filter.filter = filter.buf;
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    int err = r->epfd < 0 ? errno : 0;
    pthread_t thread;
    pthread_attr_t attr;
    if (!err) {
        sem_init(&r->ready, 0, 0);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        err = pthread_create(&thread, &attr, relay_main, r);
        pthread_attr_destroy(&attr);
        if (!err) {
            Py_BEGIN_ALLOW_THREADS
            while (sem_wait(&r->ready) != 0 && errno == EINTR) {
            }
            Py_END_ALLOW_THREADS
            err = r->ready_errno;
            if (err)  /* the thread has returned; its stack goes with it */
                close(r->epfd);
        }
    }
    PyBuffer_Release(&filter);
    if (err) {
        if (r->epfd >= 0 && !r->ready_errno)
            close(r->epfd);
        munmap(r, sizeof *r);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    relays[n_relays] = r;
    return PyLong_FromLong(n_relays++);
}

static PyObject *add(PyObject *self, PyObject *args)
{
    int index, client, upstream;
    (void)self;
    if (!PyArg_ParseTuple(args, "iii", &index, &client, &upstream))
        return NULL;
    if (index < 0 || index >= n_relays) {
        PyErr_SetString(PyExc_ValueError, "no such relay thread");
        return NULL;
    }
    /* The GIL stays held: the core has no other Python thread to let run. */
    int err = add_pair(relays[index], client, upstream);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"start", start, METH_VARARGS,
     "start(ctl_fd, report_fd, counters, filter) -> index: a relay thread, until ctl_fd's "
     "other end is closed; it writes its errno to report_fd when it stops."},
    {"add", add, METH_VARARGS,
     "add(index, client_fd, upstream_fd): the thread relays the pair from now on and closes "
     "both; OSError: it could not take them (both were reset)."},
    /* UDP (udp_batch.c): the core's own thread, in batches */
    {"udp_batch", udp_batch, METH_NOARGS, "udp_batch() -> a batch: 64 slots of 64 KiB, mapped, untouched until used."},
    {"udp_receive", udp_receive, METH_VARARGS,
     "udp_receive(batch, fd, by_source) -> [(address | None, first, count, bytes)]: up to 64 "
     "datagrams in runs from one source; [] when there is none."},
    {"udp_datagram", udp_datagram, METH_VARARGS, "udp_datagram(batch, index) -> bytes: a copy."},
    {"udp_send", udp_send, METH_VARARGS,
     "udp_send(batch, fd, family, first, count, destination, segment) -> (sent, errno, segment): "
     "datagrams of one size in a row as one UDP_SEGMENT message."},
    {"udp_release", udp_release, METH_VARARGS, "udp_release(batch): its pages back to the system."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "portfwd_relay", "Established TCP pairs relayed by a C thread; UDP datagrams in batches.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_portfwd_relay(void)
{
    return PyModule_Create(&module);
}
