"""recipes/host_memory.py: freed large blocks stay in the process, so the next step's tensors do not fault in."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Allocates and frees a 256 MiB tensor twice and prints the minor page faults of the second allocation+touch.
PROBE = """
import resource, torch
from recipes import host_memory
print("applied", host_memory.keep_freed_memory())
def step():  # four 40 MiB activations, each above glibc's largest mmap threshold (32 MiB), written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(10 * 2**20) for _ in range(4)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("faults", *[step() for _ in range(8)])
"""


def probe(env_extra: dict) -> tuple[str, list[int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    return lines["applied"][0], [int(f) for f in lines["faults"]]


PAGES = 4 * 10 * 2**20 * 4 // 4096  # one step's pages: 40,960


def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = probe({})
    assert applied == "True"
    assert faults[0] > PAGES // 2  # the first step faults its memory in
    assert sum(faults[-3:]) < PAGES // 20, faults  # later steps reuse it


def test_glibc_tuning_in_the_environment_is_left_alone():
    # What the memory benchmarks set so that freed tensors leave the resident set: then every step faults in.
    applied, faults = probe({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert applied == "False"
    assert min(faults[-3:]) > PAGES // 2, faults
