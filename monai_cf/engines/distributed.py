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
"""Where this process stands in a ``torch.distributed`` run: its rank and whether the run has several processes.

Both ask ``torch.distributed`` directly rather than ``ignite.distributed``: ignite's first query wraps the process
group and counts the processes per node with a collective call, which would hang when only rank 0 asks (as in the
pipeline's rank-0 file writes).
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "process_rank"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process's rank in a running ``torch.distributed`` group, 0 outside one.

    ``torch.distributed`` rather than ``ignite.distributed``: ignite's first rank query creates a process group, a
    collective call that must not happen on one rank only.
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
