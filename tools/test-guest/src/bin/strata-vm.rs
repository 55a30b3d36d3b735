//! `strata-vm`: boots Strata's test guest attached to vhost-user-blk sockets and runs a script
//! in it (default: a short 4 KiB random read/write fio job on /dev/vda), printing the guest's
//! output. Exits with the script's exit code, or 2 if the guest could not be run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use test_guest::{BlkDevice, FioJob, FsDevice, VmConfig};

/// Boot Strata's test guest (QEMU TCG) attached to vhost-user devices and run a script in it.
#[derive(Debug, Parser)]
#[command(name = "strata-vm")]
struct Args {
    /// A vhost-user-blk socket, optionally with `,queues=N` and `,queue-size=N` (repeatable;
    /// the first is /dev/vda in the guest).
    #[arg(long = "disk", value_name = "SOCKET[,queues=N]")]
    disks: Vec<String>,
    /// A vhost-user-fs socket with its mount tag: `SOCKET,tag=TAG` (repeatable).
    #[arg(long = "fs", value_name = "SOCKET,tag=TAG")]
    fs: Vec<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = test_guest::vm::DEFAULT_MEMORY_MIB)]
    memory_mib: u32,
    /// A shell script file to run in the guest (busybox sh).
    #[arg(long, conflicts_with = "command")]
    script: Option<PathBuf>,
    /// A shell command to run in the guest.
    #[arg(long, short = 'c')]
    command: Option<String>,
    /// Runtime in seconds of the default fio job.
    #[arg(long, default_value_t = 10)]
    fio_runtime: u32,
    /// Hard time-out in seconds: QEMU is killed after it.
    #[arg(long, default_value_t = test_guest::vm::DEFAULT_TIMEOUT.as_secs())]
    timeout: u64,
    /// Also print the guest's serial console.
    #[arg(long)]
    console: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata-vm: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut cfg = VmConfig::new()
        .cpus(args.cpus)
        .memory_mib(args.memory_mib)
        .timeout(Duration::from_secs(args.timeout));
    for spec in &args.disks {
        cfg.blk.push(parse_disk(spec)?);
    }
    for spec in &args.fs {
        cfg.fs.push(parse_fs(spec)?);
    }
    let script = match (&args.script, &args.command) {
        (Some(path), _) => {
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
        }
        (None, Some(command)) => command.clone(),
        (None, None) => {
            if cfg.blk.is_empty() {
                bail!("the default fio job needs a --disk (or give --script/--command)");
            }
            default_script(args.fio_runtime)
        }
    };
    eprintln!(
        "strata-vm: booting the guest ({} vCPU, {} MiB, {} disk(s), {} fs) under QEMU TCG",
        cfg.cpus,
        cfg.memory_mib,
        cfg.blk.len(),
        cfg.fs.len()
    );
    let run = cfg.run_script(&script)?;
    if args.console {
        println!(
            "--- guest serial console ---\n{}",
            run.serial_log.trim_end()
        );
        println!("--- guest script output ---");
    }
    print!("{}", run.output);
    let boot = run
        .boot_time
        .map(|t| format!("{:.1} s", t.as_secs_f64()))
        .unwrap_or_else(|| "?".to_string());
    eprintln!(
        "strata-vm: guest script exited with {} (boot {boot}, total {:.1} s)",
        run.exit_code,
        run.elapsed.as_secs_f64()
    );
    Ok(ExitCode::from(u8::try_from(run.exit_code).unwrap_or(1)))
}

/// The default job: describe the disks, then a short 4 KiB randrw fio run on /dev/vda.
fn default_script(runtime_secs: u32) -> String {
    let fio = FioJob::quick_randrw("/dev/vda", runtime_secs);
    format!(
        r#"set -e
echo "guest: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPU(s)"
for d in /sys/block/vd*; do
    echo "$(basename "$d"): $(( $(cat "$d/size") / 2048 )) MiB, $(ls "$d/mq" | wc -l) queue(s), read-only=$(cat "$d/ro")"
done
{}
"#,
        fio.checked_command()
    )
}

/// `SOCKET[,queues=N][,queue-size=N]`.
fn parse_disk(spec: &str) -> anyhow::Result<BlkDevice> {
    let mut parts = spec.split(',');
    let socket = parts
        .next()
        .filter(|s| !s.is_empty())
        .context("empty --disk")?;
    let mut dev = BlkDevice::new(socket, 1);
    for part in parts {
        match part.split_once('=') {
            Some(("queues", n)) => dev.num_queues = n.parse().context("--disk queues=N")?,
            Some(("queue-size", n)) => {
                dev.queue_size = Some(n.parse().context("--disk queue-size=N")?)
            }
            _ => bail!("unknown --disk option {part:?} (queues=N, queue-size=N)"),
        }
    }
    Ok(dev)
}

/// `SOCKET,tag=TAG[,queue-size=N]`.
fn parse_fs(spec: &str) -> anyhow::Result<FsDevice> {
    let mut parts = spec.split(',');
    let socket = parts
        .next()
        .filter(|s| !s.is_empty())
        .context("empty --fs")?;
    let mut dev = FsDevice::new(socket, "");
    for part in parts {
        match part.split_once('=') {
            Some(("tag", tag)) => dev.tag = tag.to_string(),
            Some(("queue-size", n)) => {
                dev.queue_size = Some(n.parse().context("--fs queue-size=N")?)
            }
            _ => bail!("unknown --fs option {part:?} (tag=TAG, queue-size=N)"),
        }
    }
    if dev.tag.is_empty() {
        bail!("--fs needs tag=TAG");
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disk_and_fs_specs() {
        let d = parse_disk("/tmp/a.sock,queues=2,queue-size=256").unwrap();
        assert_eq!(d.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(d.num_queues, 2);
        assert_eq!(d.queue_size, Some(256));
        assert_eq!(parse_disk("/tmp/b.sock").unwrap().num_queues, 1);
        assert!(parse_disk("/tmp/b.sock,bogus=1").is_err());
        let f = parse_fs("/tmp/fs.sock,tag=data").unwrap();
        assert_eq!(f.tag, "data");
        assert!(parse_fs("/tmp/fs.sock").is_err());
    }
}
