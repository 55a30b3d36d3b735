//! `stratactl`: Strata's administration command line. Each subcommand group lives in its own
//! module and owns its arguments; `main` only dispatches.
//!
//! Groups: `ns` (the iSNS name server, [`ns`]); datastores and virtual disks (`mkfs`, `info`,
//! `ls`, `mkdir`, `disk create|rm|resize`, `fsck`, [`vmfs_cmd`]), offline on `--datastore PATH`
//! or through stratad's control socket (`--control PATH`); `iscsi` (stratad's iSCSI targets
//! while it runs, [`iscsi_cmd`]).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod iscsi_cmd;
mod ns;
mod vmfs_cmd;

#[derive(Debug, Parser)]
#[command(name = "stratactl", version, about = "Administer Strata services")]
struct Cli {
    /// Datastore commands: print JSON (name-server commands take `ns --json`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: vmfs_cmd::Target,
    #[command(subcommand)]
    group: Group,
}

#[derive(Debug, Subcommand)]
enum Group {
    /// The name server (strata-nameserver): registrations, discovery domains, policy, stats.
    Ns(ns::NsArgs),
    /// stratad's iSCSI targets (needs --control): list, create, delete, lun-add, lun-rm.
    #[command(subcommand)]
    Iscsi(iscsi_cmd::IscsiCommand),
    #[command(flatten)]
    Vmfs(vmfs_cmd::VmfsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.group {
        Group::Ns(a) => ns::run(a).map_err(|e| e.to_string()),
        Group::Iscsi(cmd) => {
            iscsi_cmd::run(cli.target.control.as_deref(), &cmd).map_err(|e| e.to_string())
        }
        Group::Vmfs(cmd) => vmfs_cmd::run(&cli.target, &cmd, cli.json).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratactl: {e}");
            ExitCode::FAILURE
        }
    }
}
