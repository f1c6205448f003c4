"""Read back a W&B offline run folder: its ``run-<id>.wandb`` transaction log.

wandb 0.31 no longer ships a Python reader for this file (its Go core writes it). The format is
a 7-byte header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB-log records in
32 KiB blocks (each record: a 4-byte checksum, a 2-byte little-endian length, a 1-byte type:
1 full, 2 first, 3 middle, 4 last fragment; a block's tail shorter than a record header is
padding). Each whole record is a ``wandb.proto.wandb_internal_pb2.Record``, parsed here with
wandb's own protobuf classes.

    run = read_offline_run(folder)    # {"run": {...}, "history": [{...}], "config": {...}}
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    offset, pending = HEADER, b""
    while offset + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER:
            offset += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += RECORD_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            offset += left_in_block - RECORD_HEADER  # zero padding to the block end


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(folder: Path) -> dict:
    """The run record, the history rows (step and values) and the config of one run folder."""
    from wandb.proto import wandb_internal_pb2

    (log,) = Path(folder).glob("run-*.wandb")
    out: dict = {"run": None, "history": [], "config": {}}
    for payload in _payloads(log.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {
                "id": run.run_id,
                "name": run.display_name,
                "group": run.run_group,
                "job_type": run.job_type,
                "project": run.project,
            }
            for item in run.config.update:
                out["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append(
                {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
    return out
