"""``hilo dev`` end to end: server, UI, worker, API and examples; Ctrl-C; resume."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hilo.cli.dev import port_problems
from hilo.client import HiloClient
from hilo.db.store import Store
from hilo.devtools.devserver import free_port, process_command_line
from hilo.feedback.links import LinkRejected, LinkSigner
from hilo.settings import DEV_LINK_SECRET, DEV_WRITE_KEY, Settings
from worker.main import connect


def start_dev(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hilo.cli", "dev"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for_http(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"hilo dev exited:\n{log.read_text()}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()}")


def three_free_ports() -> tuple[int, int, int]:
    """Three different free ports (free_port alone may hand out one twice)."""
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    first, second, third = sorted(ports)
    return first, second, third


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=60)


async def test_hilo_dev_runs_the_stack_and_resumes(tmp_path: Path) -> None:
    temporal_port, ui_port, api_port = three_free_ports()
    env = {
        **os.environ,
        "HILO_STATE_DIR": str(tmp_path / "state"),
        "HILO_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "HILO_TEMPORAL_UI_PORT": str(ui_port),
        "HILO_API_PORT": str(api_port),
        "HILO_ADMIN_TOKEN": "dev-test-token",
    }
    log = tmp_path / "dev.log"
    api = f"http://127.0.0.1:{api_port}"
    process = start_dev(env, log)
    try:
        wait_for_http(f"{api}/health", process, log)
        wait_for_http(f"http://127.0.0.1:{ui_port}/", process, log)
        output = log.read_text()
        assert f"http://127.0.0.1:{ui_port}/namespaces/default/workflows" in output
        assert "journey abandoned_cart v1 (published)" in output

        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "hilo.cli",
                "send-event",
                "Cart Abandoned",
                "--customer",
                "42",
                "-p",
                "cart_id=c1",
                "-p",
                "cart_value=80",
                "-p",
                "product_name=Mug",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(sent.stdout)["started"] == ["journey/abandoned_cart/42/c1"]
        with HiloClient(api, "dev-test-token") as hilo:
            routed = hilo.send_event("Page Viewed", "42", {"url": "/"})
        assert routed["signalled"] == ["journey/abandoned_cart/42/c1"]
        client = await connect(Settings(temporal_address=f"127.0.0.1:{temporal_port}"))
        handle = client.get_workflow_handle("journey/abandoned_cart/42/c1")
        assert (await handle.describe()).status.name == "RUNNING"

        link_secret = (tmp_path / "state" / "link-secret").read_text()
        assert stop(process) == 0
        assert "Stopped." in log.read_text()
        async with httpx.AsyncClient() as probe:
            with pytest.raises(httpx.ConnectError):
                await probe.get(f"http://127.0.0.1:{ui_port}/", timeout=1)

        process = start_dev(env, log)
        wait_for_http(f"{api}/health", process, log)
        assert "journey abandoned_cart v1 (unchanged)" in log.read_text()
        # Links sent before the restart still work after it.
        assert (tmp_path / "state" / "link-secret").read_text() == link_secret
        client = await connect(Settings(temporal_address=f"127.0.0.1:{temporal_port}"))
        description = await client.get_workflow_handle("journey/abandoned_cart/42/c1").describe()
        assert description.status.name == "RUNNING"  # still waiting for its 45-minute timer
    finally:
        if process.poll() is None:
            stop(process)


def run_dev_until_it_exits(env: dict[str, str], within: float) -> tuple[int, list[str]]:
    """``hilo dev``'s exit code and output lines; Ctrl-C and fail when it is still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hilo.cli", "dev"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # stops the Temporal server it may have started
        output, _ = process.communicate(timeout=60)
        raise AssertionError(f"hilo dev did not exit within {within:.0f}s:\n{output}") from None
    return process.returncode, output.strip().splitlines()


PORT_SETTINGS = {
    # which port is taken: (the line's name for it, the setting that moves it)
    "temporal": ("Temporal frontend", "HILO_TEMPORAL_ADDRESS"),
    "ui": ("Temporal UI", "HILO_TEMPORAL_UI_PORT"),
    "api": ("Hilo API", "HILO_API_PORT"),
}


@pytest.mark.parametrize("taken", list(PORT_SETTINGS))
def test_hilo_dev_refuses_a_port_something_else_holds(tmp_path: Path, taken: str) -> None:
    ports = dict(zip(("temporal", "ui", "api"), three_free_ports(), strict=True))
    env = {
        **os.environ,
        "HILO_STATE_DIR": str(tmp_path / "state"),
        "HILO_TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}",
        "HILO_TEMPORAL_UI_PORT": str(ports["ui"]),
        "HILO_API_PORT": str(ports["api"]),
    }
    with socket.socket() as holder:  # any listener, as another server would be
        holder.bind(("127.0.0.1", ports[taken]))
        holder.listen()
        started = time.monotonic()
        returncode, output = run_dev_until_it_exits(env, within=30)
        elapsed = time.monotonic() - started
    port = ports[taken]
    name, setting = PORT_SETTINGS[taken]
    assert returncode != 0, output
    assert len(output) == 1, output
    line = output[0]
    assert line.startswith(f"port {port} ({name}) is in use; set {setting}="), line
    assert line.endswith(" or stop what holds it"), line
    # The suggested port is one `hilo dev` could use.
    suggested = line.split(f"{setting}=", 1)[1].split(" ", 1)[0]
    assert int(suggested.rsplit(":", 1)[-1]) not in ports.values(), line
    assert elapsed < 10, f"took {elapsed:.1f}s to refuse"
    assert not (tmp_path / "state" / "temporal.db").exists(), "a Temporal server was started"


def test_hilo_dev_refuses_two_of_its_own_services_on_one_port(tmp_path: Path) -> None:
    port, temporal_port, _ = three_free_ports()
    env = {
        **os.environ,
        "HILO_STATE_DIR": str(tmp_path / "state"),
        "HILO_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "HILO_TEMPORAL_UI_PORT": str(port),
        "HILO_API_PORT": str(port),
    }
    returncode, output = run_dev_until_it_exits(env, within=30)
    assert returncode != 0
    assert output == [
        f"HILO_TEMPORAL_UI_PORT and HILO_API_PORT are both {port}; give each its own port"
    ]


# ---------------------------------------------------------------- the Temporal server is its child


def dev_env(state: Path) -> tuple[dict[str, str], Settings]:
    """The environment of a ``hilo dev`` on three free ports, and the settings it makes."""
    temporal_port, ui_port, api_port = three_free_ports()
    env = {
        **os.environ,
        "HILO_STATE_DIR": str(state),
        "HILO_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "HILO_TEMPORAL_UI_PORT": str(ui_port),
        "HILO_API_PORT": str(api_port),
    }
    settings = Settings(
        _env_file=None,
        state_dir=state,
        temporal_address=env["HILO_TEMPORAL_ADDRESS"],
        temporal_ui_port=ui_port,
        api_port=api_port,
    )
    return env, settings


def temporal_child(hilo_dev: int) -> int:
    """The pid of the Temporal server ``hilo dev`` runs: its child running ``start-dev``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
            if parent == hilo_dev and b"start-dev" in command:
                return int(stat.parent.name)
    raise AssertionError(f"hilo dev (pid {hilo_dev}) runs no Temporal server")


def wait_until_gone(pid: int, within: float) -> float:
    started = time.monotonic()
    while process_command_line(pid) is not None:
        assert time.monotonic() - started < within, f"pid {pid} still runs after {within}s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the child in /proc")
def test_hilo_dev_stops_with_one_line_when_its_temporal_server_dies(tmp_path: Path) -> None:
    env, settings = dev_env(tmp_path / "state")
    log = tmp_path / "dev.log"
    process = start_dev(env, log)
    try:
        wait_for_http(f"{settings.api_url}/health", process, log)
        os.kill(temporal_child(process.pid), signal.SIGKILL)
        started = time.monotonic()
        returncode = process.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            stop(process)
    output = log.read_text()
    assert returncode != 0, output
    said = [line for line in output.splitlines() if "Temporal dev server stopped" in line]
    assert len(said) == 1, output
    assert said[0].startswith(
        "The Temporal dev server stopped on its own (killed by SIGKILL; its log: "
        f"{(tmp_path / 'state' / 'temporal.log').resolve()}); Hilo stops too"
    ), said[0]
    assert elapsed < 10, f"hilo dev took {elapsed:.1f}s to notice:\n{output}"
    assert port_problems(settings) == []  # the API let go of its port too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_killing_hilo_dev_takes_its_temporal_server_with_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env, settings = dev_env(state)
    log = tmp_path / "dev.log"
    process = start_dev(env, log)
    server = 0
    try:
        wait_for_http(f"{settings.api_url}/health", process, log)
        server = temporal_child(process.pid)
        process.kill()  # SIGKILL: no handler of hilo dev runs
        process.wait(timeout=10)
        killed = time.monotonic()
        wait_until_gone(server, within=5)
        # The Temporal frontend and UI ports are free (a dead process's sockets close last).
        while problems := port_problems(settings):
            assert time.monotonic() - killed < 5, problems
            time.sleep(0.05)

        # The next start finds nothing left over and runs.
        process = start_dev(env, log)
        wait_for_http(f"{settings.api_url}/health", process, log)
        assert "earlier hilo dev left running" not in log.read_text()
        assert temporal_child(process.pid) != server
    finally:
        if process.poll() is None:
            stop(process)
        if server and process_command_line(server) is not None:
            os.kill(server, signal.SIGKILL)  # the orphan this test found


ORPHAN = """
import os, subprocess, sys
from pathlib import Path
from hilo.devtools.devserver import DevServer

state = Path(sys.argv[1])
state.mkdir(parents=True, exist_ok=True)
server = DevServer(
    db_file=state / "temporal.db", port=int(sys.argv[2]), ui_port=int(sys.argv[3]),
    log_file=state / "temporal.log",
)
# As a start without the parent-death signal (another OS, an older Hilo) left it.
orphan = subprocess.Popen(server.command(), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
(state / "temporal.pid").write_text(f"{orphan.pid} {os.getpid()}\\n")
print(orphan.pid)
"""


def test_a_temporal_server_an_earlier_hilo_dev_left_running_is_stopped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env, settings = dev_env(state)
    ports = [str(settings.temporal_ui_port)]
    temporal_port = settings.temporal_address.rsplit(":", 1)[1]
    left = subprocess.run(
        [sys.executable, "-c", ORPHAN, str(state.resolve()), temporal_port, *ports],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    orphan = int(left.stdout)
    try:
        deadline = time.monotonic() + 60
        while not port_problems(settings):  # until the orphan holds its ports
            assert time.monotonic() < deadline, "the orphan server did not start"
            time.sleep(0.2)

        log = tmp_path / "dev.log"
        process = start_dev(env, log)
        try:
            wait_for_http(f"{settings.api_url}/health", process, log)
            assert (
                f"Stopped the Temporal dev server (pid {orphan}) an earlier hilo dev left "
                f"running on {(state / 'temporal.db').resolve()}"
            ) in log.read_text().splitlines()
            assert process_command_line(orphan) is None
        finally:
            stop(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def test_a_second_hilo_dev_on_the_same_state_names_the_first(dev_stack: DevStack) -> None:
    returncode, output = run_dev_until_it_exits(dev_stack.env, within=30)
    first = dev_stack.process.pid
    assert returncode != 0
    assert len(output) == 1, output
    assert output[0].startswith(f"another hilo dev (pid {first}) runs the Temporal server"), output
    assert dev_stack.process.poll() is None  # and the first runs on
    assert httpx.get(f"{dev_stack.api}/health", timeout=5).status_code == 200


# ---------------------------------------------------------------- links follow the API's port


def test_development_links_follow_the_api_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HILO_PUBLIC_URL", raising=False)
    monkeypatch.setenv("HILO_API_PORT", "8123")
    settings = Settings(_env_file=None)
    assert settings.public_url == "http://127.0.0.1:8123"
    assert (
        settings.link_signer()
        .unsubscribe_url("m1", "42", "email")
        .startswith("http://127.0.0.1:8123/l/u/")
    )
    # An API listening on every interface is reached on this machine at the loopback address.
    assert Settings(_env_file=None, api_host="0.0.0.0").public_url == "http://127.0.0.1:8123"
    assert Settings(_env_file=None, api_host="::", api_port=9000).public_url == (
        "http://[::1]:9000"
    )
    assert Settings(_env_file=None, api_host="localhost").public_url == "http://localhost:8123"
    # Said outright, the public URL is kept.
    monkeypatch.setenv("HILO_PUBLIC_URL", "https://hilo.shop.example/")
    assert Settings(_env_file=None).public_url == "https://hilo.shop.example"


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One ``hilo dev`` on ports other than the defaults, for the tests that only look at it."""
    folder = tmp_path_factory.mktemp("dev_stack")
    temporal_port, ui_port, api_port = three_free_ports()
    env = {
        **os.environ,
        "HILO_STATE_DIR": str(folder / "state"),
        "HILO_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "HILO_TEMPORAL_UI_PORT": str(ui_port),
        "HILO_API_PORT": str(api_port),
        "HILO_ADMIN_TOKEN": "a-dev-token-of-this-test",
    }
    env.pop("HILO_PUBLIC_URL", None)
    log = folder / "dev.log"
    stack = DevStack(
        api=f"http://127.0.0.1:{api_port}",
        temporal_address=f"127.0.0.1:{temporal_port}",
        ui=f"http://127.0.0.1:{ui_port}",
        state=folder / "state",
        log=log,
        env=env,
        process=start_dev(env, log),
    )
    try:
        wait_for_http(f"{stack.api}/health", stack.process, log)
        yield stack
    finally:
        if stack.process.poll() is None:
            stop(stack.process)


@dataclass
class DevStack:
    api: str
    temporal_address: str
    ui: str
    state: Path
    log: Path
    env: dict[str, str]  # what `hilo dev` ran with, as a .env file would give every command
    process: subprocess.Popen[bytes]


def test_links_in_a_dev_stacks_messages_reach_its_api(dev_stack: DevStack) -> None:
    api = dev_stack.api
    assert not api.endswith(":8000")
    segment = httpx.Client(base_url=api, auth=(DEV_WRITE_KEY, ""), timeout=10)
    with segment:
        traits = {"email": "ana@example.com", "consent": {"email": True}}
        segment.post("/v1/identify", json={"userId": "ana", "traits": traits}).raise_for_status()
        segment.post("/v1/track", json={"userId": "ana", "event": "Signed Up"}).raise_for_status()

    store = Store(f"sqlite:///{dev_stack.state / 'hilo.db'}")
    try:
        deadline = time.monotonic() + 60
        while not (captured := store.captured("ana")):
            assert time.monotonic() < deadline, f"no welcome email:\n{dev_stack.log.read_text()}"
            time.sleep(0.3)
    finally:
        store.dispose()
    text = json.dumps(captured[0].content)
    links = re.findall(r"https?://[^\s\"'<>\\]+/l/u/[\w.~-]+", text)
    assert links, f"no unsubscribe link in {text}"
    unsubscribe = links[0]
    assert unsubscribe.startswith(f"{api}/l/u/"), unsubscribe
    page = httpx.get(unsubscribe, timeout=10)
    assert page.status_code == 200, page.text
    # Signed with the state folder's own secret, not a constant anyone can read in the source.
    with pytest.raises(LinkRejected):
        LinkSigner(DEV_LINK_SECRET, api).verify(unsubscribe.rsplit("/", 1)[1], "unsubscribe")
    # The page's own form posts back to the same API.
    assert f'action="{unsubscribe}"' in page.text, page.text


# ---------------------------------------------------------------- the banner


def banner_lines(log: Path) -> list[str]:
    text = log.read_text()
    assert "Hilo is running." in text, text
    return text.split("Hilo is running.", 1)[1].split("Ctrl-C stops everything.", 1)[0].splitlines()


def command_after(lines: list[str], program: str) -> list[str]:
    """The banner's command line that runs ``program``, split as a shell would."""
    for line in lines:
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if Path(first).name == program:
            return shlex.split(line)
    raise AssertionError(f"no {program} command in the banner:\n" + "\n".join(lines))


def test_the_banner_gives_commands_that_run_as_printed(dev_stack: DevStack) -> None:
    lines = banner_lines(dev_stack.log)
    text = "\n".join(lines)
    # The admin token itself, and how to send it.
    assert "a-dev-token-of-this-test" in text
    assert "Authorization: Bearer a-dev-token-of-this-test" in text
    assert DEV_WRITE_KEY in text
    # How to move each port.
    for setting in ("HILO_API_PORT", "HILO_TEMPORAL_ADDRESS", "HILO_TEMPORAL_UI_PORT", ".env"):
        assert setting in text, setting

    # Each command runs as printed, from where `hilo dev` was started.
    hilo = command_after(lines, "hilo")
    assert Path(hilo[0]).is_file() and os.access(hilo[0], os.X_OK), hilo[0]
    sent = subprocess.run(hilo, env=dev_stack.env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["started"] == ["journey/abandoned_cart/42/c1"]

    curl = command_after(lines, "curl")
    header = curl[curl.index("-H") + 1]
    name, value = header.split(": ", 1)
    answer = httpx.get(curl[-1], headers={name: value}, timeout=10)
    assert answer.status_code == 200, answer.text

    temporal = command_after(lines, "temporal")
    assert Path(temporal[0]).is_file(), temporal[0]
    assert temporal[temporal.index("--address") + 1] == dev_stack.temporal_address
    listed = subprocess.run(
        [*temporal, "--output", "json"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "journey/abandoned_cart/42/c1" in listed.stdout
