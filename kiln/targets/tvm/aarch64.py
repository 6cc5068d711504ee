"""``tvm-aarch64``: the model cross-compiled for 64-bit ARM Linux (``aarch64-linux-gnu``, NEON).

The library is linked with Debian's cross toolchain (``gcc-aarch64-linux-gnu``, installed by
``tools/setup_dev.sh``) and checked to be an aarch64 ELF shared object. Verification needs to run the model, and
this x86 machine cannot run aarch64 code with TVM (a QEMU user-mode run would also need an aarch64 build of TVM's
runtime and Python, which no registry package here provides), so the same scheduled Relax module is also compiled
for the host (``model.host.so``): verification checks the import, lowering and schedules; the aarch64 code
generation itself is not executed here. :meth:`load` runs ``model.so`` on an aarch64 machine and the host twin
elsewhere.

Tuning (``trials > 0``) needs aarch64 hardware to measure on: give ``rpc_tracker``/``rpc_key`` of RPC servers
running on such boards; without them the target refuses before any work.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.targets.tvm import relax_build
from kiln.targets.tvm.runner import LIBRARY, TvmRunner
from kiln.targets.tvm.target import HOST_LIBRARY, TvmTarget

CROSS_CC = "aarch64-linux-gnu-gcc"
#: ELF ``e_machine`` of AArch64.
EM_AARCH64 = 183


def elf_machine(path: Path) -> int:
    """The ``e_machine`` field of an ELF file (KilnError if it is not ELF)."""
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise KilnError(f"{path}: not an ELF file")
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


class TvmAarch64Target(TvmTarget):
    name = "tvm-aarch64"
    summary = "Apache TVM (Relax) cross-compiled for aarch64 Linux (NEON): model.so + tvm.json (+ host twin)"
    mtriple = "aarch64-linux-gnu"
    mattr = ("+neon",)

    def check(self) -> None:
        super().check()
        if shutil.which(CROSS_CC) is None:
            raise KilnError(f"tvm-aarch64 needs the cross compiler {CROSS_CC} (apt-get install gcc-aarch64-linux-gnu)")
        if self.options.trials and not self.options.rpc_tracker:
            raise KilnError("tuning tvm-aarch64 measures on aarch64 hardware: give rpc_tracker and rpc_key")

    def cpu(self) -> str:
        return self.options.mcpu or "generic"

    def cores(self) -> int:
        return self.options.num_cores or 4

    def export_options(self) -> dict[str, Any]:
        from tvm.support import cc

        return {"fcompile": cc.cross_compiler(CROSS_CC)}

    def build_host_twin(self, scheduled: Any, out_dir: Path) -> None:
        machine = elf_machine(out_dir / LIBRARY)
        if machine != EM_AARCH64:
            raise KilnError(f"{out_dir / LIBRARY}: ELF machine {machine}, expected aarch64 ({EM_AARCH64})")
        host = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
        relax_build.compile_module(scheduled, host).export_library(str(out_dir / HOST_LIBRARY))

    def load(self, out_dir: Path) -> TvmRunner:
        library = LIBRARY if platform.machine() in ("aarch64", "arm64") else HOST_LIBRARY
        return TvmRunner.from_dir(out_dir, library)
