//! fio command lines for the guest.
//!
//! The guest carries Debian's fio 3.33 (libaio engine available). [`FioJob`] renders one job as
//! a shell command; the defaults are the settings every Strata guest job shares: O_DIRECT,
//! libaio, and a fixed random seed so that a later `--verify_only` run replays the same
//! offsets and block sizes.

/// One fio job, rendered by [`FioJob::command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FioJob {
    /// Job name (also the verify-state file prefix).
    pub name: String,
    /// The device or file.
    pub filename: String,
    /// `--rw`: read, write, randread, randwrite, randrw, ...
    pub rw: String,
    /// `--bs` ("4k") or `--bsrange` ("4k-64k").
    pub bs: String,
    /// `--size`; `None` means the whole device.
    pub size: Option<String>,
    /// `--ioengine`.
    pub ioengine: String,
    /// `--iodepth`.
    pub iodepth: u32,
    /// `--numjobs`.
    pub numjobs: u32,
    /// `--offset_increment` (so parallel jobs work on disjoint ranges).
    pub offset_increment: Option<String>,
    /// `--runtime` in seconds with `--time_based`.
    pub runtime_secs: Option<u32>,
    /// `--verify` (e.g. "crc32c").
    pub verify: Option<String>,
    /// Write only: `--do_verify=0` (verify later with [`FioJob::verify_only`]).
    pub write_only: bool,
    /// `--verify_only`: replay the job's layout and check the data a previous run wrote.
    pub verify_only: bool,
    /// `--group_reporting`.
    pub group_reporting: bool,
    /// Extra `--opt=value` arguments, passed as is.
    pub extra: Vec<String>,
}

impl FioJob {
    /// A job with the shared defaults: O_DIRECT libaio, iodepth 16, one job, whole device.
    pub fn new(name: &str, filename: &str, rw: &str, bs: &str) -> Self {
        FioJob {
            name: name.to_string(),
            filename: filename.to_string(),
            rw: rw.to_string(),
            bs: bs.to_string(),
            size: None,
            ioengine: "libaio".to_string(),
            iodepth: 16,
            numjobs: 1,
            offset_increment: None,
            runtime_secs: None,
            verify: None,
            write_only: false,
            verify_only: false,
            group_reporting: true,
            extra: Vec::new(),
        }
    }

    /// The short default job `strata-vm` runs: 4 KiB random 50/50 read/write for `secs`.
    pub fn quick_randrw(filename: &str, secs: u32) -> Self {
        let mut job = FioJob::new("quick-randrw", filename, "randrw", "4k");
        job.runtime_secs = Some(secs);
        job
    }

    /// Sets `--size`.
    pub fn size(mut self, size: &str) -> Self {
        self.size = Some(size.to_string());
        self
    }

    /// Sets `--numjobs` and makes the jobs' ranges disjoint (`--offset_increment=size`).
    pub fn jobs(mut self, numjobs: u32) -> Self {
        self.numjobs = numjobs;
        if numjobs > 1 {
            self.offset_increment = self.size.clone();
        }
        self
    }

    /// Sets `--iodepth`.
    pub fn iodepth(mut self, depth: u32) -> Self {
        self.iodepth = depth;
        self
    }

    /// Sets `--verify=<kind>` (data is checked after writing unless [`FioJob::write_only`]).
    pub fn verify(mut self, kind: &str) -> Self {
        self.verify = Some(kind.to_string());
        self
    }

    /// Writes verifiable data without reading it back (`--do_verify=0`).
    pub fn write_only(mut self) -> Self {
        self.write_only = true;
        self
    }

    /// Replays the job's layout and only verifies (`--verify_only`).
    pub fn verify_only(mut self) -> Self {
        self.verify_only = true;
        self
    }

    /// Adds an extra `--opt=value` argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    /// The shell command (arguments contain no characters the shell would interpret).
    pub fn command(&self) -> String {
        let mut cmd = String::from("fio");
        let mut opt = |s: String| {
            cmd.push(' ');
            cmd.push_str(&s);
        };
        opt(format!("--name={}", self.name));
        opt(format!("--filename={}", self.filename));
        opt(format!("--rw={}", self.rw));
        if self.bs.contains('-') {
            opt(format!("--bsrange={}", self.bs));
        } else {
            opt(format!("--bs={}", self.bs));
        }
        if let Some(size) = &self.size {
            opt(format!("--size={size}"));
        }
        opt(format!("--ioengine={}", self.ioengine));
        opt(format!("--iodepth={}", self.iodepth));
        opt("--direct=1".to_string());
        // No progress lines: the output goes to a serial port, read after the run.
        opt("--eta=never".to_string());
        // Fixed seeds: a --verify_only run must regenerate the same offsets and block sizes.
        opt("--randrepeat=1".to_string());
        opt("--randseed=20240601".to_string());
        if self.numjobs > 1 {
            opt(format!("--numjobs={}", self.numjobs));
        }
        if let Some(inc) = &self.offset_increment {
            opt(format!("--offset_increment={inc}"));
        }
        if let Some(secs) = self.runtime_secs {
            opt(format!("--runtime={secs}"));
            opt("--time_based=1".to_string());
        }
        if let Some(kind) = &self.verify {
            opt(format!("--verify={kind}"));
            opt("--verify_fatal=1".to_string());
            opt("--verify_dump=0".to_string());
            if self.write_only {
                opt("--do_verify=0".to_string());
            }
            if self.verify_only {
                opt("--verify_only=1".to_string());
            }
        }
        if self.group_reporting {
            opt("--group_reporting=1".to_string());
        }
        for extra in &self.extra {
            opt(extra.clone());
        }
        cmd
    }

    /// [`FioJob::command`] wrapped so that a failure prints a clear line:
    /// `fio job <name> failed (exit N)` and exits with fio's code.
    pub fn checked_command(&self) -> String {
        format!(
            "{cmd} || {{ rc=$?; echo \"fio job {name} failed (exit $rc)\"; exit $rc; }}",
            cmd = self.command(),
            name = self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_verify_write_then_verify_only() {
        let write = FioJob::new("w", "/dev/vda", "randwrite", "4k-64k")
            .size("32M")
            .verify("crc32c")
            .write_only();
        let cmd = write.command();
        assert!(cmd.starts_with("fio --name=w --filename=/dev/vda --rw=randwrite --bsrange=4k-64k"));
        assert!(cmd.contains("--size=32M"));
        assert!(cmd.contains("--verify=crc32c"));
        assert!(cmd.contains("--do_verify=0"));
        assert!(!cmd.contains("verify_only"));
        let mut verify = write.clone();
        verify.write_only = false;
        let cmd = verify.verify_only().command();
        assert!(cmd.contains("--verify_only=1"));
        assert!(!cmd.contains("--do_verify=0"));
    }

    #[test]
    fn parallel_jobs_get_disjoint_ranges() {
        let cmd = FioJob::new("p", "/dev/vda", "randwrite", "4k")
            .size("16M")
            .jobs(2)
            .command();
        assert!(cmd.contains("--numjobs=2"));
        assert!(cmd.contains("--offset_increment=16M"));
        let quick = FioJob::quick_randrw("/dev/vda", 10).command();
        assert!(quick.contains("--rw=randrw --bs=4k"));
        assert!(quick.contains("--runtime=10 --time_based=1"));
    }
}
