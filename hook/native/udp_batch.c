/* udp_batch: UDP datagrams received and sent in batches, for udp_relay.py (issue 15).
 *
 *     socket ─recvmmsg, up to 64 datagrams─▶ the batch's slots (one 64 KiB slot each)
 *       receive() gives the core runs: consecutive datagrams from the same source, each
 *       (source address as recvfrom() names it, first slot, count, bytes)
 *     the core finds the run's session, then send() hands the run to one destination:
 *       datagrams of one size in a row go as ONE message with UDP_SEGMENT (generic
 *       segmentation offload): the stack is walked once per message, not per datagram,
 *       and the receiving socket still gets the datagrams one by one (the kernel segments
 *       for a socket that did not ask for UDP_GRO); every message of the run in one
 *       sendmmsg
 *
 * Why: through the Python loop each datagram cost a recvfrom and a sendto, and the sendto
 * the whole way through the stack into the service's socket; at 1 Gbit/s of 1,400-byte
 * datagrams the core was 65-96 % of a CPU, and the datagrams its lateness piled up
 * overflowed the service's receive buffer (docs/data-path.md). A send that cannot take
 * UDP_SEGMENT (a route through a device without checksum offload: EIO; a kernel without
 * it: EINVAL, ENOPROTOOPT) is made again without, datagram by datagram, and the caller
 * is told so that it stops asking for that socket.
 *
 * Memory: the slots are mapped once, untouched until used (a 1,400-byte datagram touches
 * one page of its slot), and given back by release() once a listener has no session left.
 * One batch per core: the core receives a batch and sends it on
 * before it receives the next, so all its sockets share it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include "udp_batch.h"

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

#define BATCH 64
#define SLOT 65536
/* The kernel's bounds on one UDP_SEGMENT message: 64 segments (UDP_MAX_SEGMENTS of older
 * kernels; newer ones take 128) and one UDP datagram's length (IPv4's is the smaller). */
#define MAX_SEGMENTS 64
#define MAX_PAYLOAD (65535 - 20 - 8)

struct batch {
    unsigned count;
    unsigned len[BATCH];
    struct sockaddr_storage from[BATCH];
    socklen_t fromlen[BATCH];
    unsigned char slots[BATCH][SLOT];
};

static const char CAPSULE[] = "portfwd_relay.udp_batch";

static void batch_free(PyObject *capsule)
{
    struct batch *b = PyCapsule_GetPointer(capsule, CAPSULE);
    if (b)
        munmap(b, sizeof *b);
}

static struct batch *batch_of(PyObject *capsule)
{
    return PyCapsule_GetPointer(capsule, CAPSULE);
}

PyObject *udp_batch(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    /* ~4 MiB of address space, zero pages until a datagram lands in them. */
    struct batch *b = mmap(NULL, sizeof *b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED)
        return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(b, CAPSULE, batch_free);
    if (!capsule)
        munmap(b, sizeof *b);
    return capsule;
}

/* The address as CPython's recvfrom() names it (socketmodule.c's makesockaddr): the
 * sessions are looked up by it, whichever path made them. */
static PyObject *address(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(in->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(in6->sin6_port), ntohl(in6->sin6_flowinfo),
                             in6->sin6_scope_id);
    }
    PyErr_SetString(PyExc_ValueError, "a datagram from an address that is not IPv4 or IPv6");
    return NULL;
}

static int same_source(const struct batch *b, unsigned i, unsigned j)
{
    return b->fromlen[i] == b->fromlen[j] && memcmp(&b->from[i], &b->from[j], b->fromlen[i]) == 0;
}

/* receive(batch, fd, by_source) -> [(address | None, first, count, bytes)], [] when there
 * is nothing to read. by_source false: one run, no address (a session's own socket, whose
 * datagrams all go to its one client, whoever in the container sent them). */
PyObject *udp_receive(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    int fd, by_source;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oip", &capsule, &fd, &by_source))
        return NULL;
    struct batch *b = batch_of(capsule);
    if (!b)
        return NULL;

    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (unsigned i = 0; i < BATCH; i++) {
        iov[i].iov_base = b->slots[i];
        iov[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &b->from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof b->from[i];
    }
    int n;
    do
        n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
    while (n < 0 && errno == EINTR);
    b->count = 0;
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyList_New(0);
        /* An error after some datagrams is kept by the kernel for the next call. */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    b->count = (unsigned)n;
    for (unsigned i = 0; i < b->count; i++) {
        b->len[i] = msgs[i].msg_len;
        b->fromlen[i] = msgs[i].msg_hdr.msg_namelen;
    }

    PyObject *runs = PyList_New(0);
    if (!runs)
        return NULL;
    for (unsigned first = 0; first < b->count;) {
        unsigned end = first + 1;
        Py_ssize_t bytes = b->len[first];
        while (end < b->count && (!by_source || same_source(b, first, end)))
            bytes += b->len[end++];
        PyObject *source = by_source ? address(&b->from[first]) : Py_NewRef(Py_None);
        PyObject *run = source ? Py_BuildValue("(NIIn)", source, first, end - first, bytes) : NULL;
        if (!run || PyList_Append(runs, run) < 0) {
            Py_XDECREF(run);
            Py_DECREF(runs);
            return NULL;
        }
        Py_DECREF(run);
        first = end;
    }
    return runs;
}

/* release(batch): its pages back to the system (the next datagrams fault fresh zero pages
 * in): a burst of large datagrams touches up to 4 MiB that an idle core should not keep. */
PyObject *udp_release(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &capsule))
        return NULL;
    struct batch *b = batch_of(capsule);
    if (!b)
        return NULL;
    if (madvise(b, sizeof *b, MADV_DONTNEED) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* datagram(batch, index) -> bytes: a copy, for a datagram that must outlive the batch. */
PyObject *udp_datagram(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    unsigned index;
    (void)self;
    if (!PyArg_ParseTuple(args, "OI", &capsule, &index))
        return NULL;
    struct batch *b = batch_of(capsule);
    if (!b)
        return NULL;
    if (index >= b->count) {
        PyErr_SetString(PyExc_IndexError, "no such datagram in the batch");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)b->slots[index], b->len[index]);
}

static int parse_destination(int family, PyObject *destination, struct sockaddr_storage *ss, socklen_t *len)
{
    const char *host;
    int port;
    unsigned flow = 0, scope = 0;
    if (!PyArg_ParseTuple(destination, "si|II", &host, &port, &flow, &scope))
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
            *len = sizeof *in;
            return 0;
        }
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        in6->sin6_flowinfo = htonl(flow);
        in6->sin6_scope_id = scope;
        if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
            *len = sizeof *in6;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "not an address of the socket's family: %s", host);
    return -1;
}

/* The messages for datagrams [first, end): with segmentation, runs of one size (the last
 * may be shorter, as UDP_SEGMENT allows) become one message each. */
static unsigned build(struct batch *b, unsigned first, unsigned end, int segment, struct mmsghdr *msgs,
                      struct iovec *iov, char (*control)[CMSG_SPACE(sizeof(uint16_t))],
                      struct sockaddr_storage *to, socklen_t tolen, unsigned *datagrams)
{
    unsigned n = 0;
    for (unsigned i = first; i < end; n++) {
        unsigned size = b->len[i], j = i + 1, total = size;
        iov[i].iov_base = b->slots[i];
        iov[i].iov_len = size;
        /* Same size in a row; the last may be shorter, never empty (an empty datagram is
         * no segment: it would vanish). */
        while (segment && size > 0 && j < end && j - i < MAX_SEGMENTS && b->len[j - 1] == size &&
               b->len[j] > 0 && b->len[j] <= size && total + b->len[j] <= MAX_PAYLOAD) {
            iov[j].iov_base = b->slots[j];
            iov[j].iov_len = b->len[j];
            total += b->len[j];
            j++;
        }
        memset(&msgs[n], 0, sizeof msgs[n]);
        struct msghdr *m = &msgs[n].msg_hdr;
        m->msg_name = to;
        m->msg_namelen = tolen;
        m->msg_iov = &iov[i];
        m->msg_iovlen = j - i;
        if (j - i > 1) {
            m->msg_control = control[n];
            m->msg_controllen = sizeof control[n];
            struct cmsghdr *c = CMSG_FIRSTHDR(m);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t gso = (uint16_t)size;
            memcpy(CMSG_DATA(c), &gso, sizeof gso);
        }
        datagrams[n] = j - i;
        i = j;
    }
    return n;
}

/* send(batch, fd, family, first, count, destination, segment) -> (sent, errno, segment)
 * sent: datagrams from `first` the kernel took, or dropped because the socket's buffer is
 * full (UDP drops, and so do we); errno: why the others were not sent (0: all were);
 * segment: whether UDP_SEGMENT is still worth asking for on this socket. */
PyObject *udp_send(PyObject *self, PyObject *args)
{
    PyObject *capsule, *destination;
    int fd, family, segment;
    unsigned first, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "OiiIIOp", &capsule, &fd, &family, &first, &count, &destination, &segment))
        return NULL;
    struct batch *b = batch_of(capsule);
    if (!b)
        return NULL;
    if (first > b->count || count > b->count - first) {
        PyErr_SetString(PyExc_IndexError, "no such datagrams in the batch");
        return NULL;
    }
    struct sockaddr_storage to;
    socklen_t tolen;
    if (parse_destination(family, destination, &to, &tolen) < 0)
        return NULL;

    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    char control[BATCH][CMSG_SPACE(sizeof(uint16_t))];
    unsigned datagrams[BATCH];
    unsigned end = first + count, done = first;
    int err = 0;
    while (done < end) {
        unsigned n = build(b, done, end, segment, msgs, iov, control, &to, tolen, datagrams);
        int sent = sendmmsg(fd, msgs, n, MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                done = end;  /* dropped */
                break;
            }
            if (segment && msgs[0].msg_hdr.msg_iovlen > 1 &&
                (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT || errno == EOPNOTSUPP)) {
                segment = 0;  /* this route or kernel cannot segment: datagram by datagram */
                continue;
            }
            err = errno;
            break;
        }
        for (int k = 0; k < sent; k++)
            done += datagrams[k];
    }
    return Py_BuildValue("(IiO)", done - first, err, segment ? Py_True : Py_False);
}
