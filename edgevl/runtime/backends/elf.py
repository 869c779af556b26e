"""The shared libraries an ELF shared object names (DT_NEEDED) and its own name (DT_SONAME), read from its dynamic
section with the standard library only.

probe.py asks this of onnxruntime's provider libraries: what libonnxruntime_providers_tensorrt.so needs
(libnvinfer.so.10, libcudart.so.13, ...) says which TensorRT and CUDA build the installed onnxruntime-gpu was made
for, without loading it. No library that is installed here reads ELF headers (pyelftools is not a dependency), and
this needs ~60 lines: the program headers, the PT_DYNAMIC segment, and the string table it points at.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14


@dataclass(frozen=True)
class Dynamic:
    soname: str | None
    needed: tuple[str, ...]


def read_dynamic(path: str | Path) -> Dynamic:
    """DT_SONAME and DT_NEEDED of a 64-bit little-endian ELF file (x86_64, aarch64: every platform edgevl's GPU
    backends run on); ValueError for anything else or a file without a dynamic section."""
    with open(path, "rb") as f:                   # mapped: a 300 MB provider library is read a few pages deep
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _dynamic(data, path)
    except (struct.error, IndexError):
        raise ValueError(f"{path} is a truncated ELF file") from None
    finally:
        data.close()


def _dynamic(data, path) -> Dynamic:
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):                        # Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz
        kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if kind == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif kind == PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        raise ValueError(f"{path} has no dynamic section")
    tags = []
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):      # Elf64_Dyn: d_tag, d_val
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        tags.append((tag, value))
    strtab = next((_file_offset(loads, v) for t, v in tags if t == DT_STRTAB), None)
    if strtab is None:
        raise ValueError(f"{path} has no dynamic string table")

    def string(offset: int) -> str:
        end = data.find(b"\0", strtab + offset)
        return data[strtab + offset:end].decode(errors="replace")

    soname = next((string(v) for t, v in tags if t == DT_SONAME), None)
    return Dynamic(soname, tuple(string(v) for t, v in tags if t == DT_NEEDED))


def _file_offset(loads, address: int) -> int:
    """File offset of a virtual address (DT_STRTAB holds an address) through the PT_LOAD segments."""
    for vaddr, offset, filesz in loads:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    raise ValueError(f"address {address:#x} is in no loaded segment")
