//! End-to-end tests of virtio-fs shares: the fs guest (tools/test-guest, `build-guest.sh --fs`,
//! QEMU TCG) mounts a directory of a vmfs datastore that stratad serves with `--share`. Every
//! test makes a fresh datastore (`stratactl mkfs`) in a temp dir, starts the release stratad,
//! and at the end stops it with SIGTERM (it must exit 0) and runs `stratactl fsck` (clean).
//!
//! - `share_pjdfstest`: all of pjdfstest in a share: no failure, at least 375 passed.
//! - `share_acls_are_enforced_by_the_server`: POSIX.1e ACLs (grant, write refused with a read
//!   grant, revocation with `cache=never`), group entries not united (r from one group, w from
//!   another: O_RDWR refused), and supplementary groups taken from the share's `groups=` file
//!   only: a group the guest grants bob in its own /etc/group is refused by the server. Then the
//!   share's counters: denied, permission-cache lookups and invalidations.
//! - `share_uid_map_refuses_unmapped_ids`: `uid-map=0:0:1001`: alice (1000) works, bob (1001)
//!   gets EPERM for every access, and `unmapped_ids` counts it.
//! - `share_symlinks_are_not_followed_by_the_server`: links to /etc/passwd and
//!   ../../../../etc/shadow keep their targets verbatim and resolve in the guest; nothing
//!   appears in the datastore outside the share's directory.
//! - `share_survives_restart_and_kill9`: files, modes, owners, ACLs (default ACL inheritance
//!   included), a symlink and a multi-block file survive a clean restart; files synced before a
//!   kill -9 of stratad (guest still connected) survive it.
//! - `share_readonly_refuses_writes`: `readonly=on`: reads work, every change fails with EROFS.
//!
//! The guests share this machine's two cores, so the tests take a lock and boot one at a time;
//! each runs under a hard time-out.

use std::path::Path;
use std::time::Duration;

use test_guest::{fs_script, FsReport, FsWorkload, GuestRun, ScratchDir, VmConfig};
use tests::daemon::Stratad;
use tests::e2e::{exited, run_ok, stop_cleanly, with_deadline};
use tests::share::{
    assert_checks, counter, identity_options, ls, mount_script, output_value, share_stats,
    stratactl, stratad_args, BackgroundFsGuest,
};
use tests::vmfs::{kill9, spawn_after_crash, Provisioning, TestDatastore};

/// Hard limit for one guest run (QEMU is killed after it).
const VM_TIMEOUT: Duration = Duration::from_secs(240);
/// Size of the datastore file (sparse).
const DATASTORE_SIZE: &str = "1G";

/// A fresh datastore in `dir`.
fn datastore(dir: &ScratchDir) -> TestDatastore {
    TestDatastore::mkfs(&dir.join("ds.vmfs"), DATASTORE_SIZE).expect("mkfs")
}

/// A one-vCPU fs guest on `sock` with mount tag `tag`.
fn fs_vm(sock: &Path, tag: &str) -> VmConfig {
    VmConfig::new().fs(sock, tag).timeout(VM_TIMEOUT)
}

/// [`run_ok`] for a [`mount_script`]: also requires that the script ran to its end.
fn run_share_script(cfg: &VmConfig, daemon: &Stratad, tag: &str, body: &str) -> GuestRun {
    let run = run_ok(cfg, daemon, &mount_script(tag, body));
    assert!(
        run.output.contains("SCRIPT-DONE"),
        "the guest script did not finish:\n{}",
        run.output
    );
    run
}

#[test]
fn share_pjdfstest() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-share-pjd").expect("scratch dir");
        let ds = datastore(&dir);
        let sock = dir.join("fs.sock");
        let ctl = dir.join("control.sock");
        let args = stratad_args(
            ds.path(),
            &[format!("socket={},dir=pjd", sock.display())],
            Some(&ctl),
        );
        let daemon = Stratad::spawn(&args, &[&sock, &ctl]).expect("start stratad");
        let pid = daemon.pid();
        let run = fs_vm(&sock, "pjd")
            .run_script_watched(&fs_script("pjd", "", &[FsWorkload::pjdfstest()]), || {
                if exited(pid) {
                    Err(format!("stratad (pid {pid}) exited during the guest run"))
                } else {
                    Ok(())
                }
            })
            .unwrap_or_else(|e| panic!("guest run failed: {e}"));
        let report = FsReport::parse(&run.output);
        eprintln!(
            "guest ran in {:.1} s\n{}",
            run.elapsed.as_secs_f64(),
            report.summary()
        );
        assert!(report.mounted, "the share did not mount:\n{}", run.output);
        let pjd = report
            .pjdfstest()
            .unwrap_or_else(|| panic!("pjdfstest did not finish:\n{}", run.output));
        assert_eq!(pjd.failed, 0, "pjdfstest failures:\n{}", report.summary());
        assert!(
            pjd.passed >= 375,
            "only {} pjdfstest tests passed (virtiofsd 1.14: 375):\n{}",
            pjd.passed,
            report.summary()
        );
        let stats = share_stats(&ctl, "pjd").expect("stats");
        eprintln!("share stats: {stats}");
        assert!(counter(&stats, "requests") > 0, "{stats}");
        assert_eq!(counter(&stats, "malformed"), 0, "{stats}");
        assert_eq!(counter(&stats, "panics"), 0, "{stats}");
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after pjdfstest");
    });
}

/// The ACL scenario, run as root in `$D` (a fresh directory of the share).
const ACL_SCRIPT: &str = r#"
D="$MNT/t"
mkdir "$D" && cd "$D" || exit 1

# A named-user entry grants bob read, not write; removing it revokes the read.
echo secret >f
chmod 600 f
expect_fail bob-read-without-acl "Permission denied" su bob -c "cat $D/f"
setfacl -m u:bob:r f
getfacl f
expect_eq acl-entry "user:bob:r--" "$(getfacl -c f 2>/dev/null | grep '^user:bob:')"
expect_eq bob-reads-with-acl secret "$(su bob -c "cat $D/f" 2>&1)"
expect_fail bob-append-with-read-acl "Permission denied" su bob -c "echo x >>$D/f"
expect_fail bob-rdwr-with-read-acl "Permission denied" su bob -c "exec 3<>$D/f"
setfacl -x u:bob f
expect_fail bob-read-after-revoke "Permission denied" su bob -c "cat $D/f"
expect_eq f-unchanged secret "$(cat f)"

# POSIX.1e: the group entries are not united. alice (team and shared) gets r through team and
# w through shared, but never rw in one open.
echo data >g
chmod 600 g
setfacl -m g:team:r,g:shared:w g
getfacl g
expect_eq alice-reads-via-team data "$(su alice -c "cat $D/g" 2>&1)"
expect_ok alice-appends-via-shared su alice -c "echo more >>$D/g"
expect_fail alice-rdwr-not-united "Permission denied" su alice -c "exec 3<>$D/g"
expect_fail bob-read-write-only-group "Permission denied" su bob -c "cat $D/g"
expect_ok bob-appends-via-shared su bob -c "echo bob >>$D/g"
expect_eq g-content "data more bob" "$(cat g | tr '\n' ' ' | sed 's/ $//')"

# Supplementary groups come from the share's groups= file, not from the guest: the guest's
# kernel lets bob in once its /etc/group puts him in team, the server does not.
echo top >h
chgrp team h
chmod 640 h
expect_eq alice-reads-team-file top "$(su alice -c "cat $D/h" 2>&1)"
expect_fail bob-not-in-team "Permission denied" su bob -c "cat $D/h"
cp /etc/group /tmp/group.orig
sed 's/^team:x:2000:alice$/team:x:2000:alice,bob/' /tmp/group.orig >/etc/group
expect_ok guest-puts-bob-in-team sh -c "su bob -c id | grep -q '2000(team)'"
expect_fail server-ignores-guest-groups "Permission denied" su bob -c "cat $D/h"
cp /tmp/group.orig /etc/group
"#;

const ACL_CHECKS: &[&str] = &[
    "bob-read-without-acl",
    "acl-entry",
    "bob-reads-with-acl",
    "bob-append-with-read-acl",
    "bob-rdwr-with-read-acl",
    "bob-read-after-revoke",
    "f-unchanged",
    "alice-reads-via-team",
    "alice-appends-via-shared",
    "alice-rdwr-not-united",
    "bob-read-write-only-group",
    "bob-appends-via-shared",
    "g-content",
    "alice-reads-team-file",
    "bob-not-in-team",
    "guest-puts-bob-in-team",
    "server-ignores-guest-groups",
];

#[test]
fn share_acls_are_enforced_by_the_server() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-share-acl").expect("scratch dir");
        let ds = datastore(&dir);
        let sock = dir.join("fs.sock");
        let ctl = dir.join("control.sock");
        let ids = identity_options(dir.path()).expect("passwd and group files");
        // cache=never: the guest keeps no ACL or attribute past a request, so a revocation
        // applies at once (with cache=auto the guest may use its copy for up to 1 s).
        let share = format!("socket={},dir=acl,cache=never{ids}", sock.display());
        let daemon = Stratad::spawn(
            &stratad_args(ds.path(), &[share], Some(&ctl)),
            &[&sock, &ctl],
        )
        .expect("start stratad");
        let run = run_share_script(&fs_vm(&sock, "acl"), &daemon, "acl", ACL_SCRIPT);
        assert_checks(&run.output, ACL_CHECKS);

        let stats = share_stats(&ctl, "acl").expect("stats");
        eprintln!("share stats: {stats}");
        // At least the guest-only group membership was refused by the server itself.
        assert!(counter(&stats, "denied") > 0, "{stats}");
        assert!(
            counter(&stats, "perm_cache.hits") + counter(&stats, "perm_cache.misses") > 0,
            "{stats}"
        );
        // The ACL changes made cached profiles of f and g stale.
        assert!(counter(&stats, "perm_cache.invalidations") > 0, "{stats}");
        assert_eq!(counter(&stats, "malformed"), 0, "{stats}");
        assert_eq!(counter(&stats, "panics"), 0, "{stats}");
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the ACL checks");
    });
}

/// Guest uids 0..=1000 are mapped (identity); bob (1001) is not.
const IDMAP_SCRIPT: &str = r#"
D="$MNT/t"
mkdir "$D" && cd "$D" || exit 1
mkdir pub
chmod 1777 pub
echo hello >pub/r
chmod 644 pub/r
expect_eq alice-reads hello "$(su alice -c "cat $D/pub/r" 2>&1)"
expect_ok alice-creates su alice -c "echo a >$D/pub/alice.txt"
expect_eq alice-owns-her-file 1000 "$(stat -c %u pub/alice.txt)"
expect_fail bob-read "Operation not permitted" su bob -c "cat $D/pub/r"
expect_fail bob-stat "Operation not permitted" su bob -c "stat $D/pub/r"
expect_fail bob-ls "Operation not permitted" su bob -c "ls $D/pub"
expect_fail bob-create "Operation not permitted" su bob -c "echo b >$D/pub/bob.txt"
expect_fail bob-mkdir "Operation not permitted" su bob -c "mkdir $D/pub/bobdir"
expect_eq nothing-of-bob "alice.txt r" "$(ls pub | tr '\n' ' ' | sed 's/ $//')"
"#;

const IDMAP_CHECKS: &[&str] = &[
    "alice-reads",
    "alice-creates",
    "alice-owns-her-file",
    "bob-read",
    "bob-stat",
    "bob-ls",
    "bob-create",
    "bob-mkdir",
    "nothing-of-bob",
];

#[test]
fn share_uid_map_refuses_unmapped_ids() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-share-idmap").expect("scratch dir");
        let ds = datastore(&dir);
        let sock = dir.join("fs.sock");
        let ctl = dir.join("control.sock");
        let ids = identity_options(dir.path()).expect("passwd and group files");
        // cache=never: every access of bob's reaches the server (none is served from the
        // guest's caches of root's lookups).
        let share = format!(
            "socket={},dir=mapped,uid-map=0:0:1001,cache=never{ids}",
            sock.display()
        );
        let daemon = Stratad::spawn(
            &stratad_args(ds.path(), &[share], Some(&ctl)),
            &[&sock, &ctl],
        )
        .expect("start stratad");
        let run = run_share_script(&fs_vm(&sock, "mapped"), &daemon, "mapped", IDMAP_SCRIPT);
        assert_checks(&run.output, IDMAP_CHECKS);
        let stats = share_stats(&ctl, "mapped").expect("stats");
        eprintln!("share stats: {stats}");
        assert!(counter(&stats, "unmapped_ids") > 0, "{stats}");
        assert_eq!(counter(&stats, "malformed"), 0, "{stats}");
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the id-map checks");
    });
}

/// Symlinks pointing out of the share, made in `$MNT/links` (kept for the datastore check).
const SYMLINK_SCRIPT: &str = r#"
mkdir "$MNT/links" && cd "$MNT/links" || exit 1
ln -s /etc/passwd esc
ln -s ../../../../etc/shadow esc2
ln -s ../../../.. up
expect_eq readlink-absolute /etc/passwd "$(readlink esc)"
expect_eq readlink-relative ../../../../etc/shadow "$(readlink esc2)"
expect_eq lstat-is-link "symbolic link" "$(stat -c %F esc)"
# The guest resolves the links in its own namespace: esc is the guest's /etc/passwd (it has
# the pjdfstest user), esc2 the guest's /etc/shadow, which does not exist.
expect_ok esc-is-guest-passwd cmp esc /etc/passwd
expect_ok esc-has-guest-user grep -q '^tests:x:1100:1100:pjdfstest:' esc
expect_fail esc2-resolves-in-guest "No such file" cat esc2
# A directory made through a link to / lands in the guest's root, not in the datastore.
expect_ok mkdir-through-link mkdir up/strata-escape-test
expect_ok escape-is-in-guest test -d /strata-escape-test
expect_eq share-holds-links "esc esc2 up" "$(ls | tr '\n' ' ' | sed 's/ $//')"
"#;

const SYMLINK_CHECKS: &[&str] = &[
    "readlink-absolute",
    "readlink-relative",
    "lstat-is-link",
    "esc-is-guest-passwd",
    "esc-has-guest-user",
    "esc2-resolves-in-guest",
    "mkdir-through-link",
    "escape-is-in-guest",
    "share-holds-links",
];

#[test]
fn share_symlinks_are_not_followed_by_the_server() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-share-sym").expect("scratch dir");
        let ds = datastore(&dir);
        let sock = dir.join("fs.sock");
        let share = format!("socket={},dir=sym", sock.display());
        let daemon = Stratad::spawn(&stratad_args(ds.path(), &[share], None), &[&sock])
            .expect("start stratad");
        let run = run_share_script(&fs_vm(&sock, "sym"), &daemon, "sym", SYMLINK_SCRIPT);
        assert_checks(&run.output, SYMLINK_CHECKS);
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the symlink checks");

        // The datastore holds the share's directory and nothing else; the links are stored
        // with their targets verbatim (a symlink's size is its target's length).
        let root = ls(ds.path(), "/").expect("ls /");
        let names: Vec<&str> = root.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["sym"], "datastore root: {root:?}");
        let share_root = ls(ds.path(), "/sym").expect("ls /sym");
        let names: Vec<&str> = share_root.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["links"], "share root: {share_root:?}");
        let links = ls(ds.path(), "/sym/links").expect("ls /sym/links");
        let got: Vec<(&str, u64)> = links.iter().map(|e| (e.name.as_str(), e.size)).collect();
        assert_eq!(
            got,
            [
                ("esc", "/etc/passwd".len() as u64),
                ("esc2", "../../../../etc/shadow".len() as u64),
                ("up", "../../../..".len() as u64)
            ],
            "links in the datastore: {links:?}"
        );
    });
}

/// Prints the state of `$MNT/keep` as `M`, `ACL`, `MD5` and `LINK` lines (no access times).
const MANIFEST_FN: &str = r#"
manifest() {
    (
    cd "$MNT/keep" || exit 1
    for f in $(find . | sort); do
        echo "M $f $(stat -c '%F %a %u %g %s %Y' "$f")"
    done
    for f in a big sub sub/c; do
        echo "ACL $f $(getfacl -c "$f" 2>&1 | tr '\n' ' ')"
    done
    echo "MD5 $(md5sum a big sub/c | tr '\n' ' ')"
    echo "LINK $(readlink link)"
    )
}
"#;

/// The `M`, `ACL`, `MD5` and `LINK` lines of a guest's output.
fn manifest(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| {
            ["M ", "ACL ", "MD5 ", "LINK "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect()
}

#[test]
fn share_survives_restart_and_kill9() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-share-persist").expect("scratch dir");
        let ds = datastore(&dir);
        let sock = dir.join("fs.sock");
        let ids = identity_options(dir.path()).expect("passwd and group files");
        let args = stratad_args(
            ds.path(),
            &[format!("socket={},dir=persist{ids}", sock.display())],
            None,
        );
        let cfg = fs_vm(&sock, "persist");

        // Boot 1: files, modes, owners, ACLs, a default ACL, a symlink, a multi-block file.
        let daemon = Stratad::spawn(&args, &[&sock]).expect("start stratad");
        let body = format!(
            r#"{MANIFEST_FN}
mkdir "$MNT/keep" && cd "$MNT/keep" || exit 1
echo hello >a
chown 1000:2000 a
chmod 640 a
setfacl -m u:bob:r,g:shared:rw a
dd if=/dev/urandom of=big bs=64k count=40 2>/dev/null
chmod 604 big
mkdir sub
chgrp team sub
chmod 2770 sub
setfacl -d -m u:alice:rwx sub
echo c >sub/c
ln -s a link
sync
expect_eq default-acl-inherited "user:alice:rwx" "$(getfacl -c sub/c | grep '^user:alice:' | cut -d'#' -f1 | tr -d '[:space:]')"
manifest
"#
        );
        let run = run_share_script(&cfg, &daemon, "persist", &body);
        assert_checks(&run.output, &["default-acl-inherited"]);
        let before = manifest(&run.output);
        assert!(
            before
                .iter()
                .any(|l| l.starts_with("ACL a ") && l.contains("user:bob:r--")),
            "manifest without bob's ACL entry:\n{}",
            run.output
        );
        assert!(
            before
                .iter()
                .any(|l| l.starts_with("M ./big ") && l.contains(" 2621440 ")),
            "manifest without the 2.5 MiB file:\n{}",
            run.output
        );
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the clean stop");

        // Boot 2, on a restarted stratad: everything is as it was. Then files are written and
        // synced, and stratad is killed with SIGKILL while the guest is still connected.
        let daemon = Stratad::spawn(&args, &[&sock]).expect("restart stratad");
        let body = format!(
            r#"{MANIFEST_FN}
manifest
mkdir "$MNT/crash" && cd "$MNT/crash" || exit 1
echo synced-data >s1
chmod 600 s1
# The group bits of the mode become the ACL's mask (rw-): 660.
setfacl -m u:alice:rw s1
dd if=/dev/urandom of=s2 bs=64k count=20 2>/dev/null
echo "S2MD5=$(md5sum <s2 | cut -d' ' -f1)"
sync
echo CRASH-SYNCED
sleep 600
"#
        );
        let mut guest =
            BackgroundFsGuest::start(&cfg, &mount_script("persist", &body)).expect("boot 2");
        guest
            .wait_for_output("CRASH-SYNCED", VM_TIMEOUT)
            .unwrap_or_else(|e| panic!("boot 2: {e}"));
        kill9(daemon);
        let output2 = guest.kill();
        eprintln!("boot 2 (killed after sync):\n{output2}");
        assert_eq!(
            manifest(&output2),
            before,
            "the share changed across a clean restart"
        );
        let s2_md5 = output_value(&output2, "S2MD5")
            .unwrap_or_else(|| panic!("no S2MD5 in:\n{output2}"))
            .to_string();

        // Boot 3, after the crash: the synced files are there, and so is everything else.
        let daemon = spawn_after_crash(&args, &[&sock]).expect("restart stratad after kill -9");
        let body = format!(
            r#"{MANIFEST_FN}
manifest
cd "$MNT/crash" || exit 1
expect_eq s1-content synced-data "$(cat s1)"
expect_eq s1-mode 660 "$(stat -c %a s1)"
expect_eq s1-acl "user:alice:rw-" "$(getfacl -c s1 | grep '^user:alice:' | cut -d'#' -f1 | tr -d '[:space:]')"
expect_eq s2-content {s2_md5} "$(md5sum <s2 | cut -d' ' -f1)"
"#
        );
        let run = run_share_script(&cfg, &daemon, "persist", &body);
        assert_checks(
            &run.output,
            &["s1-content", "s1-mode", "s1-acl", "s2-content"],
        );
        assert_eq!(
            manifest(&run.output),
            before,
            "the share changed across kill -9 and restart"
        );
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the restart following kill -9");
    });
}

const READONLY_SCRIPT: &str = r#"
cd "$MNT" || exit 1
expect_eq ro-lists blob.img "$(ls)"
expect_eq ro-size 1048576 "$(stat -c %s blob.img)"
expect_eq ro-reads-zeroes "$(dd if=/dev/zero bs=64k count=16 2>/dev/null | md5sum)" "$(dd if=blob.img bs=64k 2>/dev/null | md5sum)"
expect_fail ro-create "Read-only file system" sh -c "echo x >new"
expect_fail ro-append "Read-only file system" sh -c "echo x >>blob.img"
expect_fail ro-mkdir "Read-only file system" mkdir d
expect_fail ro-unlink "Read-only file system" rm -f blob.img
expect_fail ro-rename "Read-only file system" mv blob.img b2
expect_fail ro-chmod "Read-only file system" chmod 600 blob.img
expect_fail ro-symlink "Read-only file system" ln -s blob.img l
expect_fail ro-setfacl "Read-only file system" setfacl -m u:bob:r blob.img
expect_fail ro-truncate "Read-only file system" truncate -s 0 blob.img
expect_eq ro-unchanged "blob.img 1048576" "$(ls) $(stat -c %s blob.img)"
"#;

const READONLY_CHECKS: &[&str] = &[
    "ro-lists",
    "ro-size",
    "ro-reads-zeroes",
    "ro-create",
    "ro-append",
    "ro-mkdir",
    "ro-unlink",
    "ro-rename",
    "ro-chmod",
    "ro-symlink",
    "ro-setfacl",
    "ro-truncate",
    "ro-unchanged",
];

#[test]
fn share_readonly_refuses_writes() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-share-ro").expect("scratch dir");
        let ds = datastore(&dir);
        // The share's content, made offline: a thin 1 MiB file (reads return zeroes).
        let path = ds.path().to_str().expect("utf-8 path");
        stratactl(&["--datastore", path, "mkdir", "ro"]).expect("mkdir ro");
        ds.disk_create("ro/blob.img", "1M", Provisioning::Thin)
            .expect("create ro/blob.img");
        let sock = dir.join("fs.sock");
        let share = format!("socket={},dir=ro,readonly=on", sock.display());
        let daemon = Stratad::spawn(&stratad_args(ds.path(), &[share], None), &[&sock])
            .expect("start stratad");
        let run = run_share_script(&fs_vm(&sock, "ro"), &daemon, "ro", READONLY_SCRIPT);
        assert_checks(&run.output, READONLY_CHECKS);
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the read-only run");
        let entries = ls(ds.path(), "/ro").expect("ls /ro");
        let got: Vec<(&str, u64)> = entries.iter().map(|e| (e.name.as_str(), e.size)).collect();
        assert_eq!(got, [("blob.img", 1 << 20)], "share content: {entries:?}");
    });
}
