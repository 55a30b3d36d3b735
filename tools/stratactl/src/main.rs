//! `stratactl`, Strata's administration command line.
//!
//! Command groups, one module each:
//! - `vmfs_cmd`: datastores and virtual disk files (`mkfs`, `info`, `ls`, `mkdir`,
//!   `disk create|rm|resize`, `fsck`), offline on `--datastore PATH` or through stratad's
//!   control socket (`--control PATH`).
//!
//! Every command prints plain text, or one JSON document with `--json`; errors go to stderr
//! with a non-zero exit status.

mod vmfs_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "stratactl",
    version,
    about = "Administer Strata: datastores, disks, name server"
)]
struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    target: vmfs_cmd::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Vmfs(vmfs_cmd::VmfsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Vmfs(cmd) => vmfs_cmd::run(&cli.target, cmd, cli.json).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratactl: {e}");
            ExitCode::FAILURE
        }
    }
}
