"""Reading a source as Ray tasks: the file is cut into chunks (line-aligned byte ranges of a JSONL
file, row groups of a Parquet file, slices of a ``txt_dir`` folder's sorted files) and every chunk is
parsed by :func:`sleep_pipeline.data.ingest.parse_unit`, the local reader's own code, with the line
numbers the local reader gives. Whether an id was used by an earlier line is checked afterwards, over
the whole source, by the caller. The workers read the files themselves: the source path must be
visible to them (a shared filesystem, or the same node).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from sleep_pipeline.config import QualityConfig, SourceConfig
from sleep_pipeline.data.ingest import SourceError, parse_unit
from sleep_pipeline.data.ray_dedup import _remote, write_table
from sleep_pipeline.progress import LogFn

STAGE_SCHEMA = pa.schema([
    ("record_id", pa.string()), ("source", pa.string()), ("tier", pa.int32()), ("line_no", pa.int64()),
    ("bucket", pa.string()), ("system", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
    ("meta", pa.string()), ("_excerpt", pa.string()),
])
_BLOCK = 1 << 20


def jsonl_chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges that cover the file, each ending just after a newline (or at its end)."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as fh:
        while bounds[-1] + chunk_bytes < size:
            fh.seek(bounds[-1] + chunk_bytes)
            fh.readline()  # to the end of the line this offset falls in
            if fh.tell() >= size:
                break
            bounds.append(fh.tell())
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


def count_newlines(path: str, start: int, end: int) -> int:
    n = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            block = fh.read(min(_BLOCK, left))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _units(src: SourceConfig, chunk: tuple, first_line: int) -> Iterator[tuple[int, str, Any]]:
    """The (line_no, kind, payload) units of one chunk, as ``ingest._raw_units`` yields them."""
    if src.format == "jsonl":
        start, end = chunk
        with open(src.path, "rb") as fh:
            fh.seek(start)
            pos, line_no = start, first_line
            while pos < end:
                line = fh.readline()
                if not line:
                    break
                pos += len(line)
                yield line_no, "bytes", line.rstrip(b"\r\n")
                line_no += 1
    elif src.format == "parquet":
        import pyarrow.parquet as pq

        first_group, last_group = chunk
        rows = pq.ParquetFile(src.path).read_row_groups(list(range(first_group, last_group))).to_pylist()
        for i, row in enumerate(rows):
            yield first_line + i, "row", row
    else:  # txt_dir: a slice of the sorted file names
        for i, name in enumerate(chunk):
            path = src.path / name
            if path.suffix.lower() != ".txt":
                yield first_line + i, "skip", name
            else:
                yield first_line + i, "bytes", (name, path.read_bytes())


def parse_chunk(src: SourceConfig, quality: QualityConfig, chunk: tuple, first_line: int, out: str | None = None) -> tuple:
    """(records as an Arrow table with ``_excerpt`` (with ``out``: written there as Parquet, its path;
    None when no record passed), quarantine rows as dicts, lines read)."""
    records, quarantine, lines = [], [], 0
    for line_no, kind, payload in _units(src, chunk, first_line):
        lines += 1
        record, rejected = parse_unit(src, quality, line_no, kind, payload)
        if rejected is not None:
            quarantine.append(asdict(rejected))
        else:
            records.append(record)
    table = pa.Table.from_pylist(records, schema=STAGE_SCHEMA)
    if out is not None:
        return (write_table(table, out) if table.num_rows else None), quarantine, lines
    return table, quarantine, lines


def _plan(src: SourceConfig, chunk_bytes: int) -> tuple[list[tuple], list[int] | None]:
    """The chunks of a source and, where known without reading it, each chunk's first line number."""
    if src.format == "jsonl":
        return jsonl_chunks(src.path, chunk_bytes), None
    if src.format == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(src.path).metadata
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise SourceError(f"source {src.name!r}: cannot read Parquet file {src.path}: {exc}") from exc
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        chunks, firsts, start, first, acc = [], [], 0, 1, 0
        for i, rows in enumerate(sizes):
            acc += meta.row_group(i).total_byte_size
            if acc >= chunk_bytes or i == len(sizes) - 1:
                chunks.append((start, i + 1))
                firsts.append(first)
                first += sum(sizes[start : i + 1])
                start, acc = i + 1, 0
        return chunks, firsts
    names = [p.name for p in sorted(p for p in src.path.iterdir() if p.is_file())]
    per = max(1, chunk_bytes // (64 * 1024))  # about 64 KiB a file
    chunks = [tuple(names[i : i + per]) for i in range(0, len(names), per)]
    return chunks, [1 + i * per for i in range(len(chunks))]


def read_source_on_ray(src: SourceConfig, quality: QualityConfig, chunk_bytes: int, log: LogFn | None = None,
                       out_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("records", table)``, ``("quarantine", rows)`` and ``("lines", n)`` chunk by chunk, in
    file order, parsed on the connected Ray cluster. With ``out_dir`` (a folder the workers and the
    caller share) the records come as Parquet files written there, so they never pass through the
    driver's Python; otherwise it holds one chunk's records at a time."""
    import ray

    chunks, firsts = _plan(src, chunk_bytes)
    if firsts is None:  # JSONL: each chunk's first line number from the newlines before it
        counts = ray.get([_remote(count_newlines).remote(str(src.path), s, e) for s, e in chunks])
        firsts = [1 + sum(counts[:k]) for k in range(len(chunks))]
    if log:
        log(f"{src.name}: reading {len(chunks)} chunk(s) of {src.path} on Ray")
    parse = _remote(parse_chunk, num_returns=3)
    refs = [parse.remote(src, quality, c, f, None if out_dir is None else os.path.join(out_dir, f"chunk-{k:06d}.parquet"))
            for k, (c, f) in enumerate(zip(chunks, firsts))]
    for table_ref, quarantine_ref, lines_ref in refs:
        yield "lines", ray.get(lines_ref)
        yield "quarantine", ray.get(quarantine_ref)
        yield "records", ray.get(table_ref)
