"""Support for the end-to-end tests: real runtimes, real containers, real clients.

One module per job: rootfs (the image), runtimes (runc/crun invocation, rootful or as the test
user), bundle (config.json, and its rootless form), hookenv (the hook's config, state dir and
direct invocation), container (lifecycle with guaranteed cleanup), users (the unprivileged test
user), podman (podman with a hooks.d dir and an imported busybox image), netns, ports, clients,
procs, wait.
"""
