/* portfwd_relay: the TCP connections of a core, accepted, dialled and relayed by threads in
 * C (issue 15).
 *
 * Two ways in. The threads accept on the listeners listen() gives them and dial the
 * container themselves ("accepting" below: a new connection crosses one thread). For the
 * rest (PROXY headers, fallbacks, an empty pool) the core's Python loop accepts, dials,
 * writes a PROXY header if asked, and then hands the pair over: add() puts both sockets into
 * a thread's epoll set and the loop forgets them (the thread shares the process's descriptor
 * table; no message, no wake-up for the hand-over itself). From there, that thread alone
 * relays:
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
 * Connections the threads accept are counted in a slot of theirs too (stats.RELAY_ACCEPTED).
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
#include <netinet/in.h>
#include <arpa/inet.h>
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
enum { TO_CONTAINER = 3, TO_CLIENT = 4, RELAY_CLOSED = 7, RELAY_ACCEPTED = 8 };

struct pair;

struct end {  /* epoll's data: which socket of which pair; NULL pair: a listener's */
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
    struct pair *free_pairs;  /* add()'s own: pairs' memory, reused (see new_pair) */
    struct pair *own_free;  /* the thread's own, for the connections it accepts */
    int active;  /* atomic: pairs in this thread's set (the accepting threads balance on it) */
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
static struct pair *new_pair(struct relay *r, struct pair **free_list)
{
    /* `free_list`: the caller's own (add() in the Python thread, or the relay thread for
     * what it accepts). Both refill it from what the thread gave back since the last time,
     * each taking the whole list (an exchange: safe with two takers, no ABA). */
    if (*free_list == NULL)
        *free_list = __atomic_exchange_n(&r->returned, NULL, __ATOMIC_ACQUIRE);
    if (*free_list == NULL) {
        size_t size = 1 << 16, n = size / sizeof(struct pair);
        struct pair *slab = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (slab == MAP_FAILED)
            return NULL;
        for (size_t i = 0; i < n; i++) {
            slab[i].next_free = *free_list;
            *free_list = &slab[i];
        }
    }
    struct pair *p = *free_list;
    *free_list = p->next_free;
    memset(p, 0, sizeof *p);
    return p;
}

/* Pushes a chain (first … last) on an atomic list: the thread gives pairs back to add_pair,
 * add_pair gives the thread the pairs it could not arm. Takers take a list whole
 * (exchange): no ABA. */
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
    __atomic_fetch_sub(&r->active, 1, __ATOMIC_RELAXED);
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
static int add_pair(struct relay *r, struct pair **free_list, int client, int upstream)
{
    static const struct linger reset = {1, 0};
    int fds[2] = {client, upstream}, err = 0;
    struct pair *p = new_pair(r, free_list);
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
        else
            __atomic_fetch_add(&r->active, 1, __ATOMIC_RELAXED);
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

/* --- accepting: a new connection crosses one thread --------------------------------------- */

/* A host listener whose connections the threads accept and dial themselves (listen()): it
 * is in every thread's epoll set with EPOLLEXCLUSIVE, so a connection wakes one idle thread,
 * and that thread accepts it, dials the container from a socket of the pool, and relays the
 * pair: the request, the answer and both closes cross no other thread. Through the Python
 * loop a new connection crossed two (the loop accepted and dialled, a relay thread relayed)
 * and its latency spread wider than one thread's (docs/data-path.md: p99 4.1–5.1 ms against
 * 3.3–3.5 with everything in the one Python thread, at the same rate).
 *
 * Only the plain case is done here: the first target, from the pool's socket, bound to the
 * client's own address where the listener says so (same family, no scope). Anything else
 * goes to the Python loop whole, by a record on the core's slow pipe — the client's socket,
 * never a byte read from it — and the loop serves it as it serves every connection: an empty
 * pool (it waits for the dialer), a refusal or an address taken (the next target, or the
 * dial from loopback), a dial still in progress, a client of another family (its address is
 * mapped or not carried, and logged), a listener that writes PROXY headers (never given to
 * the threads). The loop logs what happened there; the threads never log. */

#define ACCEPT_BATCH 4  /* accepts per wake-up: a connection of a batch waits for the batch's dials */
/* The pool: fewer than its low mark ready (with those asked for), ask for POOL_ASK more (the
 * dialer's MAX_BATCH). A request's way back (the loop, the dialer, the loop) takes a few ms
 * on a loaded machine: at 24k new connections/s a low mark of 16 or 32 left the pool empty
 * for 1 to 20 % of the connections (which the loop then served), 64 for 0.6 to 2 % (the
 * slowest of them the p99: docs/data-path.md), 192 for none. The mark starts at POOL_LOW
 * and doubles, up to POOL_LOW_MAX, each time a take finds the pool empty after a supply:
 * a container that never has such a burst keeps the fewer sockets waiting. */
#define POOL_MAX 256
#define POOL_LOW 64
#define POOL_LOW_MAX 192
#define POOL_ASK 32

/* What the threads tell the core's loop on the slow pipe (16 bytes: one atomic write). */
enum { SLOW_CONNECTION = 0, SLOW_NEED_SOCKETS = 1, SLOW_PAUSED = 2 };
struct slow_record {
    int32_t what, a, b, c;
};

/* Container-side TCP sockets made by the dialer, handed over by the loop (supply()): [0]
 * IPv4, [1] IPv6. A mutex: taken once per connection by one of a few threads, uncontended
 * almost always (a futex only when it is). */
struct socket_pool {
    pthread_mutex_t lock;
    int fds[2][POOL_MAX];
    int ready[2], asked[2];
    int low[2];  /* the low mark (see POOL_LOW) */
    int supplied[2];  /* a supply came: an empty pool from now on is a shortfall */
};

struct listener {
    struct end tag;  /* first: epoll's data; tag.pair is NULL */
    int fd, id, slow;
    int kind;  /* the pool: 0 IPv4, 1 IPv6 (the target's family) */
    int bind_client;  /* bind the container side to the client's address (same family) */
    int paused;  /* atomic: out of every thread's epoll set after an accept error */
    union {
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } target;
    socklen_t target_len;
};

#define MAX_RELAYS 64
/* The threads this process started (a core starts one per CPU, at most four, once): add()
 * names one by its index. They live as long as the process, and so do the listeners. */
static struct relay *relays[MAX_RELAYS];
static int n_relays;
static struct socket_pool pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .low = {POOL_LOW, POOL_LOW}};

/* 1 once the loop has the record; 0 when its pipe is full (the loop is far behind) or gone:
 * for a connection the caller resets it, a request for sockets is made again later. */
static int tell(int slow, int what, int a, int b, int c)
{
    struct slow_record rec = {what, a, b, c};
    return write(slow, &rec, sizeof rec) == sizeof rec;
}

/* A socket for a dial, or -1 (none ready: the loop serves this connection). Asks the loop
 * for more below the low mark, once per POOL_ASK; raises the mark when the pool ran dry. */
static int pool_take(struct listener *l)
{
    int fd = -1, ask = 0, k = l->kind;
    pthread_mutex_lock(&pool.lock);
    if (pool.ready[k])
        fd = pool.fds[k][--pool.ready[k]];
    else if (pool.supplied[k] && pool.low[k] < POOL_LOW_MAX)
        pool.low[k] = pool.low[k] * 2 < POOL_LOW_MAX ? pool.low[k] * 2 : POOL_LOW_MAX;
    if (pool.ready[k] + pool.asked[k] < pool.low[k]) {
        pool.asked[k] += POOL_ASK;
        ask = 1;
    }
    pthread_mutex_unlock(&pool.lock);
    if (ask && !tell(l->slow, SLOW_NEED_SOCKETS, k, POOL_ASK, 0)) {
        pthread_mutex_lock(&pool.lock);  /* not asked after all: the next take asks again */
        pool.asked[k] -= POOL_ASK;
        pthread_mutex_unlock(&pool.lock);
    }
    return fd;
}

/* Out of every thread's epoll set; 1 if this call took it out (0: already out). For an
 * accept error (e.g. out of descriptors: a level-triggered listener would wake them for
 * ever; the loop puts it back, resume(), in 100 ms) and for the core's end (stop_accepting). */
static int unwatch_listener(struct listener *l)
{
    if (__atomic_exchange_n(&l->paused, 1, __ATOMIC_ACQ_REL))
        return 0;  /* another thread did */
    for (int i = 0; i < n_relays; i++)
        epoll_ctl(relays[i]->epfd, EPOLL_CTL_DEL, l->fd, NULL);
    return 1;
}

static void pause_listener(struct listener *l, int err)
{
    if (unwatch_listener(l))
        tell(l->slow, SLOW_PAUSED, l->id, err, 0);
}

/* The thread that relays a pair this one accepted: this one, unless another relays fewer
 * pairs. A wake-up goes to whichever thread is idle, so the accepting thread is often the one
 * that already relays the most (two keep-alive connections opened together were accepted by
 * one thread, and shared its CPU: half the rate of one each). Pairs are plain memory: a pair
 * from this thread's free list may go to any thread, which gives it back to its own list. */
static struct relay *least_busy(struct relay *self)
{
    struct relay *best = self;
    int fewest = __atomic_load_n(&self->active, __ATOMIC_RELAXED);
    for (int i = 0; i < n_relays && fewest > 0; i++) {
        int n = __atomic_load_n(&relays[i]->active, __ATOMIC_RELAXED);
        if (n < fewest) {
            best = relays[i];
            fewest = n;
        }
    }
    return best;
}

/* One accepted client: dial the container and relay the pair here, or give it to the loop. */
static void dial(struct relay *r, struct listener *l, int client, struct sockaddr_storage *peer)
{
    static const struct linger reset = {1, 0};
    int up = pool_take(l), err = 0;
    if (up < 0)
        goto slow;  /* err 0: nothing was tried */
    if (l->bind_client) {
        int same = 0;
        if (l->kind == 0 && peer->ss_family == AF_INET) {
            same = 1;
        } else if (l->kind == 1 && peer->ss_family == AF_INET6) {
            struct sockaddr_in6 *p6 = (struct sockaddr_in6 *)peer;
            p6->sin6_flowinfo = 0;
            same = p6->sin6_scope_id == 0;  /* a link-local client's scope names a host interface */
        }
        if (!same)
            goto slow_close;  /* mapped, or not carried: the loop's (and its log's) */
        /* The dialer gave the socket SO_REUSEADDR with IP_TRANSPARENT: the client may reuse
         * its port while our last connection from it is in TIME_WAIT in the container. */
        if (bind(up, (struct sockaddr *)peer,
                 l->kind == 0 ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6)) != 0) {
            err = errno;
            goto slow_close;
        }
    }
    int rc = connect(up, (struct sockaddr *)&l->target, l->target_len);
    if (rc != 0 && errno == EINPROGRESS)
        /* A container on this host answers inside the connect() that sends the SYN (the
         * packet is processed in the sender's context): a second connect() says so. */
        rc = connect(up, (struct sockaddr *)&l->target, l->target_len);
    if (rc != 0 && errno != EISCONN) {
        err = errno;  /* refused, taken, or still under way (EALREADY): the loop dials again */
        goto slow_close;
    }
    add_count(r, RELAY_ACCEPTED, 1);  /* add_pair counts a pair it cannot arm as closed */
    add_pair(least_busy(r), &r->own_free, client, up);
    return;
slow_close:
    close(up);  /* SO_LINGER {1, 0} from the dialer: nothing half-open is left in the container */
slow:
    if (!tell(l->slow, SLOW_CONNECTION, l->id, client, err)) {
        /* The loop cannot take it (its pipe is full): a reset, as an overflowing backlog
         * would give; counted as a connection opened and closed. */
        setsockopt(client, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(client);
        add_count(r, RELAY_ACCEPTED, 1);
        add_count(r, RELAY_CLOSED, 1);
    }
}

static void on_listener(struct relay *r, struct listener *l)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        /* Paused or stopped (stop_accepting: the core is ending) since this batch began: a
         * connection left in the backlog waits for the next core, one accepted here would
         * be reset by this one's end. */
        if (__atomic_load_n(&l->paused, __ATOMIC_ACQUIRE))
            return;
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        int client = accept4(l->fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;  /* another thread took it, or none left */
            if (errno == ECONNABORTED || errno == EPROTO)
                continue;  /* reset while queued: nobody to serve */
            pause_listener(l, errno);
            return;
        }
        /* SO_LINGER {1, 0} and TCP_NODELAY come from the listener (listeners._bind_one). */
        dial(r, l, client, &peer);
    }
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
            struct end *e = events[i].data.ptr;
            if (e->pair == NULL)
                on_listener(r, (struct listener *)e);
            else
                on_event(r, e, events[i].events);
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

/* Listeners given to the threads, by the handle listen() returned (the loop's thread only). */
static struct listener **listeners;
static int n_listeners;
static int accepting_stopped;  /* stop_accepting() was called: resume() is a no-op */

static int watch_listener(struct listener *l)
{
    for (int i = 0; i < n_relays; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &l->tag};
        if (epoll_ctl(relays[i]->epfd, EPOLL_CTL_ADD, l->fd, &ev) != 0 && errno != EEXIST) {
            int err = errno;
            for (int j = 0; j < i; j++)
                epoll_ctl(relays[j]->epfd, EPOLL_CTL_DEL, l->fd, NULL);
            return err;
        }
    }
    return 0;
}

static PyObject *listen_(PyObject *self, PyObject *args)
{
    int fd, id, slow, family, port, bind_client;
    const char *address;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiiisip", &fd, &id, &slow, &family, &address, &port, &bind_client))
        return NULL;
    if (n_relays == 0) {
        PyErr_SetString(PyExc_RuntimeError, "no relay thread runs");
        return NULL;
    }
    struct listener **grown = realloc(listeners, (size_t)(n_listeners + 1) * sizeof *listeners);
    if (grown == NULL)
        return PyErr_NoMemory();
    listeners = grown;  /* the old block is gone once realloc succeeded */
    struct listener *l = calloc(1, sizeof *l);
    if (l == NULL)
        return PyErr_NoMemory();
    l->fd = fd;
    l->id = id;
    l->slow = slow;
    l->bind_client = bind_client;
    int ok;
    if (family == AF_INET) {
        l->kind = 0;
        l->target.v4.sin_family = AF_INET;
        l->target.v4.sin_port = htons((uint16_t)port);
        ok = inet_pton(AF_INET, address, &l->target.v4.sin_addr);
        l->target_len = sizeof l->target.v4;
    } else {
        l->kind = 1;
        l->target.v6.sin6_family = AF_INET6;
        l->target.v6.sin6_port = htons((uint16_t)port);
        ok = inet_pton(AF_INET6, address, &l->target.v6.sin6_addr);
        l->target_len = sizeof l->target.v6;
    }
    if (ok != 1 || family != (l->kind ? AF_INET6 : AF_INET)) {
        free(l);
        PyErr_Format(PyExc_ValueError, "not an address of family %d: %s", family, address);
        return NULL;
    }
    /* Non-blocking (the file's flag, shared with every holder of the listener: the core's
     * loop has it so too): a thread whose accept another thread won must not wait there. */
    int flags = fcntl(fd, F_GETFL);
    int err = flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0 ? errno : watch_listener(l);
    if (err) {
        free(l);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    listeners[n_listeners] = l;
    return PyLong_FromLong(n_listeners++);
}

static PyObject *resume(PyObject *self, PyObject *args)
{
    int handle;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &handle))
        return NULL;
    if (handle < 0 || handle >= n_listeners) {
        PyErr_SetString(PyExc_ValueError, "no such listener");
        return NULL;
    }
    struct listener *l = listeners[handle];
    if (!accepting_stopped && __atomic_load_n(&l->paused, __ATOMIC_ACQUIRE)) {
        int err = watch_listener(l);
        if (err) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        __atomic_store_n(&l->paused, 0, __ATOMIC_RELEASE);
    }
    Py_RETURN_NONE;
}

static PyObject *stop_accepting(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    accepting_stopped = 1;
    for (int i = 0; i < n_listeners; i++)
        unwatch_listener(listeners[i]);
    Py_RETURN_NONE;
}

/* PyArg "O&" converter: a pool's kind, 0 (IPv4) or 1 (IPv6), into an int. */
static int pool_kind(PyObject *arg, void *out)
{
    long kind = PyLong_AsLong(arg);
    if (kind == -1 && PyErr_Occurred())
        return 0;
    if (kind < 0 || kind > 1) {
        PyErr_SetString(PyExc_ValueError, "kind is 0 (IPv4) or 1 (IPv6)");
        return 0;
    }
    *(int *)out = (int)kind;
    return 1;
}

static PyObject *supply(PyObject *self, PyObject *args)
{
    int kind;
    PyObject *seq;
    (void)self;
    if (!PyArg_ParseTuple(args, "O&O", pool_kind, &kind, &seq))
        return NULL;
    if (!PyList_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "supply: a list of descriptors");
        return NULL;
    }
    Py_ssize_t n = PyList_Size(seq);
    int fds[POOL_MAX];
    if (n > POOL_MAX) {
        PyErr_SetString(PyExc_ValueError, "supply: more descriptors than the pool holds");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyList_GetItem(seq, i));
        if (fd == -1 && PyErr_Occurred())
            return NULL;
        fds[i] = (int)fd;
    }
    /* Those the pool has no room for are closed (not expected: the threads ask for
     * POOL_ASK only while fewer than the low mark are ready or asked for). */
    int taken = 0;
    pthread_mutex_lock(&pool.lock);
    pool.asked[kind] = pool.asked[kind] > n ? pool.asked[kind] - (int)n : 0;
    pool.supplied[kind] = 1;
    while (taken < n && pool.ready[kind] < POOL_MAX)
        pool.fds[kind][pool.ready[kind]++] = fds[taken++];
    pthread_mutex_unlock(&pool.lock);
    for (Py_ssize_t i = taken; i < n; i++)
        close(fds[i]);
    Py_RETURN_NONE;
}

static PyObject *pool_state(PyObject *self, PyObject *args)
{
    int kind;
    (void)self;
    if (!PyArg_ParseTuple(args, "O&", pool_kind, &kind))
        return NULL;
    pthread_mutex_lock(&pool.lock);
    int ready = pool.ready[kind], asked = pool.asked[kind], low = pool.low[kind];
    pthread_mutex_unlock(&pool.lock);
    return Py_BuildValue("(iii)", ready, asked, low);
}

static PyObject *pairs(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    PyObject *out = PyList_New(n_relays);
    for (int i = 0; out != NULL && i < n_relays; i++)
        PyList_SetItem(out, i, PyLong_FromLong(__atomic_load_n(&relays[i]->active, __ATOMIC_RELAXED)));
    return out;
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
    int err = add_pair(relays[index], &relays[index]->free_pairs, client, upstream);
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
    {"listen", listen_, METH_VARARGS,
     "listen(fd, id, slow_fd, family, address, port, bind_client) -> handle: the threads accept "
     "on this listener and dial the container's address:port themselves; what they cannot serve "
     "goes to slow_fd as 16-byte records (what, a, b, c)."},
    {"pairs", pairs, METH_NOARGS, "pairs() -> [n]: how many pairs each thread relays now."},
    {"stop_accepting", stop_accepting, METH_NOARGS,
     "stop_accepting(): the threads accept on no listener from now on (the core is ending: "
     "what is left in the backlogs waits for the next core); resume() does not undo it."},
    {"resume", resume, METH_VARARGS, "resume(handle): a listener paused after an accept error, watched again."},
    {"supply", supply, METH_VARARGS,
     "supply(kind, fds): container-side TCP sockets for the threads' dials (kind 0 IPv4, 1 IPv6); "
     "theirs from now on."},
    {"pool_state", pool_state, METH_VARARGS,
     "pool_state(kind) -> (ready, asked, low mark): the threads' socket pool (for the tests)."},
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
    PyObject *m = PyModule_Create(&module);
    /* For the tests, which fill the pool */
    if (m != NULL && (PyModule_AddIntConstant(m, "POOL_MAX", POOL_MAX) < 0
                      || PyModule_AddIntConstant(m, "POOL_LOW", POOL_LOW) < 0
                      || PyModule_AddIntConstant(m, "POOL_LOW_MAX", POOL_LOW_MAX) < 0
                      || PyModule_AddIntConstant(m, "POOL_ASK", POOL_ASK) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
