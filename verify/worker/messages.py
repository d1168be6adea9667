"""Messages between the harness and its backend workers.

A message is one JSON line followed by the arrays it names, each in numpy's
.npy format with its byte length in the header, so a worker can run under any
Python that has numpy (another virtual environment, another Keras release).
An array of a dtype numpy's .npy format cannot name (ml_dtypes's bfloat16, which
it stores as raw void) goes as its bits, uint16, with the dtype's name beside its
length: the same bits come back.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np

from reference.arithmetic import numpy_dtype


BITS = {"bfloat16": np.uint16}  # dtypes sent as their bits
# A run_error's reason for a class the installed Keras lacks is "unsupported: ...";
# matrix marks such a release's cell with the word alone.
UNSUPPORTED = "unsupported"


def write_message(stream, header: dict, arrays: dict | None = None) -> None:
    blobs, entries = [], []
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        bits = BITS.get(array.dtype.name)
        buf = io.BytesIO()
        np.save(buf, array if bits is None else array.view(bits), allow_pickle=False)
        blobs.append(buf.getvalue())
        entries.append([name, len(blobs[-1])] + ([] if bits is None else [array.dtype.name]))
    header = {**header, "arrays": entries}
    stream.write(json.dumps(header).encode() + b"\n")
    for b in blobs:
        stream.write(b)
    stream.flush()


class RunMessages:
    """One run's messages to the runner: run_start with its states before the first
    step, a chunk per block of steps with the digest of the gradients applied in it
    (verify/worker/gradients.py), run_end."""

    def __init__(self, stream, run_id):
        self.stream, self.run_id = stream, run_id

    def start(self, first: dict, iteration: int, **fields) -> None:
        """`first`: each state's value before the first step, by name."""
        write_message(self.stream, {"type": "run_start", "id": self.run_id,
                                    "states": list(first), **fields},
                      {**{name: value[None] for name, value in first.items()},
                       "iterations": np.array([iteration])})

    def chunk(self, start: int, gradients: str, states: dict, iterations) -> None:
        """Steps start, start + 1, ... (1-based): `states`, each state's rows by name."""
        write_message(self.stream, {"type": "chunk", "id": self.run_id, "start": start,
                                    "gradients": gradients},
                      {**states, "iterations": iterations})

    def end(self, **fields) -> None:
        write_message(self.stream, {"type": "run_end", "id": self.run_id, **fields})


def read_message(stream):
    """The next (header, arrays), or None at end of stream."""
    line = stream.readline()
    if not line:
        return None
    header = json.loads(line)
    arrays = {}
    for name, length, *dtype in header.pop("arrays"):
        data = stream.read(length)
        if len(data) != length:
            raise EOFError("worker stream ended inside an array")
        arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
        if dtype:
            arrays[name] = arrays[name].view(numpy_dtype(dtype[0]))
    return header, arrays


def peak_memory_mb() -> float:
    """This process's own peak resident memory, MiB.  Linux's VmHWM starts afresh
    at exec; ru_maxrss does not: after Python's subprocess (vfork + exec) it keeps
    the parent's peak, so a worker started by a large harness would report the
    harness's memory as its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here
