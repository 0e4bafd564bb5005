"""Where the time of one `sync` goes: a first sync of small results, or one large result, under py-spy.

Sets up what ``bench_runs.py`` measures (the emulator with ``--latency`` per response in this process, a real
sshd), runs `sync` once under ``py-spy record`` and sums its samples two ways:

* wall time per phase of the main thread (``--idle``: waits count), and per kind of thread;
* time on the CPU per kind of work, over all threads (py-spy without ``--idle``; with ``--gil``, only the
  thread holding the GIL is sampled, which shows how much of the work is serialised on it).

A sample is put in the kind of work of its innermost frame that one of ``KINDS`` names, so a socket read
under urllib3 counts as broker HTTP and one under paramiko's packetizer as SSH framing. Also prints what
``perf stat`` counts for the same run, if perf works here. Needs root and py-spy (``pip install py-spy``).

    python benchmarks/profile_runs.py first-sync --count 100
    python benchmarks/profile_runs.py large --size 512M --transport paramiko
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_runs import LargeResult, Sample, Site, add_small_results, as_installed, run_child  # noqa: E402
from test_resources.broker_emulator import BrokerEmulator  # noqa: E402
from test_resources.sshd import SshdServer  # noqa: E402

RATE = 250  # samples per second

# Innermost frame's file (or function) -> kind of work; looked up from the leaf towards the root.
KINDS = (
    ("_find_and_load", "start-up: imports"),
    ("base64", "Fernet: base64"),
    ("broker_sftp_uploader/crypto.py", "Fernet: AES-CBC + HMAC"),
    ("cryptography/", "Fernet: AES-CBC + HMAC"),
    ("paramiko/packet.py", "SSH packets: cipher, MAC, socket"),
    ("paramiko/kex", "SSH login: key exchange"),
    ("paramiko/auth", "SSH login: authentication"),
    ("paramiko/sftp", "SFTP framing (paramiko)"),
    ("paramiko/channel.py", "SSH channel (paramiko)"),
    ("paramiko/transport.py", "SSH transport thread (paramiko)"),
    ("paramiko/", "paramiko, other"),
    ("sftp/session.py", "SFTP uploads (ours)"),
    ("paramiko_internals.py", "SFTP uploads (ours)"),
    ("engine/prefetch.py", "prefetch hand-over"),
    ("state/ledger.py", "ledger saves"),
    ("state/atomic.py", "ledger saves"),
    ("state/journal.py", "journal of partial files"),
    ("documents.py", "broker: XML"),
    ("xml/", "broker: XML"),
    ("urllib3/", "broker: HTTP (requests, urllib3)"),
    ("requests/", "broker: HTTP (requests, urllib3)"),
    ("http/client.py", "broker: HTTP (requests, urllib3)"),
    ("broker/", "broker: HTTP (requests, urllib3)"),
    ("subprocess.py", "ssh children (start, pipes)"),
    ("concurrency.py", "thread pools and hand-overs"),
    ("concurrent/futures", "thread pools and hand-overs"),
    ("threading.py", "thread pools and hand-overs"),
    ("logging/", "logging"),
    ("click/", "CLI (click)"),
    ("config.py", "config"),
)
# Where the main thread is, by the outermost of our functions on its stack (first match from the root).
PHASES = (
    ("_find_and_load", "start-up: imports"),
    ("_load (broker_sftp_uploader/commands/sync.py", "load key, ledger, journal"),
    ("list_requests", "listing (HEAD status, filtered)"),
    ("fetch_completions", "status calls"),
    ("remove_leftover_parts", "partial-file cleanup"),
    ("SftpLogin.connection", "waiting for the SFTP login"),
    ("Applier._connect", "waiting for the SFTP login"),
    ("Applier._record", "recording: ledger saves"),
    ("Workers.batches", "waiting for uploads"),
    ("_upload_ledger_copy", "ledger copy upload"),
    ("SftpLogin.close", "closing the connection"),
    ("_leave_reports", "last-run.json"),
    ("Workers.__exit__", "waiting for uploads"),
)


def kind_of(frames: list[str], rules: tuple[tuple[str, str], ...], leaf_first: bool) -> str:
    """The kind named by the first frame (from the leaf or the root) that a rule matches."""
    for frame in (reversed(frames) if leaf_first else frames):
        for needle, kind in rules:
            if needle in frame:
                return kind
    return "other"


# Threads by what they run (py-spy may show a thread under the name of an earlier one with its id).
THREADS = (("Applier._attempt", "upload workers"), ("get_completion", "status calls"),
           ("Prefetcher._produce", "prefetch"), ("SftpLogin._log_in", "SFTP login"),
           ("Transport.run", "paramiko transport"), ("_Watchdog", "deadline watchdog"))


def thread_kind(name: str, frames: list[str]) -> str:
    """What a thread does: the main thread by its name, the others by a function on their stack."""
    if name == "MainThread":
        return name
    return next((kind for needle, kind in THREADS if any(needle in frame for frame in frames)), "other threads")


def summarise(raw: Path, title: str, by_phase: bool) -> None:
    """Print seconds per kind of work (and per main-thread phase, per thread kind) from py-spy's raw output."""
    kinds: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        head, *frames = stack.split(";")
        count = int(count_text)
        name = head.split(": ", 1)[1] if ": " in head else "unnamed"
        kinds[kind_of(frames, KINDS, leaf_first=True)] += count
        threads[thread_kind(name, frames)] += count
        if name == "MainThread":
            phases[kind_of(frames, PHASES, leaf_first=False)] += count
    print(f"\n{title} (seconds; {sum(kinds.values()) / RATE:.2f} in all)")
    for kind, count in kinds.most_common():
        print(f"  {count / RATE:7.2f}  {kind}")
    print("  by thread: " + ", ".join(f"{name} {count / RATE:.2f}" for name, count in threads.most_common()))
    if by_phase:
        print("  main thread by phase:")
        for phase, count in phases.most_common():
            print(f"  {count / RATE:7.2f}  {phase}")


def profile(run: Callable[[tuple[str, ...]], Sample], work: Path, label: str) -> None:
    """Run `sync` plainly, under py-spy (wall, CPU, GIL) and under perf stat; print what each found."""
    plain: Sample = run(())
    print(f"{label}: {plain.seconds:.2f} s, CPU {plain.cpu:.2f} s, peak RSS {plain.rss:.0f} MiB")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    for mode, options, by_phase in (("wall time (waits included)", ("--idle",), True),
                                    ("CPU time", (), False), ("holding the GIL", ("--gil",), False)):
        raw = work / f"spy-{options[0].strip('-') if options else 'cpu'}.txt"
        sample = run((spy, "record", "--threads", "--nonblocking", "--format", "raw", "--rate", str(RATE),
                      "-o", str(raw), *options, "--"))
        summarise(raw, f"{mode}, a run of {sample.seconds:.2f} s", by_phase)
    perf = shutil.which("perf")
    if perf:
        output = work / "perf.txt"
        run((perf, "stat", "-e", "task-clock,context-switches,cpu-migrations", "-o", str(output), "--"))
        print("\nperf stat:\n" + "".join(line for line in output.read_text().splitlines(keepends=True)
                                          if line.strip() and not line.startswith("#")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=("first-sync", "large"))
    parser.add_argument("--count", type=int, default=100, help="small results in the first sync")
    parser.add_argument("--size", default="512M", help="the large result's size (K, M, G)")
    parser.add_argument("--transport", default="paramiko", help="SFTP.TRANSPORT for the large result")
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added to every broker response")
    parser.add_argument("--output", type=Path, default=Path("/var/tmp/bsu-profile"),
                        help="folder that keeps py-spy's raw stacks and perf's counts")
    args = parser.parse_args()
    as_installed()
    scratch = Path(tempfile.mkdtemp(prefix="bsu-profile-", dir="/var/tmp"))
    scratch.chmod(0o755)
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        with SshdServer(scratch / "sshd") as sshd:
            if args.scenario == "first-sync":
                with BrokerEmulator(data_dir=scratch / "broker") as broker:
                    add_small_results(broker, args.count)
                    broker.latency = args.latency
                    runs = iter(range(100))

                    def first(prefix: tuple[str, ...]) -> Sample:
                        site = Site(scratch, broker, sshd, f"first-{next(runs)}")
                        sample = run_child(site.sync_command(prefix), site.root)
                        site.clear_remote()
                        return sample

                    profile(first, args.output, f"first sync of {args.count} small results")
            else:
                scenario = LargeResult(args.size, scratch, sshd, args.transport)
                scenario.broker.latency = args.latency
                try:
                    profile(scenario.run_sync, args.output, f"{args.size} over {args.transport} (bundle build "
                            "included in the seconds; py-spy counts only the sync process)")
                    print("seconds less the bundle build, per run:",
                          ", ".join(f"{seconds:.2f}" for seconds in scenario.counted))
                finally:
                    scenario.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
