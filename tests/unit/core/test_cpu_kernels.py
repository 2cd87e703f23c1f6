"""Importing keye pins torch's x86-64 CPU kernels to one instruction set (keye.determinism.pin_cpu_kernels): the same
commit, config and seed trained another SFT checkpoint on an AVX-512/AMX Xeon than on AMD Zen 4 machines.
KEYE_CPU_KERNELS=native gives torch its own choice back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 kernels only")

PROBE = """
import hashlib, os, sys
{first}
import torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(96, 384), torch.nn.GELU(), torch.nn.Linear(384, 331))
opt = torch.optim.AdamW(m.parameters(), 1e-3)
x, y = torch.randn(777, 96), torch.randint(0, 331, (777,))
for _ in range(5):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
q = torch.randn(1, 4, 301, 32)
o = torch.nn.functional.scaled_dot_product_attention(q, q.flip(2), q, is_causal=True)
data = b"".join(p.detach().numpy().tobytes() for p in m.parameters()) + o.numpy().tobytes()
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(data).hexdigest())
"""


def _probe(first: str, env: dict[str, str]) -> tuple[str, str]:
    cap, digest = _run_probe(first, env).stdout.splitlines()[-1].split()
    return cap, digest


def _run_probe(first: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run(PROBE.format(first=first), env)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose environment holds none of the pins but those in `env`."""
    from keye.determinism import CPU_KERNEL_ENV

    clean = {k: v for k, v in os.environ.items() if k not in CPU_KERNEL_ENV}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


# MKL picks each GEMM's thread count at run time unless told not to (MKL_DYNAMIC; Intel's reproducibility conditions
# ask for a fixed count). Two processes of one CI run with the same pin once trained different bytes (2026-12-06),
# the only such miss in ~100 runs here; the probes that compare bytes fix the count so that they test the pin alone.
# The pipeline keeps MKL's choice: fixing it changes the default run's bytes and costs ~40% of an SFT step
# (docs/TRAINING.md, "Reproducibility").
FIXED_MKL_THREADS = {"MKL_DYNAMIC": "FALSE", "MKL_NUM_THREADS": "1"}


@x86
def test_importing_keye_pins_the_kernels_even_after_torch_is_imported():
    from keye.determinism import CPU_KERNEL_ENV

    cap, pinned = _probe("import torch, keye", FIXED_MKL_THREADS)
    assert cap == CPU_KERNEL_ENV["ATEN_CPU_CAPABILITY"].upper()
    # the same bytes as a process given the pin in its environment by hand
    assert _probe("", {**CPU_KERNEL_ENV, **FIXED_MKL_THREADS}) == (cap, pinned)


@x86
def test_every_mkl_call_runs_the_pinned_branch():
    """MKL_VERBOSE names each call's code branch (CNR:<branch>): all on AVX2 after `import keye`, with MKL's own
    thread choice, as the pipeline runs; a process without the pin reports none."""
    import re

    from keye.determinism import CPU_KERNEL_ENV

    def branches(first: str, env: dict[str, str]) -> set[str]:
        return set(re.findall(r"CNR:(\w+)", _run_probe(first, {**env, "MKL_VERBOSE": "1"}).stdout))

    assert branches("import torch, keye", {}) == {CPU_KERNEL_ENV["MKL_CBWR"]}
    assert branches("", {}) <= {"OFF"}


@x86
def test_native_gives_torch_its_own_choice_back():
    """torch's own capability, and none of the three pins in the process's environment. Not the trained bytes: two
    native processes trained different bytes in one CI run (2026-12-06); torch's own kernels promise no bitwise
    reproducibility across processes (MKL without MKL_CBWR may vary with memory alignment), the pinned ones did."""
    from keye.determinism import CPU_KERNEL_ENV

    code = (
        "import os\nimport keye\nimport torch\n"
        f"print(torch.backends.cpu.get_cpu_capability(), sum(k in os.environ for k in {sorted(CPU_KERNEL_ENV)!r}))\n"
    )
    cap, pinned = _run(code, {"KEYE_CPU_KERNELS": "native"}).stdout.split()
    assert (cap, pinned) == (_probe("", {})[0], "0")


@x86
def test_an_operators_choice_wins():
    cap, _ = _probe("import keye", {"ATEN_CPU_CAPABILITY": "default"})
    assert cap == "DEFAULT"


@x86
def test_a_torch_op_before_keye_is_warned_about():
    code = (
        "import os, warnings\n"
        "import torch\n"
        "torch.ones(3).exp()\n"  # torch picks its kernels now, before the pin
        "from keye.determinism import check_cpu_kernels, pin_cpu_kernels\n"
        "pin_cpu_kernels()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    check_cpu_kernels()\n"
        "print(torch.backends.cpu.get_cpu_capability(), len(w))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "KEYE_CPU_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cap, warned = out.stdout.split()
    if cap == "AVX2":  # an AVX2-only machine: native already is the pinned set
        pytest.skip("this CPU's native kernels are the pinned ones")
    assert warned == "1"


def test_a_bad_choice_fails_at_import_and_names_the_variable():
    out = subprocess.run(
        [sys.executable, "-c", "import keye"], env={**os.environ, "KEYE_CPU_KERNELS": "avx9"}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode != 0 and "KEYE_CPU_KERNELS='avx9'" in out.stderr and "native" in out.stderr
