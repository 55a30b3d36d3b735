#!/usr/bin/env python3
"""Shared-folder benchmark: stratad's virtio-fs share vs virtiofsd 1.14, side by side.

Each round boots the fs test guest (TCG) once per back-end and workload, alternating
A B A B, and reports the medians:
  - meta: create, stat, chmod, unlink of N files in one directory (ops/s per phase, guest);
  - fio-randrw: 4k random read/write on a file in the share (IOPS, guest).
Server CPU per operation is the back-end process's user+system CPU time (wait4 rusage) over
its whole life — one fresh process per run, started right before the guest boots — divided
by the operations of the run; boot and mount requests are included (a few hundred).

Both back-ends store on the same host filesystem: virtiofsd serves a directory, stratad a
datastore file next to it (created with `stratactl mkfs` before the timed process starts).

Usage: tools/fs-bench.py [--rounds 2] [--files 10000] [--fio-runtime 20] [--json OUT]
Needs: the release build (stratad, stratactl, fs-guest), tools/install-virtiofsd.sh.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")


def virtiofsd_binary():
    out = subprocess.run(["bash", os.path.join(ROOT, "tools", "install-virtiofsd.sh")],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def wait_socket(path, proc, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path):
            return
        if os.wait4(proc.pid, os.WNOHANG)[0] == proc.pid:
            raise RuntimeError("back-end exited early")
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not appear")


def run_guest(sock, tag, workload, pid, args):
    cmd = [os.path.join(REL, "fs-guest"), "--socket", sock, "--tag", tag, "--run", workload,
           "--watch-pid", str(pid), "--json", "--meta-files", str(args.files),
           "--fio-runtime", str(args.fio_runtime)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise RuntimeError(f"fs-guest {workload} failed ({r.returncode})")
    return json.loads(r.stdout)


def reap(proc, grace_s):
    """Waits up to grace_s for the child to exit by itself, then sends SIGTERM; returns its
    CPU seconds (user + system) from wait4 (so it must not have been reaped before)."""
    t0 = time.time()
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.time() - t0 > grace_s:
            proc.send_signal(signal.SIGTERM)
            _, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


def one_run(system, workload, args, vfsd):
    work = tempfile.mkdtemp(prefix=f"fsbench-{system}-", dir=args.dir)
    sock = os.path.join(work, "fs.sock")
    try:
        if system == "stratad":
            ds = os.path.join(work, "ds.vmfs")
            subprocess.run([os.path.join(REL, "stratactl"), "mkfs", ds, "--size", "64G"],
                           check=True, capture_output=True)
            proc = subprocess.Popen([os.path.join(REL, "stratad"), "--datastore", ds,
                                     "--share", f"socket={sock},dir=bench,tag=fs",
                                     "--cpus", args.server_cpu],
                                    stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        else:
            shared = os.path.join(work, "dir")
            os.mkdir(shared)
            proc = subprocess.Popen(["taskset", "-c", args.server_cpu, vfsd,
                                     f"--socket-path={sock}", f"--shared-dir={shared}",
                                     "--cache=auto", "--posix-acl", "--sandbox=none"],
                                    stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_socket(sock, proc)
        report = run_guest(sock, "fs", workload, proc.pid, args)
        # virtiofsd exits by itself when QEMU disconnects; stratad keeps serving.
        cpu_s = reap(proc, 0.0 if system == "stratad" else 2.0)
        return report, cpu_s
    finally:
        shutil.rmtree(work, ignore_errors=True)


def figures(workload, report, cpu_s, args):
    """Flattens a report into {metric: value}; adds server CPU µs per operation."""
    out = {}
    if workload == "meta":
        ops = 0
        for m in report["meta"]:
            out[f"{m['phase']}_ops_s"] = m["ops_per_sec"]
            ops += m["files"]
        out["cpu_us_per_op"] = cpu_s * 1e6 / ops
    else:
        f = report["fio"]
        out["read_iops"] = f["read_iops"]
        out["write_iops"] = f["write_iops"]
        ios = (f["read_iops"] + f["write_iops"]) * args.fio_runtime
        out["cpu_us_per_op"] = cpu_s * 1e6 / ios
    out["server_cpu_s"] = cpu_s
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--fio-runtime", type=int, default=20)
    ap.add_argument("--workloads", default="meta,fio-randrw")
    ap.add_argument("--server-cpu", default="1", help="CPU the back-end runs on")
    ap.add_argument("--dir", default="/var/tmp", help="where datastores and shared dirs live")
    ap.add_argument("--json", help="write all runs and medians here")
    args = ap.parse_args()
    vfsd = virtiofsd_binary()
    runs = []
    for rnd in range(args.rounds):
        for workload in args.workloads.split(","):
            for system in ("stratad", "virtiofsd"):
                report, cpu_s = one_run(system, workload, args, vfsd)
                fig = figures(workload, report, cpu_s, args)
                runs.append({"round": rnd, "system": system, "workload": workload, **fig})
                print(f"round {rnd} {workload:10} {system:9} "
                      + " ".join(f"{k}={v:.2f}" for k, v in fig.items()), flush=True)
    medians = {}
    for workload in args.workloads.split(","):
        for system in ("stratad", "virtiofsd"):
            rs = [r for r in runs if r["system"] == system and r["workload"] == workload]
            keys = [k for k in rs[0] if k not in ("round", "system", "workload")]
            medians[f"{workload}/{system}"] = {k: statistics.median(r[k] for r in rs) for k in keys}
    print("\nmedians:")
    for name, fig in medians.items():
        print(f"  {name:22} " + " ".join(f"{k}={v:.2f}" for k, v in fig.items()))
    for workload in args.workloads.split(","):
        s, v = medians[f"{workload}/stratad"], medians[f"{workload}/virtiofsd"]
        ratios = {k: s[k] / v[k] for k in s if v[k] and k != "server_cpu_s"}
        print(f"  {workload:22} stratad/virtiofsd " +
              " ".join(f"{k}={r:.2f}" for k, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()
