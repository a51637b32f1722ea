#!/usr/bin/env python3
"""An independent reader of the lazyblk blob format, written from docs/format.md alone.

  blobinfo.py BLOB                 summary (JSON) of footer and index
  blobinfo.py BLOB --chunks        also every chunk's kind and stored length
  blobinfo.py BLOB --export RAW    verify every chunk (SHA-256 before zstd) and write the raw disk image
                                   (needs the `zstandard` module or the `zstd` command)
"""
import hashlib, json, struct, subprocess, sys

FOOTER_MAGIC = b"LZBLKFT\x01"
INDEX_MAGIC = b"LZBLKIX\x01"


def read_index(f, size):
    f.seek(size - 64)
    foot = f.read(64)
    magic, version, flags, algo = struct.unpack_from("<8sHHB", foot, 0)
    if magic != FOOTER_MAGIC or version != 1 or flags != 0 or algo != 1 or foot[13:16] != b"\0\0\0":
        raise ValueError("bad footer")
    ioff, ilen = struct.unpack_from("<QQ", foot, 16)
    idigest = foot[32:64]
    if ioff + ilen + 64 != size or ilen > 256 << 20:
        raise ValueError("bad index location")
    f.seek(ioff)
    raw = f.read(ilen)
    if hashlib.sha256(raw).digest() != idigest:
        raise ValueError("index digest mismatch")
    magic, version, shift, algo = struct.unpack_from("<8sHBB", raw, 0)
    image_size, count = struct.unpack_from("<QQ", raw, 16)
    if magic != INDEX_MAGIC or version != 1 or algo != 1 or not 12 <= shift <= 22:
        raise ValueError("bad index header")
    cs = 1 << shift
    if count != -(-image_size // cs) or ilen != 64 + 48 * count:
        raise ValueError("bad chunk count")
    chunks = []
    for i in range(count):
        off, slen, kind = struct.unpack_from("<QIB", raw, 64 + 48 * i)
        digest = raw[64 + 48 * i + 16: 64 + 48 * i + 48]
        clen = min(cs, image_size - i * cs)
        if kind == 0:
            ok = off == 0 and slen == 0 and digest == bytes(32)
        elif kind == 1:
            ok = slen == clen and off + slen <= ioff
        elif kind == 2:
            ok = 0 < slen < clen and off + slen <= ioff
        else:
            ok = False
        if not ok:
            raise ValueError(f"bad entry for chunk {i}")
        chunks.append((off, slen, kind, digest, clen))
    return dict(index_offset=ioff, index_length=ilen, image_size=image_size, chunk_size=cs), chunks


def decompress(data, clen):
    try:
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=clen)
    except ImportError:
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout


def main():
    path = sys.argv[1]
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        info, chunks = read_index(f, size)
        info["blob_size"] = size
        info["chunk_count"] = len(chunks)
        info["zero_chunks"] = sum(1 for c in chunks if c[2] == 0)
        info["stored_bytes"] = sum(c[1] for c in chunks)
        if "--chunks" in sys.argv:
            info["chunks"] = [[c[2], c[1]] for c in chunks]
        if "--export" in sys.argv:
            out = open(sys.argv[sys.argv.index("--export") + 1], "wb")
            out.truncate(info["image_size"])
            for i, (off, slen, kind, digest, clen) in enumerate(chunks):
                if kind == 0:
                    continue
                f.seek(off)
                data = f.read(slen)
                if hashlib.sha256(data).digest() != digest:
                    raise ValueError(f"chunk {i}: digest mismatch")
                if kind == 2:
                    data = decompress(data, clen)
                if len(data) != clen:
                    raise ValueError(f"chunk {i}: wrong decompressed size")
                out.seek(i * info["chunk_size"])
                out.write(data)
            out.close()
    print(json.dumps(info))


if __name__ == "__main__":
    main()
