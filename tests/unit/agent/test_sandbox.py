"""The `python` tool's sandbox: an infinite loop, a 1 GB allocation, a fork bomb, a write outside the scratch
directory, a network call and an output flood are each stopped or refused with a message, and the parent (this
test process, standing for the trainer) goes on unharmed; ordinary cells work, and files stay in the scratch."""

from __future__ import annotations

import os
import time

import pytest

from keye.agent.sandbox import SandboxLimits, run_cell

LIMITS = SandboxLimits(time_s=3.0, memory_mb=512, output_bytes=4096)


def test_an_ordinary_cell_prints_and_echoes_its_last_value(tmp_path):
    r = run_cell("import numpy as np\nprint('sum', sum(range(5)))\nnp.arange(4).sum() * 2", tmp_path, LIMITS)
    assert r.ok and r.reason == "ok"
    assert r.output.splitlines() == ["sum 10", "np.int64(12)"]
    r = run_cell("open('notes.txt', 'w').write('kept')\nopen('notes.txt').read()", tmp_path, LIMITS)
    assert r.ok and (tmp_path / "notes.txt").read_text() == "kept"


def test_an_infinite_loop_is_stopped_at_the_time_limit():
    t0 = time.monotonic()
    r = run_cell("while True:\n    pass", limits=LIMITS)
    assert r.reason == "timeout" and not r.ok
    assert "ran past its 3 s limit and was stopped" in r.output
    assert time.monotonic() - t0 < LIMITS.time_s + 3


def test_a_1gb_allocation_fails_inside_the_cell():
    r = run_cell("x = bytearray(1 << 30)\nprint('allocated', len(x))", limits=LIMITS)
    assert not r.ok and "MemoryError" in r.output and "allocated" not in r.output


def test_a_fork_bomb_is_refused():
    r = run_cell("import os\nwhile True:\n    os.fork()", limits=LIMITS)
    assert not r.ok and "starting processes is not allowed (os.fork)" in r.output
    r = run_cell("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", limits=LIMITS)
    assert not r.ok and "starting processes is not allowed" in r.output


def test_writes_and_reads_outside_the_scratch_directory_are_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    scratch = tmp_path / "scratch"
    r = run_cell(f"open({str(outside)!r}, 'w').write('x')", scratch, LIMITS)
    assert not r.ok and "is not allowed: only the scratch directory" in r.output
    assert not outside.exists()
    r = run_cell("import os\nos.remove('/etc/hostname')", scratch, LIMITS)
    assert not r.ok and "outside the scratch directory" in r.output
    r = run_cell("open('../outside.txt', 'a').write('x')", scratch, LIMITS)
    assert not r.ok and not outside.exists()
    r = run_cell("print(open('/etc/passwd').read())", scratch, LIMITS)
    assert not r.ok and "reading '/etc/passwd' is not allowed" in r.output and "root:" not in r.output


def test_a_network_call_is_refused():
    r = run_cell("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)", limits=LIMITS)
    assert not r.ok and "network access is not allowed" in r.output
    assert r.isolation in ("netns", "audit-hook")


def test_an_output_flood_is_cut_off_and_the_loop_goes_on():
    r = run_cell("while True:\n    print('x' * 1000)", limits=LIMITS)
    assert r.reason == "output_limit" and "the cell was stopped" in r.output
    assert len(r.output) < LIMITS.output_bytes + 200
    assert run_cell("1 + 1", limits=LIMITS).output.strip() == "2"  # the next cell runs normally
    assert os.getpid() > 0  # the parent is alive and can go on


def test_no_process_of_a_stopped_cell_survives(tmp_path):
    marker = tmp_path / "alive"
    # a cell that would keep writing a file after its time is up, were anything of it left running
    code = "import time\nwhile True:\n    open('alive', 'w').write(str(time.time()))\n    time.sleep(0.05)"
    r = run_cell(code, tmp_path, SandboxLimits(time_s=1.0))
    assert r.reason == "timeout"
    before = marker.read_text()
    time.sleep(0.4)
    assert marker.read_text() == before


@pytest.mark.parametrize(
    "code", ["import ctypes\nctypes.CDLL(None).fork()", "import os\nos.system('echo hi')"]
)
def test_native_escapes_are_refused(code):
    r = run_cell(code, limits=LIMITS)
    assert not r.ok and "not allowed" in r.output and "hi\n" not in r.output
