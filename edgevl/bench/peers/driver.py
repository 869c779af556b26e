"""What every peer shares: where it is set up, whether it is, running its tools, caching conversions.

A peer lives under ~/.cache/edgevl/peers/<folder>/ ($EDGEVL_CACHE replaces ~/.cache/edgevl),
put there by `make bench-peers` (benchmarks/setup_peers.sh): its own virtual environment, its
tools, and `ready.json`, written last, naming the paths and versions. edgevl never imports a
peer's packages: it runs the peer's tools, or a small driver script with the peer's Python, as
subprocesses and reads what they print. Converted models are cached beside the tools, one
folder per source model (keyed by its config, tokenizer and weight files), each file written
to a temporary name and renamed, so an interrupted conversion is never mistaken for a done one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgevl.cache import cache_root
from edgevl.errors import EdgevlError

SETUP_COMMAND = "make bench-peers"


def peers_root() -> Path:
    return cache_root() / "peers"


@dataclass
class PeerSetup:
    """A set-up peer: its folder and its ready.json (paths, versions)."""

    name: str
    root: Path
    info: dict

    def path(self, key: str) -> Path:
        return Path(self.info["paths"][key])

    @property
    def versions(self) -> dict:
        return dict(self.info.get("versions") or {})


def load_setup(name: str, folder: str, required: tuple[str, ...]) -> PeerSetup:
    """The peer's PeerSetup, or one sentence naming `make bench-peers` when it is not (fully) set up."""
    root = peers_root() / folder
    ready = root / "ready.json"
    hint = f"run `{SETUP_COMMAND}` once (it sets up llama.cpp and OpenVINO under {peers_root()})"
    if not ready.is_file():
        raise EdgevlError(f"--reference {name} needs the {name} peer, which is not set up on this machine: {hint}.")
    try:
        info = json.loads(ready.read_text())
        missing = [key for key in required if not Path(info["paths"][key]).exists()]
    except (ValueError, KeyError, TypeError):
        raise EdgevlError(f"the {name} peer's {ready} is unreadable: {hint} again.") from None
    if missing:
        raise EdgevlError(f"the {name} peer is incomplete ({', '.join(missing)} missing): {hint} again.")
    return PeerSetup(name, root, info)


@dataclass
class ToolRun:
    """One finished subprocess: exit status, output, wall time and its peak RSS (0: not measurable here)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    max_rss_bytes: int


def _hwm_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except (OSError, ValueError):
        return 0


def run_tool(cmd: list[str], timeout: float | None = None, env: dict | None = None,
             poll_s: float = 0.02) -> ToolRun:
    """Run `cmd` to completion (stdin closed, output to temporary files). Its peak RSS is its VmHWM, read
    every `poll_s` while it runs: wait4's ru_maxrss would not do, Linux carries the parent's high-water mark
    (this process, models loaded) into a forked child across exec."""
    import tempfile
    import threading
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env={**os.environ, **(env or {})})
        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], _hwm_bytes(proc.pid))
                done.wait(poll_s)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise EdgevlError(f"{Path(str(cmd[0])).name} ran past {timeout:.0f} s and was stopped.") from None
        finally:
            done.set()
            watcher.join()
        out.seek(0)
        err.seek(0)
        return ToolRun(proc.returncode, out.read(), err.read(), time.perf_counter() - t0, peak[0])


def check(run: ToolRun, what: str) -> ToolRun:
    """`run` if it succeeded, else one sentence with the last line it printed on stderr."""
    if run.returncode != 0:
        last = next((line.strip() for line in reversed(run.stderr.splitlines()) if line.strip()), "no output")
        raise EdgevlError(f"{what} failed (exit status {run.returncode}): {last[:300]}")
    return run


def source_key(source: Path) -> str:
    """A folder name for the conversions of one source model: its name and a hash of its config,
    tokenizer and weight files (names, sizes, modification times)."""
    h = hashlib.sha256()
    for f in sorted(Path(source).iterdir()):
        if f.name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "-".join([*Path(source).resolve().parts[-2:], h.hexdigest()[:12]])


def build_file(path: Path, build: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """`path`, made once by `build(tmp)` writing a temporary sibling that is renamed when complete."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    log(f"building {path} (once)")
    try:
        build(tmp)
        tmp.rename(path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()
    return path


def files_bytes(paths) -> int:
    """Bytes of the given files and of every file under the given folders."""
    total = 0
    for p in map(Path, paths):
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total
