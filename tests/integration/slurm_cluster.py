"""A real one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd with a generated config.

Debian's `slurm-wlm` and `munge` are installed with apt-get when absent (CI runs as root). Every daemon's
state, sockets, logs and pid files live in one temporary folder, so nothing of the host's own set-up is touched,
and `stop()` ends exactly the processes it started, by the PIDs in their pid files.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue")


def _missing() -> list[str]:
    return [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed() -> str | None:
    """None when SLURM is usable, else the reason it cannot be (for pytest.skip)."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and this machine has no apt-get to install slurm-wlm and munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"could not install SLURM ({' '.join(cmd)} failed): {proc.stderr[-500:]}"
    return None if not _missing() else f"SLURM still incomplete after install: {', '.join(_missing())} missing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """`with LocalSlurm(cpus=2) as cluster:` ... `cluster.run(["sbatch", ...])`.

    Its folder is a fresh /tmp directory (not pytest's tmp_path: the munge user must be able to reach it),
    removed again by `stop()`.
    """

    def __init__(self, cpus: int = 2):
        self.folder = Path(tempfile.mkdtemp(prefix="hiclip-slurm-"))
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.munge_dir = self.folder / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.pid_files = {"munged": self.munge_dir / "munged.pid", "slurmctld": self.folder / "slurmctld.pid",
                          "slurmd": self.folder / "slurmd.pid"}

    @property
    def env(self) -> dict:
        """Environment for client commands (sbatch, scontrol, ...)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.folder.chmod(0o755)  # munged refuses group/world-writable paths; slurmd reads the config
        self._start_munge()
        (self.folder / "state").mkdir(exist_ok=True)
        (self.folder / "spool").mkdir(exist_ok=True)
        self.conf.write_text(self._config())
        subprocess.run([_sbin("slurmctld"), "-f", str(self.conf)], env=self.env, check=True, timeout=60)
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, "slurmctld")
        subprocess.run([_sbin("slurmd"), "-f", str(self.conf)], env=self.env, check=True, timeout=60)
        self._wait(self.node_idle, "slurmd (node idle)")

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        for path in (self.munge_dir, key):
            shutil.chown(path, "munge", "munge")
        key.chmod(0o600)
        self.munge_dir.chmod(0o755)  # the socket folder must be readable by clients, writable only by munge
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.munge_socket}",
                        f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
                        f"--log-file={self.munge_dir / 'munged.log'}", f"--seed-file={self.munge_dir / 'munged.seed'}"],
                       check=True, timeout=60)
        self._wait(self.munge_socket.exists, "munged")

    def _config(self) -> str:
        f = self.folder
        return "\n".join([
            "ClusterName=localtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start (default 120 s + 1): the
            # slurmd refuses the job id until its revoked credential expired.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=1",  # a test cluster: schedule within a second
            "MinJobAge=600",
            "KillWait=10",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def node_idle(self) -> bool:
        out = self.run(["scontrol", "show", "node", self.host], check=False).stdout
        return "State=IDLE " in out or out.rstrip().endswith("State=IDLE")

    def logs(self, tail: int = 3000) -> str:
        """The daemons' log tails, for failure messages."""
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}\n"
                       for p in sorted(self.folder.rglob("*.log")) if p.is_file())

    def _wait(self, ready, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not come up within {timeout:.0f} s; logs:\n{self.logs(1500)}")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", job_id, "--oneliner"]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def stop(self) -> None:
        """End the daemons this cluster started, by their pid files' PIDs (never by name)."""
        for name in ("slurmd", "slurmctld", "munged"):
            path = self.pid_files[name]
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)
