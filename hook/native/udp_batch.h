/* udp_batch.c's functions, in portfwd_relay.c's module (one extension for the core's data
 * path in C). */
#ifndef UDP_BATCH_H
#define UDP_BATCH_H
#include <Python.h>

PyObject *udp_batch(PyObject *self, PyObject *args);
PyObject *udp_receive(PyObject *self, PyObject *args);
PyObject *udp_datagram(PyObject *self, PyObject *args);
PyObject *udp_send(PyObject *self, PyObject *args);
PyObject *udp_release(PyObject *self, PyObject *args);

#endif
