//! No XDP program outlives its process: a process holding the steering program on an interface
//! is killed with SIGKILL (no destructor runs) and SIGTERM (default action), and the program is
//! gone from the interface right after. aya attaches through a bpf link, which the kernel
//! releases with the process's last reference to it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
