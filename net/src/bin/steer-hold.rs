//! `steer-hold IFACE`: attaches the steering program (default ports) to IFACE, prints
//! "attached <mode>", holds it until stdin closes, then prints the counters and detaches.
//! A manual tool for trying steering on an interface, and the process net/tests/detach.rs
//! kills to check that the kernel removes the program however its holder dies.

use std::io::Read;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iface = std::env::args().nth(1).ok_or("usage: steer-hold IFACE")?;
    let ports = ebpf::DEFAULT_STEER_PORTS.map(ebpf::SteerPort::both);
    let mut steer = ebpf::Steering::load(&ports)?;
    let mode = steer.attach(&iface, ebpf::ModePreference::Auto)?;
    println!("attached {mode:?}");
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    println!("{:?}", steer.counters()?);
    Ok(())
}
