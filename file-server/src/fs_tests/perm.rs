//! Permission checks: modes, ACLs and their id mapping, groups, sticky directories, names,
//! symlinks, unmapped ids, the permission cache's invalidation.

use super::*;

#[test]
fn share_root_is_created_root_owned_0755() {
    let f = fixture();
    let (a, _) = f.fs.getattr(root(), ROOT, None).unwrap();
    assert_eq!(a.mode & 0o7777, 0o755);
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!((a.uid.into_inner(), a.gid.into_inner()), (0, 0));
}

use virtiofsd::soft_idmap::Id;

#[test]
fn mode_bits_are_enforced_by_the_server() {
    let f = fixture();
    let d = f.mkdir(root(), ROOT, "private", 0o700).unwrap();
    f.chown(root(), d, ALICE, ALICE).unwrap();
    let (file, _) = f.create(ctx(ALICE, ALICE), d, "secret", 0o600).unwrap();
    // Bob cannot search Alice's 0700 directory, whatever his guest kernel thinks.
    assert_eq!(
        errno_of(f.fs.lookup(ctx(BOB, BOB), d, &c("secret"))),
        libc::EACCES
    );
    assert!(f.fs.lookup(ctx(ALICE, ALICE), d, &c("secret")).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    // Opening the directory up lets Bob search it, but the file stays Alice's.
    f.chmod(ctx(ALICE, ALICE), d, 0o755).unwrap();
    assert!(f.fs.lookup(ctx(BOB, BOB), d, &c("secret")).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    // Only the owner (or root) changes modes; only root gives files away.
    assert_eq!(errno_of(f.chmod(ctx(BOB, BOB), file, 0o666)), libc::EPERM);
    assert_eq!(
        errno_of(f.chown(ctx(ALICE, ALICE), file, BOB, ALICE)),
        libc::EPERM
    );
    f.chown(root(), file, BOB, BOB).unwrap();
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDWR).is_ok());
}

#[test]
fn acl_grant_and_revocation_apply_at_once() {
    let f = fixture();
    let (file, _) = f.create(root(), ROOT, "shared", 0o600).unwrap();
    f.chown(root(), file, ALICE, ALICE).unwrap();
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    let grant = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, BOB, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Mask, 0, 4),
        (AclTag::Other, 0, 0),
    ]);
    f.set_acl(ctx(ALICE, ALICE), file, XATTR_ACL_ACCESS, &grant)
        .unwrap();
    // The mask limits Bob's rw- to r--, and the mode's group bits mirror the mask.
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDONLY).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_WRONLY)),
        libc::EACCES
    );
    let (a, _) = f.fs.getattr(root(), file, None).unwrap();
    assert_eq!(a.mode & 0o777, 0o640);
    // chmod rewrites the mask: the next check refuses, no staleness window.
    f.chmod(ctx(ALICE, ALICE), file, 0o600).unwrap();
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    f.chmod(ctx(ALICE, ALICE), file, 0o640).unwrap();
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDONLY).is_ok());
    // Removing the ACL revokes too.
    f.fs.removexattr(ctx(ALICE, ALICE), file, &c("system.posix_acl_access"))
        .unwrap();
    f.chmod(ctx(ALICE, ALICE), file, 0o600).unwrap();
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    let st = f.fs.settings().perm.stats();
    assert!(st.hits + st.misses > 0 && st.invalidations > 0, "{st:?}");
}

/// Named ACL entries are ids like owners: stored in datastore ids (guest ids mapped on set,
/// unmapped ones refused), shown in guest ids (unmapped ones as the overflow id), evaluated
/// against the caller's mapped ids.
#[test]
fn acl_ids_go_through_the_id_maps() {
    let f = fixture_maps(
        "0:0:1;1000:101000:100",
        "0:0:1;1000:101000:100;2000:102000:100",
    );
    let (file, _) = f.create(root(), ROOT, "mapped", 0o600).unwrap();
    let grant = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, BOB, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Group, G_A, 4),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 0),
    ]);
    f.set_acl(root(), file, XATTR_ACL_ACCESS, &grant).unwrap();
    // Stored in datastore ids.
    let stored = f
        .fs_ds()
        .getxattr(f.fs_ino(file), XATTR_ACL_ACCESS)
        .unwrap();
    let stored = Acl::parse(&stored).unwrap();
    let named: Vec<(AclTag, u32)> = stored
        .entries()
        .iter()
        .filter(|e| e.tag.is_named())
        .map(|e| (e.tag, e.id))
        .collect();
    assert_eq!(
        named,
        [
            (AclTag::User, 100_000 + BOB),
            (AclTag::Group, 100_000 + G_A)
        ]
    );
    // Evaluated against the caller's mapped ids: Bob (guest 1001, datastore 101001) may write;
    // Alice (in no entry) may not; a member of ga (by its primary gid) may read.
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDWR).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(ALICE, ALICE), file, libc::O_RDONLY)),
        libc::EACCES
    );
    assert!(f.open(ctx(ALICE, G_A), file, libc::O_RDONLY).is_ok());
    // Shown in guest ids.
    let got = match f
        .fs
        .getxattr(root(), file, &c("system.posix_acl_access"), 4096)
        .unwrap()
    {
        virtiofsd::filesystem::GetxattrReply::Value(v) => v,
        _ => panic!("expected a value"),
    };
    assert_eq!(Acl::parse(&got).unwrap(), grant);
    // An id outside the map cannot be named (as chown to it is refused).
    let unmapped = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, 5, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 0),
    ]);
    assert_eq!(
        errno_of(f.set_acl(root(), file, XATTR_ACL_ACCESS, &unmapped)),
        libc::EINVAL
    );
    let unmapped_default = acl(&[
        (AclTag::UserObj, 0, 7),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Group, 7, 5),
        (AclTag::Mask, 0, 7),
        (AclTag::Other, 0, 0),
    ]);
    assert_eq!(
        errno_of(f.set_acl(root(), ROOT, XATTR_ACL_DEFAULT, &unmapped_default)),
        libc::EINVAL
    );
    // A datastore id the map does not cover is shown as the overflow id.
    let foreign = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, 7, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 0),
    ]);
    f.fs_ds()
        .setxattr(
            f.fs_ino(file),
            XATTR_ACL_ACCESS,
            &foreign.encode(),
            vmfs::XattrSetMode::Any,
        )
        .unwrap();
    let got = match f
        .fs
        .getxattr(root(), file, &c("system.posix_acl_access"), 4096)
        .unwrap()
    {
        virtiofsd::filesystem::GetxattrReply::Value(v) => v,
        _ => panic!("expected a value"),
    };
    let shown: Vec<u32> = Acl::parse(&got)
        .unwrap()
        .entries()
        .iter()
        .filter(|e| e.tag.is_named())
        .map(|e| e.id)
        .collect();
    assert_eq!(shown, [crate::fs::OVERFLOW_ID]);
}

#[test]
fn group_entries_are_not_unioned() {
    let f = fixture();
    let (file, _) = f.create(root(), ROOT, "f", 0o600).unwrap();
    // Carol is in ga (r) and gb (w): asking rw through the group class must fail on Linux.
    let a = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Group, G_A, 4),
        (AclTag::Group, G_B, 2),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 6),
    ]);
    f.set_acl(root(), file, XATTR_ACL_ACCESS, &a).unwrap();
    let carol = ctx(CAROL, CAROL);
    assert!(f.open(carol, file, libc::O_RDONLY).is_ok());
    assert!(f.open(carol, file, libc::O_WRONLY).is_ok());
    assert_eq!(errno_of(f.open(carol, file, libc::O_RDWR)), libc::EACCES);
    // Bob is in neither group: "other" (rw) applies.
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDWR).is_ok());
}

#[test]
fn default_acl_is_inherited_and_umask_ignored() {
    let f = fixture();
    let d = f.mkdir(root(), ROOT, "proj", 0o777).unwrap();
    let def = acl(&[
        (AclTag::UserObj, 0, 7),
        (AclTag::User, BOB, 7),
        (AclTag::GroupObj, 0, 5),
        (AclTag::Mask, 0, 7),
        (AclTag::Other, 0, 0),
    ]);
    f.set_acl(root(), d, XATTR_ACL_DEFAULT, &def).unwrap();
    let e =
        f.fs.create(
            ctx(ALICE, ALICE),
            d,
            &c("doc"),
            0o666,
            false,
            libc::O_RDWR as u32,
            0o022,
            Extensions::default(),
        )
        .unwrap()
        .0;
    // Mode = default ACL ∩ create mode; the umask is not applied when a default ACL exists.
    assert_eq!(e.attr.mode & 0o777, 0o660);
    assert!(f.open(ctx(BOB, BOB), e.inode, libc::O_RDWR).is_ok());
    let sub = f.mkdir(ctx(ALICE, ALICE), d, "sub", 0o755).unwrap();
    let r =
        f.fs.getxattr(root(), sub, &c("system.posix_acl_default"), 4096)
            .unwrap();
    assert!(
        matches!(r, virtiofsd::filesystem::GetxattrReply::Value(v) if Acl::parse(&v).unwrap() == def)
    );
    // Without a default ACL the umask applies (mkdir's 0777 was umasked by the guest's 0).
    let open = f.mkdir(root(), ROOT, "open", 0o777).unwrap();
    let plain =
        f.fs.create(
            ctx(ALICE, ALICE),
            open,
            &c("plain"),
            0o666,
            false,
            libc::O_RDWR as u32,
            0o022,
            Extensions::default(),
        )
        .unwrap()
        .0
        .inode;
    let (a, _) = f.fs.getattr(root(), plain, None).unwrap();
    assert_eq!(a.mode & 0o777, 0o644);
}

#[test]
fn hostile_names_are_refused() {
    let f = fixture();
    for bad in ["a/b", "..", ".", "/etc"] {
        let r = f.mkdir(root(), ROOT, bad, 0o755);
        assert_eq!(errno_of(r), libc::EINVAL, "{bad}");
        let r = f.create(root(), ROOT, bad, 0o644);
        assert_eq!(errno_of(r), libc::EINVAL, "{bad}");
    }
    let long = "x".repeat(256);
    assert_eq!(
        errno_of(f.mkdir(root(), ROOT, &long, 0o755)),
        libc::ENAMETOOLONG
    );
    // ".." at the share root stays at the root: the datastore above is unreachable.
    let e = f.fs.lookup(root(), ROOT, &c("..")).unwrap();
    assert_eq!(e.inode, ROOT);
    // Node ids outside the share (the datastore root's number) do not reach it either.
    let (a, _) = f.fs.getattr(root(), ROOT, None).unwrap();
    assert_eq!(a.ino, ROOT);
}

#[test]
fn symlinks_are_stored_not_followed() {
    let f = fixture();
    let e =
        f.fs.symlink(
            root(),
            &c("../../../etc/shadow"),
            ROOT,
            &c("escape"),
            Extensions::default(),
        )
        .unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        f.fs.readlink(root(), e.inode).unwrap(),
        b"../../../etc/shadow"
    );
    let looked = f.fs.lookup(root(), ROOT, &c("escape")).unwrap();
    assert_eq!(looked.inode, e.inode);
    assert_eq!(looked.attr.mode & libc::S_IFMT, libc::S_IFLNK);
}

#[test]
fn unmapped_uids_are_refused() {
    // Guest ids 0..=2000 map to host 100000.. ; anything else is refused.
    let f = fixture_with("0:100000:2001");
    assert!(f.fs.getattr(ctx(1000, 0), ROOT, None).is_ok());
    assert_eq!(
        errno_of(f.fs.getattr(ctx(5000, 0), ROOT, None)),
        libc::EPERM
    );
    // The share root is host-root owned: outside the map, shown as the overflow id.
    let (a, _) = f.fs.getattr(ctx(0, 0), ROOT, None).unwrap();
    assert_eq!(a.uid.into_inner(), crate::fs::OVERFLOW_ID);
    // Guest root is host 100000, not root: it cannot write the root-owned 0755 share root.
    assert_eq!(errno_of(f.mkdir(ctx(0, 0), ROOT, "x", 0o755)), libc::EACCES);
}

#[test]
fn sticky_directories_protect_other_users_entries() {
    let f = fixture();
    let tmp = f.mkdir(root(), ROOT, "tmp", 0o777).unwrap();
    f.chmod(root(), tmp, 0o1777).unwrap();
    f.create(ctx(ALICE, ALICE), tmp, "a", 0o644).unwrap();
    assert_eq!(
        errno_of(f.fs.unlink(ctx(BOB, BOB), tmp, &c("a"))),
        libc::EPERM
    );
    f.fs.unlink(ctx(ALICE, ALICE), tmp, &c("a")).unwrap();
}

#[test]
fn write_read_truncate() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "data", 0o644).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let n =
        f.fs.write(
            root(),
            file,
            h,
            SliceReader(&payload),
            payload.len() as u32,
            4096,
            None,
            false,
            false,
            0,
        )
        .unwrap();
    assert_eq!(n, payload.len());
    let mut w = VecWriter(Vec::new());
    let n =
        f.fs.read(root(), file, h, &mut w, 400_000, 0, None, 0)
            .unwrap();
    assert_eq!(n, 4096 + payload.len());
    assert!(w.0[..4096].iter().all(|&b| b == 0));
    assert_eq!(&w.0[4096..], &payload[..]);
    // A read-only handle cannot write; Bob cannot open the 0644 file for writing.
    let ro = f.open(root(), file, libc::O_RDONLY).unwrap();
    assert_eq!(
        errno_of(f.fs.write(
            root(),
            file,
            ro,
            SliceReader(b"x"),
            1,
            0,
            None,
            false,
            false,
            0
        )),
        libc::EBADF
    );
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_WRONLY)),
        libc::EACCES
    );
    let attr = fuse::SetattrIn {
        size: 10,
        ..Default::default()
    };
    let (a, _) =
        f.fs.setattr(root(), file, attr, None, SetattrValid::SIZE)
            .unwrap();
    assert_eq!(a.size, 10);
}

/// An inode number freed and given to a new file must not inherit the old file's cached
/// permission profile: the cache keys carry the inode's generation.
#[test]
fn reused_inode_numbers_do_not_inherit_cached_profiles() {
    let f = fixture();
    let (old, h) = f.create(root(), ROOT, "open-to-all", 0o666).unwrap();
    f.fs.release(root(), old, 0, h, false, false, None).unwrap();
    // Bob opens it read-write: his profile of the inode is cached.
    let bh = f.open(ctx(BOB, BOB), old, libc::O_RDWR).unwrap();
    f.fs.release(root(), old, 0, bh, false, false, None)
        .unwrap();
    f.fs.unlink(root(), ROOT, &c("open-to-all")).unwrap();
    f.fs.forget(root(), old, 2);
    // A freed number is reused after the next commit, once allocation wraps around: create
    // root-private files until one takes it (same attr_gen as the old file's: both fresh).
    f.fs_ds().sync().unwrap();
    let total = f.fs_ds().statfs().unwrap().fd_total;
    let mut new = 0;
    for n in 0..total {
        let name = format!("private{n}");
        let i = f
            .fs_ds()
            .make_node(
                f.fs.root_ino(),
                name.as_bytes(),
                libc::S_IFREG | 0o600,
                0,
                0,
                0,
            )
            .unwrap();
        if i.ino == f.fs_ino(old) {
            f.fs.lookup(root(), ROOT, &c(&name)).unwrap();
            new = i.ino;
            break;
        }
    }
    assert_eq!(new, old, "the datastore did not reuse the inode number");
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), new, libc::O_RDONLY)),
        libc::EACCES
    );
}

#[test]
fn disconnect_drops_the_vms_cached_profiles() {
    let f = fixture();
    crate::fs::set_current_conn(7);
    f.fs.lookup(ctx(BOB, BOB), ROOT, &c("..")).unwrap();
    assert!(f.fs.settings().perm.stats().entries > 0);
    f.fs.disconnected(7);
    assert_eq!(f.fs.settings().perm.stats().entries, 0);
}
