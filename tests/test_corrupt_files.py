"""Corruption classes of model files, ported from llama.cpp's tests/test-gguf.cpp (and the
safetensors format's own rules) as plain tests: every damaged file must give a FluxMiniError
that says what is wrong, never a crash, an abort, another exception or unbounded memory.

The files are written here byte by byte from the published formats (independent of fluxmini's
reader). All cases of a test load in one subprocess (a crash fails the test, not the run), which
also measures the loader's peak memory and, outside sanitizer builds, caps its address space.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

# ---------------------------------------------------------------------------------- GGUF writer

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_F16, T_Q4_0, T_Q8_0 = 0, 1, 2, 8
INT64_MAX = 2**63 - 1


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_scalar(key, vtype, fmt, value) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + struct.pack(fmt, value)


def tensor_info(name, dims, ttype, offset, n_dims=None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return (gstr(name) + struct.pack("<I", n) + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in dims)
            + struct.pack("<IQ", ttype, offset & (2**64 - 1)))


def gguf(tensors=(), kvs=(), *, version=3, n_tensors=None, n_kv=None, alignment=32, data=None) -> bytes:
    """tensors: (name, dims, type, offset[, n_dims]) tuples; data: the data section (default: zeros
    enough for 4 KiB); counts and alignment may lie."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensor_info(*t) for t in tensors)
    body += b"\0" * (-len(body) % alignment)
    return body + (bytes(4096) if data is None else data)


def f32_tensor(name="img_in.weight", dims=(8, 2), offset=0):
    return (name, list(dims), T_F32, offset)


GOOD_GGUF = gguf([f32_tensor("a.weight"), f32_tensor("b.weight", offset=64)])


# ---------------------------------------------------------------------------------- safetensors

def safetensors(header, data=bytes(256), *, hlen=None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if hlen is None else hlen & (2**64 - 1)) + h + data


def st_entry(dtype="F32", shape=(2, 4), offsets=(0, 32)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ---------------------------------------------------------------------------------- loading

CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import fluxmini
    cases = json.load(open(sys.argv[1]))
    sanitized = "asan" in os.environ.get("LD_PRELOAD", "")
    def vm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    def peak_kb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    def load(path):
        try:
            fluxmini.FluxMini.load(path, components=[], threads=1)
            return {"ok": True}
        except fluxmini.FluxMiniError as e:
            return {"ok": False, "cls": type(e).__name__, "msg": str(e)}
    load(cases[0]["path"])  # warm up: the engine's one-time setup is not the loader's memory
    base = peak_kb()
    biggest = max(os.path.getsize(c["path"]) for c in cases)
    if not sanitized:  # ASan reserves terabytes of address space: measure its peak only
        cap = (vm_kb() + 256 * 1024) * 1024 + 16 * biggest
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for c in cases:
        r = load(c["path"])
        r["name"] = c["name"]
        print(json.dumps(r), flush=True)
    print(json.dumps({"peak_growth_kb": peak_kb() - base, "biggest": biggest}), flush=True)
""")


def load_all(tmp_path: Path, files: dict) -> dict:
    """Loads each {name: bytes} as a model file in one subprocess; returns {name: result}."""
    cases = []
    for i, (name, data) in enumerate(files.items()):
        p = tmp_path / f"case{i}.bin"
        p.write_bytes(data)
        cases.append({"name": name, "path": str(p)})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "cases.json")], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    done = [x["name"] for x in lines if "name" in x]
    assert r.returncode == 0, f"crashed (rc {r.returncode}) after {done[-1:]}: {r.stderr[-3000:]}"
    mem = lines[-1]
    # Memory: a constant factor of the (small) files plus a fixed margin, never what a count claims.
    assert mem["peak_growth_kb"] * 1024 < 64 * 2**20 + 16 * mem["biggest"], mem
    return {x["name"]: x for x in lines if "name" in x}


def check_refused(results: dict, expected: dict, cls="FluxMiniFileError"):
    for name, patterns in expected.items():
        r = results[name]
        assert not r["ok"], f"{name}: a damaged file was accepted"
        assert r["cls"] == cls, (name, r)
        for p in patterns:
            assert p.lower() in r["msg"].lower(), (name, p, r["msg"])


def check_parsed(results: dict, names):
    """Files that are well-formed but not a Flux model: the reader accepted them (the error, if
    any, comes from the model checks after parsing)."""
    for name in names:
        r = results[name]
        assert r["ok"] or r["cls"] == "FluxMiniValueError", (name, r)


# ---------------------------------------------------------------------------------- GGUF classes

def test_gguf_corruption_classes(tmp_path):
    big = 2**40
    cases = {
        # n_dims 1..4
        "n_dims_0": (gguf([("a", [], T_F32, 0, 0)]), ["0 dimensions"]),
        "n_dims_5": (gguf([("a", [1, 1, 1, 1, 1], T_F32, 0)]), ["5 dimensions"]),
        "n_dims_huge": (gguf([("a", [1], T_F32, 0, 2**32 - 1)]), ["dimensions"]),
        # every dim >= 1 (0 divides by zero elsewhere; -1 wraps)
        "dim_0": (gguf([f32_tensor(dims=(8, 0))]), ["bad dimension (0)"]),
        "dim_negative": (gguf([f32_tensor(dims=(8, -1))]), ["bad dimension"]),
        # element count / byte size overflow
        "ne_int64_max": (gguf([f32_tensor(dims=(INT64_MAX, 2, 1, 1))]), ["bad dimension"]),
        "bytes_overflow": (gguf([f32_tensor(dims=(big, big, big, 1))]), ["impossible size"]),
        "bytes_past_file": (gguf([f32_tensor(dims=(2**20, 2**20))]), ["past the end"]),
        # offset + size inside the file, aligned
        "offset_past_end": (gguf([f32_tensor(offset=1 << 20)]), ["past the end"]),
        "offset_misaligned": (gguf([f32_tensor(offset=4)]), ["misaligned"]),
        "offset_wraps": (gguf([f32_tensor(offset=2**64 - 32)]), ["past the end"]),
        "overlap": (gguf([f32_tensor("a.weight"), f32_tensor("b.weight", offset=32)]), ["overlap"]),
        # alignment KV must be a power of two
        "align_0": (gguf([f32_tensor()], [kv_scalar("general.alignment", U32, "<I", 0)]), ["power of two"]),
        "align_3": (gguf([f32_tensor()], [kv_scalar("general.alignment", U32, "<I", 3)]), ["power of two"]),
        "align_48": (gguf([f32_tensor()], [kv_scalar("general.alignment", U32, "<I", 48)]), ["power of two"]),
        "align_2g": (gguf([f32_tensor()], [kv_scalar("general.alignment", U32, "<I", 2**31)]), ["power of two"]),
        # tensor type within range (4 and 5 are removed types)
        "type_removed": (gguf([("a", [32], 4, 0)]), ["unknown type id 4"]),
        "type_past_count": (gguf([("a", [32], 1000, 0)]), ["unknown type id 1000"]),
        "type_huge": (gguf([("a", [32], 2**31, 0)]), ["unknown type id"]),
        "block_size": (gguf([("a", [33], T_Q4_0, 0)]), ["block size"]),
        # strings and arrays bounded by the file before allocation
        "key_len_huge": (gguf(kvs=[struct.pack("<Q", 2**62) + b"k"]), ["string of"]),
        "key_len_past_end": (gguf(kvs=[struct.pack("<Q", 5000) + b"k"], data=b""), ["truncated"]),
        "str_value_huge": (gguf(kvs=[gstr("k") + struct.pack("<IQ", STR, 2**63)]), ["string of"]),
        "name_len_huge": (b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, 2**40) + bytes(64), ["string of"]),
        "array_len_huge": (gguf(kvs=[gstr("k") + struct.pack("<IIQ", ARR, U32, 2**61)]), ["truncated"]),
        "array_len_wraps": (gguf(kvs=[gstr("k") + struct.pack("<IIQ", ARR, U64, 2**61)]), ["truncated"]),
        "string_array_huge": (gguf(kvs=[gstr("k") + struct.pack("<IIQ", ARR, STR, 2**60)]), ["truncated"]),
        # nested arrays and unchecked element types
        "nested_array": (gguf(kvs=[gstr("k") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", U8, 1) + b"x"]),
                         ["bad array element type 9"]),
        "array_elem_type": (gguf(kvs=[gstr("k") + struct.pack("<IIQ", ARR, 13, 1)]), ["bad array element type 13"]),
        "array_elem_type_huge": (gguf(kvs=[gstr("k") + struct.pack("<IIQ", ARR, 2**32 - 1, 1)]), ["array element type"]),
        "kv_type": (gguf(kvs=[gstr("k") + struct.pack("<I", 13)]), ["unknown value type 13"]),
        # counts that the file cannot hold
        "n_tensors_huge": (gguf(n_tensors=2**62), ["impossible"]),
        "n_kv_huge": (gguf(n_kv=2**63), ["impossible"]),
        "n_tensors_lies": (gguf([f32_tensor()], n_tensors=5, data=b"", alignment=1), ["truncated"]),
        # duplicates
        "dup_tensor": (gguf([f32_tensor("a.weight"), f32_tensor("a.weight", offset=64)]), ["#0", "#1", "a.weight"]),
        "dup_key": (gguf(kvs=[kv_scalar("k", U8, "<B", 1), kv_scalar("k", U8, "<B", 2)]), ["appears twice"]),
        # versions
        "version_1": (gguf(version=1), ["version 1"]),
        "version_4": (gguf(version=4), ["version 4"]),
        # names that are not UTF-8: named by index
        "name_not_utf8": (gguf([f32_tensor("a.weight"), f32_tensor(b"b\xff\xfe.weight", offset=64)]),
                          ["tensor #1", "not valid utf-8", "b\\xff\\xfe.weight"]),
        "name_surrogate": (gguf([f32_tensor(b"\xed\xa0\x80")]), ["tensor #0", "not valid utf-8"]),
        "name_overlong": (gguf([f32_tensor(b"\xc0\xaf")]), ["tensor #0", "not valid utf-8"]),
    }
    results = load_all(tmp_path, {"good": GOOD_GGUF, **{k: v[0] for k, v in cases.items()}})
    check_parsed(results, ["good"])
    check_refused(results, {k: v[1] for k, v in cases.items()})


def test_gguf_names_any_unicode_are_fine(tmp_path):
    # Valid UTF-8 of every length class and control characters are names like any other.
    files = {"unicode": gguf([f32_tensor("caf\u00e9.\u4e2d.\U0001F600.weight"), f32_tensor("\t\n\x01", offset=64)]),
             "alignment_64": gguf([f32_tensor()], [kv_scalar("general.alignment", U32, "<I", 64)], alignment=64),
             "kv_every_type": gguf([f32_tensor()], [
                 kv_scalar("u8", U8, "<B", 1), kv_scalar("i8", I8, "<b", -1), kv_scalar("u16", U16, "<H", 1),
                 kv_scalar("i16", I16, "<h", -1), kv_scalar("u32", U32, "<I", 1), kv_scalar("i32", I32, "<i", -1),
                 kv_scalar("f32", F32, "<f", 0.5), kv_scalar("bool", BOOL, "<B", 1), kv_scalar("u64", U64, "<Q", 1),
                 kv_scalar("i64", I64, "<q", -1), kv_scalar("f64", F64, "<d", 0.5),
                 gstr("s") + struct.pack("<I", STR) + gstr(b"\xff not utf-8 values are skipped"),
                 gstr("a") + struct.pack("<IIQ", ARR, STR, 2) + gstr("x") + gstr("")])}
    check_parsed(load_all(tmp_path, files), files)


def test_gguf_every_truncation_and_byte_damage(tmp_path):
    # A small valid file cut at every byte, and each header byte set to 0xff / 0x00 / +1:
    # each must load or be refused with a FluxMiniError (load_all fails on anything else).
    good = gguf([f32_tensor("a.weight"), ("b.weight", [32, 2], T_Q8_0, 64)],
                [kv_scalar("general.alignment", U32, "<I", 32), gstr("s") + struct.pack("<I", STR) + gstr("v")],
                data=bytes(132))  # exactly the two tensors: 64 + 2 * 34 bytes
    header_end = len(good) - 132
    files = {f"cut{n}": good[:n] for n in range(1, len(good))}
    for i in range(header_end):
        for v in (0xFF, 0x00, (good[i] + 1) & 0xFF):
            files[f"set{i}_{v}"] = good[:i] + bytes([v]) + good[i + 1:]
    results = load_all(tmp_path, files)
    assert all(r["ok"] or r["cls"].startswith("FluxMini") for r in results.values())
    refused = {k for k, r in results.items() if k.startswith("cut") and not r["ok"]}
    assert len(refused) == len(good) - 1  # no prefix of a file is a valid file


# ---------------------------------------------------------------------------------- safetensors

def test_safetensors_corruption_classes(tmp_path):
    ok = {"a.weight": st_entry()}
    cases = {
        # header length
        "hlen_past_end": (safetensors(ok, hlen=10**6), ["header claims"]),
        "hlen_huge": (safetensors(ok, hlen=2**63), ["header claims"]),
        "hlen_wraps": (safetensors(ok, hlen=2**64 - 1), ["header claims"]),
        "hlen_short": (safetensors(ok, hlen=10), ["not valid json"]),
        "trailing": (safetensors(b'{}  x'), ["trailing characters"]),
        "entry_not_object": (safetensors({"a": [1, 2]}), ["incomplete"]),
        "bad_json": (safetensors(b'{"a": {"dtype": "F32",'), ["not valid json"]),
        "deep_nesting": (safetensors(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"), ["nesting too deep"]),
        # dtype
        "dtype_unknown": (safetensors({"a": st_entry(dtype="Q4")}), ["unknown dtype 'q4'"]),
        "dtype_not_str": (safetensors({"a": {**st_entry(), "dtype": 5}}), ["incomplete"]),
        "dtype_bytes": (safetensors(b'{"a": {"dtype": "\xff\xfe", "shape": [1], "data_offsets": [0, 4]}}'),
                        ["unknown dtype", "\\xff"]),
        # shape
        "shape_negative": (safetensors({"a": st_entry(shape=(-1, 4))}), ["bad shape"]),
        "shape_float": (safetensors({"a": st_entry(shape=(1.5, 4))}), ["bad shape"]),
        "shape_string": (safetensors({"a": st_entry(shape=("2", 4))}), ["bad shape"]),
        "shape_5d": (safetensors({"a": st_entry(shape=(1, 1, 1, 2, 4))}), ["dimensions"]),
        "shape_huge": (safetensors({"a": st_entry(shape=(2**41, 4))}), ["bad shape"]),
        "shape_overflow": (safetensors({"a": st_entry(shape=(2**40, 2**40, 2**40))}), ["impossible size"]),
        "shape_plus_sign": (safetensors(b'{"a": {"dtype": "F32", "shape": [2+1], "data_offsets": [0, 12]}}'),
                            ["bad shape"]),
        # data_offsets
        "offsets_reversed": (safetensors({"a": st_entry(offsets=(32, 0))}), ["bad data_offsets"]),
        "offsets_mismatch": (safetensors({"a": st_entry(offsets=(0, 16))}), ["needs 32"]),
        "offsets_past_end": (safetensors({"a": st_entry(offsets=(1000, 1032))}), ["past the end"]),
        "offsets_wrap": (safetensors({"a": st_entry(offsets=(2**64 - 16, 16))}), ["bad data_offsets"]),
        "offsets_three": (safetensors({"a": {**st_entry(), "data_offsets": [0, 16, 32]}}), ["incomplete"]),
        "offsets_negative": (safetensors({"a": st_entry(offsets=(-32, 0))}), ["bad data_offsets"]),
        "overlap": (safetensors({"a": st_entry(), "b": st_entry(offsets=(16, 48))}), ["overlap"]),
        # duplicates and names
        "duplicate": (safetensors(b'{"a": ' + json.dumps(st_entry()).encode() + b', "a": '
                                  + json.dumps(st_entry(offsets=(32, 64))).encode() + b"}"), ["#0", "#1", "'a'"]),
        "name_not_utf8": (safetensors(b'{"ok": ' + json.dumps(st_entry()).encode() + b', "b\xff": '
                                      + json.dumps(st_entry(offsets=(32, 64))).encode() + b"}"),
                          ["tensor #1", "not valid utf-8", "b\\xff"]),
        "name_lone_surrogate": (safetensors(b'{"\\ud800x": ' + json.dumps(st_entry()).encode() + b"}"),
                                ["surrogate"]),
        "bad_hex_escape": (safetensors(b'{"\\u00zz": ' + json.dumps(st_entry()).encode() + b"}"), ["hex digit"]),
    }
    good = {
        "good": safetensors({"img_in.weight": st_entry(), "__metadata__": {"format": "pt"}}),
        # __metadata__ of any shape is not a tensor; non-string values are skipped
        "metadata_odd": safetensors({"__metadata__": {"a": 1, "b": [1, 2], "c": {"d": "e"}}, "a.weight": st_entry()}),
        "metadata_list": safetensors({"__metadata__": [1, 2], "a.weight": st_entry()}),
        "surrogate_pair": safetensors(b'{"\\ud83d\\ude00.weight": ' + json.dumps(st_entry()).encode() + b"}"),
        "scalar_and_empty": safetensors({"s": st_entry(shape=(), offsets=(0, 4)), "e": st_entry(shape=(0, 4), offsets=(4, 4))}),
    }
    results = load_all(tmp_path, {**good, **{k: v[0] for k, v in cases.items()}})
    check_parsed(results, good)
    check_refused(results, {k: v[1] for k, v in cases.items()})


def test_safetensors_every_truncation(tmp_path):
    data = safetensors({"a.weight": st_entry(), "__metadata__": {"k": "v"}}, data=bytes(32))
    results = load_all(tmp_path, {f"cut{n}": data[:n] for n in range(1, len(data))})
    assert all(not r["ok"] and r["cls"] == "FluxMiniFileError" for r in results.values()), results


def test_empty_tensor_used_by_a_network_is_refused(tmp_path):
    # Zero-sized tensors are legal safetensors, but one the engine would compute with is damage.
    vae = safetensors({"decoder.conv_in.weight": st_entry(shape=(0, 16, 3, 3), offsets=(0, 0))})
    results = load_all(tmp_path, {"vae": vae})
    r = results["vae"]
    assert r["cls"] == "FluxMiniValueError" and "empty" in r["msg"], r


# ---------------------------------------------------------------------------------- memory

def test_memory_is_bounded_by_the_file(tmp_path):
    # Claims of huge counts and lengths in small files, and a big header made of many tiny
    # entries: peak memory stays within a constant factor of the file (load_all's assertion).
    many = b"".join(tensor_info(f"t{i}", [1], T_F32, 0) for i in range(20000))
    files = {
        "many_infos_overlapping": b"GGUF" + struct.pack("<IQQ", 3, 20000, 0) + many + bytes(64),
        "many_kv": gguf(kvs=[kv_scalar(f"k{i}", U8, "<B", 1) for i in range(20000)]),
        "claims": gguf(n_tensors=2**20, n_kv=2**20, data=bytes(2**20)),
        "st_many_dims": safetensors(b'{"a": {"dtype": "F32", "shape": [' + b"1," * 400000 + b'1], "data_offsets": [0, 4]}}'),
        "st_many_meta": safetensors(b'{"__metadata__": {' + b",".join(b'"k%d": 1' % i for i in range(100000)) + b"}}"),
    }
    results = load_all(tmp_path, files)
    assert results["many_infos_overlapping"]["cls"] == "FluxMiniFileError"
    assert results["claims"]["cls"] == "FluxMiniFileError"
    assert results["st_many_dims"]["cls"] == "FluxMiniFileError"


# Each file loads in its own process after a tiny warm-up load (the engine's one-time setup); the
# peak resident memory above the memory before it, mapped file pages included, is what loading
# the file took.
PEAK_CHILD = textwrap.dedent("""
    import json, sys
    import fluxmini
    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    def load(path):
        try:
            fluxmini.FluxMini.load(path, components=[], threads=1)
            return "loaded"
        except fluxmini.FluxMiniError as e:
            return type(e).__name__ + ": " + str(e)[-160:]
    load(sys.argv[1])
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS (Linux)
        f.write("5")
    base = status_kb("VmRSS")
    result = load(sys.argv[2])
    print(json.dumps({"growth": (status_kb("VmHWM") - base) * 1024, "result": result}))
""")
# The reader keeps at most 65536 tensors or keys, names of at most 256 bytes, strings of at most
# 1 MiB and 16 MiB of metadata (csrc/weights.cpp); the fixed margin covers that and the
# interpreter's own noise.
MARGIN = 96 * 2**20


def _name(i: int, length: int) -> bytes:
    return (b"%08x" % i).ljust(length, b"n")


def _peak_files() -> dict:
    """Files that make the reader keep the most it can per byte, each class at its caps (and one
    past them)."""
    n, long = 1 << 16, 256
    infos = lambda count, length, stride: b"".join(  # noqa: E731
        tensor_info(_name(i, length), [1], T_F32, i * stride) for i in range(count))
    st_entries = b",".join(b'"%s":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}' % (_name(i, long), 4 * i, 4 * i + 4)
                           for i in range(n))
    return {
        # every tensor kept: the most names and infos the caps allow (the model checks refuse it after)
        "gguf_max_infos": b"GGUF" + struct.pack("<IQQ", 3, n, 0) + infos(n, long, 32) + bytes(32 * n + 64),
        "gguf_max_short_infos": b"GGUF" + struct.pack("<IQQ", 3, n, 0) + infos(n, 1, 0) + bytes(64),
        "gguf_over_count": b"GGUF" + struct.pack("<IQQ", 3, 2 * n, 0) + infos(2 * n, 1, 0) + bytes(64),
        "gguf_max_keys": gguf(kvs=[gstr(_name(i, long)) + struct.pack("<I", STR) + gstr(b"v" * long) for i in range(n)]),
        "gguf_long_values": gguf(kvs=[gstr(b"k%d" % i) + struct.pack("<I", STR) + gstr(b"v" * 2**20) for i in range(48)]),
        "gguf_claims": gguf(n_tensors=2**40, n_kv=2**40, data=bytes(2**20)),
        "st_max_entries": safetensors(b"{" + st_entries + b"}", data=bytes(4 * n)),
        "st_max_metadata": safetensors(b'{"__metadata__":{' + b",".join(
            b'"%s":"%s"' % (_name(i, long), b"v" * long) for i in range(n)) + b"}}"),
        "st_long_metadata": safetensors(b'{"__metadata__":{' + b",".join(
            b'"k%d":"%s"' % (i, b"v" * 2**20) for i in range(48)) + b"}}"),
        "st_claims": safetensors(b"{}", hlen=2**40),
        # past the caps, at sizes where keeping everything took more than the margin (a reader
        # without the caps fails here: 1 M infos took 4x their 33 MB, long names and values 2x)
        "gguf_1M_infos": b"GGUF" + struct.pack("<IQQ", 3, 1 << 20, 0) + infos(1 << 20, 1, 0) + bytes(64),
        "gguf_long_names": b"GGUF" + struct.pack("<IQQ", 3, 48, 0) + infos(48, 2**20, 0) + bytes(64),
        "gguf_many_long_values": gguf(kvs=[gstr(b"k%d" % i) + struct.pack("<I", STR) + gstr(b"v" * 2**20)
                                          for i in range(112)]),
        "st_huge_name": safetensors(b'{"' + b"n" * (64 << 20) + b'": {}}'),  # a copy of a string as big as the file
    }


def test_peak_memory_is_the_file_plus_a_fixed_margin(tmp_path):
    # The bound the fuzzers hold the loader to (docs/FUZZING.md): whatever a file holds or claims,
    # loading it takes at most its own size plus a fixed margin. Before the caps, 1 M minimal
    # tensor infos (40 MiB) took 320 MiB and names of 1 MiB four times their file.
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        import pytest

        pytest.skip("ASan's redzones and quarantine change the process's memory; the bound is the real build's")
    warm = tmp_path / "warm.bin"
    warm.write_bytes(GOOD_GGUF)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    results = {}
    for name, data in _peak_files().items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        r = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(warm), str(path)], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        results[name] = (len(data), json.loads(r.stdout.splitlines()[-1]))
        path.unlink()
    for name, (size, r) in results.items():
        assert r["growth"] <= size + MARGIN, (name, size, r)
    # each past a cap is refused as damage, saying what the cap is
    for name in ("gguf_over_count", "gguf_1M_infos"):
        assert "at most 65536" in results[name][1]["result"], results[name]
    assert "names of at most 256 bytes" in results["gguf_long_names"][1]["result"], results["gguf_long_names"]
    assert "more than 1 MiB" in results["st_huge_name"][1]["result"], results["st_huge_name"]
    # ... and files at the caps are read whole (the most the reader keeps is what was measured)
    for name in ("gguf_max_infos", "gguf_max_keys", "st_max_entries", "st_max_metadata"):
        assert results[name][1]["result"] == "loaded", (name, results[name])
