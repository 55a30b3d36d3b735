//! `fs-guest`: boots Strata's fs test guest (QEMU TCG) on a vhost-user-fs back-end, mounts the
//! share (`mount -t virtiofs TAG /mnt/TAG`) and runs workloads in it: pjdfstest, a metadata
//! benchmark (create/stat/chmod/unlink of N files), a 4 KiB random read/write fio job on a file
//! in the share, or a script; prints the parsed results (or JSON).
//!
//! The back-end is either an external socket (`--socket`, e.g. stratad's) or a fresh
//! virtiofsd 1.14 this tool starts on a directory (`--virtiofsd DIR`: the baseline).
//!
//! Exit status: 0 when the share mounted, every workload exited 0 and pjdfstest reported no
//! failure; 1 otherwise; 2 when the guest could not be run (QEMU, time-out, back-end died).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use test_guest::{
    fs_script, virtiofsd_binary, FsDevice, FsReport, FsWorkload, ScratchDir, Virtiofsd, VmConfig,
};

/// Boot the fs test guest on a vhost-user-fs socket and run pjdfstest / benchmarks in the share.
#[derive(Debug, Parser)]
#[command(name = "fs-guest")]
struct Args {
    /// The back-end's vhost-user-fs socket (e.g. stratad's).
    #[arg(
        long,
        conflicts_with = "virtiofsd",
        required_unless_present = "virtiofsd"
    )]
    socket: Option<PathBuf>,
    /// Instead of --socket: start a fresh virtiofsd 1.14 on this directory
    /// (`--cache=MODE --posix-acl`; binary from $STRATA_VIRTIOFSD or tools/install-virtiofsd.sh).
    #[arg(long, value_name = "DIR")]
    virtiofsd: Option<PathBuf>,
    /// virtiofsd's --cache mode (never, metadata, auto, always).
    #[arg(long, default_value = "auto")]
    virtiofsd_cache: String,
    /// Extra virtiofsd argument (repeatable), e.g. --virtiofsd-arg=--thread-pool-size=4.
    #[arg(long, allow_hyphen_values = true)]
    virtiofsd_arg: Vec<String>,
    /// The mount tag (the back-end's tag; QEMU's `tag=`).
    #[arg(long, default_value = "fs")]
    tag: String,
    /// `queue-size` of the vhost-user-fs-pci device.
    #[arg(long, default_value_t = test_guest::vm::DEFAULT_FS_QUEUE_SIZE)]
    queue_size: u16,
    /// More vhost-user-fs devices, attached but not mounted: `SOCKET,tag=TAG` (repeatable).
    #[arg(long = "extra-fs", value_name = "SOCKET,tag=TAG")]
    extra_fs: Vec<String>,
    /// Workloads in order (repeatable or comma-separated): pjdfstest, meta, fio-randrw, script.
    #[arg(long, value_delimiter = ',', default_value = "pjdfstest")]
    run: Vec<String>,
    /// The script of `--run script` (busybox sh; runs in a fresh directory of the share with
    /// $MNT and $DIR set). Giving --script alone implies `--run script`.
    #[arg(long)]
    script: Option<PathBuf>,
    /// Only the pjdfstest tests whose names contain PAT (repeatable).
    #[arg(long, value_name = "PAT")]
    pjdfstest_filter: Vec<String>,
    /// Files of the metadata benchmark.
    #[arg(long, default_value_t = test_guest::fs::DEFAULT_META_FILES)]
    meta_files: u32,
    /// Drop the guest's caches before each metadata phase.
    #[arg(long)]
    meta_drop_caches: bool,
    /// fio file size.
    #[arg(long, default_value = "128M")]
    fio_size: String,
    /// fio runtime in seconds.
    #[arg(long, default_value_t = 20)]
    fio_runtime: u32,
    /// fio iodepth.
    #[arg(long, default_value_t = 16)]
    fio_iodepth: u32,
    /// Extra `mount` arguments, e.g. "-o dax".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    mount_opts: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = test_guest::vm::DEFAULT_MEMORY_MIB)]
    memory_mib: u32,
    /// Hard time-out in seconds: QEMU is killed after it.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Abort the run at once if this process (the back-end) exits.
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Also print the guest script's full output (stderr when --json).
    #[arg(long)]
    output: bool,
    /// Also print the guest's serial console (stderr).
    #[arg(long)]
    console: bool,
    /// Print the guest script and exit.
    #[arg(long)]
    print_script: bool,
}

/// How long QEMU may keep running after the back-end exited before the run is aborted.
const BACKEND_EXIT_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fs-guest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn workloads(args: &Args) -> anyhow::Result<Vec<FsWorkload>> {
    let mut names: Vec<&str> = args.run.iter().map(|s| s.trim()).collect();
    if args.script.is_some() && !names.contains(&"script") {
        // --script alone (run's default is pjdfstest): only the script.
        if args.run == ["pjdfstest"] {
            names.clear();
        }
        names.push("script");
    }
    let mut out = Vec::new();
    for name in names {
        out.push(match name {
            "pjdfstest" => FsWorkload::Pjdfstest {
                patterns: args.pjdfstest_filter.clone(),
            },
            "meta" => FsWorkload::Meta {
                files: args.meta_files,
                drop_caches: args.meta_drop_caches,
            },
            "fio-randrw" | "fio" => FsWorkload::FioRandrw {
                size: args.fio_size.clone(),
                runtime_secs: args.fio_runtime,
                iodepth: args.fio_iodepth,
            },
            "script" => {
                let path = args
                    .script
                    .as_ref()
                    .context("--run script needs --script FILE")?;
                let body = std::fs::read_to_string(path)
                    .with_context(|| format!("read {}", path.display()))?;
                FsWorkload::Script {
                    name: "script".to_string(),
                    body,
                }
            }
            other => bail!("unknown workload {other:?} (pjdfstest, meta, fio-randrw, script)"),
        });
    }
    if out.is_empty() {
        bail!("no workload (--run)");
    }
    Ok(out)
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let workloads = workloads(args)?;
    let script = fs_script(&args.tag, &args.mount_opts, &workloads);
    if args.print_script {
        print!("{script}");
        return Ok(ExitCode::SUCCESS);
    }

    let scratch = ScratchDir::new("fs-guest")?;
    let mut daemon = None;
    let socket = match (&args.socket, &args.virtiofsd) {
        (Some(socket), _) => socket.clone(),
        (None, Some(dir)) => {
            let bin = virtiofsd_binary()?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("--virtiofsd {}", dir.display()))?;
            let socket = scratch.join("virtiofsd.sock");
            let d = Virtiofsd::start(
                &bin,
                &socket,
                &dir,
                &args.virtiofsd_cache,
                &args.virtiofsd_arg,
                &scratch.join("virtiofsd.log"),
            )?;
            eprintln!(
                "fs-guest: started {} (pid {}) on {} (--cache={} --posix-acl)",
                bin.display(),
                d.pid(),
                dir.display(),
                args.virtiofsd_cache
            );
            daemon = Some(d);
            socket
        }
        (None, None) => bail!("give --socket or --virtiofsd"),
    };

    let mut dev = FsDevice::new(&socket, &args.tag);
    dev.queue_size = Some(args.queue_size);
    let mut cfg = VmConfig::new()
        .cpus(args.cpus)
        .memory_mib(args.memory_mib)
        .timeout(Duration::from_secs(args.timeout));
    cfg.fs.push(dev);
    for spec in &args.extra_fs {
        cfg.fs.push(parse_fs(spec, args.queue_size)?);
    }
    let names: Vec<&str> = workloads.iter().map(|w| w.name()).collect();
    eprintln!(
        "fs-guest: booting the fs guest ({} vCPU, {} MiB) under QEMU TCG on {} (tag {}), running {}",
        cfg.cpus,
        cfg.memory_mib,
        socket.display(),
        args.tag,
        names.join(", ")
    );
    let watch_pid = args.watch_pid;
    let daemon_pid = daemon.as_ref().map(Virtiofsd::pid);
    let started = Instant::now();
    // A back-end may exit as soon as QEMU disconnects (virtiofsd does), which can be seen here
    // a little before QEMU's own exit: abort only if QEMU still runs after a grace period.
    let mut dead_since: Option<Instant> = None;
    let result = cfg.run_script_watched(&script, || {
        for (pid, what) in [(watch_pid, "watched process"), (daemon_pid, "virtiofsd")] {
            if let Some(pid) = pid {
                if exited(pid) {
                    let since = *dead_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > BACKEND_EXIT_GRACE {
                        return Err(format!("{what} (pid {pid}) exited during the guest run"));
                    }
                }
            }
        }
        Ok(())
    });
    let wall = started.elapsed();
    let daemon_log = daemon.as_ref().map(Virtiofsd::log);
    if let Some(d) = daemon {
        d.stop();
    }
    let run = match result {
        Ok(run) => run,
        Err(e) => {
            if let Some(log) = daemon_log {
                eprintln!("--- virtiofsd log ---\n{}", log.trim_end());
            }
            return Err(e.into());
        }
    };
    if args.console {
        eprintln!(
            "--- guest serial console ---\n{}",
            run.serial_log.trim_end()
        );
    }
    if args.output {
        let text = format!("--- guest script output ---\n{}", run.output.trim_end());
        if args.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
    let report = FsReport::parse(&run.output);
    let boot = run
        .boot_time
        .map(|t| format!("{:.1} s", t.as_secs_f64()))
        .unwrap_or_else(|| "?".to_string());
    if args.json {
        let mut json = report.to_json();
        json.pop();
        println!(
            "{json},\"exit_code\":{},\"boot_secs\":{},\"wall_secs\":{:.1}}}",
            run.exit_code,
            run.boot_time
                .map_or("null".to_string(), |t| format!("{:.1}", t.as_secs_f64())),
            wall.as_secs_f64()
        );
    } else {
        print!("{}", report.summary());
        if !report.mounted || report.sections.is_empty() {
            println!("--- guest script output (tail) ---");
            let lines: Vec<&str> = run.output.lines().collect();
            println!("{}", lines[lines.len().saturating_sub(30)..].join("\n"));
        }
    }
    eprintln!(
        "fs-guest: guest script exited with {} (boot {boot}, total {:.1} s)",
        run.exit_code,
        wall.as_secs_f64()
    );
    Ok(if report.success() && run.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether process `pid` has exited (a zombie counts as exited).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// `SOCKET,tag=TAG[,queue-size=N]`.
fn parse_fs(spec: &str, queue_size: u16) -> anyhow::Result<FsDevice> {
    let mut parts = spec.split(',');
    let socket = parts
        .next()
        .filter(|s| !s.is_empty())
        .context("empty --extra-fs")?;
    let mut dev = FsDevice::new(socket, "");
    dev.queue_size = Some(queue_size);
    for part in parts {
        match part.split_once('=') {
            Some(("tag", tag)) => dev.tag = tag.to_string(),
            Some(("queue-size", n)) => {
                dev.queue_size = Some(n.parse().context("--extra-fs queue-size=N")?)
            }
            _ => bail!("unknown --extra-fs option {part:?} (tag=TAG, queue-size=N)"),
        }
    }
    if dev.tag.is_empty() {
        bail!("--extra-fs needs tag=TAG");
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_lists() {
        let a = Args::parse_from(["fs-guest", "--socket", "/s", "--run", "pjdfstest,meta"]);
        let w = workloads(&a).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].name(), "meta");
        let a = Args::parse_from(["fs-guest", "--virtiofsd", "/d", "--run", "fio-randrw"]);
        assert_eq!(workloads(&a).unwrap()[0].name(), "fio-randrw");
        let a = Args::parse_from(["fs-guest", "--socket", "/s", "--run", "bogus"]);
        assert!(workloads(&a).is_err());
        assert!(Args::try_parse_from(["fs-guest"]).is_err());
        let d = parse_fs("/x.sock,tag=two", 1024).unwrap();
        assert_eq!((d.tag.as_str(), d.queue_size), ("two", Some(1024)));
    }
}
