"""Where cron users feel it: `sync` against the original script's way of working, and big results against OpenSSH.

Every figure is measured in back-to-back pairs on the same machine, the tool and its reference one right
after the other (the order alternating from pair to pair), ``--repeats`` pairs each (default 3); the tables
give the minimum, median and maximum of each side and of the per-pair ratio, the CPU time (user + sys) of
each side's processes, and the CPU steal the machine showed meanwhile (from /proc/stat), so a reader can
judge the noise. The figures:

1. a no-change run with N = 30, 300, 3000 tagged requests, against a reference client that makes the same
   broker calls as the original script: one after the other, a new connection each;
2. the first sync of 100 new small results, against the same reference (export, download, Fernet in
   memory, paramiko's ``putfo``, one request after the other, one SFTP login);
3. one large result (1 MiB … 1 GiB): end-to-end payload MiB/s of `sync` (start-up and connect kept, the
   broker's bundle build left out) over OpenSSH's `sftp -b` putting a file of the same size to the same
   sshd (start-up and connect kept), with the peak RSS of `sync`; each transport that ``--transports`` names.

Both sides of a pair start a new interpreter or program and log in anew. The broker emulator runs in this
process with TCP_NODELAY (as Jetty) and ``--latency`` added to every response; the sshd is a real OpenSSH
on 127.0.0.1. Needs root (the sshd's users). Run it on a quiet machine (no test run meanwhile).

    python benchmarks/bench_runs.py                       # every figure (about 15 minutes)
    python benchmarks/bench_runs.py --counts 30,300 --sizes 1M,64M --first-sync 20 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker_sftp_uploader.crypto import generate_key_file
from test_resources import broker_actors as actors
from test_resources.broker_emulator import BrokerEmulator
from test_resources.sshd import SshdServer

MIB = 1024 * 1024
UNITS = {"K": 1024, "M": MIB, "G": 1024 * MIB}
NODE = actors.NODE1_KEY
API_KEY = actors.ADMIN_KEY

# The targets (issue "Step 7"): speed-ups over the original for the no-change runs (by N) and the first
# sync, ratios to `sftp -b` for 512 MiB (by transport), and the peak RSS of any `sync`.
NO_CHANGE_TARGETS = {300: 7.0, 3000: 13.0}
FIRST_SYNC_TARGET = 6.0
LARGE_TARGETS = {("512M", "paramiko"): 0.45, ("512M", "openssh"): 0.6}
RSS_TARGET_MIB = 100.0

# The original script's way of working, reduced to its calls: a new connection per call, every call
# in turn, each result read whole, Fernet.encrypt in memory, paramiko's putfo.
ORIGINAL = r'''
import sys, time, xml.etree.ElementTree as ET
import requests
url, key, ledger_path, mode = sys.argv[1:5]
NS = "{http://aktin.org/ns/exchange}"
headers = {"Authorization": "Bearer %s" % key}
requests.head(url + "/broker/status", timeout=60).raise_for_status()
listing = requests.get(url + "/broker/request/filtered", headers={**headers, "Accept": "application/xml"},
                       params={"type": "application/vnd.aktin.query.request+xml", "predicate": "//tag='rki'"},
                       timeout=60)
ids = [element.get("id") for element in ET.fromstring(listing.content)]
known = {e.findtext("id"): e.findtext("completion") for e in ET.parse(ledger_path).getroot()} if mode == "ledger" else {}
todo = []
for request_id in ids:
    status = requests.get(f"{url}/broker/request/{request_id}/status",
                          headers={**headers, "Accept": "application/xml"}, timeout=60)
    root = ET.fromstring(status.content)
    nodes, done = len(root.findall(f".//{NS}node")), len(root.findall(f".//{NS}completed"))
    completion = str(round(done / nodes, 2) if nodes else 0.0)
    if known.get(request_id) != completion:
        todo.append(request_id)
if todo:
    import io, paramiko
    from cryptography.fernet import Fernet
    fernet = Fernet(open(sys.argv[5], "rb").read().strip())
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(sys.argv[6], port=int(sys.argv[7]), username=sys.argv[8], password=sys.argv[9],
                   allow_agent=False, look_for_keys=False)
    sftp = client.open_sftp()
    for request_id in todo:
        uuid = requests.post(f"{url}/broker/export/request-bundle/{request_id}",
                             headers={**headers, "Accept": "text/plain"}, timeout=60).text
        data = requests.get(f"{url}/broker/download/{uuid}", headers=headers, timeout=60).content
        sftp.putfo(io.BytesIO(fernet.encrypt(data)), f"{sys.argv[10]}/export_{request_id}.zip")
    client.close()
'''

# Runs the CLI and reports the peak RSS of its own address space (VmHWM): unlike ru_maxrss, which keeps
# what the forking parent had resident, VmHWM starts afresh at exec.
PEAK_PROBE = (
    "import atexit, re, runpy, sys\n"
    "def report():\n"
    "    status = open('/proc/self/status').read()\n"
    "    sys.stderr.write('PEAK_RSS_KIB=%s\\n' % re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
    "atexit.register(report)\n"
    "sys.argv = ['broker-sftp-uploader', *sys.argv[1:]]\n"
    "runpy.run_module('broker_sftp_uploader', run_name='__main__')\n"
)


def parse_size(text: str) -> int:
    """Bytes in ``text`` (``64M``, ``1G``, ``4096``)."""
    return int(text[:-1]) * UNITS[text[-1].upper()] if text[-1].upper() in UNITS else int(text)


# ---- one run, its CPU time and the machine's steal --------------------------------------------------------

@dataclass
class Sample:
    """One run: wall seconds, CPU seconds (user + sys of the process and the children it waited for),
    and the peak RSS in MiB when the run reported it."""

    seconds: float
    cpu: float
    rss: float | None = None


def run_child(command: list[str], cwd: Path) -> Sample:
    """Run ``command`` to completion; it must exit 0.

    The CPU time is what this process's waited-for children used meanwhile: the child and every process it
    waited for (the `ssh` children of `sync` and `sftp`). A line ``PEAK_RSS_KIB=n`` on its stderr (from
    ``PEAK_PROBE``) gives the peak RSS.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    child = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {child.returncode}: {child.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = child.stderr.strip().splitlines()
    rss = int(lines[-1].split("=")[1]) / 1024 if lines and lines[-1].startswith("PEAK_RSS_KIB=") else None
    return Sample(seconds, cpu, rss)


def cpu_counters() -> list[int]:
    """The machine's CPU time counters (jiffies: user, nice, system, idle, iowait, irq, softirq, steal …)."""
    with open("/proc/stat") as handle:
        return [int(value) for value in handle.readline().split()[1:]]


def steal_percent(before: list[int], after: list[int]) -> float:
    """The share of the machine's CPU time that the hypervisor gave to others between two readings."""
    spent = [late - early for early, late in zip(before, after)]
    return 100.0 * spent[7] / max(1, sum(spent))


@dataclass
class Pair:
    """One back-to-back pair: the tool's run, the reference's, and the steal during both."""

    tool: Sample
    reference: Sample
    steal: float


def measure_pairs(repeats: int, tool: Callable[[], Sample], reference: Callable[[], Sample]) -> list[Pair]:
    """``repeats`` pairs, the tool first in the even pairs and the reference first in the odd ones."""
    pairs = []
    for number in range(repeats):
        before = cpu_counters()
        if number % 2 == 0:
            tool_sample = tool()
            reference_sample = reference()
        else:
            reference_sample = reference()
            tool_sample = tool()
        pairs.append(Pair(tool_sample, reference_sample, steal_percent(before, cpu_counters())))
    return pairs


# ---- the scenarios -------------------------------------------------------------------------------------

class Site:
    """A working dir, key and config for `sync`, pointing at the emulator and a fresh remote folder."""

    def __init__(self, root: Path, broker: BrokerEmulator, sshd: SshdServer, label: str, extra: str = ""):
        self.root = root / label
        (self.root / "state").mkdir(parents=True)
        self.key = self.root / "rki.key"
        generate_key_file(self.key)
        self.folder = f"bench-{label}"
        self.remote = sshd.folder(self.folder)
        (self.root / "state" / "known_hosts").write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")
        self.config = self.root / "settings.toml"
        self.config.write_text(f"""\
[BROKER]
URL = "{broker.url}"
API_KEY = "{API_KEY}"
[REQUESTS]
TAG = "rki"
[SFTP]
HOST = "{sshd.host}"
PORT = {sshd.port}
USERNAME = "{sshd.password_user}"
PASSWORD = "{sshd.password}"
TIMEOUT = 60
FOLDERNAME = "{self.folder}"
{extra}
[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"
[MISC]
WORKING_DIR = "state"
""")
        self.config.chmod(0o600)
        self.ledger = self.root / "state" / "status.xml"

    def sync_command(self, prefix: tuple[str, ...] = ()) -> list[str]:
        """`sync` on this site, through ``PEAK_PROBE`` (``prefix``: a profiler to run it under)."""
        return [*prefix, sys.executable, "-c", PEAK_PROBE, "sync", "-c", str(self.config)]

    def run_sync(self, prefix: tuple[str, ...] = ()) -> Sample:
        return run_child(self.sync_command(prefix), self.root)

    def original_command(self, broker: BrokerEmulator, sshd: SshdServer, mode: str) -> list[str]:
        return [sys.executable, "-c", ORIGINAL, broker.url, API_KEY, str(self.ledger), mode,
                str(self.key), sshd.host, str(sshd.port), sshd.password_user, sshd.password, self.folder]

    def write_ledger(self, completions: dict[str, str]) -> None:
        """A ledger (and its upload digest) saying every request was sent with ``completions``."""
        entries = "".join(f"<request-status><id>{request_id}</id><completion>{completion}</completion>"
                          "<uploaded>2026-01-01 00:00:00</uploaded></request-status>"
                          for request_id, completion in completions.items())
        data = f"<?xml version='1.0' encoding='UTF-8'?>\n<status version=\"1\">{entries}</status>\n".encode()
        self.ledger.write_bytes(data)
        (self.root / "state" / "status.xml.uploaded-sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")

    def clear_remote(self) -> None:
        shutil.rmtree(self.remote, ignore_errors=True)


@dataclass
class Figure:
    """A measured figure: its pairs, how to read them (a speed-up in seconds, or a rate ratio), its target."""

    work: str
    pairs: list[Pair]
    target: float | None
    payload: int = 0  # bytes moved per run, for the rate figures
    tool_seconds: list[float] = field(default_factory=list)  # the tool's seconds that count (export left out)

    def ratios(self) -> list[float]:
        """Per pair: the reference's seconds over the tool's (a speed-up, or the tool's rate over the
        reference's)."""
        return [pair.reference.seconds / tool for pair, tool in zip(self.pairs, self.tool_seconds)]


def no_change(count: int, scratch: Path, sshd: SshdServer, latency: float, repeats: int) -> Figure:
    """A run that finds every one of ``count`` requests unchanged, against the original making its calls."""
    with BrokerEmulator(data_dir=scratch / f"broker-nc-{count}") as broker:
        ids = [str(actors.create_request(broker.url, "rki")) for _ in range(count)]
        for _ in range(max(1, count // 10)):  # some untagged requests, as on a real broker
            actors.create_request(broker.url, "default")
        site = Site(scratch, broker, sshd, f"nochange-{count}")
        site.write_ledger({request_id: "0.0" for request_id in ids})
        broker.latency = latency
        pairs = measure_pairs(repeats, site.run_sync,
                              lambda: run_child(site.original_command(broker, sshd, "ledger"), site.root))
        assert not any(site.remote.iterdir()), "a no-change run uploaded something"
    return Figure(f"no-change run, N = {count}", pairs, NO_CHANGE_TARGETS.get(count),
                  tool_seconds=[pair.tool.seconds for pair in pairs])


def add_small_results(broker: BrokerEmulator, count: int) -> None:
    """Add ``count`` completed requests tagged rki to ``broker``, each with a 2 KiB result."""
    for _ in range(count):
        request_id = actors.create_request(broker.url, "rki")
        actors.put_result(broker.url, NODE, request_id, os.urandom(2048), content_type="application/octet-stream")
        actors.post_status(broker.url, NODE, request_id, "completed")


def first_sync(count: int, scratch: Path, sshd: SshdServer, latency: float, repeats: int) -> Figure:
    """The first run over ``count`` new small results (a new site and remote folder each time), against the
    original exporting, encrypting and uploading them one by one."""
    sites = iter(range(2 * repeats))

    def ours() -> Sample:
        site = Site(scratch, broker, sshd, f"first-ours-{next(sites)}")
        sample = site.run_sync()
        assert len(list(site.remote.glob("export_*.zip"))) == count
        site.clear_remote()
        return sample

    def original() -> Sample:
        site = Site(scratch, broker, sshd, f"first-original-{next(sites)}")
        sample = run_child(site.original_command(broker, sshd, "fresh"), site.root)
        assert len(list(site.remote.glob("export_*.zip"))) == count
        site.clear_remote()
        return sample

    with BrokerEmulator(data_dir=scratch / "broker-first") as broker:
        add_small_results(broker, count)
        broker.latency = latency
        pairs = measure_pairs(repeats, ours, original)
    return Figure(f"first sync of {count} new small results", pairs, FIRST_SYNC_TARGET if count == 100 else None,
                  tool_seconds=[pair.tool.seconds for pair in pairs])


def make_result(path: Path, size: int) -> None:
    """A file of ``size`` random bytes (incompressible, like an encrypted or zipped result)."""
    block = os.urandom(MIB)
    with open(path, "wb") as handle:
        handle.writelines(block[: min(MIB, size - offset)] for offset in range(0, size, MIB))


def sftp_put(sshd: SshdServer, source: Path, folder: str, work: Path) -> Sample:
    """OpenSSH's ``sftp -b`` putting ``source`` into ``folder`` (key login; start-up and connect kept)."""
    batch = work / "batch"
    batch.write_text(f"put {source} {folder}/openssh-reference.bin\n")
    known = work / "known_hosts_reference"
    known.write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")
    command = ["sftp", "-q", "-b", str(batch), "-P", str(sshd.port), "-i", str(sshd.client_key_path),
               "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
               "-o", "BatchMode=yes", f"{sshd.key_user}@{sshd.host}"]
    return run_child(command, work)


class LargeResult:
    """One request with a large result on a started emulator; ``sync`` sends it to a new folder each time."""

    def __init__(self, size_text: str, scratch: Path, sshd: SshdServer, transport: str):
        self.size_text, self.sshd, self.transport = size_text, sshd, transport
        self.work = scratch / f"large-{size_text}-{transport}"
        self.work.mkdir()
        result = self.work / "result.bin"
        make_result(result, parse_size(size_text))
        self.broker = BrokerEmulator(data_dir=self.work / "broker").start()
        self.request_id = actors.create_request(self.broker.url, "rki")
        actors.put_result(self.broker.url, NODE, self.request_id, result, content_type="application/octet-stream")
        actors.post_status(self.broker.url, NODE, self.request_id, "completed")
        result.unlink()
        self.runs = 0
        self.payload = 0
        self.token = self.work / "token.bin"
        self.counted: list[float] = []  # the seconds of each sync less the bundle build

    def run_sync(self, prefix: tuple[str, ...] = ()) -> Sample:
        """`sync` on a new site; the emulator's bundle build is not counted in ``counted``."""
        self.runs += 1
        extra = "" if self.transport == "paramiko" else f'TRANSPORT = "{self.transport}"'
        site = Site(self.work, self.broker, self.sshd, f"site-{self.runs}", extra)
        self.broker.export_seconds.clear()
        sample = site.run_sync(prefix)
        self.counted.append(sample.seconds - sum(self.broker.export_seconds))
        uploaded = site.remote / f"export_{self.request_id}.zip"
        self.payload = uploaded.stat().st_size
        if not self.token.exists():  # the reference sends as many bytes
            shutil.move(uploaded, self.token)
        site.clear_remote()
        return sample

    def run_reference(self) -> Sample:
        if not self.token.exists():  # the first pair begins with sync, which leaves the token
            raise RuntimeError("the reference needs the size of a token: run sync first")
        folder = f"bench-reference-{self.size_text}-{self.transport}"
        remote = self.sshd.folder(folder)
        sample = sftp_put(self.sshd, self.token, folder, self.work)
        shutil.rmtree(remote, ignore_errors=True)
        return sample

    def close(self) -> None:
        self.broker.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def large(size_text: str, scratch: Path, sshd: SshdServer, transport: str, repeats: int) -> Figure:
    """One large result's `sync` against `sftp -b` of the same size, ``repeats`` pairs."""
    scenario = LargeResult(size_text, scratch, sshd, transport)
    try:
        pairs = measure_pairs(repeats, scenario.run_sync, scenario.run_reference)
    finally:
        scenario.close()
    return Figure(f"{size_text} {transport}", pairs, LARGE_TARGETS.get((size_text, transport)),
                  payload=scenario.payload, tool_seconds=scenario.counted)


# ---- the report ----------------------------------------------------------------------------------------

def spread(values: list[float], digits: int = 2) -> str:
    """``min / median / max`` of ``values``."""
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{low:.{digits}f} / {middle:.{digits}f} / {high:.{digits}f}"


def verdict(figure: Figure) -> str:
    """Whether the median per-pair ratio reaches the target (with the target)."""
    if figure.target is None:
        return "–"
    met = statistics.median(figure.ratios()) >= figure.target
    unit = "x" if figure.payload == 0 else ""
    return f"≥ {figure.target:g}{unit}: {'met' if met else 'NOT met'}"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def print_report(args: argparse.Namespace, speedups: list[Figure], rates: list[Figure], steal: float,
                 minutes: float) -> None:
    print(f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}; broker latency "
          f"{args.latency * 1000:.0f} ms per response; {args.repeats} back-to-back pair(s) per figure; "
          f"CPU steal over the whole run {steal:.0f} %, {minutes:.1f} min")
    print("min / median / max of each; CPU: user + sys seconds of the side's processes (median)")
    if speedups:
        print()
        print("| work | original s | ours s | speed-up per pair | target | CPU original / ours s | "
              "peak RSS MiB | steal % |")
        print("|---|---:|---:|---:|---|---:|---:|---:|")
        for figure in speedups:
            pairs = figure.pairs
            print(f"| {figure.work} | {spread([p.reference.seconds for p in pairs])} | "
                  f"{spread(figure.tool_seconds)} | {spread(figure.ratios(), 1)} | {verdict(figure)} | "
                  f"{statistics.median(p.reference.cpu for p in pairs):.2f} / "
                  f"{statistics.median(p.tool.cpu for p in pairs):.2f} | "
                  f"{max(p.tool.rss or 0 for p in pairs):.0f} | {spread([p.steal for p in pairs], 0)} |")
    if rates:
        print()
        print("| result, transport | ours MiB/s | sftp -b MiB/s | ratio per pair | target | "
              "CPU sftp / ours s | peak RSS MiB | steal % |")
        print("|---|---:|---:|---:|---|---:|---:|---:|")
        for figure in rates:
            pairs, mebibytes = figure.pairs, figure.payload / MIB
            print(f"| {figure.work} | {spread([mebibytes / s for s in figure.tool_seconds], 0)} | "
                  f"{spread([mebibytes / p.reference.seconds for p in pairs], 0)} | {spread(figure.ratios())} | "
                  f"{verdict(figure)} | {statistics.median(p.reference.cpu for p in pairs):.2f} / "
                  f"{statistics.median(p.tool.cpu for p in pairs):.2f} | "
                  f"{max(p.tool.rss or 0 for p in pairs):.0f} | {spread([p.steal for p in pairs], 0)} |")
    peaks = [p.tool.rss for figure in speedups + rates for p in figure.pairs if p.tool.rss is not None]
    if peaks:
        print()
        print(f"peak RSS of any sync: {max(peaks):.0f} MiB (target ≤ {RSS_TARGET_MIB:.0f}: "
              f"{'met' if max(peaks) <= RSS_TARGET_MIB else 'NOT met'})")


def as_installed() -> None:
    """Run both sides as an installed tool runs: from bytecode. ``pip install`` compiles a package's
    modules, and Python writes the bytecode of what it imports; an environment with
    PYTHONDONTWRITEBYTECODE set (some containers' images) and this checkout's package, installed
    editable, would make every run compile the tool's modules from source again (about 80 ms of each
    start on the development VM)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "broker_sftp_uploader")], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="30,300,3000", help="N for the no-change runs")
    parser.add_argument("--first-sync", type=int, default=100, help="new small results in the first sync")
    parser.add_argument("--sizes", default="1M,64M,512M,1G", help="large result sizes (K, M, G)")
    parser.add_argument("--transports", default="paramiko,openssh", help="SFTP.TRANSPORT values to measure")
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added to every broker response")
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back pairs per figure")
    args = parser.parse_args()
    as_installed()
    scratch = Path(tempfile.mkdtemp(prefix="bsu-bench-", dir="/var/tmp"))
    scratch.chmod(0o755)
    speedups, rates = [], []
    started, counters = time.monotonic(), cpu_counters()
    try:
        with SshdServer(scratch / "sshd") as sshd:
            for count in filter(None, args.counts.split(",")):
                speedups.append(no_change(int(count), scratch, sshd, args.latency, args.repeats))
            if args.first_sync:
                speedups.append(first_sync(args.first_sync, scratch, sshd, args.latency, args.repeats))
            for size_text in filter(None, args.sizes.split(",")):
                for transport in filter(None, args.transports.split(",")):
                    rates.append(large(size_text, scratch, sshd, transport, args.repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_report(args, speedups, rates, steal_percent(counters, cpu_counters()), (time.monotonic() - started) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
