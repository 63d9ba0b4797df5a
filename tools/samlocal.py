"""`sam local` on a machine with no container registry: a private Docker engine and an offline
stand-in for `public.ecr.aws/lambda/python:3.13`, shared by the test tier
(tests/integration/test_sam_local.py) and `make sam-local`.

    python3 tools/samlocal.py up [--arch x86_64|arm64]   engine and image; prints DOCKER_HOST
    python3 tools/samlocal.py down                        stop the engine, unless still in use
    python3 tools/samlocal.py serve [--port 8080] [--arch ...]
                                                          `make sam-local` (see the docs)

What it promises (see ../shared/DESIGN.md, "sam local on a machine with no registry"):

- Engine: Debian's `dockerd` (installed with apt when missing, as root) with its own socket,
  data root, exec root, config file and bridge (`sgdocker0`), iptables untouched, so it never
  meets a system Docker. Its state lives under ~/.cache/streamgate/docker and is reused. A
  running engine on our socket is reused; whoever stops using it last stops it (flock), and only
  if this module started it (its pid file) and no `up` asked to keep it for later commands.
- Image: a debootstrap'd Debian trixie with python3.13, built with `FROM scratch`, the real
  image's ENV and WORKDIR, tagged as SAM expects (`...python:3.13-<arch>`). The rootfs tarball
  is cached under ~/.cache/streamgate/images, keyed by a hash of everything that goes into it;
  the image carries the key as a label, so a changed recipe rebuilds and an unchanged one is
  reused (SAM's `...:3.13-rapid-<arch>` image on top is dropped when the base changes).
- Every wait is bounded. Only a machine that lacks a prerequisite we cannot install (not
  root, no apt-get, no setsid) raises ``Unavailable`` with the reason, which tests turn into a
  skip. Anything of our own that fails (an apt-get install, dockerd's start, debootstrap, the
  image build, the engine's network) raises ``SetupError``: a failure, never a skip, so that a
  regression here cannot pass as "sam local unavailable".

Standard library only, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STREAMGATE_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamgate")

# Lambda architecture -> (Debian architecture, Docker platform, qemu binfmt entry or None).
ARCHES = {"x86_64": ("amd64", "linux/amd64", "qemu-x86_64"),
          "arm64": ("arm64", "linux/arm64", "qemu-aarch64")}
BRIDGE = "sgdocker0"
DEFAULT_BRIDGE_CIDR = "172.29.77.1/24"
LABEL = "org.streamgate.standin"
IMAGE_REPO = "public.ecr.aws/lambda/python"

# The stand-in's recipe. Everything here goes into the cache key.
SUITE, VARIANT = "trixie", "minbase"
INCLUDE = ("python3.13", "python3", "ca-certificates")
MIRROR = os.environ.get("STREAMGATE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The real image's layout and ENV (docs.aws.amazon.com/lambda/latest/dg/python-image.html).
LAYOUT = ("mkdir -p var/task var/runtime var/rapid var/lang/bin opt"
          " && ln -sf /usr/bin/python3.13 var/lang/bin/python3.13"
          " && ln -sf /usr/bin/python3.13 var/lang/bin/python3"
          " && rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/*")
DOCKERFILE = """FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 TZ=:/etc/localtime \\
    PATH=/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin \\
    LAMBDA_TASK_ROOT=/var/task LAMBDA_RUNTIME_DIR=/var/runtime
ENV LD_LIBRARY_PATH=/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:\\
/var/task:/var/task/lib:/opt/lib
WORKDIR /var/task
LABEL {label}={key}
"""

APT_TIMEOUT_S = 900
DOCKERD_START_S = 60
DOCKERD_STOP_S = 30
DEBOOTSTRAP_S = {"x86_64": 900, "arm64": 2400}
IMAGE_BUILD_S = 600


class Unavailable(Exception):
    """This machine lacks a prerequisite of `sam local` that we cannot install (not root, no
    apt-get); the message says which. The only reason to skip the tier."""


class SetupError(Exception):
    """Setting up the engine or the image failed (a command, dockerd's start, a lock or a
    wait): a failure to report, never a reason to skip."""


def log(message: str) -> None:
    print(f"samlocal: {message}", file=sys.stderr, flush=True)


def host_arch() -> str:
    return "arm64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _run(cmd: Sequence[str], *, timeout: float, what: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                                env=env, cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise SetupError(f"{what} took over {timeout:.0f} s: "
                         f"{_tail(e.stderr or e.stdout)}") from e
    if result.returncode != 0:
        raise SetupError(f"{what} failed ({result.returncode}): "
                          f"{_tail(result.stderr or result.stdout)}")
    return result


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX, timeout: float = 3600) -> Iterator[IO[str]]:
    """``path`` locked for the block (polling, so the wait is bounded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SetupError(f"{path} stayed locked for {timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- packages ----------------------------------------------------------------------------------

def ensure_packages(arch: str) -> None:
    """dockerd, debootstrap and ip (and qemu-user-static for a foreign arch), from apt if
    missing."""
    wanted = {"dockerd": "docker.io", "debootstrap": "debootstrap", "ip": "iproute2"}
    if arch != host_arch():
        wanted[f"{ARCHES[arch][2]}-static"] = "qemu-user-static"
    missing = sorted({pkg for binary, pkg in wanted.items() if not _which(binary)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"needs root to install {' '.join(missing)} (not root)")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{' '.join(missing)} missing and no apt-get to install them")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Keep the package scripts from starting a system dockerd: only ours may run.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        _run(["apt-get", "update", "-qq"], timeout=APT_TIMEOUT_S, what="apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
             timeout=APT_TIMEOUT_S, what=f"apt-get install {' '.join(missing)}", env=env)
    finally:
        if made_policy:
            policy.unlink()


def _which(binary: str) -> str | None:
    return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_binfmt(arch: str) -> None:
    """qemu-user-static registered for ``arch`` (flag F, so it works inside chroots and
    containers); the package's systemd unit does this where systemd runs."""
    if arch == host_arch():
        return
    entry = ARCHES[arch][2]
    misc = Path("/proc/sys/fs/binfmt_misc")
    if (misc / entry).exists():
        return
    if not (misc / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], timeout=30,
             what="mounting binfmt_misc")
    conf = Path(f"/usr/lib/binfmt.d/{entry}.conf")
    if not conf.exists():
        raise SetupError(f"{conf} missing: is qemu-user-static installed?")
    line = next(x for x in conf.read_text().splitlines() if x.startswith(":"))
    try:
        (misc / "register").write_text(line)
    except OSError as e:
        raise SetupError(f"cannot register {entry} with binfmt_misc: {e}") from e


# --- engine ------------------------------------------------------------------------------------

class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Engine:
    """A private dockerd. ``up()`` starts or joins it, ``down()`` leaves it (and stops it when
    this was its last user and this module started it)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or CACHE / "docker"
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "dockerd.pid"
        self.logfile = self.root / "dockerd.log"
        self._users: IO[str] | None = None
        self.gateway = ""

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """The environment for docker, sam and docker-py to talk to this engine."""
        return {**os.environ, "DOCKER_HOST": self.docker_host}

    def ping(self, timeout: float = 2) -> bool:
        conn = _UnixConnection(str(self.socket), timeout)
        try:
            conn.request("GET", "/_ping")
            return conn.getresponse().read() == b"OK"
        except OSError:
            return False
        finally:
            conn.close()

    def up(self, timeout: float = DOCKERD_START_S) -> Engine:
        if os.geteuid() != 0:
            raise Unavailable("a private dockerd needs root (not root)")
        ensure_packages(host_arch())
        with _flock(self.root / "start.lock"):
            if not self.ping():
                self._start(timeout)
            self._users = open(self.root / "users.lock", "a")  # noqa: SIM115 - held until down()
            fcntl.flock(self._users, fcntl.LOCK_SH)
        try:
            self.gateway = self._gateway()
        except BaseException:
            self.down()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self._stale_pid()
        cidr = _bridge_cidr()
        _ensure_bridge(cidr)
        for d in ("data", "exec"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        config = self.root / "daemon.json"
        config.write_text("{}\n")  # never /etc/docker/daemon.json: a system Docker's settings
        cmd = [_which("dockerd") or "dockerd",
               "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
               "--host", self.docker_host, "--pidfile", str(self.pidfile),
               "--config-file", str(config), "--storage-driver", "overlay2",
               "--bridge", BRIDGE, "--iptables=false", "--ip-forward=false", "--ip-masq=false",
               "--exec-opt", "native.cgroupdriver=cgroupfs"]
        if not shutil.which("setsid"):
            raise Unavailable("no setsid (util-linux) to start dockerd as a daemon")
        log(f"starting dockerd ({self.docker_host}, bridge {BRIDGE} {cidr})")
        with open(self.logfile, "ab") as out:
            offset = out.tell()
            # A daemon, not our child: `setsid --fork` leaves it to init, so whichever process
            # stops it last needs no child of its own to reap.
            subprocess.run(["setsid", "--fork", *cmd], stdout=out, stderr=out,
                           stdin=subprocess.DEVNULL, timeout=30, check=True)
        deadline = time.monotonic() + timeout
        while not self.ping():
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                started = f.read().decode(errors="replace")
            pid = _read_pid(self.pidfile)
            if "level=fatal" in started or (pid and not _alive(pid)):
                raise SetupError(f"dockerd cannot start: {_tail(started)}")
            if time.monotonic() > deadline:
                if pid:
                    _stop_pid(pid, DOCKERD_STOP_S)
                raise SetupError(f"dockerd did not answer within {timeout:.0f} s: "
                                  f"{_tail(started)}")
            time.sleep(0.2)
        # Leftovers of a run that was killed: nothing can be using them, the engine just started.
        self.docker("container", "prune", "--force", timeout=60)

    def _stale_pid(self) -> None:
        pid = _read_pid(self.pidfile)
        if pid and not _alive(pid):
            self.pidfile.unlink(missing_ok=True)
        elif pid:
            raise SetupError(f"dockerd {pid} holds {self.pidfile} but does not answer on "
                              f"{self.socket}; stop it first (python3 tools/samlocal.py down)")

    def _gateway(self) -> str:
        out = self.docker("network", "inspect", "bridge", "--format",
                          "{{range .IPAM.Config}}{{.Gateway}}{{end}}", timeout=30).stdout.strip()
        if not out:
            raise SetupError("the engine's bridge network has no gateway address")
        return out

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run([docker_cli(), "--host", self.docker_host, *args], timeout=timeout,
                    what=f"docker {args[0]}")

    def keep(self) -> None:
        """Leave the engine running after this process (`samlocal.py up`) until ``down(force)``."""
        (self.root / "keep").touch()

    def down(self, timeout: float = DOCKERD_STOP_S, *, force: bool = False) -> None:
        """Leave the engine; stop it if no one else uses it, no `up` asked to keep it (unless
        ``force``) and this module started it."""
        with _flock(self.root / "start.lock", timeout=timeout + 60):
            if self._users is not None:
                fcntl.flock(self._users, fcntl.LOCK_UN)
                self._users.close()
                self._users = None
            if force:
                (self.root / "keep").unlink(missing_ok=True)
            elif (self.root / "keep").exists():
                log("engine kept running (`python3 tools/samlocal.py down` stops it)")
                return
            with open(self.root / "users.lock", "a") as users:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log("engine still in use elsewhere: left running")
                    return
                pid = _read_pid(self.pidfile)
                if pid and _alive(pid):
                    log(f"stopping dockerd {pid}")
                    _stop_pid(pid, timeout)
                self.pidfile.unlink(missing_ok=True)
                if Path(f"/sys/class/net/{BRIDGE}").exists():
                    subprocess.run(["ip", "link", "delete", BRIDGE], timeout=30,
                                   capture_output=True, check=False)

    def __enter__(self) -> Engine:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def docker_cli() -> str:
    """Debian's client (it matches the engine's API) before any other docker on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SetupError("no docker client (the docker.io package ships one)")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, which a parent has yet to reap, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: dockerd stops its containers and containerd."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        log(f"dockerd {pid} ignored SIGTERM for {timeout:.0f} s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _bridge_cidr() -> str:
    """Our bridge's address: STREAMGATE_DOCKER_BRIDGE_CIDR, else the default, unless a network
    on this machine already overlaps it."""
    cidr = os.environ.get("STREAMGATE_DOCKER_BRIDGE_CIDR", DEFAULT_BRIDGE_CIDR)
    ours = ipaddress.ip_interface(cidr).network
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    for line in out.splitlines():
        fields = line.split()
        if (len(fields) > 3 and fields[1] != BRIDGE
                and ipaddress.ip_interface(fields[3]).network.overlaps(ours)):
            raise SetupError(f"{cidr} overlaps {fields[3]} on {fields[1]}; set "
                             "STREAMGATE_DOCKER_BRIDGE_CIDR to a free private /24")
    return cidr


def _ensure_bridge(cidr: str) -> None:
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        subprocess.run(["ip", "link", "delete", BRIDGE], timeout=30, capture_output=True,
                       check=False)
    for cmd in (["ip", "link", "add", BRIDGE, "type", "bridge"],
                ["ip", "addr", "add", cidr, "dev", BRIDGE],
                ["ip", "link", "set", BRIDGE, "up"]):
        _run(cmd, timeout=30, what=" ".join(cmd))


# --- image -------------------------------------------------------------------------------------

def rootfs_key(arch: str) -> str:
    """A hash of everything that goes into the rootfs tarball for ``arch``."""
    recipe = {"suite": SUITE, "variant": VARIANT, "include": INCLUDE, "arch": ARCHES[arch][0],
              "layout": LAYOUT, "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def image_key(arch: str) -> str:
    """A hash of everything that goes into the stand-in image: the rootfs and the Dockerfile."""
    recipe = {"rootfs": rootfs_key(arch), "dockerfile": DOCKERFILE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def image_tag(arch: str) -> str:
    return f"{IMAGE_REPO}:3.13-{arch}"


def ensure_image(engine: Engine, arch: str) -> str:
    """The stand-in base image for ``arch`` in ``engine``: kept if its key matches, else built
    from the cached rootfs tarball, else debootstrap'd first. Returns its tag."""
    tag, key = image_tag(arch), image_key(arch)
    images = CACHE / "images"
    with _flock(images / f"build-{arch}.lock"):
        if _label(engine, tag) == key:
            return tag
        tarball = images / f"python3.13-{arch}-{rootfs_key(arch)}.tar"
        if not tarball.exists():
            _debootstrap(arch, tarball)
        with tempfile.TemporaryDirectory(dir=images) as context:
            os.link(tarball, Path(context) / "rootfs.tar")
            (Path(context) / "Dockerfile").write_text(DOCKERFILE.format(label=LABEL, key=key))
            log(f"building {tag} from {tarball.name}")
            engine.docker("build", "--platform", ARCHES[arch][1], "--tag", tag, context,
                          timeout=IMAGE_BUILD_S)
        # SAM builds `...:3.13-rapid-<arch>` on top once and then reuses it: drop the stale one.
        subprocess.run([docker_cli(), "--host", engine.docker_host, "image", "rm", "--force",
                        f"{IMAGE_REPO}:3.13-rapid-{arch}"], capture_output=True, timeout=120,
                       check=False)
        subprocess.run([docker_cli(), "--host", engine.docker_host, "image", "prune", "--force"],
                       capture_output=True, timeout=120, check=False)
        for old in images.glob(f"python3.13-{arch}-*.tar"):
            if old != tarball:
                old.unlink()
    return tag


def _label(engine: Engine, tag: str) -> str | None:
    result = subprocess.run(
        [docker_cli(), "--host", engine.docker_host, "image", "inspect", "--format",
         "{{json .Config.Labels}}", tag], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return None
    labels: dict[str, Any] = json.loads(result.stdout or "null") or {}
    value = labels.get(LABEL)
    return value if isinstance(value, str) else None


def _debootstrap(arch: str, tarball: Path) -> None:
    ensure_packages(arch)
    ensure_binfmt(arch)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix=f"rootfs-{arch}-", dir=tarball.parent))
    try:
        started = time.monotonic()
        log(f"debootstrap {SUITE} {ARCHES[arch][0]} (a few minutes; cached afterwards)")
        _run(["debootstrap", "--variant", VARIANT, "--arch", ARCHES[arch][0],
              "--include", ",".join(INCLUDE), SUITE, str(rootfs), MIRROR],
             timeout=DEBOOTSTRAP_S[arch], what="debootstrap")
        _run(["sh", "-c", LAYOUT], cwd=rootfs, timeout=60, what="image layout")
        partial = tarball.with_suffix(".partial")
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
             timeout=300, what="tar")
        partial.rename(tarball)
        log(f"rootfs {tarball.name}: {tarball.stat().st_size >> 20} MiB in "
            f"{time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def up(arch: str) -> Engine:
    """Engine and image for ``arch``, ready for `sam local ... --skip-pull-image`."""
    ensure_packages(arch)
    engine = Engine().up()
    try:
        ensure_binfmt(arch)
        ensure_image(engine, arch)
    except BaseException:
        engine.down()
        raise
    return engine


# --- make sam-local ----------------------------------------------------------------------------

def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    """Until ``url`` answers anything over HTTP (or ``process`` exits, or ``timeout``)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SetupError(f"{process.args!r} exited ({process.returncode})")
        try:
            # A server not up yet refuses at once; one that is up may take long to answer
            # (a cold start under qemu): wait for that answer rather than queue more requests.
            with urllib.request.urlopen(url, timeout=max(1.0, deadline - time.monotonic())):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SetupError(f"{url} did not answer within {timeout:.0f} s")


def sam_env(engine: Engine, arch: str) -> dict[str, str]:
    """The environment for `sam build` and `sam local` against ``engine``.

    AWS_EC2_METADATA_DISABLED: with no AWS credentials or region configured, SAM's boto3 asks
    the EC2 metadata service (169.254.169.254) for them; where that address accepts the
    connection but never answers, `sam local invoke` hangs (DESIGN.md's "hung 300 s once").
    Credentials you do have (environment, ~/.aws) are still passed into the container."""
    return {**engine.env(), "SAM_CLI_TELEMETRY": "0", "AWS_EC2_METADATA_DISABLED": "true",
            "ARCHITECTURE": arch}


def sam_parameters(arch: str, **params: str) -> str:
    """--parameter-overrides for sam local: it replaces samconfig.toml's, so Auth comes too."""
    merged = {"Auth": "none", "AllowUnauthenticated": "true", "Architecture": arch, **params}
    return " ".join(f'{k}="{v}"' for k, v in merged.items())


def stop(process: subprocess.Popen[Any], timeout: float = 30,
         sig: int = signal.SIGTERM) -> None:
    """``sig`` to the process group of ``process``, then SIGKILL after ``timeout``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def serve(port: int, arch: str) -> int:
    """`make sam-local`: the engine and image, `sam build`, the embedded model behind the dev
    server on the bridge address, then `sam local start-api --port <port>` relaying it."""
    sam, python = ROOT / ".venv-sam/bin/sam", ROOT / ".venv/bin/python"
    # Ctrl-C, and SIGTERM too, end in the cleanup below (a shell's `&` may have left SIGINT
    # ignored); the children run in sessions of their own, so only we stop them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        engine = up(arch)
    except Unavailable as e:
        log(f"cannot run sam local here: {e}")
        return 2
    except SetupError as e:
        log(f"setting up sam local failed: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    processes: list[subprocess.Popen[Any]] = []
    try:
        env = sam_env(engine, arch)
        log(f"sam build (Architecture={arch})")
        subprocess.run([str(sam), "build", "--parameter-overrides", f"Architecture={arch}"],
                       cwd=ROOT, env=env, check=True, timeout=900)
        # The function in the container cannot carry the model: the dev server serves it on the
        # bridge address (only there: the container reaches the host through it), and the
        # function relays it as its OpenAI-compatible upstream.
        dev_port = free_port(engine.gateway)
        dev = subprocess.Popen(
            [str(python), "-m", "streamgate.devserver", "--host", engine.gateway,
             "--port", str(dev_port)], cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "functions/streamgate"),
                 "STREAMGATE_PROVIDER": "local"})
        processes.append(dev)
        upstream = f"http://{engine.gateway}:{dev_port}/v1"
        wait_http(f"{upstream[:-3]}/health", 300, dev)
        api = subprocess.Popen(
            [str(sam), "local", "start-api", "--port", str(port), "--skip-pull-image",
             "--parameter-overrides", sam_parameters(
                 arch, Provider="openai", UpstreamBaseUrl=upstream,
                 DefaultModel="gemma-3-270m")],
            cwd=ROOT, env=env, start_new_session=True)
        processes.append(api)
        log(f"embedded model at {upstream}; sam local start-api on http://127.0.0.1:{port} "
            "(Ctrl-C stops everything)")
        return api.wait()
    except KeyboardInterrupt:
        return 0
    except (subprocess.SubprocessError, SetupError) as e:
        log(str(e))
        return 1
    finally:
        for process in reversed(processes):
            stop(process)  # on SIGTERM sam local removes its containers
        engine.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 tools/samlocal.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "serve"])
    parser.add_argument("--arch", choices=sorted(ARCHES), default=host_arch(),
                        help="Lambda architecture of the image (default: this machine's)")
    parser.add_argument("--port", type=int, default=8080, help="sam local start-api port")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.port, args.arch)
    if args.command == "down":
        Engine().down(force=True)
        return 0
    try:
        engine = up(args.arch)
    except Unavailable as e:
        log(str(e))
        return 2
    except SetupError as e:
        log(f"failed: {e}")
        return 1
    engine.keep()  # for the commands that follow; `down` stops it
    print(f"export DOCKER_HOST={engine.docker_host}  # image {image_tag(args.arch)}, "
          f"host at {engine.gateway}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
