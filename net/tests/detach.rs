//! No XDP program outlives its process: a process holding the steering program on an interface
//! is killed with SIGKILL (no destructor runs) and SIGTERM (default action), and the program is
//! gone from the interface right after. aya attaches through a bpf link, which the kernel
//! releases with the process's last reference to it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use common::{with_pair, VethPair};

fn killed_process_leaves_no_program(p: &VethPair, signal: libc::c_int) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &p.ns_b])
        .arg(env!("CARGO_BIN_EXE_steer-hold"))
        .arg(&p.vb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn steer-hold");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("child stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read child");
    assert!(line.starts_with("attached"), "child said {line:?}");
    assert!(p.xdp_attached(), "program attached by the child");
    let pid = i32::try_from(child.id()).expect("pid");
    // `ip netns exec` execs the program, so the child's pid is the holder's.
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    child.wait().expect("wait child");
    let end = Instant::now() + Duration::from_secs(2);
    while p.xdp_attached() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !p.xdp_attached(),
        "program left on vb after signal {signal}"
    );
}

#[test]
fn program_detached_when_holder_is_killed() {
    with_pair("program_detached_when_holder_is_killed", |p| {
        killed_process_leaves_no_program(p, libc::SIGKILL);
        killed_process_leaves_no_program(p, libc::SIGTERM);
    });
}

/// Loads a two-instruction XDP program (`return XDP_PASS`) named `name` with a raw
/// BPF_PROG_LOAD: "someone else's" program.
fn load_pass_program(name: &str) -> std::os::fd::OwnedFd {
    #[repr(C, align(8))]
    #[derive(Default)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    // mov64 r0, 2 (XDP_PASS); exit.
    let insns: [u64; 2] = [u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]), 0x95];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    attr.prog_name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for BPF_PROG_LOAD whose pointers
    // reference live buffers; its size is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor owned by nothing else.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

/// A netlink attachment (as DPDK's net_af_xdp PMD makes) outlives its loader: the steering
/// program left that way is detached by `detach_stale_steering`, another program is reported
/// by id and left alone.
#[test]
fn stale_steering_program_detached_foreign_one_refused() {
    use std::os::fd::AsRawFd;
    with_pair("stale_steering_program_detached_foreign_one_refused", |p| {
        let vb = p.vb.clone();
        VethPair::run_in(&p.ns_b, move || {
            let ifindex = ebpf::sys::if_index(&vb).expect("ifindex");
            assert_eq!(
                ebpf::detach_stale_steering(&vb).expect("nothing attached"),
                None
            );
            {
                let mut obj = aya::Ebpf::load(ebpf::steer_object()).expect("load object");
                let prog: &mut aya::programs::Xdp = obj
                    .program_mut("storage_steer")
                    .expect("program")
                    .try_into()
                    .expect("an XDP program");
                prog.load().expect("load program");
                let fd = prog.fd().expect("program fd");
                ebpf::sys::xdp_set_link_fd(ifindex, fd.as_fd().as_raw_fd(), 0)
                    .expect("netlink attach");
            } // the loader is gone; the program stays attached
            let id = ebpf::sys::xdp_prog_id(ifindex)
                .expect("query")
                .expect("left attached");
            assert_eq!(ebpf::detach_stale_steering(&vb).expect("detach"), Some(id));
            assert_eq!(ebpf::sys::xdp_prog_id(ifindex).expect("query"), None);

            let other = load_pass_program("someone_else");
            ebpf::sys::xdp_set_link_fd(ifindex, other.as_raw_fd(), 0).expect("attach other");
            let id = ebpf::sys::xdp_prog_id(ifindex)
                .expect("query")
                .expect("attached");
            let err = ebpf::detach_stale_steering(&vb).expect_err("not ours");
            assert!(
                matches!(err, ebpf::SteerError::OtherProgramAttached { id: i, .. } if i == id),
                "{err}"
            );
            assert!(err.to_string().contains(&id.to_string()), "{err}");
            assert_eq!(ebpf::sys::xdp_prog_id(ifindex).expect("query"), Some(id));
            ebpf::sys::xdp_detach_all(ifindex).expect("detach other");
            assert_eq!(ebpf::sys::xdp_prog_id(ifindex).expect("query"), None);
        });
    });
}
