"""The native merge kernel (``kernel.c``): built on first use with the system C compiler, cached per user,
called through ctypes.

Why: a merge is memory-bound, and the torch path pays ~1.5 s to import torch plus several passes over each
chunk (convert, multiply, add, round). The kernel converts, merges and rounds each element in one pass, and
ctypes releases the GIL during the call, so the reader and writer threads of the HF merge keep running.

The library goes to ``$XDG_CACHE_HOME/c2f_megatron`` (default ``~/.cache/c2f_megatron``) under a name
keyed by a hash of the source, the compiler's path and the flags; it is compiled to a temporary name and renamed,
so concurrent processes never load a half-written file. ``C2F_MERGE_NATIVE=0`` selects the torch path;
without a working compiler the merge says so in one line and uses torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from c2f_megatron.merge.recipe import MergeRecipe

SOURCE = Path(__file__).with_name("kernel.c")
ENV_SWITCH = "C2F_MERGE_NATIVE"
# -ffp-contract=off: every product and sum rounds to fp32 on its own, as torch's separate mul and add
# kernels do (a fused multiply-add would round once and give other bits). No -ffast-math for the same reason.
CFLAGS = ("-O3", "-ffp-contract=off", "-std=gnu11", "-fPIC", "-shared")
ABI_VERSION = 1
# safetensors dtype names -> the kernel's dtype codes.
DTYPE_CODES = {"F32": 0, "BF16": 1, "F16": 2}
KIND_CODES = {"weighted": 0, "task": 1}

_loaded: dict[str, ctypes.CDLL] = {}
_notified: set[str] = set()


class NativeUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (the message says why, in one line)."""


def enabled() -> bool:
    """False when ``C2F_MERGE_NATIVE`` is 0/false/no/off: the torch path is forced."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "c2f_megatron"


def find_compiler() -> list[str] | None:
    """``$CC`` (may carry arguments, e.g. ``ccache gcc``), else the first of cc, gcc, clang on PATH."""
    env = os.environ.get("CC", "").strip()
    if env:
        import shlex

        cmd = shlex.split(env)
        return cmd if shutil.which(cmd[0]) else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def library_path(compiler: Sequence[str]) -> Path:
    """Where the library built by ``compiler`` from the current source lives (the name hashes both)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    for part in (*compiler, *CFLAGS, platform.machine(), sys.platform):
        key.update(b"\0" + part.encode())
    return cache_dir() / f"merge_kernel-{key.hexdigest()[:16]}.so"


def build(compiler: Sequence[str], target: Path) -> None:
    """Compile ``kernel.c`` to ``target`` through a temporary file in the same directory (atomic rename)."""
    import subprocess  # here, not at the top: only a first use compiles (and these imports cost ~7 ms)
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [*compiler, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
            raise NativeUnavailable(f"{' '.join(compiler)} failed on {SOURCE}: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.c2f_abi_version() != ABI_VERSION:
        raise NativeUnavailable(f"{path}: ABI version {lib.c2f_abi_version()}, expected {ABI_VERSION}")
    lib.c2f_merge.restype = ctypes.c_int
    lib.c2f_merge.argtypes = [
        ctypes.c_int,  # kind
        ctypes.c_int,  # number of inputs
        ctypes.c_int,  # input dtype
        ctypes.POINTER(ctypes.c_void_p),  # inputs
        ctypes.c_int64,  # elements
        ctypes.c_int,  # number of recipes
        ctypes.POINTER(ctypes.c_float),  # weights, one row per recipe
        ctypes.c_int,  # output dtype
        ctypes.POINTER(ctypes.c_void_p),  # outputs
    ]
    return lib


def load_library() -> ctypes.CDLL:
    """The kernel library, built into the cache on first use; raises NativeUnavailable with the reason."""
    compiler = find_compiler()
    if compiler is None:
        cc = os.environ.get("CC")
        raise NativeUnavailable(f"C compiler {cc!r} (from $CC) not found" if cc else "no C compiler found")
    path = library_path(compiler)
    lib = _loaded.get(str(path))
    if lib is not None:
        return lib
    try:
        if not path.is_file():
            print(f"c2f merge: compiling the native merge kernel into {path} (once)", file=sys.stderr)
            build(compiler, path)
        try:
            lib = _open(path)
        except OSError:  # a damaged cache entry (disk full, killed copy): rebuild once
            build(compiler, path)
            lib = _open(path)
    except OSError as exc:
        raise NativeUnavailable(f"cannot build or load {path}: {exc}") from exc
    _loaded[str(path)] = lib
    return lib


def notify_once(reason: str) -> None:
    """One line on stderr per reason and process: the merge falls back to torch (slower), it does not fail."""
    if reason not in _notified:
        _notified.add(reason)
        print(f"c2f merge: native kernel unavailable ({reason}); using the torch path", file=sys.stderr)


class NativeMerger:
    """Evaluates recipes over raw little-endian buffers with the kernel; ``supports`` says which dtypes."""

    def __init__(self, recipes: Sequence[MergeRecipe], lib: ctypes.CDLL | None = None) -> None:
        kinds = {r.kind for r in recipes}
        n_inputs = {r.num_inputs for r in recipes}
        if not recipes or len(kinds) != 1 or len(n_inputs) != 1:
            raise ValueError("the recipes of one merge must share kind and inputs")
        self.lib = lib if lib is not None else load_library()
        self.kind = kinds.pop()
        self.num_inputs = n_inputs.pop()
        self.num_outputs = len(recipes)
        flat = [w for r in recipes for w in r.weights]
        # ctypes.c_float converts each python float as torch converts a scalar for an fp32 tensor op:
        # static_cast<float>, round to nearest even.
        self._weights = (ctypes.c_float * len(flat))(*flat)
        self._max_inputs = int(self.lib.c2f_max_inputs())

    def supports(self, in_dtype: str, out_dtype: str) -> bool:
        """Whether the kernel evaluates inputs of ``in_dtype`` into outputs of ``out_dtype`` (safetensors names)."""
        return in_dtype in DTYPE_CODES and out_dtype in DTYPE_CODES and self.num_inputs <= self._max_inputs

    def merge(
        self, inputs: Sequence[int], in_dtype: str, outputs: Sequence[int], out_dtype: str, n: int
    ) -> None:
        """``outputs[k][:n] = recipes[k](inputs[:][:n])``; inputs and outputs are addresses of buffers that
        hold at least ``n`` elements of their dtype (the caller owns and sizes them; outputs must not overlap
        inputs)."""
        self.merge_arrays(pointer_array(inputs), in_dtype, pointer_array(outputs), out_dtype, n)

    def merge_arrays(
        self, inputs: ctypes.Array, in_dtype: str, outputs: ctypes.Array, out_dtype: str, n: int
    ) -> None:
        """``merge`` with the addresses already in ctypes arrays (``pointer_array``), which a caller that
        reuses its buffers builds once instead of per chunk."""
        if len(inputs) != self.num_inputs or len(outputs) != self.num_outputs:
            raise ValueError(
                f"expected {self.num_inputs} inputs and {self.num_outputs} outputs, "
                f"got {len(inputs)} and {len(outputs)}"
            )
        if not self.supports(in_dtype, out_dtype):
            raise ValueError(f"native kernel does not merge {in_dtype} into {out_dtype}")
        rc = self.lib.c2f_merge(
            KIND_CODES[self.kind],
            self.num_inputs,
            DTYPE_CODES[in_dtype],
            inputs,
            n,
            self.num_outputs,
            self._weights,
            DTYPE_CODES[out_dtype],
            outputs,
        )
        if rc != 0:
            raise RuntimeError(f"native merge kernel refused its arguments (status {rc})")


def pointer_array(addresses: Sequence[int]) -> ctypes.Array:
    """The ``void *[]`` the kernel takes for its inputs or outputs."""
    return (ctypes.c_void_p * len(addresses))(*addresses)
