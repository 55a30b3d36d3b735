//! `stratactl --control PATH iscsi ...`: stratad's iSCSI targets while it runs (list, create,
//! delete, add and remove LUNs), through its control socket.

use std::path::Path;

use clap::Subcommand;
use jsonrpc::{Client, ClientError, ClientLimits};
use serde_json::{json, Value};

/// Errors of the iSCSI commands.
#[derive(Debug, thiserror::Error)]
pub enum IscsiCmdError {
    /// No control socket given.
    #[error("iscsi commands need --control PATH (stratad's control socket)")]
    NoControl,
    /// The call failed.
    #[error(transparent)]
    Rpc(#[from] ClientError),
}

/// iSCSI target subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum IscsiCommand {
    /// List targets, their LUNs and the portals.
    List,
    /// Create a target exporting a disk (by its --disk name) as its first LUN.
    Create {
        /// Target name (iqn.YYYY-MM.domain:name).
        iqn: String,
        /// Disk name.
        disk: String,
        /// LUN number (default 0).
        #[arg(long)]
        lun: Option<u64>,
        /// Require CHAP with this user name.
        #[arg(long, requires = "chap_secret_file")]
        chap_user: Option<String>,
        /// File holding the CHAP secret (read by stratad).
        #[arg(long)]
        chap_secret_file: Option<String>,
        /// Initiators allowed, `;`-separated (default: any the zoning allows).
        #[arg(long)]
        allow: Option<String>,
    },
    /// Delete a target (its sessions end).
    Delete {
        /// Target name.
        iqn: String,
    },
    /// Add a disk to a target as a LUN.
    LunAdd {
        /// Target name.
        iqn: String,
        /// Disk name.
        disk: String,
        /// LUN number (default: the lowest free one).
        #[arg(long)]
        lun: Option<u64>,
    },
    /// Remove a LUN from a target.
    LunRm {
        /// Target name.
        iqn: String,
        /// LUN number.
        lun: u64,
    },
}

/// Runs `cmd` against the control socket `control`; prints JSON results.
pub fn run(control: Option<&Path>, cmd: &IscsiCommand) -> Result<(), IscsiCmdError> {
    let socket = control.ok_or(IscsiCmdError::NoControl)?;
    let (method, params) = match cmd {
        IscsiCommand::List => ("iscsi_get_targets", json!({})),
        IscsiCommand::Create {
            iqn,
            disk,
            lun,
            chap_user,
            chap_secret_file,
            allow,
        } => {
            let mut p = json!({"iqn": iqn, "disk": disk});
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    p[k] = v;
                }
            };
            put("lun", lun.map(Value::from));
            put("chap-user", chap_user.clone().map(Value::from));
            put(
                "chap-secret-file",
                chap_secret_file.clone().map(Value::from),
            );
            put("allow", allow.clone().map(Value::from));
            ("iscsi_target_create", p)
        }
        IscsiCommand::Delete { iqn } => ("iscsi_target_delete", json!({"iqn": iqn})),
        IscsiCommand::LunAdd { iqn, disk, lun } => {
            let mut p = json!({"iqn": iqn, "disk": disk});
            if let Some(l) = lun {
                p["lun"] = Value::from(*l);
            }
            ("iscsi_target_lun_add", p)
        }
        IscsiCommand::LunRm { iqn, lun } => {
            ("iscsi_target_lun_remove", json!({"iqn": iqn, "lun": lun}))
        }
    };
    let mut c = Client::connect_unix(socket, ClientLimits::default())?;
    let v: Value = c.call(method, &params)?;
    if v != json!({}) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    Ok(())
}
