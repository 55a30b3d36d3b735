//! Test support shared by Strata's cross-crate and end-to-end tests.
//!
//! - [`daemon`]: builds and spawns `stratad` (release build, so guest and blkio tests run at a
//!   realistic speed), waits for its sockets and stops it with SIGTERM.
//! - [`guest`]: re-export of `test-guest` (tools/test-guest), which boots the cached test guest
//!   under QEMU TCG with shared memfd memory and vhost-user devices, runs a script in it and
//!   reads the results from the serial console with a hard time-out.
//! - [`share`]: virtio-fs shares: the fs guest's user and group files, the control socket's
//!   stats, datastore listings, guest-script checks, a background fs guest.
//! - [`vmfs`]: vmfs datastores made with `stratactl`, fsck, kill -9 of stratad.
//! - [`iscsi`]: the iSCSI target under test (stratad, or tgtd as the reference peer, chosen by
//!   `STRATA_ISCSI_TARGET`) and the iSNS name server (strata-nameserver).
//! - [`iscsi_cu`]: libiscsi's conformance suite `iscsi-test-cu`: its output parsed per test,
//!   the expected-results files (tests/expected/iscsi-test-cu/) and the comparison.

pub mod daemon;
pub mod e2e;
pub mod iscsi;
pub mod iscsi_cu;
pub use test_guest as guest;
pub mod share;
pub mod vmfs;
