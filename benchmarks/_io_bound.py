"""Helper process for merge_speed.py: the I/O a file-to-file merge cannot avoid, timed on its own.

    python _io_bound.py OUT_FILE OUT_BYTES INPUT [INPUT ...]

Reads every input file once, front to back, into one reused buffer, then writes ``OUT_BYTES`` to ``OUT_FILE`` and
fsyncs it (the merge's output must be on disk before it is renamed into place), then removes it. Prints JSON.
"""

import json
import os
import sys
import time

CHUNK = 64 << 20


def main() -> None:
    out, nbytes, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    read = 0
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                read += n
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(out, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(view[: min(CHUNK, left)])
        write_s = time.perf_counter() - start
        os.fsync(f.fileno())
    fsync_s = time.perf_counter() - start - write_s
    os.unlink(out)
    print(json.dumps({"read_s": read_s, "bytes_read": read, "write_s": write_s, "fsync_s": fsync_s}))


if __name__ == "__main__":
    main()
