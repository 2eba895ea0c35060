"""executor.run_python: the sandbox for model-written code (issue 5, STYLE.md section 6).

Real subprocesses only. The hostile battery runs each attack for real and checks the host side:
files, processes, signals, sockets and the wall clock. MARGIN is generous because the CI box has two
shared cores; a sandbox that fails to contain an attack misses it by far more.
"""
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import executor
from executor import run_python

MARGIN = 2.0  # seconds past the time limit that a contained run may take on a loaded 2-core box
IS_ROOT = os.geteuid() == 0


def needs(*layers):
    """Skip unless this machine allows one of these layers: where none is possible the sandbox
    runs without it (and says so), and the attack it stops is not contained; here the disk filler
    would fill the real disk."""
    have = kernel_allows() | ({"root"} if IS_ROOT else set())
    if not have & set(layers):
        pytest.skip(f"this machine allows none of {layers}")


def sandbox_processes():
    """Live (not zombie) processes owned by a sandbox uid (executor._SANDBOX_UID_BASE + n)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if (int(status["Uid"].split()[0]) >= executor._SANDBOX_UID_BASE
                and not status["State"].strip().startswith("Z")):
            found.append(int(pid))
    return found


# --- plain behaviour --------------------------------------------------------------------------

def test_runs_code_with_stdin_files_and_exit_codes():
    r = run_python("import sys\nprint(open('data/x.txt').read(), input(), sys.argv, __name__)",
                   stdin="from stdin\n", files={"data/x.txt": "from a file"})
    assert (r.status, r.exit_code, r.reason) == ("ok", 0, "")
    assert r.stdout == "from a file from stdin ['main.py'] __main__\n"
    assert run_python("import sys; sys.exit(3)").exit_code == 3
    r = run_python("raise SystemExit('bye')")
    assert (r.status, r.exit_code, r.stderr) == ("error", 1, "bye\n")


def test_error_traceback_points_at_main_py_only():
    r = run_python("def f():\n    return 1 / 0\nf()\n")
    assert r.status == "error" and r.exit_code == 1
    assert r.reason == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 2, in f' in r.stderr and "<string>" not in r.stderr
    r = run_python("x = (")
    assert r.status == "error" and r.reason.startswith("SyntaxError")


def test_runs_do_not_share_random_state():
    draws = {run_python("import random\nprint(random.random())").stdout for _ in range(3)}
    assert len(draws) == 3


def test_exit_runs_atexit_and_joins_threads():
    code = ("import atexit, threading, time\n"
            "atexit.register(lambda: print('atexit'))\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n"
            "print('main')\n")
    assert run_python(code).stdout == "main\nthread\natexit\n"


def test_rejects_files_outside_the_work_dir():
    for bad in ("/etc/x", "../x", "a/../../x", "main.py"):
        with pytest.raises(ValueError, match="files key"):
            run_python("pass", files={bad: "x"})


def test_layers_and_limits_are_in_force():
    code = ("import os, resource as R\n"
            "print([R.getrlimit(r)[0]\n"
            "       for r in (R.RLIMIT_CPU, R.RLIMIT_AS, R.RLIMIT_FSIZE, R.RLIMIT_NOFILE)])\n"
            "print(os.getuid() != 0, os.getpid(), os.getcwd() == os.environ['HOME'])\n")
    r = run_python(code, timeout=4.5, memory_mb=300, file_mb=3)
    assert r.status == "ok", r
    lines = r.stdout.splitlines()
    assert lines[0] == str([5, 300 << 20, 3 << 20, 256])
    assert "rlimits" in r.layers and "session" in r.layers
    want = {"no-new-privs"} | kernel_allows()  # a layer this machine allows must be in force
    assert want <= set(r.layers), want - set(r.layers)
    if IS_ROOT:
        assert {"uid-drop", "nproc"} <= set(r.layers) and lines[1].startswith("True")
    if "pid-namespace" in want:
        assert lines[1].split()[1] == "1"  # init of its own PID namespace


PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, flag in (("pid", 0x20000000), ("net", 0x40000000), ("mount", 0x20000)):
    if os.fork() == 0:
        os._exit(0 if libc.unshare(ctypes.c_long(flag)) == 0 else 1)
    if os.wait()[1] == 0:
        print(name + "-namespace")
if libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)) >= 1:
    print("landlock")
"""


@functools.lru_cache(maxsize=1)
def kernel_allows():
    """The namespace and Landlock layers this machine lets us create, probed outside the sandbox."""
    out = subprocess.run([sys.executable, "-I", "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_work_dir_is_private_and_removed():
    name = f"scoreflow-probe-{time.time_ns()}"
    r = run_python(f"import os\nopen({name!r}, 'w').write('x')\nprint(os.path.abspath({name!r}))")
    assert r.status == "ok" and r.stdout.strip().endswith(name)
    assert not os.path.exists(r.stdout.strip())  # a private tmpfs, or a host temp dir since removed
    assert run_python(f"open({name!r}).read()").status == "error"  # nothing carries over


# --- the hostile battery ----------------------------------------------------------------------

def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and r.exit_code == -signal.SIGKILL  # the launcher killed it
    assert r.seconds < 1.0 + MARGIN


def test_sleeping_code_times_out_on_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", timeout=1.0)
    assert r.status == "timeout" and r.seconds < 1.0 + MARGIN


def test_fork_bomb_is_contained():
    probe = run_python("pass")
    if not {"nproc", "cgroup-pids"} & set(probe.layers):
        pytest.skip(f"no layer that stops a fork bomb is active here: {probe.layers}")
    code = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    t0 = time.monotonic()
    r = run_python(code, timeout=2.0, max_procs=16)
    assert r.status == "timeout" and time.monotonic() - t0 < 2.0 + MARGIN
    time.sleep(0.2)
    assert sandbox_processes() == []


def test_memory_bomb_is_stopped():
    r = run_python("x = bytearray(8 << 30)", memory_mb=512)
    assert r.status == "memory" and "MemoryError" in r.stderr
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
                   memory_mb=256, timeout=20)
    assert r.status == "memory", r


def test_disk_filler_hits_the_work_dir_quota():
    needs("mount-namespace")  # the tmpfs work dir is the only disk quota
    prefix = f"scoreflow-fill-{time.time_ns()}-"
    code = (f"import os\n"
            f"print(os.path.abspath({prefix!r} + '0'), flush=True)\n"
            f"i = 0\n"
            f"while True:\n"
            f"    with open({prefix!r} + str(i), 'wb') as f:\n"
            f"        f.write(b'x' * (1 << 20))\n"
            f"    i += 1\n")
    r = run_python(code, disk_mb=8, timeout=10)
    assert r.status == "error" and "No space left on device" in r.reason, r
    assert not os.path.exists(r.stdout.strip())
    r = run_python("with open('big', 'wb') as f:\n"
                   "    while True:\n"
                   "        f.write(b'x' * (1 << 20))",
                   file_mb=2, timeout=10)
    assert r.status == "error" and "File too large" in r.reason


def test_writes_outside_the_work_dir_fail(tmp_path):
    needs("landlock")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # file permissions would allow it: only the sandbox stands in the way
    nonce = time.time_ns()
    targets = [str(open_dir / "evil.txt")] + [f"{d}/scoreflow-escape-{nonce}"
                                               for d in ("/dev/shm", "/var/tmp")
                                               if os.path.isdir(d)]  # world-writable host dirs
    try:
        code = (f"for t in {targets!r}:\n"
                f"    try:\n"
                f"        open(t, 'w').write('pwned')\n"
                f"        print('wrote', t)\n"
                f"    except OSError as e:\n"
                f"        print(type(e).__name__)\n")
        r = run_python(code)
        assert r.status == "ok" and "wrote" not in r.stdout, r
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets[1:]:
            if os.path.exists(t):
                os.unlink(t)


def test_secret_file_in_home_is_unreadable(tmp_path, monkeypatch):
    needs("landlock", "mount-namespace")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".secret").write_text("TOKEN-abc123")
    for p in (tmp_path, home, home / ".secret"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # world-readable: permissions alone would allow it
    monkeypatch.setenv("HOME", str(home))
    code = (f"import os\n"
            f"for f in ({str(home / '.secret')!r}, {str(tmp_path / 'home' / '.secret')!r}):\n"
            f"    try:\n"
            f"        print(open(f).read())\n"
            f"    except OSError as e:\n"
            f"        print(type(e).__name__)\n"
            f"try:\n"
            f"    print(os.listdir({os.path.realpath(os.path.expanduser('~'))!r}))\n"
            f"except OSError as e:\n"
            f"    print(type(e).__name__)\n")
    r = run_python(code)
    assert r.status == "ok" and "TOKEN" not in r.stdout and ".secret" not in r.stdout, r
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = run_python(f"print(open({os.path.join(project, 'executor.py')!r}).read())")
    assert r.status == "error" and "def run_python" not in r.stdout + r.stderr


def test_environment_secret_does_not_leak(monkeypatch):
    monkeypatch.setenv("SCOREFLOW_TEST_SECRET", "s3cr3t-value")
    code = ("import os\n"
            "print(dict(os.environ))\n"
            "for p in ('/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ'):\n"
            "    try:\n"
            "        print(open(p).read())\n"
            "    except OSError as e:\n"
            "        print(p, type(e).__name__)\n")
    r = run_python(code)
    assert r.status == "ok" and "PATH" in r.stdout
    assert "s3cr3t" not in r.stdout + r.stderr


def test_no_network_even_to_loopback():
    needs("net-namespace")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set() and not accepted:
            try:
                accepted.append(server.accept())
            except socket.timeout:
                pass
    t = threading.Thread(target=accept)
    t.start()
    code = (f"import socket\n"
            f"for attempt in ('tcp', 'udp'):\n"
            f"    try:\n"
            f"        if attempt == 'tcp':\n"
            f"            socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            f"        else:\n"
            f"            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(\n"
            f"                b'x', ('127.0.0.1', {port}))\n"
            f"        print(attempt, 'connected')\n"
            f"    except OSError as e:\n"
            f"        print(attempt, 'blocked', e)\n")
    r = run_python(code)
    time.sleep(0.3)  # a connection that got through would be accepted by now
    done.set()
    t.join()
    server.close()
    assert accepted == [] and "connected" not in r.stdout, r
    assert r.stdout.count("blocked") == 2


def test_cannot_signal_processes_outside(tmp_path):
    needs("root", "pid-namespace")
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = (f"import os, signal\n"
                f"for pid, sig in (({victim.pid}, signal.SIGKILL),\n"
                f"                 ({os.getpid()}, signal.SIGUSR1),\n"
                f"                 (os.getppid(), signal.SIGKILL), (-1, signal.SIGKILL)):\n"
                f"    try:\n"
                f"        os.kill(pid, sig)\n"
                f"    except OSError as e:\n"
                f"        print(pid, type(e).__name__)\n")
        r = run_python(code)
        time.sleep(0.2)
        assert victim.poll() is None and got == [], r
        # kill(-1) may take down the sandbox itself, nothing else
        assert r.status in ("ok", "killed")
    finally:
        victim.kill()
        victim.wait()
        signal.signal(signal.SIGUSR1, old)


def test_detached_child_does_not_outlive_the_run():
    needs("root", "pid-namespace")  # uid-sweep or the PID namespace
    marker = f"{time.time_ns() % 10**6}.25"  # a unique `sleep` argument to look for afterwards
    code = (f"import os\n"
            f"if os.fork() == 0:\n"
            f"    os.setsid()\n"
            f"    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
            f"    os._exit(0)\n"
            f"print('parent leaves')\n")
    r = run_python(code, timeout=5)
    assert r.status == "ok" and r.seconds < 1 + MARGIN
    time.sleep(0.2)
    leftovers = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True,
                               text=True).stdout
    assert leftovers == "" and sandbox_processes() == []


def test_giant_output_is_capped():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", max_output=10_000,
                   file_mb=4, timeout=10)
    assert r.status == "error" and "File too large" in r.reason
    assert len(r.stdout) < 10_100 and "bytes cut" in r.stdout
    assert r.seconds < 10


def test_parallel_runs_do_not_interfere():
    def normal(i):
        return run_python("import sys, time\n"
                          "time.sleep(0.3)\n"
                          "print(open('id').read(), sys.stdin.read())",
                          files={"id": str(i)}, stdin=f"in{i}")

    hostile = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
               "        pass")
    if not {"nproc", "cgroup-pids"} & set(run_python("pass").layers):
        hostile = "while True:\n    pass"  # no layer here stops a fork bomb: a CPU hog instead
    with ThreadPoolExecutor(8) as pool:
        bomb = pool.submit(run_python, hostile, timeout=2.0, max_procs=16)
        results = list(pool.map(normal, range(8)))
    assert [r.stdout for r in results] == [f"{i} in{i}\n" for i in range(8)]
    assert all(r.status == "ok" for r in results)
    assert bomb.result().status == "timeout"


def test_a_dead_server_is_replaced():
    run_python("pass")
    server = executor._sandbox_state["server"]
    server.proc.kill()
    server.proc.wait()
    r = run_python("print('again')")
    assert r.status == "ok" and r.stdout == "again\n"
    assert executor._sandbox_state["server"] is not server


def test_a_wedged_server_is_replaced_not_waited_on():
    """A server that stops answering (here SIGSTOPped, its whole process group: unprivileged, the
    serving process is a child of the one we started) costs a run its launch timeout or its reap
    grace, never a hang: the launch is retried on a fresh server; a run already started is reported
    "internal" (not evidence about the code) and the next run gets a fresh server."""
    saved = executor._SANDBOX_REPLY_TIMEOUT, executor._SANDBOX_REAP_GRACE
    executor._SANDBOX_REPLY_TIMEOUT, executor._SANDBOX_REAP_GRACE = 2.0, 1.0
    try:
        server = executor._sandbox_server(restart=True)  # its socket timeout is the 2 s above
        os.killpg(server.proc.pid, signal.SIGSTOP)  # wedged before the launch
        t0 = time.monotonic()
        r = run_python("print('relaunched')")
        assert r.status == "ok" and r.stdout == "relaunched\n"
        assert time.monotonic() - t0 < 2.0 + 2.0 + 5.0 + MARGIN  # reply timeout, kill wait, start
        assert executor._sandbox_state["server"] is not server

        server = executor._sandbox_state["server"]  # wedged mid-run: it cannot reap the killed run
        threading.Timer(0.5, os.killpg, (server.proc.pid, signal.SIGSTOP)).start()
        t0 = time.monotonic()
        r = run_python("import time\ntime.sleep(30)", timeout=1.5)
        assert r.status == "internal" and "did not report the run's end" in r.reason, r
        assert time.monotonic() - t0 < 1.5 + 1.0 + 2.0 + 5.0 + MARGIN
        assert executor._sandbox_state["server"] is not server
    finally:
        executor._SANDBOX_REPLY_TIMEOUT, executor._SANDBOX_REAP_GRACE = saved
        executor._sandbox_server(restart=True)  # later tests get the usual timeouts
    assert run_python("print('fine')").stdout == "fine\n"


def test_unprivileged_runs_each_get_a_pid_namespace():
    """The path for a user who is not root: the server's own user namespace carries the others,
    and every run, not only the first, is init of a fresh PID namespace (the server once could
    not get back into its own PID namespace, the first run's namespace died with it and every
    later fork failed). Run as nobody, where nobody may run this interpreter and our modules."""
    if not IS_ROOT:
        pytest.skip("only root can become nobody (unprivileged, the other tests take this path)")
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"HOME": project, "PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(sys.path)}
    # This interpreter, or else the system's of the same version with our sys.path: a venv over a
    # Python under /root (mode 0700, as in CI here) is one nobody cannot execute.
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, system):
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c"]
        probe = subprocess.run(as_nobody + ["import executor, os, sys\n"  # the server execs it
                                            "sys.exit(not os.access(sys.executable, os.X_OK))"],
                               cwd=project, env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip(f"nobody cannot run {sys.executable} or {system} with our modules: "
                    f"{probe.stderr[-300:]}")
    code = ("import executor\n"
            "for _ in range(3):\n"
            "    r = executor.run_python('import os; print(os.getpid())')\n"
            "    print(r.status, r.stdout.strip() or '-', *r.layers, r.reason)\n")
    out = subprocess.run(as_nobody + [code], cwd=project, env=env, capture_output=True, text=True,
                         timeout=120).stdout.splitlines()
    assert len(out) == 3 and all(line.startswith("ok ") for line in out), out
    for line in out:
        if "user-namespace" in line.split():
            assert line.split()[1] == "1" and "pid-namespace" in line.split(), line
