"""Rebuild the data shipped inside the package (src/multilora/bundled/) from a copy of the public data sets.

    python tools/bundle_data.py                      # from ../shared/data beside the repository
    python tools/bundle_data.py --source DIR         # from another copy with the same layout

Every data file (.csv, .json, .jsonl) is written gzipped under the same relative path plus ".gz"
(deterministic: no name or time in the gzip header, so a rebuild from the same data changes no byte);
license files are copied as they are. bundled/README.md (sources and licenses) is kept by hand.
The loaders read `name` or `name.gz` transparently (`multilora.data.data_file`).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "multilora" / "bundled"
DATA_SUFFIXES = (".csv", ".json", ".jsonl")
FOLDERS = ("alpaca", "mmlu", "superglue")


def gzip_bytes(data: bytes) -> bytes:
    """`data` gzipped at level 9 with an empty file name and mtime 0 (the same bytes every time)."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def bundle(source: Path, dest: Path = BUNDLED) -> tuple[int, int, int]:
    """Write `source`'s alpaca/, mmlu/ and superglue/ into `dest` (data gzipped); (files, bytes in, bytes out)."""
    files = size_in = size_out = 0
    for folder in FOLDERS:
        if not (source / folder).is_dir():
            raise SystemExit(f"{source / folder}: not found; pass --source, the folder holding {', '.join(FOLDERS)}")
        shutil.rmtree(dest / folder, ignore_errors=True)
        for path in sorted((source / folder).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in DATA_SUFFIXES:
                target = target.with_name(target.name + ".gz")
                packed = gzip_bytes(data)
                assert gzip.decompress(packed) == data
            else:  # LICENSE, DATA_LICENSE
                packed = data
            target.write_bytes(packed)
            files, size_in, size_out = files + 1, size_in + len(data), size_out + len(packed)
    return files, size_in, size_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data",
                   help="folder holding alpaca/, mmlu/, superglue/ (default: ../shared/data)")
    args = p.parse_args()
    files, size_in, size_out = bundle(args.source)
    print(f"wrote {files} files to {BUNDLED.relative_to(ROOT)}: {size_in / 1e6:.1f} MB of data, "
          f"{size_out / 1e6:.1f} MB on disk")


if __name__ == "__main__":
    main()
