#!/usr/bin/env python3
"""Writes the seed corpus in fuzz/corpus/<target>/: real-format narinfos, NARs, protocol
frames, manifests, config files, keys and admin requests. Deterministic; needs Python 3 and the
`cryptography` package (for ed25519 keys and signatures). The fuzzers grow their own corpora
from these; only the seeds (and minimized finds) are committed."""
import base64, hashlib, os, struct, subprocess, sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
ALPHA = "0123456789abcdfghijklmnpqrsvwxyz"


def b32(b):
    n = (len(b) * 8 - 1) // 5 + 1
    out = []
    for k in range(n - 1, -1, -1):
        bit = k * 5
        i, j = bit // 8, bit % 8
        v = b[i] >> j
        if i + 1 < len(b):
            v |= (b[i + 1] << (8 - j)) & 0xFF
        out.append(ALPHA[v & 0x1F])
    return "".join(out)


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- NARs (the format of nix/src/nar/mod.rs) ---
def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack("<Q", len(b)) + b + b"\0" * ((8 - len(b) % 8) % 8)


def node(n):
    kind = n[0]
    if kind == "file":
        out = s("(") + s("type") + s("regular")
        if n[2]:
            out += s("executable") + s("")
        return out + s("contents") + s(n[1]) + s(")")
    if kind == "link":
        return s("(") + s("type") + s("symlink") + s("target") + s(n[1]) + s(")")
    out = s("(") + s("type") + s("directory")
    for name in sorted(n[1], key=lambda k: k.encode()):
        out += s("entry") + s("(") + s("name") + s(name) + s("node") + node(n[1][name]) + s(")")
    return out + s(")")


def nar(n):
    return s("nix-archive-1") + node(n)


nars = {
    "file": ("file", b"hello\n", False),
    "empty-file": ("file", b"", False),
    "exec": ("file", b"#!/bin/sh\necho hi\n", True),
    "symlink": ("link", "../lib/libfoo.so.1"),
    "empty-dir": ("dir", {}),
    "tree": ("dir", {
        "bin": ("dir", {"hello": ("file", b"\x7fELF" + bytes(range(40)), True)}),
        "lib": ("dir", {"libfoo.so": ("link", "libfoo.so.1"), "libfoo.so.1": ("file", b"x" * 9, False)}),
        "share": ("dir", {"doc": ("dir", {"README": ("file", b"read me\n", False)})}),
    }),
}
for name, n in nars.items():
    put("nar", name + ".nar", nar(n))

# --- keys and signatures ---
sk = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"peerix fuzz seed").digest())
seed = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                        serialization.NoEncryption())
pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
secret_text = "peerix-fuzz-1:" + base64.b64encode(seed + pub).decode()
public_text = "peerix-fuzz-1:" + base64.b64encode(pub).decode()
put("signing", "secret.key", secret_text)
put("signing", "public.key", public_text)
put("signing", "nixos.pub", "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")


def path_hash(name):
    return b32(hashlib.sha256(name.encode()).digest()[:20])


def narinfo(name, data, refs=(), deriver=None, sign=True, ca=None, extra=""):
    sp = "/nix/store/%s-%s" % (path_hash(name), name)
    h = "sha256:" + b32(hashlib.sha256(data).digest())
    refs = sorted("%s-%s" % (path_hash(r), r) for r in refs)
    fp = "1;%s;%s;%d;%s" % (sp, h, len(data), ",".join("/nix/store/" + r for r in refs))
    t = "StorePath: %s\nURL: nar/%s.nar\nCompression: none\nFileHash: %s\nFileSize: %d\n" % (
        sp, h[7:], h, len(data))
    t += "NarHash: %s\nNarSize: %d\nReferences: %s\n" % (h, len(data), " ".join(refs))
    if deriver:
        t += "Deriver: %s-%s.drv\n" % (path_hash(deriver), deriver)
    if sign:
        t += "Sig: peerix-fuzz-1:%s\n" % base64.b64encode(sk.sign(fp.encode())).decode()
    if ca:
        t += "CA: %s\n" % ca
    return t + extra, fp


tree = nar(nars["tree"])
infos = [
    narinfo("hello-2.12.1", tree, refs=["glibc-2.38-44", "hello-2.12.1"], deriver="hello-2.12.1"),
    narinfo("glibc-2.38-44", nar(nars["file"]), deriver="glibc-2.38-44", sign=False),
    narinfo("source", nar(nars["empty-dir"]), ca="fixed:r:sha256:" + b32(bytes(32)), sign=False),
    narinfo("old", nar(nars["exec"]), extra="Deriver: unknown-deriver\nSystem: x86_64-linux\n"),
]
for i, (t, fp) in enumerate(infos):
    put("narinfo", "narinfo-%d" % i, t)
    put("signing", "sig-%d" % i, [l for l in t.splitlines() if l.startswith("Sig: ")][0][5:]
        if "Sig: " in t else "name:" + base64.b64encode(bytes(64)).decode())

# --- store paths and hashes ---
put("store_path", "full", "/nix/store/%s-hello-2.12.1" % path_hash("hello-2.12.1"))
put("store_path", "inside", "/nix/store/%s-hello-2.12.1/bin/hello" % path_hash("hello-2.12.1"))
put("store_path", "base", "%s-glibc-2.38-44" % path_hash("glibc-2.38-44"))
put("store_path", "hash", path_hash("x"))
d = hashlib.sha256(b"x").digest()
put("store_path", "sha256-base32", "sha256:" + b32(d))
put("store_path", "sha256-hex", "sha256:" + d.hex())
put("store_path", "sha256-sri", "sha256-" + base64.b64encode(d).decode())


# --- manifests (chunkstore/src/manifest.rs) ---
def manifest(lens):
    b = struct.pack("<BQI", 1, sum(lens), len(lens))
    for i, l in enumerate(lens):
        b += hashlib.sha256(b"chunk%d" % (i % 3)).digest() + struct.pack("<I", l)
    return b


def manifest_ok(lens):
    # One id, one length: ids repeat every three chunks, so give them repeating lengths too.
    return manifest([lens[i % 3] for i in range(len(lens))])


put("manifest", "empty", manifest([]))
put("manifest", "one", manifest([5]))
put("manifest", "three", manifest([65536, 70000, 4096]))
put("manifest", "repeats", manifest_ok([100, 200, 300, 0, 0, 0, 0]))


# --- protocol frames (swarm/src/protocol.rs) ---
def frame(kind, body):
    return struct.pack(">IB", len(body) + 1, kind) + body


nh_want = hashlib.sha256(b"wanted").digest()
put("protocol_request", "lookup", frame(1, struct.pack(">H", 2) + bytes(20) + b"\x01" * 20))
put("protocol_request", "manifest", frame(2, hashlib.sha256(tree).digest()))
put("protocol_request", "have", frame(3, struct.pack(">HH", 2, 1) + bytes(96)))
put("protocol_request", "chunks", frame(4, struct.pack(">H", 3) + bytes(96)))
# A Chunks request wanting zstd, compression and deltas against two older NARs.
want = b"\x07" + nh_want + b"\x02" + bytes(32) + b"\x01" * 32
put("protocol_request", "chunks-want", frame(4, struct.pack(">H", 1) + bytes(32) + want))
put("protocol_request", "chunks-zstd", frame(4, struct.pack(">H", 1) + bytes(32) + b"\x01"))
put("protocol_request", "two-frames", frame(2, bytes(32)) + frame(4, struct.pack(">H", 1) + bytes(32)))

chunk_text = b"chunk bytes, chunk bytes, chunk bytes " * 40


def zstd(b):
    # The zstd command line tool (Debian: zstd) makes the frames.
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=b, capture_output=True, check=True).stdout


lookup = struct.pack(">H", 2)
for t, _ in infos[:2]:
    lookup += struct.pack(">I", len(t)) + t.encode()
nh = hashlib.sha256(tree).digest()
replies = {
    "lookup-reply": frame(0x81, lookup),
    "lookup-empty": frame(0x81, struct.pack(">H", 0)),
    "manifest-reply": frame(0x82, b"\x01" + nh + manifest([len(tree)])),
    "manifest-none": frame(0x82, b"\x00"),
    "have-reply": frame(0x83, b"\x05\x01" + b"\x00\x01\x02"),
    "chunk": frame(0x84, hashlib.sha256(b"c").digest() + b"\x00" + b"chunk bytes"),
    "chunk-missing": frame(0x84, bytes(32) + b"\x01"),
    "chunk-zstd": frame(0x84, bytes(32) + b"\x02" + struct.pack(">I", len(chunk_text)) + zstd(chunk_text)),
    "chunk-delta": frame(
        0x84,
        bytes(32) + b"\x03\x01" + bytes(32) + struct.pack(">I", len(chunk_text)) + zstd(chunk_text),
    ),
    "refused": frame(0xFF, b"\x01"),
}
# Two leading bytes: the Have request's chunk count / 4 and NAR count (see the target).
for name, f in replies.items():
    put("protocol_reply", name, b"\x03\x03" + f)

# --- the config file (src/config.rs) ---
put("config", "full.toml", """listen = "127.0.0.1:12304"
http-beyond-loopback = false
p2p-listen = ["/ip4/0.0.0.0/tcp/12305", "/ip4/0.0.0.0/udp/12305/quic-v1"]
peers = ["10.0.0.2:12305", "/ip4/10.0.0.3/tcp/12305"]
mdns = true
store = "/"
state-dir = "/var/lib/peerix"
private-key = "/var/lib/peerix/peerix.sec"
trusted-keys = ["%s"]
upstream-cache = "https://cache.nixos.org"
priority = 30
timeout = 2.5
swarm-key = "/var/lib/peerix/swarm.key"
scan-interval = 600
wire-compression = "auto"
deltas = true
chunk-size = "256KiB"
share-all = false
deny = ["*-private", "secret-*"]
""" % public_text)
put("config", "small.toml", 'upstream-cache = "none"\nmdns = false\ntimeout = 0.5\n')

# --- admin requests (src/admin.rs), one JSON line each ---
put("admin", "status", '{"op":"status"}\n')
put("admin", "seed", '{"op":"seed","targets":[{"label":"result","root":"/nix/store/%s-hello-2.12.1"}],"share_private_paths":true}\n' % path_hash("hello-2.12.1"))
put("admin", "unseed", '{"op":"unseed","which":["result"],"all":false}\n')
print("corpus written to", OUT, file=sys.stderr)
