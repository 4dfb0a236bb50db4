"""The exec socket's multiplexed frames, read back into the load service's lines."""

from __future__ import annotations

import struct

from lab.orchestration.loaders import STDERR, STDOUT, FrameReader


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def chunked(data: bytes, size: int):  # type: ignore[no-untyped-def]
    chunks = [data[i : i + size] for i in range(0, len(data), size)]

    def recv(_n: int) -> bytes:
        return chunks.pop(0) if chunks else b""

    return recv


def test_lines_come_whole_across_frames_and_chunks_with_stderr_kept_apart() -> None:
    data = (
        frame(STDOUT, b'{"result": ')
        + frame(STDERR, b"a warning\n")
        + frame(STDOUT, b'{"requests": 5}}\n{"error": "late"}\n')
    )
    for size in (1, 3, 7, len(data)):  # however the socket splits it
        reader = FrameReader(chunked(data, size))
        assert reader.line() == b'{"result": {"requests": 5}}'
        assert reader.line() == b'{"error": "late"}'
        assert reader.line() is None  # the end of the stream
        assert reader.stderr == b"a warning\n"


def test_a_stream_cut_inside_a_frame_is_the_end() -> None:
    data = frame(STDOUT, b'{"result": 1}\n')[:-4]
    assert FrameReader(chunked(data, 5)).line() is None
