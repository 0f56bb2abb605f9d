"""Shared by the real-node benchmarks (scripts/bench-real-e2e, scripts/bench-real-rescan): a
regtest bitcoind in a temporary folder, its JSON-RPC, a receiver that timestamps every request,
and chainwatch started against both. Standard library only, but for pyzmq in the e2e bench."""

import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

# Threads here timestamp arrivals: a waiting thread must not sit out the default 5 ms GIL
# switch interval.
sys.setswitchinterval(0.0001)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAINWATCH = os.path.join(ROOT, "target", "release", "chainwatch")
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
API_TOKEN = "bench-token-" + "x" * 40


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(*parts):
    print(*parts, file=sys.stderr, flush=True)


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def sha256d(b):
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


class Node:
    """A regtest bitcoind of its own: temporary datadir, RPC and ZMQ on free loopback ports."""

    def __init__(self, extra_args=(), datadir=None):
        self.exe = os.environ.get("BITCOIND_EXE")
        if not self.exe or not os.access(self.exe, os.X_OK):
            sys.exit("BITCOIND_EXE must name a bitcoind executable")
        self.owned = datadir is None
        self.datadir = datadir or tempfile.mkdtemp(prefix="chainwatch-bench-node-")
        self.rpc_port = free_port()
        self.zmq = {t: f"tcp://127.0.0.1:{free_port()}" for t in ("sequence", "rawtx", "rawblock")}
        self.extra = list(extra_args)
        self.proc = None
        self.start()

    def start(self):
        args = [
            self.exe, "-regtest", f"-datadir={self.datadir}", f"-rpcport={self.rpc_port}",
            "-listen=0", "-server=1", "-printtoconsole=0", "-fallbackfee=0.0002",
            "-rpcbind=127.0.0.1", "-rpcallowip=127.0.0.1", "-rpcworkqueue=64",
        ] + [f"-zmqpub{t}={a}" for t, a in self.zmq.items()] + self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                self.rpc("getblockcount")
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    sys.exit("bitcoind did not start; its log: " + self.log_path())
                time.sleep(0.2)

    def log_path(self):
        return os.path.join(self.datadir, "regtest", "debug.log")

    @property
    def cookie(self):
        return os.path.join(self.datadir, "regtest", ".cookie")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.rpc_port}"

    def rpc(self, method, *params, wallet=None, timeout=3600):
        with open(self.cookie) as f:
            auth = base64.b64encode(f.read().strip().encode()).decode()
        url = self.url + (f"/wallet/{wallet}" if wallet else "")
        body = json.dumps({"jsonrpc": "1.0", "id": 1, "method": method, "params": list(params)})
        req = urllib.request.Request(url, body.encode(), {"Authorization": "Basic " + auth})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            answer = json.load(e)
        if answer.get("error"):
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                self.rpc("stop")
            except Exception:
                self.proc.terminate()
            self.proc.wait(timeout=120)

    def cleanup(self):
        self.stop()
        if self.owned:
            shutil.rmtree(self.datadir, ignore_errors=True)


class Receiver:
    """An HTTP receiver that answers 200 at once and records (monotonic ns, path, body)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.monotonic_ns()
                with outer.lock:
                    outer.requests.append((now, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self):
        """The chainwatch events received so far: (monotonic ns, parsed body)."""
        with self.lock:
            return [(t, json.loads(b)) for t, p, b in self.requests if p == "/hook"]


class Chainwatch:
    """`chainwatch run` on the node, delivering to the receiver's /hook."""

    def __init__(self, node, receiver, watches_toml="", events=("tx.*",), ordered=True):
        if not os.access(CHAINWATCH, os.X_OK):
            sys.exit(f"{CHAINWATCH} is missing: run `cargo build --release` first")
        self.dir = tempfile.mkdtemp(prefix="chainwatch-bench-")
        self.api_port = free_port()
        self.config = os.path.join(self.dir, "watcher.toml")
        with open(self.config, "w") as f:
            f.write(f"""network = "regtest"
data_dir = "{self.dir}/data"
default_confirmations = 1
log_format = "json"

[bitcoind]
rpc_url = "{node.url}"
cookie_file = "{node.cookie}"

[api]
listen = "127.0.0.1:{self.api_port}"
token = "{API_TOKEN}"

[[endpoints]]
name = "bench"
url = "http://127.0.0.1:{receiver.port}/hook"
secret = "{SECRET}"
events = {json.dumps(list(events))}
ordered = {"true" if ordered else "false"}
concurrency = 32
{watches_toml}""")
        self.log = open(os.path.join(self.dir, "chainwatch.log"), "w")
        self.proc = subprocess.Popen(
            [CHAINWATCH, "run", "--config", self.config], stdout=self.log, stderr=self.log
        )
        deadline = time.time() + 120
        while not self.healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                sys.exit(f"chainwatch did not become healthy; its log: {self.log.name}")
            time.sleep(0.2)

    def healthy(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/health", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def cli(self, *args):
        return subprocess.run(
            [CHAINWATCH, *args, "--config", self.config], capture_output=True, text=True
        )

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.log.close()

    def cleanup(self):
        self.stop()
        if os.environ.get("CHAINWATCH_BENCH_KEEP"):
            say(f"kept chainwatch's folder and log: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def read_varint(b, i):
    n = b[i]
    if n < 0xFD:
        return n, i + 1
    size = {0xFD: 2, 0xFE: 4, 0xFF: 8}[n]
    return int.from_bytes(b[i + 1:i + 1 + size], "little"), i + 1 + size


def txid_of_raw(raw):
    """The txid (display order) of a serialized transaction, witness stripped."""
    if raw[4] != 0:
        return sha256d(raw)[::-1].hex()
    i = 6
    n_in, i = read_varint(raw, i)
    for _ in range(n_in):
        i += 36
        n, i = read_varint(raw, i)
        i += n + 4
    n_out, i = read_varint(raw, i)
    for _ in range(n_out):
        i += 8
        n, i = read_varint(raw, i)
        i += n
    stripped = raw[:4] + raw[6:i] + raw[-4:]
    return sha256d(stripped)[::-1].hex()


def varint(n):
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    return b"\xfe" + struct.pack("<I", n)
