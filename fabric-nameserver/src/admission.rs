//! Connection admission: how many iSNSP connections the server holds at once, per host, per
//! network and in all. Pure bookkeeping (the listener asks, the connection thread releases);
//! no I/O here.
//!
//! Limits count address *prefixes*, not exact addresses, because a client chooses its exact
//! address cheaply: an IPv6 host picks any of the 2^64 addresses of its /64 (SLAAC, privacy
//! addresses), so the /64 is one host; an IPv4 attacker with a handful of addresses in one
//! subnet would otherwise fill every slot (8 addresses × 128). Two levels:
//! - a *host* (IPv4 /32, IPv6 /64) holds at most [`MAX_CONNECTIONS_PER_HOST`];
//! - a *network* (IPv4 /24, IPv6 /48: the usual smallest routed allocation, what one site or
//!   one attacker's rented block typically spans) holds at most
//!   [`MAX_CONNECTIONS_PER_NETWORK`], a quarter of the total: exhausting the server takes
//!   four distinct networks, while a SAN subnet of many hosts is still served;
//! - the server holds at most [`MAX_CONNECTIONS`] in all.
//!
//! An IPv4 peer on a dual-stack socket (`::ffff:a.b.c.d`) counts as its IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;

/// Most simultaneous client connections; more are accepted and closed at once. Each costs a
/// thread and up to one request being reassembled (`wire::MAX_MESSAGE_BYTES`).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most simultaneous connections from one host (IPv4 address, IPv6 /64). A host runs a few
/// iSNS clients (tgtd, iscsid, isnsdd, admin tools); 128 leaves room for load generators
/// (`isns-bench` uses up to 16) and many targets behind one address.
pub const MAX_CONNECTIONS_PER_HOST: usize = 128;
/// Most simultaneous connections from one network (IPv4 /24, IPv6 /48): a quarter of
/// [`MAX_CONNECTIONS`], so that one network cannot take every slot.
pub const MAX_CONNECTIONS_PER_NETWORK: usize = MAX_CONNECTIONS / 4;

/// The limits in force (tests shrink them; the server uses [`ConnLimits::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub total: usize,
    pub per_host: usize,
    pub per_network: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            total: MAX_CONNECTIONS,
            per_host: MAX_CONNECTIONS_PER_HOST,
            per_network: MAX_CONNECTIONS_PER_NETWORK,
        }
    }
}

/// An address prefix that connections are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefix {
    V4 { addr: u32, len: u8 },
    V6 { addr: u128, len: u8 },
}

fn prefix(ip: IpAddr, v4_len: u8, v6_len: u8) -> Prefix {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4_len)).unwrap_or(0);
            Prefix::V4 {
                addr: u32::from(a) & mask,
                len: v4_len,
            }
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6_len)).unwrap_or(0);
            Prefix::V6 {
                addr: u128::from(a) & mask,
                len: v6_len,
            }
        }
    }
}

/// The host a peer address counts as (IPv4 /32, IPv6 /64). Pure.
pub fn host_of(ip: IpAddr) -> Prefix {
    prefix(ip, 32, 64)
}

/// The network a peer address counts as (IPv4 /24, IPv6 /48). Pure.
pub fn network_of(ip: IpAddr) -> Prefix {
    prefix(ip, 24, 48)
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    Host,
    Network,
}

/// Open connections by prefix.
#[derive(Debug, Default)]
pub struct Admission {
    limits: ConnLimits,
    total: usize,
    counts: HashMap<Prefix, usize>,
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Admission {
        Admission {
            limits,
            total: 0,
            counts: HashMap::new(),
        }
    }

    /// Admits a connection from `ip` (counting it) or says which limit refuses it.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        let (h, n) = (host_of(ip), network_of(ip));
        let count = |p: &Prefix| self.counts.get(p).copied().unwrap_or(0);
        if self.total >= self.limits.total {
            return Err(Refusal::Total);
        }
        if count(&h) >= self.limits.per_host {
            return Err(Refusal::Host);
        }
        if count(&n) >= self.limits.per_network {
            return Err(Refusal::Network);
        }
        self.total += 1;
        *self.counts.entry(h).or_insert(0) += 1;
        *self.counts.entry(n).or_insert(0) += 1;
        Ok(())
    }

    /// Releases a connection admitted for `ip`.
    pub fn release(&mut self, ip: IpAddr) {
        for p in [host_of(ip), network_of(ip)] {
            if let Some(c) = self.counts.get_mut(&p) {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(&p);
                }
            }
        }
        self.total = self.total.saturating_sub(1);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    /// The production limits, reached: 128 per host, 256 per /24, 1024 in all, and an
    /// IPv6 /64 is one host however many addresses it uses.
    #[test]
    fn default_limits_are_reached_per_host_network_and_total() {
        let mut a = Admission::new(ConnLimits::default());
        for _ in 0..MAX_CONNECTIONS_PER_HOST {
            a.admit(v4(10, 0, 0, 1)).unwrap();
        }
        assert_eq!(a.admit(v4(10, 0, 0, 1)), Err(Refusal::Host));
        // The IPv4-mapped form is the same host.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(a.admit(mapped), Err(Refusal::Host));
        // Other addresses of the same /24 share the network's quarter.
        for i in 0..(MAX_CONNECTIONS_PER_NETWORK - MAX_CONNECTIONS_PER_HOST) {
            a.admit(v4(10, 0, 0, 2 + (i / 100) as u8)).unwrap();
        }
        assert_eq!(a.admit(v4(10, 0, 0, 200)), Err(Refusal::Network));
        // An IPv6 attacker rotating through its /64 is one host.
        for i in 0..MAX_CONNECTIONS_PER_HOST as u128 {
            let ip = Ipv6Addr::from(0x2001_0db8_0000_0001_0000_0000_0000_0000u128 | (i * 7919));
            a.admit(IpAddr::V6(ip)).unwrap();
        }
        let other = Ipv6Addr::from(0x2001_0db8_0000_0001_dead_beef_0000_0001u128);
        assert_eq!(a.admit(IpAddr::V6(other)), Err(Refusal::Host));
        // Fill the rest from distinct networks: the total limit, then nothing more.
        let mut net = 1u8;
        while a.open() < MAX_CONNECTIONS {
            let host = v4(10, 1, net, 1 + (a.open() % 2) as u8);
            match a.admit(host) {
                Ok(()) => {}
                Err(Refusal::Host | Refusal::Network) => net += 1,
                Err(Refusal::Total) => panic!("total refused at {}", a.open()),
            }
        }
        assert_eq!(a.open(), MAX_CONNECTIONS);
        assert_eq!(a.admit(v4(192, 168, 7, 7)), Err(Refusal::Total));
        // Releasing frees the slot for anyone.
        a.release(v4(10, 0, 0, 1));
        a.admit(v4(192, 168, 7, 7)).unwrap();
        assert_eq!(a.admit(v4(10, 0, 0, 1)), Err(Refusal::Total));
    }

    #[test]
    fn release_returns_counts_to_zero() {
        let mut a = Admission::new(ConnLimits::default());
        let ips = [
            v4(1, 2, 3, 4),
            v4(1, 2, 3, 5),
            "2001:db8::1".parse().unwrap(),
        ];
        for ip in ips {
            a.admit(ip).unwrap();
        }
        for ip in ips {
            a.release(ip);
        }
        assert_eq!(a.open(), 0);
        assert!(a.counts.is_empty());
    }
}
