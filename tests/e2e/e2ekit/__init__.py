"""Support for the end-to-end tests: real runtimes, real containers, real clients.

One module per job: rootfs (the image), runtimes (runc/crun invocation), bundle (config.json),
hookenv (the hook's config, state dir and direct invocation), container (lifecycle with
guaranteed cleanup), netns, ports, clients, procs, wait.
"""
