"""prestart / createRuntime: state → plan → bind → supervisor → ready."""

from __future__ import annotations

from .config import Config, load_config, state_dir_of
from .drivers import get_driver
from .errors import PortfwdError
from .hostnet import refuse_unless_host_netns
from .listeners import bind_all, bind_targets, ipv6_available
from .logs import HookLog
from .namespaces import shares_our_netns
from .plan import make_plan
from .poststop import stop_supervisor
from .procfs import process_start_time
from .state import ContainerState, bundle_annotations, bundle_namespaces, parse_state
from .statefile import is_alive, log_path, prepare_state_dir, read_record, remove_record
from .supervisor import Context, launch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


def prestart(raw_state: bytes, env: Mapping[str, str]) -> int:
    state = parse_state(raw_state, full_validation=True)
    config = load_config(env)
    state_dir = prepare_state_dir(state_dir_of(config, env))
    log_file = log_path(state_dir, state.id)
    log = HookLog(log_file, config.log_level, stderr=True)
    try:
        return _prestart(state, config, state_dir, log_file, log)
    except PortfwdError as e:
        log.error("prestart of container %s failed: %s", state.id, e)
        raise
    except Exception:
        log.exception("prestart of container %s failed with a bug", state.id)
        raise
    finally:
        log.close()


def _prestart(
    state: ContainerState, config: Config, state_dir: str, log_file: str, log: HookLog
) -> int:
    annotations = dict(state.annotations) or bundle_annotations(state.bundle)
    plan = make_plan(state, annotations, config)
    if not plan.mappings:
        log.info("container %s requests no ports; nothing to do", state.id)
        return 0
    driver = get_driver(plan.driver)  # an unknown driver is an error, host network or not
    if shares_our_netns(plan.container_pid, lambda: bundle_namespaces(state.bundle)):
        # What docker does with --network host -p: the container's own services are on
        # the host already; binding their ports here would take them from the container
        # and forward every connection back into itself.
        log.warning(
            "container %s uses the host's network (no network namespace of its own): "
            "its ports are not published (%s)",
            state.id,
            ", ".join(str(m) for m in plan.mappings),
        )
        return 0
    refuse_unless_host_netns()
    if _already_forwarding(state_dir, plan.container_id, plan.container_pid, log):
        return 0
    plan = driver.check(plan, log.warning)
    targets = bind_targets(plan.mappings, ipv6_available(), log.warning)
    listeners = bind_all(targets)
    held = driver.capabilities.holds_listeners
    for listener in listeners:
        if listener.target.proto not in held:
            # The driver's program binds this port itself: binding it here only checked,
            # with a clear error, that it is free before anything starts.
            listener.close()
    listeners = [listener for listener in listeners if listener.target.proto in held]
    for listener in listeners:
        if listener.unpaced is not None:
            log.info(
                "connections to %s use %s: the host's default congestion control, %s, paces every "
                "segment, which a client on this machine does not need",
                listener.target, listener.unpaced[1], listener.unpaced[0],
            )
    try:
        started = launch(
            Context(
                plan, listeners, driver, state_dir, log_file, config.log_level, annotations, state.bundle
            ),
            log,
        )
    finally:
        # The supervisor holds its own copies; the hook must not keep any port open.
        for listener in listeners:
            listener.close()
    log.info(
        "container %s: forwarding %s (supervisor pid %d)",
        plan.container_id,
        ", ".join(str(m) for m in plan.mappings),
        started.pid,
    )
    return 0


def _already_forwarding(state_dir: str, container_id: str, container_pid: int, log: HookLog) -> bool:
    """createRuntime after prestart (or a repeated hook) must not forward twice."""
    record = read_record(state_dir, container_id)
    if record is None:
        return False
    if not is_alive(record):
        log.info("removing the stale state file of container %s", container_id)
        remove_record(state_dir, container_id)
        return False
    if record.container_pid == container_pid:
        log.info("container %s is already forwarded (supervisor pid %d)", container_id, record.supervisor_pid)
        return True
    if process_start_time(record.container_pid) is None:
        # An earlier container of the same name died and its supervisor has not noticed yet.
        log.info("stopping the leftover forwarding of an earlier container %s", container_id)
        stop_supervisor(record, log)
        remove_record(state_dir, container_id)
        return False
    raise PortfwdError(
        f"container id {container_id} is already forwarded for container pid {record.container_pid} "
        f"(supervisor pid {record.supervisor_pid}); run poststop for it first"
    )
