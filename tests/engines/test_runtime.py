# Copyright (c) monai_cf contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from monai_cf.engines.runtime import ALLOCATOR_ENV, tune_cpu_allocator

_CHECK = """
import resource, sys, torch
from monai_cf.engines.runtime import tune_cpu_allocator
applied = tune_cpu_allocator()
def step():  # a training step's activations: alive together, freed together at its end
    activations = [torch.empty(((3 << 20) + 4096 * i) // 4).fill_(1.0) for i in range(20)]
    del activations
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _pages_per_step() -> int:
    return sum((3 << 20) + 4096 * i for i in range(20)) // 4096


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_allocator_reuses_freed_activations():
    env = {ALLOCATOR_ENV: "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    assert applied == "True"
    # five steps would fault in about 5 * 15,400 pages if freed activations went back to the kernel (glibc's
    # defaults do so in some runs and not in others, depending on where the heap lands); the tuned heap keeps them
    assert int(faults) < _pages_per_step() // 4


def test_switch_off_by_environment_and_off_cpu(monkeypatch):
    from monai_cf.engines.runtime import _apply_allocator_settings

    monkeypatch.setenv(ALLOCATOR_ENV, "0")
    assert _apply_allocator_settings.__wrapped__() is False
    assert tune_cpu_allocator("meta") is False
