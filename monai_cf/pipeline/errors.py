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
"""The last line of a failed bundle run names the culprit.

MONAI wraps every exception raised while it instantiates a component or evaluates an expression in a generic
``RuntimeError: Failed to instantiate component ...``, so the message that names the bad key, file, row or value
sits higher in the traceback. Under ``python -m monai.bundle`` the hook installed here prints the traceback as
usual and then repeats the original error as the last line.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

__all__ = ["root_cause", "install_bundle_excepthook", "running_monai_bundle"]


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (``__cause__``, else ``__context__``, unless ``raise ... from None``
    suppressed it: an error that re-raises with the key it concerns is the culprit).

    Example::

        try:
            run_bundle()
        except RuntimeError as error:
            print(root_cause(error))  # "data.test_csv: no file '...'"
    """
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def running_monai_bundle() -> bool:
    """Whether this process is ``python -m monai.bundle``."""
    main = os.path.normpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return main.endswith(os.path.join("monai", "bundle", "__main__.py"))


def _bundle_excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    traceback.print_exception(kind, error, tb)
    cause = root_cause(error)
    if cause is not error and not isinstance(cause, KeyboardInterrupt):
        sys.stderr.write(f"\n{type(cause).__name__}: {cause}\n")
        sys.stderr.flush()


def install_bundle_excepthook() -> bool:
    """Repeat the root cause of an uncaught wrapped exception as the last line (idempotent).

    Returns:
        Whether the hook is installed now.
    """
    if sys.excepthook is not _bundle_excepthook:
        if sys.excepthook is not sys.__excepthook__:
            return False  # someone else's hook (an IDE, a debugger): leave it alone
        sys.excepthook = _bundle_excepthook
    return True
