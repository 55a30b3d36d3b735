//! The Linux initiator (open-iscsi in the TCG test guest) against the iSCSI target under test
//! (`STRATA_ISCSI_TARGET`: `stratad`, the default, or `tgtd`), discovering through
//! strata-nameserver.
//!
//! `guest_discovers_through_isns_logs_in_and_verifies`: the target registers with a fresh
//! strata-nameserver (stratad `--isns`, tgtd's iSNS client with access control); a discovery
//! domain holds the target and initiator A, which is registered (open-iscsi registers only for
//! the time of a discovery; see `NameServer::register_initiator`). In one boot of the iscsi guest (user-mode network:
//! the host is 10.0.2.2), initiator A
//! - discovers through iSNS (`iscsiadm -m discovery -t isns`) and finds the target,
//! - logs in to the portal (10.0.2.2:PORT: the portal the target registered is a loopback
//!   address of the host, which the guest reaches through QEMU's user network),
//! - runs fio with crc32c verification on the new SCSI disk, and logs out;
//!
//! then the guest renames itself initiator B, outside the domain: its discovery lists nothing
//! and its login to the same portal is refused.

use std::time::Duration;

use dataplane::test_gate;
use test_guest::{FioJob, GuestVariant, ScratchDir, VmConfig};
use tests::e2e::{exited, with_deadline};
use tests::iscsi::{on_path, wait_until, IscsiTarget, NameServer, TargetKind, TargetSpec};

/// Hard limit for the guest run (QEMU is killed after it): a boot, two discoveries, a login,
/// a short fio job and a refused login under TCG.
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the target may take to appear in the name server.
const REGISTER_WAIT_MAX: Duration = Duration::from_secs(30);
/// Size of the LUN.
const LUN_BYTES: u64 = 256 << 20;
const TARGET_IQN: &str = "iqn.2026-12.org.strata.test:guest-disk";
const INSIDE: &str = "iqn.2026-12.org.strata.test:guest-a";
const OUTSIDE: &str = "iqn.2026-12.org.strata.test:guest-b";
/// The host as the guest sees it on QEMU's user network.
const HOST_FROM_GUEST: &str = "10.0.2.2";

/// The guest script; `{ns}`, `{portal}`, `{iqn}`, `{inside}`, `{outside}` and `{fio}` are
/// filled in.
const SCRIPT: &str = r#"set -u
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mkdir -p /run/lock/iscsi /var/lock /etc/iscsi/nodes /etc/iscsi/send_targets /etc/iscsi/isns

start_iscsid() {
    echo "InitiatorName=$1" >/etc/iscsi/initiatorname.iscsi
    # Its own session: iscsid stopping signals its whole process group, this script included.
    setsid iscsid -f >/tmp/iscsid.log 2>&1 &
    ISCSID=$!
    sleep 1
}
stop_iscsid() {
    # iscsid sometimes ignores SIGTERM after a logout (seen in CI: the guest then waited here
    # until the test's 300 s deadline): 3 s of grace, then SIGKILL.
    kill $ISCSID 2>/dev/null
    n=0
    while kill -0 $ISCSID 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 30 ] && { kill -9 $ISCSID 2>/dev/null; break; }; sleep 0.1
    done
    wait $ISCSID 2>/dev/null
    rm -rf /etc/iscsi/nodes/* /etc/iscsi/send_targets/* /etc/iscsi/isns/*
}
fail() {
    echo "FAIL: $*"
    echo "--- iscsid log ---"
    cat /tmp/iscsid.log
    dmesg | tail -30
    exit 1
}

# --- initiator A, in the target's discovery domain -------------------------------------------
start_iscsid {inside}
iscsiadm -m discovery -t isns -p {ns} >/tmp/disc-a.txt 2>&1
echo "discovery-a:"; cat /tmp/disc-a.txt
grep -q "{iqn}" /tmp/disc-a.txt || fail "initiator A did not discover {iqn}"
echo discovered-a
iscsiadm -m node -o new -T {iqn} -p {portal} >/dev/null || fail "node record"
ok=0
for try in 1 2 3 4 5; do
    if iscsiadm -m node -T {iqn} -p {portal} --login; then ok=1; break; fi
    sleep 2
done
[ $ok = 1 ] || fail "initiator A could not log in"
n=0
while [ ! -b /dev/sda ]; do
    n=$((n + 1)); [ $n -gt 100 ] && fail "no /dev/sda after login"; sleep 0.1
done
echo "disk: $(cat /sys/block/sda/device/vendor) $(cat /sys/block/sda/device/model) $(cat /sys/block/sda/size) sectors"
echo logged-in-a
{fio} || fail "fio verify on /dev/sda"
echo fio-verified
iscsiadm -m node -T {iqn} -p {portal} --logout || fail "logout"
n=0
while [ -b /dev/sda ]; do
    n=$((n + 1)); [ $n -gt 100 ] && fail "/dev/sda still present after logout"; sleep 0.1
done
echo logged-out-a
stop_iscsid

# --- initiator B, outside it -------------------------------------------------------------------
start_iscsid {outside}
iscsiadm -m discovery -t isns -p {ns} >/tmp/disc-b.txt 2>&1
echo "discovery-b:"; cat /tmp/disc-b.txt
grep -q "{iqn}" /tmp/disc-b.txt && fail "initiator B discovered {iqn}"
echo nothing-discovered-b
iscsiadm -m node -o new -T {iqn} -p {portal} >/dev/null || fail "node record"
if iscsiadm -m node -T {iqn} -p {portal} --login; then
    fail "initiator B logged in"
fi
[ -b /dev/sda ] && fail "initiator B has a disk"
echo login-refused-b
stop_iscsid
"#;

#[test]
fn guest_discovers_through_isns_logs_in_and_verifies() {
    const NAME: &str = "guest_discovers_through_isns_logs_in_and_verifies";
    let kind = TargetKind::from_env().expect(tests::iscsi::TARGET_ENV);
    if let Some(why) = kind.unavailable() {
        test_gate::skip(NAME, &format!("{}: {why}", kind.name()));
        return;
    }
    if !on_path("isnsadm") {
        test_gate::skip(NAME, "isnsadm not installed (package open-isns-utils)");
        return;
    }
    with_deadline(move || {
        let dir = ScratchDir::new("iscsi-guest").expect("scratch dir");
        let data = dir.join("ns");
        std::fs::create_dir(&data).expect("name server dir");
        let ns = NameServer::start(&data).expect("start strata-nameserver");
        let image = dir.join("lun.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(LUN_BYTES))
            .expect("create the LUN image");
        let spec = TargetSpec {
            iqn: TARGET_IQN.to_string(),
            image,
            allow: Vec::new(),
            isns: Some(ns.addr),
            log: dir.join("target.log"),
        };
        let target = IscsiTarget::start(kind, &spec).expect("start the target");
        wait_until(
            "the target registered in strata-nameserver",
            REGISTER_WAIT_MAX,
            || ns.has_node(TARGET_IQN),
        )
        .expect("registration");
        ns.rpc(
            "ns_dd_create",
            serde_json::json!({"name": "guest-zone", "members": [TARGET_IQN, INSIDE]}),
        )
        .expect("create the discovery domain");
        ns.register_initiator(INSIDE).expect("register initiator A");

        let fio = FioJob::new("iscsi", "/dev/sda", "randwrite", "4k-64k")
            .size("32M")
            .iodepth(16)
            .verify("crc32c");
        let portal = format!("{HOST_FROM_GUEST}:{}", target.portal.port());
        let script = SCRIPT
            .replace("{ns}", &format!("{HOST_FROM_GUEST}:{}", ns.addr.port()))
            .replace("{portal}", &portal)
            .replace("{iqn}", TARGET_IQN)
            .replace("{inside}", INSIDE)
            .replace("{outside}", OUTSIDE)
            .replace("{fio}", &fio.command());
        let cfg = VmConfig::new()
            .net()
            .variant(GuestVariant::Iscsi)
            .timeout(VM_TIMEOUT);
        let pid = target.pid();
        let run = cfg
            .run_script_watched(&script, || {
                if exited(pid) {
                    Err(format!(
                        "{} (pid {pid}) exited during the guest run",
                        kind.name()
                    ))
                } else {
                    Ok(())
                }
            })
            .and_then(|run| run.expect_success())
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(dir.join("target.log")).unwrap_or_default();
                panic!("guest run failed: {e}\n--- target log ---\n{log}")
            });
        eprintln!(
            "guest ran in {:.1} s (boot {:.1} s)\n{}",
            run.elapsed.as_secs_f64(),
            run.boot_time.map(|t| t.as_secs_f64()).unwrap_or(f64::NAN),
            run.output
        );
        for step in [
            "discovered-a",
            "logged-in-a",
            "fio-verified",
            "logged-out-a",
            "nothing-discovered-b",
            "login-refused-b",
        ] {
            assert!(run.output.contains(step), "missing {step}:\n{}", run.output);
        }
        target.stop().expect("stop the target");
    });
}
