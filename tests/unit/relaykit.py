"""What the relay's unit tests share: running an EventLoop until a connection has closed."""


def run_until_closed(loop, closed):
    """Run until the connection's on_close appended to `closed` (checked every 10 ms: the loop
    only looks at `running` between events)."""

    def check():
        if closed:
            loop.running = False
        loop.call_later(0.01, check)

    check()
    loop.run()
