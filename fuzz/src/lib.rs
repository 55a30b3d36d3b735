//! Coverage-guided fuzz targets over Strata's hostile-input paths (issue 12, "Fuzzing").
//!
//! Each target is a plain `run(data: &[u8])` that drives the real code with one input and
//! panics when an invariant breaks; `seeds()` builds its small seed corpus (checked in under
//! `fuzz/corpus/<target>/`). The libFuzzer binaries (`fuzz_targets/`, feature `libfuzzer`,
//! built and run by `tools/fuzz.sh`) call `run`; `cargo test` replays every seed and every
//! regression input through the same functions (`tests/replay.rs`).
//!
//! Map of the crate:
//! - [`input`]: the byte cursor targets decode inputs with, and its inverse for seeds.
//! - [`cow_disk`]: a copy-on-write block device over a shared base image, so each run starts
//!   from the same small datastore without copying 64 MiB.
//! - [`datastore`]: the small base datastore the vmfs-backed targets start from.
//! - [`blk_chain`]: virtio-blk avail ring, descriptor chain walk and request parser over a
//!   fake guest memory.
//! - [`fuse`]: FUSE requests → replies through the file server's `ShareHandler` on a real
//!   `VmfsFs` over a datastore in memory.
//! - [`iscsi_pdu`]: an iSCSI byte stream → PDU framing (AHS, digests, lengths) under any
//!   framing settings, header accessors, text parsing, the target's PDU builders.
//! - [`iscsi_login`]: Login Requests → the iSCSI login state machine (stages, CHAP,
//!   negotiation), then a discovery session's PDUs, with protocol and access oracles.
//! - [`iscsi_session`]: a byte stream of full-feature PDUs → an iSCSI session over a null
//!   LUN (window, immediate/unsolicited data, R2T, Data-In, TMF, logout), with framing,
//!   StatSN and Data-In length oracles.
//! - [`scsi`]: CDBs and Data-Out from two nexuses → a SCSI logical unit (null or raw backend)
//!   through plan/start/complete, with Data-In, sense, read-back and reservation oracles.
//! - [`isns`]: iSNS PDU bytes → reassembly → command → registry, with a WAL-replay oracle.
//! - [`jsonrpc`]: a control-socket byte stream → line framing → JSON-RPC request parsing →
//!   a method table, with a response-shape oracle.
//! - [`vmfs_image`]: crafted datastore images (decoded fields mutated, checksums resealed) →
//!   fsck, mount and namespace operations.
//! - [`vmfs_journal`]: crafted journals (resealed transactions) → mount-time replay, fsck.
//! - [`vhost_user`]: sequences of vhost-user messages, with memory and eventfd attachments,
//!   through the vhost message layer into dataplane's `VhostDevice`.

pub mod blk_chain;
pub mod cow_disk;
pub mod datastore;
pub mod fuse;
pub mod input;
pub mod iscsi_login;
pub mod iscsi_pdu;
pub mod iscsi_session;
pub mod isns;
pub mod jsonrpc;
pub mod scsi;
pub mod vhost_user;
pub mod vmfs_image;
pub mod vmfs_journal;

/// A target's entry point.
pub type Run = fn(&[u8]);

/// A target's seed corpus builder.
pub type Seeds = fn() -> Vec<Vec<u8>>;

/// Every target: (name, run, seeds). Names are the libFuzzer binaries' and the corpus
/// directories'.
pub const TARGETS: &[(&str, Run, Seeds)] = &[
    ("blk_chain", blk_chain::run, blk_chain::seeds),
    ("fuse", fuse::run, fuse::seeds),
    ("iscsi_login", iscsi_login::run, iscsi_login::seeds),
    ("iscsi_pdu", iscsi_pdu::run, iscsi_pdu::seeds),
    ("iscsi_session", iscsi_session::run, iscsi_session::seeds),
    ("isns", isns::run, isns::seeds),
    ("jsonrpc", jsonrpc::run, jsonrpc::seeds),
    ("scsi", scsi::run, scsi::seeds),
    ("vmfs_image", vmfs_image::run, vmfs_image::seeds),
    ("vmfs_journal", vmfs_journal::run, vmfs_journal::seeds),
    ("vhost_user", vhost_user::run, vhost_user::seeds),
];

/// Whether targets log what each step of an input did (`STRATA_FUZZ_TRACE=1`, to check what
/// a seed or a crash reaches).
pub(crate) fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("STRATA_FUZZ_TRACE").is_some())
}
