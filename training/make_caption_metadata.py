#!/usr/bin/env python
"""Write an ``imagefolder`` with captions (``metadata.jsonl`` per split) from the emoji data's ``annotations.csv``.

    python training/make_caption_metadata.py --data_dir ../shared/data/emoji --output_dir runs/emoji-captions

``annotations.csv`` has one row per image (``file_name`` relative to the data folder, ``split``, ``label``,
``caption`` such as "grinning face", ``text`` such as "grinning"). The `datasets` imagefolder convention wants a
``metadata.csv`` / ``metadata.jsonl`` next to the images with a ``file_name`` column relative to it; the shared
data folder is read-only, so the images are linked (hard links where possible, copies otherwise) into
``output_dir/<split>/<label>/`` and each split gets its metadata. ``--caption_column caption`` (or ``text``)
of ``train_prior.py`` then reads them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="Folder with annotations.csv and the images it names.")
    parser.add_argument("--annotations", default=None, help="the CSV (default: data_dir/annotations.csv)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--columns", nargs="+", default=["caption", "text", "label"],
                        help="annotations.csv columns copied into the metadata (besides file_name).")
    args = parser.parse_args(argv)
    data, out = Path(args.data_dir), Path(args.output_dir)
    table = Path(args.annotations) if args.annotations else data / "annotations.csv"
    if not table.is_file():
        parser.error(f"{table} not found")
    with table.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ["file_name", "split", *args.columns] if rows and c not in rows[0]]
    if missing:
        parser.error(f"{table} has no column(s) {missing}; columns: {list(rows[0]) if rows else []}")
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        source = data / row["file_name"]
        if not source.is_file():
            parser.error(f"{table} names {row['file_name']}, which is not a file under {data}")
        relative = Path(row["file_name"]).relative_to(row["split"]) if row["file_name"].startswith(row["split"] + "/") \
            else Path(row["file_name"]).name
        target = out / row["split"] / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        by_split.setdefault(row["split"], []).append({"file_name": relative.as_posix(),
                                                      **{c: row[c] for c in args.columns}})
    for split, entries in by_split.items():
        tmp = out / split / "metadata.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        tmp.replace(out / split / "metadata.jsonl")
        print(f"{split}: {len(entries)} images -> {out / split / 'metadata.jsonl'}")


if __name__ == "__main__":
    main()
