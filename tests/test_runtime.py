"""keep_freed_memory: freed blocks stay in the process instead of going back to the kernel; forked_map: the
results of one-thread forked workers."""

import subprocess
import sys
from pathlib import Path

import pytest

from mechvit import keep_freed_memory

PROBE = """
import torch, mechvit
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
base = rss_mib()
x = torch.ones(50_000_000); del x           # 200 MB, freed
returned = rss_mib() - base
assert mechvit.keep_freed_memory()
y = torch.ones(50_000_000); del y
kept = rss_mib() - base
print(returned, kept)
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or sys.platform != "linux", reason="needs Linux glibc"
)
def test_freed_memory_is_kept_only_after_the_call():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    returned, kept = map(float, out.split())
    assert returned < 50, out  # glibc's default: a 200 MB block goes back to the kernel when freed
    assert kept > 150, out  # after keep_freed_memory it stays, ready for the next call


def test_bad_block_size_is_refused():
    with pytest.raises(ValueError, match=r"max_block_bytes must be in \(0, 2\*\*31\), got 0"):
        keep_freed_memory(0)


def test_progress_bars_silences_every_tqdm_bar_inside_the_block_only():
    import io

    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    from mechvit.runtime import progress_bars

    def shown(cls) -> str:
        buf = io.StringIO()
        for _ in cls(range(3), file=buf, mininterval=0):
            pass
        return buf.getvalue()

    assert "3/3" in shown(tqdm)
    with progress_bars(False):
        assert shown(tqdm) == "" and shown(auto_tqdm) == ""
    with progress_bars(True):
        assert "3/3" in shown(tqdm)
    assert "3/3" in shown(tqdm)  # restored after the block
    with pytest.raises(KeyError), progress_bars(False):
        raise KeyError("x")
    assert "3/3" in shown(tqdm)  # restored after an error too


def test_forked_map_runs_a_closure_in_one_thread_processes_and_raises_their_errors():
    import os

    import torch

    from mechvit.runtime import forked_map

    table = {i: torch.full((3,), float(i)) for i in range(5)}  # inherited by fork, never pickled
    parent, threads = os.getpid(), torch.get_num_threads()

    def work(i):
        return float(table[i].sum()), os.getpid(), torch.get_num_threads()

    # tensors come back whole (multiprocessing's pickler would pass them through shared memory, served by the
    # worker, which exits after its item: a hang)
    tensors = dict(forked_map(lambda i: {"t": table[i] * 2, "big": torch.ones(100_000) * i}, range(5), 2))
    assert all(
        torch.equal(v["t"], 2 * table[i]) and float(v["big"].sum()) == 1e5 * i for i, v in tensors.items()
    )
    out = dict(forked_map(work, range(5), 2))
    assert sorted(out) == list(range(5)) and torch.get_num_threads() == threads
    assert all(v[0] == 3.0 * i and v[1] != parent and v[2] == 1 for i, v in out.items())
    assert len({v[1] for v in out.values()}) == 5  # a fresh process per item

    def broken(i):
        if i == 3:
            raise KeyError("item 3 is missing")
        return i

    with pytest.raises(KeyError, match="item 3 is missing") as err:
        list(forked_map(broken, range(5), 2))
    assert "item 3 is missing" in str(err.value.__cause__) and "in broken" in str(err.value.__cause__)

    def dies(i):
        if i == 1:
            os._exit(3)  # no result, no exception: the parent must not wait for ever
        return i

    with pytest.raises(RuntimeError, match=r"the worker for 1 died without a result \(exit code 3\)"):
        list(forked_map(dies, range(4), 2))
    nested = forked_map(work, range(2), 1)
    next(nested)
    with pytest.raises(RuntimeError, match="forked_map does not nest"):
        next(forked_map(work, range(2), 1))
    nested.close()
    assert dict(forked_map(work, [1], 1))[1][0] == 3.0  # usable again once the first one is closed
