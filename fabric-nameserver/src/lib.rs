//! Strata's SAN name server: a durable iSNS server (RFC 4171) with discovery-domain zoning
//! and state-change notification, administered over a JSON-RPC control socket.
//!
//! Map of the crate:
//! - [`wire`]: the iSNSP wire format — PDU header, TLVs, multi-PDU reassembly, reply
//!   splitting into ≤ 8 KiB PDUs. Pure.
//! - [`command`]: validation of a parsed request into a typed [`command::Command`]. Pure.
//! - [`registry`]: the state (entities, portals, nodes, portal groups, DDs, DD sets, policy),
//!   authorization (owner address, administrator-listed control nodes), soft zoning, and the
//!   execution of commands into replies (query plans encoded outside the lock), logged
//!   mutations and SCNs.
//! - [`store`]: the write-ahead log with group commit, snapshots and crash recovery (a torn
//!   tail is cut; corruption before it stops startup).
//! - [`esi`]: Entity Status Inquiry: probing portals that asked for it, deciding which
//!   are dead (pure message codec and schedule; the server thread applies the verdicts).
//! - [`scn`]: delivery of state-change notifications to clients' SCN ports, with retries.
//! - [`service`]: executes requests (iSNSP messages and control calls) against the registry,
//!   makes every change durable before answering, queues SCNs, counts; expiry, snapshot and
//!   ESI rounds.
//! - [`server`]: starts the service and its threads: the TCP listener and connection threads
//!   (per-PDU, per-message and per-reply deadlines), the control socket, housekeeping, ESI.
//! - [`admission`]: connection limits per host (IPv4 address, IPv6 /64), per network (IPv4
//!   /24, IPv6 /48) and in all. Pure.
//! - [`control`]: the JSON-RPC control socket behind `stratactl ns` (its method table, over
//!   the service).
//! - [`client`]: an iSNS client for a target daemon: registers its entity, portals and
//!   targets, answers ESI, re-registers after a name-server restart, takes SCNs, and answers
//!   discovery-domain access questions ([`client::DdAccess`]). Uses `wire` (and the shared
//!   constants of `registry`/`esi`); nothing on the server side uses it.
//!
//! Dependencies run one way: `server` → `control` → `service` → `registry`, `store`, `scn`.
//!
//! The binary `strata-nameserver` (src/bin) owns process concerns: command line, logging,
//! signals.

pub mod admission;
pub mod client;
pub mod command;
pub mod control;
pub mod esi;
pub mod registry;
pub mod scn;
pub mod server;
pub mod service;
pub mod store;
pub mod wire;
