"""A throw-away real Slurm cluster on this one machine: Debian's slurmctld, one slurmd per fake node and a
private munged, with fake GPUs (platform_notes.md section 5).

Installation: `ensure_slurm_installed()` runs `apt-get install slurmctld slurmd slurm-client munge` when the
binaries are missing (as root; CI runs `make test` as root on a fresh Debian 12 machine) and does nothing when
they are there, so it is idempotent and costs nothing after the first time (~5-20 s then).

Isolation, so that nothing of the machine's own Slurm or munge is used or touched:
- every file lives under `root` (a temp dir): slurm.conf + gres.conf (clients and daemons find them through
  SLURM_CONF / -f), state, spool, logs, the munge key and socket (slurm.conf AuthInfo=socket=...);
- the daemons run in the foreground as children of this process (`-D`), so their pids are known exactly;
  `stop()` cancels the cluster's jobs, waits for them, then SIGTERMs those pids (SIGKILL after a grace time);
- fake node i is `<prefix>i` at 127.0.1.i with its own slurmd port and its own UTS namespace (so `hostname` in
  its jobs says its name); /etc/hosts gets `127.0.1.i <prefix>i` lines (gloo and Ray resolve host names), and
  exactly the lines added are removed again;
- GPUs are character devices (major 195) under `root`: Slurm accepts them as GRES, CUDA_VISIBLE_DEVICES is set
  per job, nothing opens them.
All fake nodes share one kernel, file system and network namespace: anything binding 0.0.0.0 on a fixed port
collides between them (Ray: the head on 127.0.1.1:6379 only; its other ports are picked free per node).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge")
# a Slurm client's messages when a round trip to slurmctld failed, not the request
TRANSIENT = re.compile(r"Socket timed out|Zero Bytes were transmitted|Connection reset|Unable to contact slurm")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


class SlurmSetupError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def ensure_slurm_installed(timeout_s: float = 900) -> str:
    """Install Debian's Slurm and munge when missing; returns what it did ("present" or "installed in N s")."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return "present"
    if os.geteuid() != 0 or _which("apt-get") is None:
        raise SlurmSetupError(
            f"{', '.join(missing)} not installed and this is not a root Debian/Ubuntu shell: run "
            f"`apt-get install --no-install-recommends {' '.join(PACKAGES)}` as root"
        )
    t0 = time.time()
    # There is no init system: forbid the packages' maintainer scripts from starting their services.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                raise SlurmSetupError(
                    f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
                )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = [b for b in BINARIES if _which(b) is None]
    if still:
        raise SlurmSetupError(f"after installing {' '.join(PACKAGES)}: still missing {still}")
    return f"installed in {time.time() - t0:.0f} s"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class FakeSlurmCluster:
    """`nodes` fake nodes of `gpus_per_node` fake GPUs and `cpus_per_node` claimed CPUs, in one partition."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        nodes: int = 2,
        gpus_per_node: int = 8,
        cpus_per_node: int = 4,
        node_prefix: str = "lnode",
        partition: str = "luffy",
    ):
        self.root = Path(root)
        self.nodes = [f"{node_prefix}{i}" for i in range(1, nodes + 1)]
        self.ips = [f"127.0.1.{i}" for i in range(1, nodes + 1)]
        self.gpus_per_node, self.cpus_per_node, self.partition = gpus_per_node, cpus_per_node, partition
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hosts_lines_added: list[str] = []
        self.started_s: float | None = None

    # ---------------------------------------------------------------------------------------------- use

    @property
    def env(self) -> dict[str, str]:
        """Environment for the Slurm clients (and the jobs they submit) of this cluster."""
        env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[k]  # nothing of an enclosing job leaks in
        return env

    def run(
        self, *cmd: str, timeout: float = 60, check: bool = True, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise self._failed(proc)
        return proc

    def _failed(self, proc: subprocess.CompletedProcess) -> SlurmSetupError:
        return SlurmSetupError(
            f"`{' '.join(proc.args)}` failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{self.log_tail()}"
        )

    def job(self, job_id: str, tries: int = 3) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...). The query is retried (up to
        `tries` times, 2 s apart) when the client dies of a signal or its round trip times out: on two busy cores a
        job's ranks can keep munged and slurmctld waiting, and slurmctld then drops the client's connection (the
        client dies of SIGPIPE). Any other failure, or the last try's, raises."""
        for attempt in range(1, tries + 1):
            proc = self.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=90)  # MessageTimeout + 30
            if proc.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
            if attempt == tries or not (proc.returncode < 0 or TRANSIENT.search(proc.stderr)):
                raise self._failed(proc)
            time.sleep(2)
        raise ValueError(f"tries must be >= 1, not {tries}")

    def wait_for_state(self, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict[str, str]:
        deadline = time.time() + timeout_s
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} within {timeout_s}s: {info}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ---------------------------------------------------------------------------------------------- start

    def start(self, timeout_s: float = 60) -> "FakeSlurmCluster":
        t0 = time.time()
        for d in ("etc", "state", "log", "fakedev", "munge-private", "munge", *[f"spool/{n}" for n in self.nodes]):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_config()
            self._add_hosts()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
            self._wait(
                lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout_s, "slurmctld to answer"
            )
            for node in self.nodes:
                # own UTS namespace: `hostname` in this node's jobs is its name (exec keeps the pid)
                self._spawn(
                    f"slurmd-{node}",
                    [
                        "unshare",
                        "--uts",
                        "--",
                        "sh",
                        "-c",
                        f'hostname {node} && exec slurmd -D -N {node} -f "{self.conf}"',
                    ],
                )
            self._wait(self._all_idle, timeout_s, "every node to be idle")
        except BaseException:
            self.stop()
            raise
        self.started_s = time.time() - t0
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout.log", "w")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmSetupError(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n{self.log_tail()}"
                    )
            if ok():
                return
            time.sleep(0.3)
        raise SlurmSetupError(f"timed out after {timeout_s}s waiting for {what}\n{self.log_tail()}")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _start_munge(self) -> None:
        # munged wants its socket dir traversable by all and its key private
        (self.root / "munge").chmod(0o755)
        private = self.root / "munge-private"
        private.chmod(0o700)
        key = private / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={private}/munged.pid",
                f"--log-file={private}/munged.log",
                f"--seed-file={private}/munged.seed",
            ],
        )

        def munge_ok() -> bool:
            enc = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10)
            dec = subprocess.run(
                ["unmunge", "-S", str(self.munge_socket)], input=enc.stdout, capture_output=True, timeout=10
            )
            return enc.returncode == 0 and dec.returncode == 0

        self._wait(munge_ok, 30, "munged to answer")

    def _write_config(self) -> None:
        ctld_port, *slurmd_ports = _free_ports(1 + len(self.nodes))
        mem_mb = max(1024, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2**20 // len(self.nodes) - 512)
        gres = f"Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr={ip} Port={port} CPUs={self.cpus_per_node} "
            f"RealMemory={mem_mb} {gres} State=UNKNOWN"
            for n, ip, port in zip(self.nodes, self.ips, slurmd_ports)
        )
        host = socket.gethostname().split(".")[0]
        r = self.root
        self.conf.write_text(f"""\
ClusterName=luffyci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/state/slurmctld.pid
SlurmdPidFile={r}/spool/%n/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no delegated cgroup tree here: no cgroup plugins at all
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# trust the config, not the hardware: claim CPUs and GPUs this machine does not have
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
# round trips wait up to 60 s (default 10): a job's ranks can keep munged and slurmctld off the 2 cores that long
MessageTimeout=60
JobRequeue=1
{"GresTypes=gpu" if self.gpus_per_node else ""}
{nodes}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        devices = ""
        if self.gpus_per_node:
            # Slurm 22.05 drops file-less GPUs and rejects regular files: fake character devices (no driver behind)
            for g in range(self.gpus_per_node):
                dev = r / "fakedev" / f"nvidia{g}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(195, g))
            devices = f"Name=gpu File={r}/fakedev/nvidia[0-{self.gpus_per_node - 1}]\n"
        (self.conf.parent / "gres.conf").write_text(devices)

    def _add_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        present = hosts.read_text().splitlines()
        wanted = [f"{ip} {n}" for ip, n in zip(self.ips, self.nodes)]
        new = [line for line in wanted if line not in present]
        if new:
            with hosts.open("a") as fh:
                fh.write("".join(line + "\n" for line in new))
            self.hosts_lines_added = new

    # ---------------------------------------------------------------------------------------------- stop

    def stop(self, grace_s: float = 20) -> None:
        """Cancel this cluster's jobs and wait for them, then stop exactly the daemons started here."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--partition", self.partition, check=False, timeout=20)
                deadline = time.time() + 60
                while time.time() < deadline and self.run("squeue", "-h", check=False, timeout=20).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        order = [f"slurmd-{n}" for n in reversed(self.nodes)] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        if self.hosts_lines_added:
            hosts = Path("/etc/hosts")
            lines = hosts.read_text().splitlines()
            for added in self.hosts_lines_added:
                if added in lines:
                    lines.remove(added)
            hosts.write_text("".join(line + "\n" for line in lines))
            self.hosts_lines_added = []


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of live processes whose environment has key=value (how a test finds what its jobs left running)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            found.append(int(entry.name))
    return found
