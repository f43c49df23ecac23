"""Lists the GPU images embedded in an object file or shared library (the .nv_fatbin section
that nvcc writes): one line per image, "sm_90 elf" (a cubin, machine code for that GPU family)
or "sm_90 ptx" (PTX the driver can compile for a newer GPU). What `cuobjdump --list-elf
--list-ptx` shows, for machines whose CUDA toolkit has no cuobjdump (this one's has none).

    python scripts/fatbin_images.py pymaml/_C*.so
    python scripts/fatbin_images.py FILE --require sm_90:elf --require sm_90:ptx

--require KIND exits 1 (with a message) unless an image "arch:kind" is present. The format read
here is nvcc's fat binary container (magic 0xBA55ED50) and its entry headers (kind 1 = PTX,
2 = ELF); it is undocumented, so a file with none found is an error, never an empty success.
"""

import argparse
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KINDS = {1: "ptx", 2: "elf"}


def elf_section(data, name):
    """The bytes of the ELF64 little-endian section `name`, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit("fatbin_images: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
    strtab = header(shstrndx)
    for i in range(shnum):
        h = header(i)
        start = strtab[4] + h[0]
        sec_name = data[start:data.index(b"\0", start)].decode()
        if sec_name == name:
            return data[h[4]:h[4] + h[5]]
    return None


def images(section):
    """(arch, kind) of every entry of every fat binary container in `section`."""
    found = []
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned
            continue
        entry = pos + header_size
        end = entry + fat_size
        while entry + 32 <= end:
            kind, _u1, entry_header, size = struct.unpack_from("<HHIQ", section, entry)
            arch, = struct.unpack_from("<I", section, entry + 28)
            found.append(("sm_%d" % arch, KINDS.get(kind, "kind%d" % kind)))
            if entry_header == 0:
                break
            entry += entry_header + size
        pos = max(end, pos + 8)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--require", action="append", default=[], metavar="ARCH:KIND",
                        help="e.g. sm_90:elf or sm_90:ptx; exit 1 if missing")
    args = parser.parse_args()
    with open(args.file, "rb") as f:
        data = f.read()
    section = elf_section(data, ".nv_fatbin")
    if section is None:
        print("fatbin_images: %s has no .nv_fatbin section (no GPU code)" % args.file)
        return 1
    found = images(section)
    if not found:
        print("fatbin_images: no fat binary container found in %s's .nv_fatbin" % args.file)
        return 1
    for arch, kind in sorted(set(found)):
        print(arch, kind, "(%d)" % found.count((arch, kind)))
    missing = [r for r in args.require if tuple(r.split(":", 1)) not in set(found)]
    if missing:
        print("fatbin_images: missing in %s: %s" % (args.file, ", ".join(missing)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
