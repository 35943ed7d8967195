"""A quick look at a GGUF file's header: scalar metadata and the tensor table.

`list` and `show` need a model's architecture, parameter count, quant type, context
length and chat template. gguf's GGUFReader parses every vocabulary string into numpy
objects (seconds for a 150k vocabulary); this reader walks the header with ``struct``,
skipping array contents, and reads a few hundred kilobytes. Loading a model still goes
through gguf_file.py.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from math import prod

MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (strings and arrays handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# llama.cpp's general.file_type -> the quant name a file is known by
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}


class GGUFHeaderError(ValueError):
    """Not a GGUF file, or one whose header ends early."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type{self.type_id}", 1, 0))[0]

    @property
    def n_elements(self) -> int:
        return prod(self.shape) if self.shape else 1

    @property
    def n_bytes(self) -> int:
        _, block, size = GGML_TYPES.get(self.type_id, ("", 1, 0))
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    version: int
    metadata: dict = field(default_factory=dict)  # scalars and strings; arrays as their length
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quant(self) -> str:
        """The file's quant: its general.file_type, else the type holding most bytes."""
        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        by_bytes: dict[str, int] = {}
        for t in self.tensors:
            by_bytes[t.type_name] = by_bytes.get(t.type_name, 0) + t.n_bytes
        return max(by_bytes, key=by_bytes.get) if by_bytes else "unknown"

    @property
    def context_length(self) -> int | None:
        arch = self.architecture
        value = self.metadata.get(f"{arch}.context_length") if arch else None
        return int(value) if isinstance(value, int) else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, f, endian: str):
        self.f = f
        self.e = endian

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFHeaderError("the header ends early")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(self.e + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.f.seek(self.unpack("Q"), os.SEEK_CUR)

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[item]) * count, os.SEEK_CUR)
            elif item == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(item)
            return count
        raise GGUFHeaderError(f"unknown metadata value type {vtype}")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file (metadata without array contents, and the tensor table)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFHeaderError(f"{path}: not a GGUF file")
            raw_version = f.read(4)
            endian = "<"
            version = struct.unpack("<I", raw_version)[0] if len(raw_version) == 4 else 0
            if version > 0xFFFF:  # a big-endian file
                endian, version = ">", struct.unpack(">I", raw_version)[0]
            r = _Reader(f, endian)
            n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
            header = GGUFHeader(version)
            for _ in range(n_kv):
                k = r.string()
                header.metadata[k] = r.value(r.unpack("I"))
            for _ in range(n_tensors):
                name = r.string()
                dims = tuple(r.unpack("Q") for _ in range(r.unpack("I")))
                type_id = r.unpack("I")
                r.unpack("Q")  # offset
                header.tensors.append(TensorInfo(name, tuple(reversed(dims)), type_id))
            return header
    except GGUFHeaderError as e:
        raise GGUFHeaderError(f"{path}: {e}") from None
    except (OSError, struct.error, UnicodeDecodeError) as e:
        raise GGUFHeaderError(f"{path}: cannot read the GGUF header: {e}") from None
